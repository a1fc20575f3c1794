//! Bulk jobs through Message Batches, from the API to the webhook: the same signed webhook
//! as a synchronous job's, at the batch price; interactive jobs not held up behind them; and
//! a job cancelled while its batch runs stays cancelled, its answer still charged.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::fake_anthropic;
use testkit::wait::wait_until;
use testkit::{FakeAnthropic, WebhookReceiver};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(60);

async fn pipeline(claude: &FakeAnthropic, processing: Duration) -> Pipeline {
    claude.set_batch_processing_time(processing);
    Pipeline::start(&[
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
        ("generator.batch_max_wait", json!("200ms")),
        ("generator.batch_poll_interval", json!("100ms")),
    ])
    .await
}

fn job(id: &str, callback_url: &str, priority: &str) -> Value {
    json!({
        "job_id": id,
        "kind": "product-description",
        "input": {"product_id": id, "product_name": format!("Lamp {id}"), "specs": "40 W"},
        "callback_url": callback_url,
        "priority": priority,
    })
}

async fn submit_all(pipeline: &Pipeline, jobs: &[Value]) {
    for chunk in jobs.chunks(1000) {
        let (status, body) = pipeline
            .post("/api/v1/jobs/batch", &json!({ "jobs": chunk }))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"], json!(chunk.len()), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_jobs_reach_their_webhooks_from_batches_signed_and_half_price() {
    const JOBS: usize = 2_000;
    let claude = FakeAnthropic::start().await;
    let pipeline = pipeline(&claude, Duration::from_millis(300)).await;
    let receiver = WebhookReceiver::verifying(&pipeline.secret)
        .await
        .expect("a receiver verifying signatures");
    let hook = receiver.url("/cb");
    let jobs: Vec<Value> = (0..JOBS)
        .map(|n| job(&format!("CATALOGUE-{n:05}"), &hook, "bulk"))
        .collect();
    submit_all(&pipeline, &jobs).await;

    let deliveries = receiver.wait_for(JOBS, WAIT).await;
    // Every one signed as a standard verifier checks it, completed, and priced.
    assert!(
        deliveries
            .iter()
            .all(|d| matches!(d.signature, Some(Ok(())))),
        "every signature verified"
    );
    let mut ids: Vec<String> = deliveries
        .iter()
        .map(|delivery| {
            let payload = delivery.json();
            assert_eq!(payload["status"], "completed", "{payload}");
            assert!(
                payload["cost"]["microdollars"].as_u64().is_some(),
                "{payload}"
            );
            payload["job_id"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), JOBS, "one webhook per job");
    assert_eq!(claude.calls(), 0, "no synchronous call");
    let sent = claude.batch_requests_per_custom_id();
    assert_eq!(sent.len(), JOBS);
    assert!(sent.values().all(|&n| n == 1), "each job in one batch");

    let (status, view) = pipeline.status("CATALOGUE-00000").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        view["batch_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msgbatch_")),
        "{view}"
    );
    let usage: jetcall::events::Usage =
        serde_json::from_value(view["usage"].clone()).expect("usage");
    let model = view["model"].as_str().expect("model");
    let sync = pipeline
        .config
        .prices
        .cost(model, &usage, jetcall::cost::Path::Sync)
        .expect("priced");
    let paid = view["cost"]["microdollars"].as_u64().expect("cost");
    assert!(
        paid * 2 <= sync.microdollars + 1 && paid * 2 + 1 >= sync.microdollars,
        "{paid} is half of {}",
        sync.microdollars
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_jobs_are_not_held_up_by_bulk_ones() {
    let claude = FakeAnthropic::start().await;
    // The bulk jobs' batch runs for longer than the interactive jobs should ever take.
    let pipeline = pipeline(&claude, Duration::from_secs(20)).await;
    let receiver = WebhookReceiver::start().await;
    let hook = receiver.url("/cb");
    let bulk: Vec<Value> = (0..3_000)
        .map(|n| job(&format!("BULK-{n:05}"), &hook, "bulk"))
        .collect();
    submit_all(&pipeline, &bulk).await;
    let interactive: Vec<Value> = (0..50)
        .map(|n| job(&format!("NOW-{n:03}"), &hook, "interactive"))
        .collect();
    submit_all(&pipeline, &interactive).await;

    let deliveries = receiver.wait_for(50, WAIT).await;
    let first: Vec<String> = deliveries
        .iter()
        .map(|d| d.json()["job_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        first.iter().all(|id| id.starts_with("NOW-")),
        "the interactive jobs came first: {first:?}"
    );
    assert_eq!(claude.calls(), 50, "only the interactive jobs were called");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_in_its_batch_stays_cancelled_and_its_answer_is_charged() {
    let claude = FakeAnthropic::start().await;
    let pipeline = pipeline(&claude, Duration::from_secs(2)).await;
    let receiver = WebhookReceiver::start().await;
    let hook = receiver.url("/cb");
    submit_all(&pipeline, &[job("WITHDRAWN", &hook, "bulk")]).await;
    wait_until("the job to wait in its batch", WAIT, || async {
        let (_, view) = pipeline.status("WITHDRAWN").await;
        (view["status"] == "batched" && view["batch_id"].is_string()).then_some(())
    })
    .await;
    let (status, body) = pipeline.delete("/api/v1/jobs/WITHDRAWN").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let view = wait_until("the batch's answer to be charged", WAIT, || async {
        let (_, view) = pipeline.status("WITHDRAWN").await;
        view["usage"].is_object().then_some(view)
    })
    .await;
    assert_eq!(view["status"], "delivered", "{view}");
    assert_eq!(view["ended_as"], "cancelled", "{view}");
    assert!(view["result"].is_null(), "{view}");
    assert!(view["cost"]["microdollars"].as_u64().is_some(), "{view}");
    let deliveries = receiver.wait_for(1, WAIT).await;
    assert_eq!(deliveries[0].json()["status"], "cancelled");
    assert_eq!(receiver.count(), 1, "one webhook");
    pipeline.stop().await;
}
