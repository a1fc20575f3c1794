//! A gateway on a loopback port in front of a real nats-server, as the gateway's own tests
//! start it, and the built `jetcall` binary pointed at it.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jetcall::status::Status;
use jetcall::topology::Topology;
use jetcall::{Config, JobId};
use testkit::{NatsServer, wait_until};

pub const CALLBACK: &str = "http://127.0.0.1:9/webhooks/description";

/// What a finished `jetcall` run left.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("stdout is not one JSON document ({err}): {self:?}"))
    }
}

/// `jetcall` with a clean environment of its own settings, so the developer's never leak in.
pub fn jetcall() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jetcall"));
    command
        .env_remove("JETCALL_GATEWAY")
        .env_remove("JETCALL_API_KEY")
        .env_remove("JETCALL_CONFIG")
        .env_remove("NATS_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `jetcall args…` to its end, within a minute.
pub async fn run(command: &mut Command) -> Run {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("jetcall finishes within 60 s")
        .expect("jetcall runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub struct Stack {
    /// Kept so the server lives as long as the stack.
    _nats: NatsServer,
    pub url: String,
    pub topology: Topology,
    config: Config,
    address: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Stack {
    pub async fn start(settings: &[(&str, Value)]) -> Self {
        testkit::init_logs();
        let nats = NatsServer::start();
        let config = testkit::config::config(&nats.url(), settings);
        let topology = testkit::config::provision(&config).await;
        let listener = testkit::loopback_listener();
        let address = listener.local_addr().expect("address");
        let mut stack = Self {
            _nats: nats,
            url: format!("http://{address}"),
            topology,
            config,
            address,
            stop: CancellationToken::new(),
            task: None,
        };
        stack.serve(listener).await;
        stack
    }

    async fn serve(&mut self, listener: TcpListener) {
        self.stop = CancellationToken::new();
        self.task = Some(tokio::spawn({
            let (config, stop) = (self.config.clone(), self.stop.clone());
            async move {
                gateway::run(config, listener, stop)
                    .await
                    .expect("the gateway runs");
            }
        }));
        self.wait_ready().await;
    }

    /// Stops the gateway, as a deployment would; its event streams end.
    pub async fn stop_gateway(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the gateway stops within 10 s")
                .expect("the gateway task");
        }
    }

    /// Starts a gateway again on the same address.
    pub async fn start_gateway(&mut self) {
        let listener = TcpListener::bind(self.address)
            .await
            .expect("bind the gateway's address again");
        self.serve(listener).await;
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let readyz = format!("{}/readyz", self.url);
        wait_until(
            "the gateway to be ready",
            Duration::from_secs(20),
            || async {
                let response = http.get(&readyz).send().await.ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
    }

    /// `jetcall --gateway <this gateway> args…`.
    pub fn jetcall(&self, args: &[&str]) -> Command {
        let mut command = jetcall();
        command.arg("--gateway").arg(&self.url).args(args);
        command
    }

    pub async fn run(&self, args: &[&str]) -> Run {
        run(&mut self.jetcall(args)).await
    }

    /// Requests the gateway published on `jobs.requested.>`.
    pub async fn published(&self) -> usize {
        testkit::nats::count_messages(&self.topology.stream, "jobs.requested.>").await
    }

    /// A sample of the gateway's `/metrics`.
    pub async fn metric(&self, metric: &str, labels: &[&str]) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text");
        testkit::metrics::sample(&text, metric, labels)
    }

    /// Moves a job on as the generator and the callback service would.
    pub async fn advance(&self, job_id: &str, next: Status) {
        let id = JobId::parse(job_id).expect("job id");
        self.topology
            .status
            .update(&id, |doc| doc.advance(next, OffsetDateTime::now_utc()))
            .await
            .expect("status update");
    }

    pub async fn stop(mut self) {
        self.stop_gateway().await;
    }
}

/// A running `jetcall` whose output is read line by line.
pub struct Running {
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Running {
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("jetcall starts");
        let stdout = child.stdout.take().expect("piped stdout");
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next line it prints, within 20 s.
    pub async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("a line within 20 s")
            .expect("read stdout")
            .expect("a line before the end of stdout")
    }

    /// Its exit code, within 20 s.
    pub async fn exit_code(mut self) -> Option<i32> {
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("jetcall exits within 20 s")
            .expect("wait for jetcall")
            .code()
    }
}
