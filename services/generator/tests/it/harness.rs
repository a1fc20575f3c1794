//! A real nats-server with the topology, a fake Claude, and jobs submitted the way the
//! gateway does it (status document first, then the request event).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::events::JobRequested;
use jetcall::status::JobStatus;
use jetcall::subjects::Event;
use jetcall::topology::Topology;
use jetcall::{JobId, Kind};
use testkit::fake_anthropic::API_KEY;
use testkit::{FakeAnthropic, NatsServer, wait_until};

pub struct Harness {
    pub nats: NatsServer,
    pub claude: FakeAnthropic,
    pub config: Config,
    pub topology: Topology,
}

impl Harness {
    pub async fn start(settings: &[(&str, Value)]) -> Self {
        Self::start_with(FakeAnthropic::start().await, settings).await
    }

    /// As [`Harness::start`], against a Claude started by the test (over HTTPS, say).
    pub async fn start_with(claude: FakeAnthropic, settings: &[(&str, Value)]) -> Self {
        testkit::init_logs();
        let nats = NatsServer::start();
        let claude_settings = [
            ("generator.provider", Value::from("anthropic")),
            ("anthropic.api_key", Value::from(API_KEY)),
            ("anthropic.base_url", Value::from(claude.base_url())),
        ];
        let config =
            testkit::config::config(&nats.url(), &[&claude_settings[..], settings].concat());
        let topology = testkit::config::provision(&config).await;
        Self {
            nats,
            claude,
            config,
            topology,
        }
    }

    /// Environment for a generator child process with this harness's configuration.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NATS_URL", self.nats.url()),
            ("JETCALL_CONFIG", "/dev/null".into()),
            ("JETCALL_GENERATOR__PROVIDER", "anthropic".into()),
            ("JETCALL_GENERATOR__LISTEN", "127.0.0.1:0".into()),
            ("ANTHROPIC_API_KEY", API_KEY.into()),
            ("ANTHROPIC_BASE_URL", self.claude.base_url()),
            (
                "JETCALL_GENERATOR__ACK_WAIT",
                humantime(self.config.generator.ack_wait),
            ),
        ]
    }

    /// Starts the generator binary with this harness's configuration and `extra` variables;
    /// it dies with the test.
    pub fn spawn_generator(&self, extra: &[(&str, String)]) -> Child {
        let mut command = Command::new(env!("CARGO_BIN_EXE_generator"));
        command
            .envs(self.child_env())
            .envs(extra.iter().map(|(key, value)| (*key, value.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        testkit::procs::die_with_parent(&mut command);
        command.spawn().expect("start the generator binary")
    }

    /// Runs a generator in this process; its health and metrics are served at the address.
    pub fn run_generator(&self) -> (RunningGenerator, SocketAddr) {
        let listener = testkit::loopback_listener();
        let address = listener.local_addr().expect("local address");
        let stop = CancellationToken::new();
        let task = tokio::spawn(generator::run(self.config.clone(), listener, stop.clone()));
        (RunningGenerator { stop, task }, address)
    }

    /// Submits a product-description job as the gateway would.
    pub async fn submit(&self, job_id: &str) {
        let input = json!({"product_id": "P-1", "product_name": job_id, "specs": "3 blades"});
        self.submit_kind(job_id, Kind::product_description(), input)
            .await;
    }

    /// Submits a job of any kind as the gateway would.
    pub async fn submit_kind(&self, job_id: &str, kind: Kind, input: Value) {
        self.submit_request(&request(job_id, kind, input)).await;
    }

    /// Submits `request` as the gateway would: its status document, then its request event.
    pub async fn submit_request(&self, request: &JobRequested) {
        self.topology
            .status
            .create(&JobStatus::accepted(request, "digest".into()))
            .await
            .expect("status document");
        self.publish_request(request, &Event::Requested.msg_id(&request.job_id))
            .await;
    }

    /// Publishes a request event with a chosen `Nats-Msg-Id`: a fresh one makes a second
    /// delivery of the same job, as a replay by an operator or a duplicate-window miss would.
    pub async fn publish_request(&self, request: &JobRequested, msg_id: &str) {
        let payload = serde_json::to_vec(request).expect("JSON");
        self.topology
            .jetstream
            .send_publish(
                request.subject(),
                PublishMessage::build()
                    .payload(payload.into())
                    .message_id(msg_id),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    pub async fn status(&self, job_id: &str) -> Option<JobStatus> {
        let id = JobId::parse(job_id).expect("valid id");
        self.topology
            .status
            .get(&id)
            .await
            .expect("status store")
            .map(|(doc, _)| doc)
    }

    pub async fn wait_for_status(&self, job_id: &str, status: &str) -> JobStatus {
        wait_until(
            &format!("job {job_id} to be {status}"),
            Duration::from_secs(30),
            || async {
                self.status(job_id)
                    .await
                    .filter(|doc| doc.status.as_str() == status)
            },
        )
        .await
    }

    /// Waits until the `generator` consumer has nothing pending or unacknowledged.
    pub async fn wait_until_consumer_idle(&self) {
        wait_until(
            "the generator consumer to be idle",
            Duration::from_secs(30),
            || async {
                let mut consumer = self.topology.generator_consumer().await.ok()?;
                let info = consumer.info().await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
            },
        )
        .await
    }

    pub async fn count(&self, filter: &str) -> usize {
        testkit::nats::count_messages(&self.topology.stream, filter).await
    }

    /// How many events on `filter` once there are at least `at_least`: for events published
    /// just after the status a test waited for.
    pub async fn count_at_least(&self, filter: &str, at_least: usize) -> usize {
        testkit::nats::count_at_least(&self.topology.stream, filter, at_least).await
    }
}

/// A generator running in the test's process.
#[derive(Debug)]
pub struct RunningGenerator {
    stop: CancellationToken,
    task: JoinHandle<Result<(), generator::GeneratorError>>,
}

impl RunningGenerator {
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("generator task")
            .expect("generator stops cleanly");
    }
}

/// An interactive job's request, with a callback URL nothing listens on.
pub fn request(job_id: &str, kind: Kind, input: Value) -> JobRequested {
    JobRequested {
        job_id: JobId::parse(job_id).expect("valid id"),
        kind,
        input: input.as_object().cloned().unwrap_or_else(Map::new),
        callback_url: jetcall::allowlist::CallbackUrl::parse("http://127.0.0.1:9/cb")
            .expect("a callback URL"),
        metadata: Default::default(),
        requested_at: OffsetDateTime::now_utc(),
        expires_at: None,
        tenant: None,
        priority: Default::default(),
    }
}

fn humantime(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}
