//! The start-up sweep: jobs recorded as `accepted` by a gateway that died before publishing
//! them are published by the next one, and nothing else is.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use jetcall::events::JobRequested;
use jetcall::publish::publish_event;
use jetcall::status::{JobStatus, Status};
use jetcall::subjects::Event;
use jetcall::topology::Topology;
use jetcall::{JobId, Kind};
use testkit::metrics::sample;
use testkit::{NatsServer, wait_until};

use crate::harness::{self, Gateway};

pub fn request(job_id: &str, age: Duration) -> JobRequested {
    let input = json!({
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": "1.5 Ton, 5 Star, Dual Inverter",
    });
    JobRequested {
        job_id: JobId::parse(job_id).expect("valid id"),
        kind: Kind::product_description(),
        input: input.as_object().cloned().unwrap_or_default(),
        callback_url: jetcall::allowlist::CallbackUrl::parse(
            "http://127.0.0.1:9/webhooks/description",
        )
        .expect("a callback URL"),
        metadata: serde_json::Map::new(),
        requested_at: OffsetDateTime::now_utc() - age,
        expires_at: None,
        tenant: None,
        priority: Default::default(),
    }
}

/// What a gateway leaves behind when it dies between its KV write and its publish.
pub async fn record(topology: &Topology, request: &JobRequested, status: Status) {
    let mut doc = JobStatus::accepted(request, "digest".into());
    doc.status = status;
    if status.is_generated() {
        doc.result = Some(json!({"description": "Cool."}));
    }
    topology.status.create(&doc).await.expect("status written");
}

/// What a gateway publishes when it does not die.
async fn publish(topology: &Topology, request: &JobRequested) {
    publish_event(
        &topology.jetstream,
        request.subject(),
        &Event::Requested.msg_id(&request.job_id),
        request,
    )
    .await
    .expect("request published");
}

pub const LONG_AGO: Duration = Duration::from_secs(3600);

