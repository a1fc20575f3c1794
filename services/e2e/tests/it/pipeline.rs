//! The whole pipeline in one process: a real nats-server, the gateway on a loopback port, the
//! generator and the callback service as tasks, each stoppable on its own.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::signing::SigningKey;
use jetcall::topology::Topology;
use testkit::{NatsServer, wait_until};

type Service = (CancellationToken, JoinHandle<Result<(), String>>);

pub struct Pipeline {
    nats: NatsServer,
    pub config: Config,
    pub secret: String,
    pub gateway_url: String,
    pub http: reqwest::Client,
    pub topology: Topology,
    services: Vec<(&'static str, Service)>,
    /// Each generator's and callback's `/healthz`, `/readyz` and `/metrics` base URL.
    admin_urls: Vec<(&'static str, String)>,
}

/// Configuration for a test: the given NATS server, a fresh signing secret, and `settings`
/// (dotted keys, e.g. `("callback.retry_schedule", json!(["100ms"]))`) on top.
pub fn test_config(nats: &NatsServer, secret: &str, settings: &[(&str, Value)]) -> Config {
    let base = [
        ("callback.signing_secret", Value::from(secret)),
        ("generator.provider", Value::from("offline")),
    ];
    testkit::config::config(&nats.url(), &[&base[..], settings].concat())
}

impl Pipeline {
    pub async fn start(settings: &[(&str, Value)]) -> Self {
        testkit::init_logs();
        let nats = NatsServer::start();
        let secret = SigningKey::generate();
        let config = test_config(&nats, &secret, settings);

        let topology = testkit::config::provision(&config).await;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let gateway_url = format!("http://{}", listener.local_addr().expect("addr"));
        let mut pipeline = Self {
            nats,
            config: config.clone(),
            secret,
            gateway_url,
            http: reqwest::Client::new(),
            topology,
            services: Vec::new(),
            admin_urls: Vec::new(),
        };
        let token = CancellationToken::new();
        let handle = tokio::spawn({
            let (config, token) = (config.clone(), token.clone());
            async move {
                gateway::run(config, listener, token)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        pipeline.services.push(("gateway", (token, handle)));
        pipeline.start_generator();
        pipeline.start_callback();
        pipeline.wait_ready().await;
        pipeline
    }

    pub fn start_generator(&mut self) {
        let token = CancellationToken::new();
        let (config, stop) = (self.config.clone(), token.clone());
        let listener = testkit::loopback_listener();
        self.admin_urls.push(("generator", admin_url(&listener)));
        let handle = tokio::spawn(async move {
            generator::run(config, listener, stop)
                .await
                .map_err(|e| e.to_string())
        });
        self.services.push(("generator", (token, handle)));
    }

    pub fn start_callback(&mut self) {
        let token = CancellationToken::new();
        let (config, stop) = (self.config.clone(), token.clone());
        let listener = testkit::loopback_listener();
        self.admin_urls.push(("callback", admin_url(&listener)));
        let handle = tokio::spawn(async move {
            callback::run(config, listener, stop)
                .await
                .map_err(|e| e.to_string())
        });
        self.services.push(("callback", (token, handle)));
    }

    /// The base URL of the admin surface of the `service` (generator or callback) started
    /// last.
    pub fn admin_url(&self, service: &str) -> &str {
        self.admin_urls
            .iter()
            .rev()
            .find(|(name, _)| *name == service)
            .map(|(_, url)| url.as_str())
            .unwrap_or_else(|| panic!("no {service} was started"))
    }

    async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.gateway_url);
        wait_until(
            "the gateway to be ready",
            Duration::from_secs(20),
            || async {
                let response = self.http.get(&url).send().await.ok()?;
                (response.status() == StatusCode::OK).then_some(())
            },
        )
        .await;
    }

    /// The text of the `service`'s `/metrics`.
    /// The admin URLs of every `service` started, first started first.
    pub fn admin_urls(&self, service: &str) -> Vec<String> {
        self.admin_urls
            .iter()
            .filter(|(name, _)| *name == service)
            .map(|(_, url)| url.clone())
            .collect()
    }

    /// The metrics of the `service` started last.
    pub async fn metrics(&self, service: &str) -> String {
        self.metrics_at(self.admin_url(service)).await
    }

    /// The metrics of the service whose admin URL is `admin_url`.
    pub async fn metrics_at(&self, admin_url: &str) -> String {
        let url = format!("{admin_url}/metrics");
        let response = self.http.get(&url).send().await.expect("GET /metrics");
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        response.text().await.expect("the metrics text")
    }

    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    /// Kills nats-server and starts it again on the same port and store, as a crash and an
    /// operator's restart would.
    pub fn restart_nats(&mut self) {
        self.nats.restart();
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.gateway_url))
            .json(body)
            .send()
            .await
            .expect("POST to the gateway");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .delete(format!("{}{path}", self.gateway_url))
            .send()
            .await
            .expect("DELETE to the gateway");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn status(&self, job_id: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}/api/v1/jobs/{job_id}", self.gateway_url))
            .send()
            .await
            .expect("GET from the gateway");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the job's status document says `status`, and returns the document.
    pub async fn wait_for_status(&self, job_id: &str, status: &str, timeout: Duration) -> Value {
        wait_until(&format!("job {job_id} to be {status}"), timeout, || async {
            let (_, doc) = self.status(job_id).await;
            (doc["status"] == status).then_some(doc)
        })
        .await
    }

    /// How many events on `filter` once there are at least `at_least`: for events published
    /// just after the status a test waited for.
    pub async fn count_at_least(&self, filter: &str, at_least: usize) -> usize {
        testkit::nats::count_at_least(&self.topology.stream, filter, at_least).await
    }

    /// Stops every service gracefully and checks that each returned cleanly.
    pub async fn stop(mut self) {
        for (_, (token, _)) in &self.services {
            token.cancel();
        }
        for (name, (_, handle)) in self.services.drain(..) {
            let result = tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .unwrap_or_else(|_| panic!("{name} did not stop within 20 s"));
            assert_eq!(
                result.expect("service task panicked"),
                Ok(()),
                "{name} failed"
            );
        }
    }
}

fn admin_url(listener: &tokio::net::TcpListener) -> String {
    format!("http://{}", listener.local_addr().expect("local address"))
}
