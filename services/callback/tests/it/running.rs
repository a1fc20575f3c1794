//! A callback service run in this process on a fresh nats-server, its admin surface on a
//! loopback port, and seeded completed jobs for it to deliver.

use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jetcall::JobId;
use jetcall::signing::SigningKey;
use jetcall::status::{JobStatus, Status};
use jetcall::topology::Topology;
use testkit::{NatsServer, wait_until};

pub const WAIT: Duration = Duration::from_secs(30);

/// A callback service in this process, its admin surface on a loopback port.
pub struct Running {
    pub nats: NatsServer,
    pub topology: Topology,
    pub admin: String,
    pub http: reqwest::Client,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), callback::CallbackError>>,
}

impl Running {
    pub async fn start(settings: &[(&str, Value)]) -> Self {
        testkit::init_logs();
        let nats = NatsServer::start();
        let secret = SigningKey::generate();
        let base = [("callback.signing_secret", Value::from(secret))];
        let config = testkit::config::config(&nats.url(), &[&base[..], settings].concat());
        let topology = testkit::config::provision(&config).await;
        let listener = testkit::loopback_listener();
        let admin = format!("http://{}", listener.local_addr().expect("local address"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(callback::run(config, listener, stop.clone()));
        let running = Self {
            nats,
            topology,
            admin,
            http: reqwest::Client::new(),
            stop,
            task,
        };
        wait_until("the callback to be ready", WAIT, || async {
            (running.get("/readyz").await.0 == 200).then_some(())
        })
        .await;
        running
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.admin)).send().await {
            Ok(response) => (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    }

    pub async fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {text}");
        text
    }

    /// Waits until a scrape satisfies `check`; returns that scrape.
    pub async fn wait_for_metrics(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        wait_until(what, WAIT, || async {
            let metrics = self.metrics().await;
            check(&metrics).then_some(metrics)
        })
        .await
    }

    pub async fn completed(&self, job_id: &str, url: &str) {
        testkit::jobs::completed_job(&self.topology, job_id, url)
            .await
            .expect("a completed job");
    }

    pub async fn wait_for_status(&self, job_id: &str, status: Status) {
        let id = JobId::parse(job_id).expect("id");
        wait_until(&format!("{job_id} {status:?}"), WAIT, || async {
            let (doc, _) = self.topology.status.get(&id).await.ok()??;
            (doc.status == status).then_some(())
        })
        .await;
    }

    /// Waits until `job_id` is delivered or undeliverable; returns its document.
    pub async fn wait_for_final(&self, job_id: &str, within: Duration) -> JobStatus {
        let id = JobId::parse(job_id).expect("id");
        wait_until(&format!("{job_id} final"), within, || async {
            let (doc, _) = self.topology.status.get(&id).await.ok()??;
            doc.status.is_final().then_some(doc)
        })
        .await
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("callback task")
            .expect("the callback stops cleanly");
    }
}
