//! A throwaway Jetcall installation: nats-server with a fresh JetStream store, and the
//! gateway, generator and callback services, all in one temporary directory.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use tokio::process::Command;

use crate::poll;
use crate::procs::Proc;
use crate::workspace::Workspace;

/// Started in this order, stopped before nats-server.
pub const SERVICES: [&str; 3] = ["gateway", "generator", "callback"];
/// How long a process may take to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Stack {
    /// The nats-server this stack started; `None` for one started by someone else (a cluster).
    nats: Option<Proc>,
    services: Vec<Proc>,
    /// Set for every service `spawn_service` starts, under its own `envs`.
    common_env: Vec<(String, String)>,
    nats_url: String,
    gateway: Option<SocketAddr>,
    // Last, so that on an error path it is deleted only after the processes writing to
    // it have been killed.
    dir: tempfile::TempDir,
}

/// What nats-server writes to `--ports_file_dir` once it listens.
#[derive(Deserialize)]
struct Ports {
    nats: Vec<String>,
}

impl Stack {
    /// Starts nats-server on a free port and waits until it listens.
    pub async fn start(nats_server: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("jetcall-demo-")
            .tempdir()
            .context("creating a temporary directory")?;
        std::fs::create_dir(dir.path().join("logs")).context("creating the logs directory")?;
        let mut cmd = Command::new(nats_server);
        // nats-server keeps its store in a `jetstream` directory under `-sd`.
        cmd.arg("-js")
            .arg("-sd")
            .arg(dir.path())
            .args(["-a", "127.0.0.1", "-p", "-1", "-m", "-1"])
            .arg("--ports_file_dir")
            .arg(dir.path());
        let mut nats = Proc::spawn("nats-server", cmd, dir.path().join("logs/nats-server.log"))?;
        let pid = nats.pid().context("nats-server exited at once")?;
        let ports_file = dir.path().join(format!("nats-server_{pid}.ports"));
        let nats_url = poll::until(
            "nats-server to write its ports file",
            Duration::from_secs(10),
            async || {
                nats.check_running()?;
                Ok(read_nats_url(&ports_file))
            },
        )
        .await
        // The temporary directory goes with this error, so the log is quoted, not named.
        .with_context(|| format!("nats-server did not start:\n{}", nats.log_tail(20)))?;
        Ok(Self {
            nats: Some(nats),
            services: Vec::new(),
            common_env: Vec::new(),
            nats_url,
            gateway: None,
            dir,
        })
    }

    /// A stack whose services use the NATS server(s) at `nats_url`, started by the caller,
    /// each service also given `common_env` (e.g. the replicas of a cluster).
    pub fn beside(nats_url: String, common_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("jetcall-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        std::fs::create_dir(dir.path().join("logs")).context("creating the logs directory")?;
        Ok(Self {
            nats: None,
            services: Vec::new(),
            common_env: common_env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            nats_url,
            gateway: None,
            dir,
        })
    }

    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// The gateway's base URL, once the services are started.
    pub fn gateway_url(&self) -> anyhow::Result<String> {
        let addr = self.gateway.context("the gateway has not been started")?;
        Ok(format!("http://{addr}"))
    }

    /// Starts the three services built by cargo: the gateway listening on `gateway`, the
    /// callback signing webhooks with `signing_secret`.
    pub fn start_services(
        &mut self,
        ws: &Workspace,
        gateway: SocketAddr,
        signing_secret: &str,
    ) -> anyhow::Result<()> {
        for name in SERVICES {
            let mut cmd = Command::new(ws.debug_bin(name));
            // The services read `jetcall.toml` from their working directory; the demo
            // must not pick up whatever one lies where the user happens to be.
            // The demo's receiver listens on loopback, which the default allowlist refuses;
            // the callback reads the allowlist too, to check addresses at delivery.
            cmd.current_dir(self.dir.path())
                .env("NATS_URL", &self.nats_url)
                .env("JETCALL_LOG__FORMAT", "text")
                .env("JETCALL_GATEWAY__CALLBACK_ALLOWLIST", r#"["127.0.0.1"]"#);
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info");
            }
            match name {
                "gateway" => cmd.env("JETCALL_GATEWAY__LISTEN", gateway.to_string()),
                "callback" => cmd
                    .env("JETCALL_CALLBACK__SIGNING_SECRET", signing_secret)
                    .env(
                        "JETCALL_CALLBACK__LISTEN",
                        free_addr(Some(8082))?.to_string(),
                    ),
                // The generator inherits ANTHROPIC_API_KEY, if any, like every variable.
                _ => cmd.env(
                    "JETCALL_GENERATOR__LISTEN",
                    free_addr(Some(8081))?.to_string(),
                ),
            };
            let log = self.logs_dir().join(format!("{name}.log"));
            self.services.push(Proc::spawn(name, cmd, log)?);
        }
        self.gateway = Some(gateway);
        Ok(())
    }

    /// Starts one service binary with `envs` on top of `NATS_URL`; returns its pid.
    pub fn spawn_service(
        &mut self,
        name: &str,
        program: &Path,
        envs: &[(&str, String)],
    ) -> anyhow::Result<u32> {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.dir.path())
            .env("NATS_URL", &self.nats_url)
            .env("RUST_LOG", "warn")
            .envs(self.common_env.iter().map(|(key, value)| (key, value)))
            .envs(envs.iter().map(|(key, value)| (*key, value.as_str())));
        let log = self.logs_dir().join(format!("{name}.log"));
        let proc = Proc::spawn(name, cmd, log)?;
        let pid = proc.pid().context("the service exited at once")?;
        self.services.push(proc);
        Ok(pid)
    }

