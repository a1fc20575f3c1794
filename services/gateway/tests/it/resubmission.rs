//! A resubmission of a job that is still `accepted` stores its request in the stream once,
//! even after the duplicate window has passed.

use reqwest::StatusCode;
use time::OffsetDateTime;

use jetcall::JobId;

use crate::harness::{Gateway, article_job};
use crate::sweep::{LONG_AGO, forget_msg_ids, shorten_duplicate_window};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmission_after_the_duplicate_window_publishes_nothing() {
    let gateway = Gateway::start(&[]).await;
    // After the gateway's own provisioning, which sets the configured window.
    shorten_duplicate_window(&gateway.nats, &gateway.topology).await;
    let job = article_job("JOB-RESUBMIT");
    let (status, _) = gateway.post("/api/v1/generate-description", &job).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    forget_msg_ids(&gateway.topology).await;

    // No generator: the job is still `accepted` when its caller submits it again.
    let (status, body) = gateway.post("/api/v1/generate-description", &job).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        gateway.published().await,
        1,
        "a second request in the stream is a second paid call"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmission_without_a_recorded_sequence_finds_the_request_in_the_stream() {
    let gateway = Gateway::start(&[]).await;
    shorten_duplicate_window(&gateway.nats, &gateway.topology).await;
    let job = article_job("JOB-HALF-RECORDED");
    let (status, _) = gateway.post("/api/v1/generate-description", &job).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // What a gateway that died after its publish but before recording the sequence leaves,
    // on a job old enough that JetStream would no longer drop a second copy.
    let id = JobId::parse("JOB-HALF-RECORDED").expect("valid id");
    let store = &gateway.topology.status;
    let (mut doc, revision) = store.get(&id).await.expect("read").expect("recorded");
    assert_eq!(
        doc.request_seq, None,
        "a first submission writes nothing after its publish"
    );
    doc.created_at = OffsetDateTime::now_utc() - LONG_AGO;
    store
        .update_from(&id, Some((doc, revision)), |_| true)
        .await
        .expect("rewritten");
    forget_msg_ids(&gateway.topology).await;

    let (status, body) = gateway.post("/api/v1/generate-description", &job).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(gateway.published().await, 1);
    let (doc, _) = store.get(&id).await.expect("read").expect("recorded");
    assert!(
        doc.request_seq.is_some(),
        "found in the stream and recorded"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmission_of_a_job_whose_publish_was_lost_publishes_it() {
    let gateway = Gateway::start(&[]).await;
    shorten_duplicate_window(&gateway.nats, &gateway.topology).await;
    let job = article_job("JOB-LOST-PUBLISH");
    let (status, _) = gateway.post("/api/v1/generate-description", &job).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = JobId::parse("JOB-LOST-PUBLISH").expect("valid id");
    let store = &gateway.topology.status;
    let (mut doc, revision) = store.get(&id).await.expect("read").expect("recorded");
    doc.request_seq = None;
    doc.created_at = OffsetDateTime::now_utc() - LONG_AGO;
    store
        .update_from(&id, Some((doc, revision)), |_| true)
        .await
        .expect("rewritten");
    // The request never reached the stream.
    gateway
        .topology
        .stream
        .clone()
        .purge()
        .await
        .expect("purged");
    forget_msg_ids(&gateway.topology).await;

    let (status, body) = gateway.post("/api/v1/generate-description", &job).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(gateway.published().await, 1, "published again");
    gateway.stop().await;
}
