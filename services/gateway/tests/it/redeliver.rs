//! An operator's redelivery whose publish failed is repaired by asking again.

use reqwest::StatusCode;
use serde_json::json;

use jetcall::status::Status;

use crate::harness::Gateway;
use crate::sweep::{LONG_AGO, record, request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_whose_publish_failed_is_published_when_asked_again() {
    let gateway = Gateway::start(&[]).await;
    let dead = request("JOB-DEAD-LETTER", LONG_AGO);
    record(&gateway.topology, &dead, Status::Undeliverable).await;

    // Completions have nowhere to go: the stream stops taking `jobs.completed.>`, so the
    // publish after the status write fails.
    let full = jetcall::topology::stream_config(&harness_config(&gateway));
    let mut narrowed = full.clone();
    narrowed.subjects = vec!["jobs.requested.>".into(), "jobs.undeliverable.>".into()];
    gateway
        .topology
        .jetstream
        .update_stream(narrowed)
        .await
        .expect("stream narrowed");
    let path = "/api/v1/jobs/JOB-DEAD-LETTER/redeliver";
    let (status, body) = gateway.post(path, &json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["type"], "unavailable", "{body}");

    gateway
        .topology
        .jetstream
        .update_stream(full)
        .await
        .expect("stream restored");
    let (status, body) = gateway.post(path, &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body["delivery_round"], 1,
        "the round already opened: {body}"
    );
    // Asked once more, the round's event is found in the stream and not stored again.
    let (status, body) = gateway.post(path, &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["delivery_round"], 1, "{body}");
    assert_eq!(
        testkit::nats::count_messages(&gateway.topology.stream, "jobs.completed.>").await,
        1,
        "one event for the round"
    );
    gateway.stop().await;
}

fn harness_config(gateway: &Gateway) -> jetcall::Config {
    crate::harness::config(&gateway.nats, &[])
}
