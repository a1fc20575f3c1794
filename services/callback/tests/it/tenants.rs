//! Address exemptions belong to a key's policy: a job reaches a loopback or private address
//! through a DNS name only if the key that submitted it may.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use jetcall::JobId;
use jetcall::Kind;
use jetcall::events::JobRequested;
use jetcall::publish::publish_event;
use jetcall::signing::SigningKey;
use jetcall::status::{JobStatus, Status};
use jetcall::topology::Topology;
use testkit::{NatsServer, WebhookReceiver, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// A completed job of `tenant`, recorded and published as the generator leaves it.
async fn completed_for(topology: &Topology, id: &str, tenant: &str, callback_url: &str) {
    let request = JobRequested {
        job_id: JobId::parse(id).expect("id"),
        kind: Kind::product_description(),
        input: json!({"product_id": id, "product_name": "Test AC", "specs": "1.5 Ton"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        callback_url: jetcall::allowlist::CallbackUrl::parse(callback_url).expect("a callback URL"),
        metadata: Default::default(),
        requested_at: OffsetDateTime::now_utc(),
        expires_at: None,
        tenant: None,
        priority: Default::default(),
    };
    let mut doc = JobStatus::accepted(&request, "seeded".into());
    doc.advance(Status::Completed, OffsetDateTime::now_utc());
    doc.result = Some(json!({"description": "Cool."}));
    let mut value = serde_json::to_value(&doc).expect("JSON");
    value["tenant"] = json!(tenant);
    testkit::jobs::status_bucket(topology)
        .await
        .create(id, serde_json::to_vec(&value).expect("JSON").into())
        .await
        .expect("record the job");
    let event = doc.finished_event().expect("an event");
    publish_event(
        &topology.jetstream,
        event.event().subject(&event.kind),
        &event.event().msg_id(&event.job_id),
        &event,
    )
    .await
    .expect("publish");
}

async fn final_status(topology: &Topology, id: &str) -> Value {
    let job_id = JobId::parse(id).expect("id");
    wait_until("the job to end", WAIT, || async {
        let raw = testkit::jobs::status_bucket(topology)
            .await
            .get(job_id.as_str())
            .await
            .ok()??;
        let doc: Value = serde_json::from_slice(&raw).ok()?;
        matches!(doc["status"].as_str(), Some("delivered" | "undeliverable")).then_some(doc)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_key_whose_policy_names_an_address_may_reach_it_by_name() {
    testkit::init_logs();
    let nats = NatsServer::start();
    let settings = [
        (
            "callback.signing_secret",
            Value::from(SigningKey::generate()),
        ),
        ("callback.retry_schedule", json!(["50ms"])),
        (
            "gateway.callback_allowlist",
            json!(["localhost", "127.0.0.1", "::1"]),
        ),
        (
            "gateway.api_keys",
            json!([
                {"key": "plain-key", "name": "plain"},
                {"key": "local-key", "name": "local", "callback_allowlist": ["localhost", "127.0.0.1", "::1"]},
            ]),
        ),
    ];
    let config = testkit::config::config(&nats.url(), &settings);
    let topology = testkit::config::provision(&config).await;
    let receiver = WebhookReceiver::start().await;
    let by_name = receiver.url("/hook").replace("127.0.0.1", "localhost");
    completed_for(&topology, "JOB-PLAIN", "plain", &by_name).await;
    completed_for(&topology, "JOB-LOCAL", "local", &by_name).await;

    let stop = CancellationToken::new();
    let task = tokio::spawn(callback::run(
        config,
        testkit::loopback_listener(),
        stop.clone(),
    ));
    let plain = final_status(&topology, "JOB-PLAIN").await;
    let local = final_status(&topology, "JOB-LOCAL").await;
    stop.cancel();
    let _ = task.await;

    assert_eq!(local["status"], "delivered", "{local}");
    assert_eq!(plain["status"], "undeliverable", "{plain}");
    let attempt = &plain["deliveries"][0];
    assert_eq!(attempt["error_kind"], "refused", "{plain}");
    assert!(
        attempt["error"]
            .as_str()
            .unwrap_or_default()
            .contains("loopback"),
        "{plain}"
    );
    let delivered: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|delivery| {
            delivery.json()["job_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(delivered, ["JOB-LOCAL"]);
}
