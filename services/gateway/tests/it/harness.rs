//! A gateway on a loopback port in front of a real nats-server, with nothing consuming, so a
//! test can count exactly what the gateway published.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::topology::Topology;
use testkit::{NatsServer, wait_until};

pub struct Gateway {
    pub nats: NatsServer,
    pub url: String,
    pub http: reqwest::Client,
    pub topology: Topology,
    stop: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

pub fn config(nats: &NatsServer, settings: &[(&str, Value)]) -> Config {
    // Fail fast when NATS is down: the 503 tests wait this long.
    let fail_fast = [("nats.request_timeout", Value::from("1s"))];
    testkit::config::config(&nats.url(), &[&fail_fast[..], settings].concat())
}

/// The stream and the bucket on `nats`, for a test to fill before a gateway starts.
pub async fn provision(nats: &NatsServer, settings: &[(&str, Value)]) -> Topology {
    testkit::config::provision(&config(nats, settings)).await
}

impl Gateway {
    pub async fn start(settings: &[(&str, Value)]) -> Self {
        Self::start_on(NatsServer::start(), settings).await
    }

    /// A gateway on a server that may already hold jobs.
    pub async fn start_on(nats: NatsServer, settings: &[(&str, Value)]) -> Self {
        testkit::init_logs();
        let config = config(&nats, settings);
        let topology = provision(&nats, settings).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                gateway::run(config, listener, stop)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        let gateway = Self {
            nats,
            url,
            http: reqwest::Client::new(),
            topology,
            stop,
            task,
        };
        gateway.wait_ready().await;
        gateway
    }

    pub async fn wait_ready(&self) {
        wait_until(
            "the gateway to be ready",
            Duration::from_secs(20),
            || async {
                let response = self
                    .http
                    .get(format!("{}/readyz", self.url))
                    .send()
                    .await
                    .ok()?;
                (response.status() == StatusCode::OK).then_some(())
            },
        )
        .await;
    }

    /// POSTs raw bytes with the given content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_raw(path, "application/json", body.to_string())
            .await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("GET");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Messages the gateway published on `jobs.requested.>`.
    pub async fn published(&self) -> usize {
        testkit::nats::count_messages(&self.topology.stream, "jobs.requested.>").await
    }

    /// Job status documents written (the bucket's keys that are job ids: the sweep's lease
    /// is not one).
    pub async fn recorded(&self) -> usize {
        use futures::StreamExt;
        match testkit::jobs::status_bucket(&self.topology)
            .await
            .keys()
            .await
        {
            Ok(keys) => {
                keys.filter(|key| {
                    let is_job = key
                        .as_ref()
                        .is_ok_and(|key| jetcall::JobId::parse(key).is_ok());
                    async move { is_job }
                })
                .count()
                .await
            }
            Err(_) => 0,
        }
    }

    /// Stops the gateway and hands back its server, for another one to start on.
    pub async fn stop(self) -> NatsServer {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("gateway stops within 10 s");
        assert_eq!(result.expect("gateway task"), Ok(()));
        self.nats
    }
}

pub fn article_job(job_id: &str) -> Value {
    serde_json::json!({
        "job_id": job_id,
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": "1.5 Ton, 5 Star, Dual Inverter",
        "callback_url": "http://127.0.0.1:9/webhooks/description"
    })
}

/// The `job_id`s of a `GET /api/v1/jobs` answer, in its order.
pub fn listed_ids(list: &Value) -> Vec<String> {
    list["jobs"]
        .as_array()
        .expect("a job list")
        .iter()
        .map(|job| job["job_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}
