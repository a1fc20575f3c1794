//! The whole deployment as real processes on loopback, a [`testkit::Deployment`]: nats-server
//! (one, or a three-node cluster), the gateway, generator and callback binaries (one or more
//! of each), a fake Claude and a recording webhook receiver in the test's process; with the
//! fault suite's settings and readiness checks.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use jetcall::signing::SigningKey;
use jetcall::topology::Topology;
pub use testkit::deployment::Nats;
use testkit::fake_anthropic::API_KEY;
use testkit::{Deployment, FakeAnthropic, Service, wait_until};

/// The generator's `ack_wait`: short, so a killed generator's jobs come back quickly, and
/// shorter than the stalled LLM calls of the flaky-model scenario.
pub const ACK_WAIT: Duration = Duration::from_secs(2);
/// LLM calls in flight per generator: few, so a run lasts long enough to be interrupted.
const GENERATOR_CONCURRENCY: usize = 16;
/// Every answer of the fake Claude takes this long, unless scripted otherwise.
const LLM_DELAY: Duration = Duration::from_millis(100);
/// The receiver takes this long to answer each webhook, so a few deliveries are always in
/// flight for a fault to interrupt.
const RECEIVER_DELAY: Duration = Duration::from_millis(50);
/// Long enough to outlast the receiver's downtime, short enough that a dead endpoint's jobs
/// are given up within a scenario (4.5 s of retries).
const RETRY_SCHEDULE: [&str; 7] = ["100ms", "200ms", "400ms", "800ms", "1s", "1s", "1s"];
/// Deliveries in flight per destination and callback instance (the default), which bounds
/// the deliveries a fault can leave made but unrecorded.
pub const PER_HOST_CONCURRENCY: usize = 32;
const READY: Duration = Duration::from_secs(30);

/// What to start.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// A three-node cluster with replicas 3 instead of one nats-server.
    pub cluster: bool,
    /// Instances of each service.
    pub instances: usize,
}

impl Shape {
    pub const SINGLE: Shape = Shape {
        cluster: false,
        instances: 1,
    };
}

/// The deployment (NATS, the services as `gateways`, `generators` and `callbacks`, the fake
/// Claude as `llm()`, the receiver as `receiver()`) and what the suite needs beside it.
#[derive(Debug)]
pub struct Stack {
    pub deployment: Deployment,
    pub secret: String,
    /// The test's own view of NATS, for status documents and stream counts.
    pub topology: Topology,
    pub http: reqwest::Client,
    /// A deliberately dead webhook endpoint: every connection to it is refused.
    pub dead_url: String,
    _dead_port: testkit::ClosedPort,
}

impl Deref for Stack {
    type Target = Deployment;

    fn deref(&self) -> &Deployment {
        &self.deployment
    }
}

impl DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut Deployment {
        &mut self.deployment
    }
}

/// The configuration every process shares, as dotted keys.
fn settings(
    nats_url: &str,
    replicas: usize,
    llm: &FakeAnthropic,
    secret: &str,
) -> Vec<(&'static str, Value)> {
    vec![
        ("nats.url", json!(nats_url)),
        ("nats.replicas", json!(replicas)),
        ("nats.request_timeout", json!("2s")),
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(API_KEY)),
        ("anthropic.base_url", json!(llm.base_url())),
        (
            "generator.ack_wait",
            json!(format!("{}ms", ACK_WAIT.as_millis())),
        ),
        ("generator.concurrency", json!(GENERATOR_CONCURRENCY)),
        ("callback.signing_secret", json!(secret)),
        // The receivers listen on loopback, which the default allowlist refuses.
        (
            "gateway.callback_allowlist",
            json!(testkit::config::LOOPBACK_ALLOWLIST),
        ),
        ("callback.retry_schedule", json!(RETRY_SCHEDULE)),
        ("callback.timeout", json!("2s")),
        ("callback.breaker_cooldown", json!("1s")),
        ("callback.per_host_concurrency", json!(PER_HOST_CONCURRENCY)),
    ]
}