/// Waits for the gateway's start-up sweep to complete and returns how many jobs it published.
pub async fn swept(gateway: &Gateway) -> f64 {
    wait_until(
        "the start-up sweep to complete",
        Duration::from_secs(30),
        || async {
            let (_, metrics) = gateway.get("/metrics").await;
            let metrics = metrics.as_str()?;
            let failed = sample(
                metrics,
                "jetcall_gateway_sweeps_total",
                &["outcome=\"failed\""],
            );
            assert_eq!(failed, None, "the sweep failed: {metrics}");
            let completed = sample(
                metrics,
                "jetcall_gateway_sweeps_total",
                &["outcome=\"completed\""],
            );
            (completed == Some(1.0)).then(|| {
                sample(metrics, "jetcall_gateway_sweep_republished_total", &[]).unwrap_or(0.0)
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_recorded_but_never_published_is_published_once_by_the_next_gateway() {
    let nats = NatsServer::start();
    let topology = harness::provision(&nats, &[]).await;
    let lost = request("JOB-LOST", LONG_AGO);
    record(&topology, &lost, Status::Accepted).await;

    let gateway = Gateway::start_on(nats, &[]).await;
    assert_eq!(swept(&gateway).await, 1.0);
    assert_eq!(gateway.published().await, 1);
    let message = gateway
        .topology
        .stream
        .get_last_raw_message_by_subject("jobs.requested.product-description")
        .await
        .expect("request event");
    assert_eq!(
        message.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("JOB-LOST.requested"),
        "the usual Nats-Msg-Id, so a concurrent sweep or retry is stored once"
    );
    let event: JobRequested = serde_json::from_slice(&message.payload).expect("request JSON");
    assert_eq!(event, lost);

    // The next gateway finds the request in the stream and leaves it alone.
    let nats = gateway.stop().await;
    let gateway = Gateway::start_on(nats, &[]).await;
    assert_eq!(swept(&gateway).await, 0.0);
    assert_eq!(gateway.published().await, 1);
    gateway.stop().await;
}

/// Shortens the stream's duplicate window, before anything is published: the server times
/// the forgetting of msg ids by the window in force when they were stored.
/// (The configuration refuses a window under 2 minutes; the gateway puts it back when it
/// starts.)
pub async fn shorten_duplicate_window(nats: &NatsServer, topology: &Topology) {
    let mut stream = jetcall::topology::stream_config(&harness::config(nats, &[]));
    stream.duplicate_window = Duration::from_secs(1);
    topology
        .jetstream
        .update_stream(stream)
        .await
        .expect("shorter duplicate window");
}

/// Waits until the stream has forgotten every `Nats-Msg-Id` published so far, so that a
/// second publish of a request would be stored again.
pub async fn forget_msg_ids(topology: &Topology) {
    // A probe published after everything else: once it is no longer a duplicate, nothing
    // published before it is either.
    let probe = || async {
        topology
            .jetstream
            .send_publish(
                "jobs.probe.sweep",
                async_nats::jetstream::message::PublishMessage::build()
                    .payload("probe".into())
                    .message_id("sweep-probe"),
            )
            .await
            .expect("probe sent")
            .await
            .expect("probe stored")
    };
    probe().await;
    wait_until(
        "the duplicate window to pass",
        Duration::from_secs(20),
        || async { (!probe().await.duplicate).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_in_the_stream_is_not_published_again_after_the_duplicate_window() {
    let nats = NatsServer::start();
    let topology = harness::provision(&nats, &[]).await;
    shorten_duplicate_window(&nats, &topology).await;
    let waiting = request("JOB-WAITING", LONG_AGO);
    record(&topology, &waiting, Status::Accepted).await;
    publish(&topology, &waiting).await;
    forget_msg_ids(&topology).await;

    let gateway = Gateway::start_on(nats, &[]).await;
    assert_eq!(swept(&gateway).await, 0.0);
    assert_eq!(
        gateway.published().await,
        1,
        "a republish would be stored: the generator would pay twice"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_published_without_a_msg_id_is_recognised_by_its_payload() {
    let nats = NatsServer::start();
    let topology = harness::provision(&nats, &[]).await;
    let waiting = request("JOB-BY-HAND", LONG_AGO);
    record(&topology, &waiting, Status::Accepted).await;
    topology
        .jetstream
        .publish(
            waiting.subject(),
            serde_json::to_vec(&waiting).expect("JSON").into(),
        )
        .await
        .expect("published")
        .await
        .expect("stored");

    let gateway = Gateway::start_on(nats, &[]).await;
    assert_eq!(swept(&gateway).await, 0.0);
    assert_eq!(gateway.published().await, 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_and_moved_on_jobs_are_left_alone() {
    let nats = NatsServer::start();
    let topology = harness::provision(&nats, &[]).await;
    let lost = request("JOB-LOST", LONG_AGO);
    record(&topology, &lost, Status::Accepted).await;
    // Younger than `gateway.sweep_after`: its gateway may be publishing it right now.
    record(
        &topology,
        &request("JOB-RECENT", Duration::ZERO),
        Status::Accepted,
    )
    .await;
    record(&topology, &request("JOB-DONE", LONG_AGO), Status::Completed).await;
    record(
        &topology,
        &request("JOB-BUSY", LONG_AGO),
        Status::Generating,
    )
    .await;
    // Deleted keys leave a marker with no value.
    record(&topology, &request("JOB-GONE", LONG_AGO), Status::Accepted).await;
    testkit::jobs::status_bucket(&topology)
        .await
        .delete("JOB-GONE")
        .await
        .expect("deleted");

    let gateway = Gateway::start_on(nats, &[]).await;
    assert_eq!(swept(&gateway).await, 1.0);
    assert_eq!(gateway.published().await, 1);
    let message = gateway
        .topology
        .stream
        .get_last_raw_message_by_subject("jobs.requested.product-description")
        .await
        .expect("request event");
    let event: JobRequested = serde_json::from_slice(&message.payload).expect("request JSON");
    assert_eq!(event.job_id.as_str(), "JOB-LOST");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_jobs_only_the_missing_ones_are_published() {
    let nats = NatsServer::start();
    let topology = harness::provision(&nats, &[]).await;
    shorten_duplicate_window(&nats, &topology).await;
    let jobs: Vec<_> = (0..300u64)
        .map(|i| request(&format!("JOB-{i:04}"), LONG_AGO + Duration::from_secs(i)))
        .collect();
    for (i, job) in jobs.iter().enumerate() {
        record(&topology, job, Status::Accepted).await;
        if i % 3 == 0 {
            publish(&topology, job).await;
        }
    }
    forget_msg_ids(&topology).await;

    let gateway = Gateway::start_on(nats, &[]).await;
    assert_eq!(swept(&gateway).await, 200.0);
    assert_eq!(gateway.published().await, 300);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_bucket_is_swept_at_once() {
    let gateway = Gateway::start(&[]).await;
    assert_eq!(swept(&gateway).await, 0.0);
    assert_eq!(gateway.published().await, 0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_gateway_sweeps_again_without_a_restart() {
    let gateway = Gateway::start(&[("gateway.sweep_interval", json!("1s"))]).await;
    assert_eq!(swept(&gateway).await, 0.0);
    // A gateway that died between its two writes after this one started.
    let lost = request("JOB-LOST-LATER", LONG_AGO);
    record(&gateway.topology, &lost, Status::Accepted).await;

    wait_until(
        "the running gateway to publish the lost job",
        Duration::from_secs(20),
        || async { (gateway.published().await == 1).then_some(()) },
    )
    .await;
    let (doc, _) = gateway
        .topology
        .status
        .get(&lost.job_id)
        .await
        .expect("read")
        .expect("recorded");
    assert!(doc.request_seq.is_some(), "where it is stored is recorded");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeping_gateway_holds_a_lease_and_hands_it_back() {
    let gateway = Gateway::start(&[]).await;
    assert_eq!(swept(&gateway).await, 0.0);
    let lease = testkit::jobs::status_bucket(&gateway.topology)
        .await
        .get("gateway.sweep")
        .await
        .expect("read")
        .expect("the sweeping gateway holds the lease");
    let lease: serde_json::Value = serde_json::from_slice(&lease).expect("lease JSON");
    assert!(lease["holder"].is_string(), "{lease}");
    let (_, list) = gateway.get("/api/v1/jobs").await;
    assert_eq!(list["jobs"], json!([]), "the lease is not a job: {list}");
    let nats = gateway.stop().await;
    // Handed back at shutdown, so the next gateway sweeps at once.
    let gateway = Gateway::start_on(nats, &[]).await;
    assert_eq!(swept(&gateway).await, 0.0);
    gateway.stop().await;
}