    /// Waits for the gateway's `/readyz`, failing early if any process exits.
    pub async fn wait_ready(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.gateway_url()?);
        poll::until(
            "the gateway's /readyz",
            Duration::from_secs(30),
            async || {
                self.check_running()?;
                let ready = client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|response| response.status() == reqwest::StatusCode::OK);
                Ok(ready.then_some(()))
            },
        )
        .await
    }

    /// Fails if any process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(nats) = &mut self.nats {
            nats.check_running()?;
        }
        self.services.iter_mut().try_for_each(Proc::check_running)
    }

    /// Resolves, with the reason, once any process has exited.
    pub async fn watch(&mut self) -> anyhow::Error {
        loop {
            if let Err(error) = self.check_running() {
                return error;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Prints the end of each service's log, and of nats-server's if it has stopped
    /// (while it runs its log is a start-up banner), for a failure report.
    pub fn print_log_tails(&mut self) {
        let nats = self
            .nats
            .as_mut()
            .and_then(|nats| nats.check_running().is_err().then_some(&*nats));
        for proc in self.services.iter().chain(nats) {
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                proc.name(),
                proc.log().display(),
                proc.log_tail(20)
            );
        }
    }

    /// Stops the services, then nats-server (which they need while shutting down), and
    /// deletes the temporary directory. Reports every process that did not exit cleanly.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for service in &mut self.services {
            if let Err(error) = service.terminate() {
                problems.push(format!("{error:#}"));
            }
        }
        for service in &mut self.services {
            if let Err(error) = service.finish(GRACE).await {
                problems.push(format!("{error:#}"));
            }
        }
        if let Some(nats) = &mut self.nats {
            let stopped = nats.terminate();
            if let Err(error) = stopped.and(nats.finish(GRACE).await) {
                problems.push(format!("{error:#}"));
            }
        }
        let dir = self.dir.path().display().to_string();
        if let Err(error) = self.dir.close() {
            problems.push(format!("removing {dir}: {error}"));
        }
        anyhow::ensure!(
            problems.is_empty(),
            "shutdown was not clean:\n  {}",
            problems.join("\n  ")
        );
        Ok(())
    }
}

/// The client URL from nats-server's ports file, once the file is complete.
fn read_nats_url(ports_file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(ports_file).ok()?;
    let ports: Ports = serde_json::from_str(&text).ok()?;
    ports.nats.into_iter().next()
}

/// A loopback address that is free now: `preferred` if it is, else one the kernel picks.
pub fn free_addr(preferred: Option<u16>) -> anyhow::Result<SocketAddr> {
    let listener = preferred
        .and_then(|port| TcpListener::bind(("127.0.0.1", port)).ok())
        .map_or_else(|| TcpListener::bind("127.0.0.1:0"), Ok)
        .context("finding a free port")?;
    listener.local_addr().context("reading a port number")
}