/// `JETCALL_<SECTION>__<KEY>` variables for `settings`; strings quoted, so a comma-separated
/// URL list stays one string.
fn environment(settings: &[(&str, Value)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = settings
        .iter()
        .map(|(key, value)| {
            let name = format!("JETCALL_{}", key.replace('.', "__").to_ascii_uppercase());
            (name, value.to_string())
        })
        .collect();
    env.extend(
        [
            ("JETCALL_CONFIG", "/dev/null"),
            ("RUST_LOG", "info,async_nats=warn"),
            ("NO_COLOR", "1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    env
}

impl Stack {
    pub async fn start(shape: Shape) -> Self {
        testkit::init_logs();
        let mut builder = Deployment::builder().fake_llm().receiver();
        let replicas = if shape.cluster {
            builder = builder.cluster(3);
            3
        } else {
            1
        };
        let mut deployment = builder.start().await.unwrap_or_else(|err| panic!("{err}"));
        deployment.llm().set_delay(LLM_DELAY);
        deployment.receiver().set_delay(RECEIVER_DELAY);
        let secret = SigningKey::generate();
        let nats_url = deployment.nats_url();
        let settings = settings(&nats_url, replicas, deployment.llm(), &secret);
        let config = testkit::config::config(&nats_url, &settings);

        // Provisioned here first, which also waits for a cluster's JetStream to be up.
        let client = jetcall::connect::connect(&config, "jetcall-fault-suite")
            .await
            .expect("connect to NATS");
        let topology = tokio::time::timeout(
            READY,
            jetcall::connect::provision_with_retry(
                &client,
                &config,
                jetcall::topology::Provisioner::Operator,
                &CancellationToken::new(),
            ),
        )
        .await
        .expect("JetStream ready within 30 s")
        .expect("provision");

        deployment.set_env(environment(&settings));
        let label = |service: Service, i: usize| match shape.instances {
            1 => service.name().to_owned(),
            _ => format!("{}-{}", service.name(), i + 1),
        };
        let dead_port = testkit::ClosedPort::reserve();
        for service in Service::ALL {
            for i in 0..shape.instances {
                deployment
                    .start_service(service, &label(service, i), None, &[])
                    .unwrap_or_else(|err| panic!("{err}"));
            }
        }

        let stack = Self {
            deployment,
            secret,
            topology,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
            dead_url: dead_port.url("/dead"),
            _dead_port: dead_port,
        };
        for i in 0..stack.gateways.len() {
            stack.wait_gateway_ready(i).await;
        }
        for i in 0..stack.generators.len() {
            stack.wait_generator_ready(i).await;
        }
        for i in 0..stack.callbacks.len() {
            stack.wait_callback_ready(i).await;
        }
        stack
    }

    async fn wait_ready(&self, what: &str, url: &str) {
        wait_until(&format!("{what} to be ready"), READY, || async {
            let response = self.http.get(url).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
    }

    pub async fn wait_gateway_ready(&self, i: usize) {
        let gateway = &self.gateways[i];
        self.wait_ready(gateway.process.name(), &format!("{}/readyz", gateway.url))
            .await;
    }

    pub async fn wait_generator_ready(&self, i: usize) {
        let generator = &self.generators[i];
        self.wait_ready(
            generator.process.name(),
            &format!("{}/readyz", generator.url),
        )
        .await;
    }

    pub async fn wait_callback_ready(&self, i: usize) {
        let callback = &self.callbacks[i];
        self.wait_ready(callback.process.name(), &format!("{}/readyz", callback.url))
            .await;
    }

    /// `/metrics` of generator `i`.
    pub async fn generator_metrics(&self, i: usize) -> String {
        self.http
            .get(format!("{}/metrics", self.generators[i].url))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // TEST_LOG asks for all of the services' logs, even when the scenario passes.
        if std::env::var_os("TEST_LOG").is_some() {
            eprintln!("--- the services' logs ---\n{}", self.log_tails(usize::MAX));
        } else if std::thread::panicking() {
            eprintln!(
                "--- the services' last log lines ---\n{}",
                self.log_tails(40)
            );
        }
    }
}
