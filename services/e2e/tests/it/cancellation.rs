//! Taking jobs back: cancellation before and during generation, and expiry in a backlog.
//! The fake Claude tells which prompts reached the model.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::fake_anthropic::{self, Scripted};
use testkit::wait::wait_until;
use testkit::{FakeAnthropic, WebhookReceiver};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(30);

/// One generation at a time, so later jobs wait in the stream behind the first.
fn one_at_a_time(claude: &FakeAnthropic) -> Vec<(&'static str, Value)> {
    vec![
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
        ("generator.concurrency", json!(1)),
    ]
}

fn job(id: &str, product: &str, callback_url: &str) -> Value {
    json!({
        "job_id": id,
        "kind": "product-description",
        "input": {"product_id": id, "product_name": product, "specs": "1.5 Ton"},
        "callback_url": callback_url,
    })
}

fn prompts(claude: &FakeAnthropic) -> Vec<String> {
    claude
        .requests()
        .iter()
        .map(|request| {
            request.body["messages"][0]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

async fn llm_calls_in_flight(pipeline: &Pipeline) -> Option<f64> {
    let metrics = pipeline.metrics("generator").await;
    testkit::metrics::sample(&metrics, "jetcall_generator_llm_in_flight", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_job_never_reaches_the_model_and_a_generating_one_is_abandoned() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    // The first call would take ten minutes: only its cancellation ends it in time.
    claude.push(Scripted::Delay(Duration::from_secs(600)));
    // Lease renewals (every half ack_wait) would find the cancellation too, but only after
    // this test's waits: what ends the call in time is the cancellation event.
    let mut settings = one_at_a_time(&claude);
    settings.push(("generator.ack_wait", json!("300s")));
    let pipeline = Pipeline::start(&settings).await;
    let hook = receiver.url("/cb");

    let (status, _) = pipeline
        .post("/api/v1/jobs", &job("JOB-SLOW", "Slow Kettle", &hook))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    pipeline
        .wait_for_status("JOB-SLOW", "generating", WAIT)
        .await;
    wait_until("the slow call to reach the model", WAIT, || async {
        (claude.calls() == 1).then_some(())
    })
    .await;
    let (status, _) = pipeline
        .post(
            "/api/v1/jobs",
            &job("JOB-WAITING", "Waiting Toaster", &hook),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    // The waiting job in bulk, beside an id that names no job; the generating one alone.
    let (status, bulk) = pipeline
        .post(
            "/api/v1/jobs/cancel",
            &json!({"job_ids": ["JOB-WAITING", "JOB-NONE"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{bulk}");
    assert_eq!(bulk["results"][0]["status_code"], 202, "{bulk}");
    assert_eq!(bulk["results"][0]["job"]["status"], "cancelled", "{bulk}");
    assert_eq!(bulk["results"][1]["error"]["type"], "not_found", "{bulk}");
    let (status, doc) = pipeline.delete("/api/v1/jobs/JOB-SLOW").await;
    assert_eq!(
        (status, &doc["status"]),
        (StatusCode::ACCEPTED, &json!("cancelled")),
        "{doc}"
    );

    let deliveries = receiver.wait_for(2, WAIT).await;
    let verifier = standardwebhooks::Webhook::new(&pipeline.secret).expect("a valid secret");
    let mut cancelled = Vec::new();
    for delivery in &deliveries {
        verifier
            .verify(&delivery.body, &delivery.headers)
            .expect("a cancellation webhook is signed like any other");
        let payload = delivery.json();
        assert_eq!(payload["type"], "job.cancelled", "{payload}");
        assert_eq!(payload["status"], "cancelled", "{payload}");
        assert!(payload["cancelled_at"].is_string(), "{payload}");
        assert!(payload.get("result").is_none(), "{payload}");
        cancelled.push(payload["job_id"].as_str().unwrap_or_default().to_owned());
    }
    cancelled.sort();
    assert_eq!(cancelled, ["JOB-SLOW", "JOB-WAITING"]);

    // The slow call was abandoned, not waited out: nothing is in flight although the model
    // has not answered.
    wait_until("the cancelled call to be abandoned", WAIT, || async {
        (llm_calls_in_flight(&pipeline).await == Some(0.0)).then_some(())
    })
    .await;
    let seen = prompts(&claude);
    assert_eq!(seen.len(), 1, "only the slow job was sent: {seen:?}");
    assert!(seen[0].contains("Slow Kettle"), "{seen:?}");

    for id in ["JOB-SLOW", "JOB-WAITING"] {
        let doc = pipeline.wait_for_status(id, "delivered", WAIT).await;
        assert_eq!(doc["ended_as"], "cancelled", "{doc}");
        assert_eq!(doc["error"]["type"], "cancelled", "{doc}");
        assert!(doc.get("result").is_none(), "{doc}");
        // Cancelled again once delivered: the same answer, and no second event.
        let (status, again) = pipeline.delete(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(
            (status, &again["ended_as"]),
            (StatusCode::ACCEPTED, &json!("cancelled"))
        );
    }
    assert_eq!(pipeline.count_at_least("jobs.cancelled.>", 2).await, 2);
    assert_eq!(pipeline.count_at_least("jobs.completed.>", 0).await, 0);

    // A job the model answered is past taking back.
    let (status, _) = pipeline
        .post("/api/v1/jobs", &job("JOB-DONE", "Done Fan", &hook))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    pipeline
        .wait_for_status("JOB-DONE", "delivered", WAIT)
        .await;
    let (status, error) = pipeline.delete("/api/v1/jobs/JOB-DONE").await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert_eq!(
        (&error["type"], &error["status"]),
        (&json!("not_cancellable"), &json!("delivered"))
    );
    assert_eq!(
        receiver
            .deliveries()
            .last()
            .map(|d| d.json()["type"].clone()),
        Some(json!("job.completed"))
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_expire_in_a_backlog_never_reach_the_model() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    // The first job holds the only slot for three seconds; the others may wait one.
    claude.push(Scripted::Delay(Duration::from_secs(3)));
    let pipeline = Pipeline::start(&one_at_a_time(&claude)).await;
    let hook = receiver.url("/cb");

    let (status, _) = pipeline
        .post("/api/v1/jobs", &job("JOB-FIRST", "First Kettle", &hook))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_until("the first call to reach the model", WAIT, || async {
        (claude.calls() == 1).then_some(())
    })
    .await;
    let hurried: Vec<String> = (0..5).map(|n| format!("JOB-HURRIED-{n}")).collect();
    for id in &hurried {
        let mut body = job(id, &format!("Hurried Toaster {id}"), &hook);
        body["ttl"] = json!("1s");
        let (status, answer) = pipeline.post("/api/v1/jobs", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    }

    let deliveries = receiver.wait_for(6, WAIT).await;
    let mut expired: Vec<String> = Vec::new();
    for delivery in &deliveries {
        let payload = delivery.json();
        match payload["type"].as_str() {
            Some("job.expired") => {
                assert_eq!(payload["status"], "expired", "{payload}");
                assert!(payload["expired_at"].is_string(), "{payload}");
                expired.push(payload["job_id"].as_str().unwrap_or_default().to_owned());
            }
            Some("job.completed") => assert_eq!(payload["job_id"], "JOB-FIRST"),
            other => panic!("unexpected webhook {other:?}: {payload}"),
        }
    }
    expired.sort();
    assert_eq!(expired, hurried);
    assert_eq!(
        claude.calls(),
        1,
        "no expired job reached the model: {:?}",
        prompts(&claude)
    );
    let doc = pipeline
        .wait_for_status("JOB-HURRIED-0", "delivered", WAIT)
        .await;
    assert_eq!(
        (&doc["ended_as"], &doc["generation_attempts"]),
        (&json!("expired"), &json!(0))
    );
    assert_eq!(pipeline.count_at_least("jobs.expired.>", 5).await, 5);
    let metrics = pipeline.metrics("generator").await;
    assert_eq!(
        testkit::metrics::sample(
            &metrics,
            "jetcall_generator_jobs_total",
            &["status=\"expired\""]
        ),
        Some(5.0),
        "{metrics}"
    );
    pipeline.stop().await;
}

/// A gateway that stopped between its two writes: the job is `cancelled` in its document but
/// no event says so, and the generator, not hearing of it, lets its call answer. The answer
/// is not used but its cost is kept, and the generator publishes the missing event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_whose_event_was_lost_is_finished_by_the_generator_and_still_charged() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    claude.push(Scripted::Delay(Duration::from_secs(2)));
    let mut settings = one_at_a_time(&claude);
    settings.extend([
        ("anthropic.model", json!("claude-test-model")),
        (
            "prices.claude-test-model",
            json!({"input": 3.0, "output": 15.0}),
        ),
        // No lease renewal within the call: only the document can tell.
        ("generator.ack_wait", json!("300s")),
    ]);
    let pipeline = Pipeline::start(&settings).await;
    let (status, _) = pipeline
        .post(
            "/api/v1/jobs",
            &job("JOB-LOST", "Lost Lamp", &receiver.url("/cb")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_until("the call to reach the model", WAIT, || async {
        (claude.calls() == 1).then_some(())
    })
    .await;
    let job_id = jetcall::JobId::parse("JOB-LOST").expect("an id");
    let now = time::OffsetDateTime::now_utc();
    pipeline
        .topology
        .status
        .update(&job_id, |doc| {
            doc.cancel(now, "a gateway that then stopped")
        })
        .await
        .expect("the cancellation's first write");

    let payload = receiver.wait_for(1, WAIT).await[0].json();
    assert_eq!(payload["type"], "job.cancelled", "{payload}");
    let doc = pipeline
        .wait_for_status("JOB-LOST", "delivered", WAIT)
        .await;
    assert!(doc.get("result").is_none(), "{doc}");
    let tokens = |name: &str| doc["usage"][name].as_u64().expect(name);
    assert!(tokens("output_tokens") > 0, "{doc}");
    assert_eq!(
        doc["cost"]["microdollars"],
        json!(tokens("input_tokens") * 3 + tokens("output_tokens") * 15),
        "{doc}"
    );
    assert_eq!(pipeline.count_at_least("jobs.cancelled.>", 1).await, 1);
    assert_eq!(pipeline.count_at_least("jobs.completed.>", 0).await, 0);
    pipeline.stop().await;
}

/// A `jobs.cancelled` message for a job nobody cancelled (a stray or forged one) leaves its
/// call alone: the generator checks the job's document first. Abandoned, the call would be
/// made again once its lease ran out, and paid twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_event_without_a_cancelled_job_aborts_nothing() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    claude.push(Scripted::Delay(Duration::from_secs(3)));
    let mut settings = one_at_a_time(&claude);
    // A short lease, so that an abandoned call would be made again within the test.
    settings.push(("generator.ack_wait", json!("2s")));
    let pipeline = Pipeline::start(&settings).await;
    let (status, _) = pipeline
        .post(
            "/api/v1/jobs",
            &job("JOB-STRAY", "Stray Kettle", &receiver.url("/cb")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_until("the call to reach the model", WAIT, || async {
        (claude.calls() == 1).then_some(())
    })
    .await;
    let client = async_nats::connect(pipeline.nats_url())
        .await
        .expect("a NATS connection");
    client
        .publish(
            "jobs.cancelled.product-description",
            json!({"job_id": "JOB-STRAY"}).to_string().into(),
        )
        .await
        .expect("the stray event");
    client.flush().await.expect("sent");

    let doc = pipeline
        .wait_for_status("JOB-STRAY", "delivered", WAIT)
        .await;
    assert!(doc["result"].is_object(), "{doc}");
    assert_eq!(claude.calls(), 1, "the call was paid for once");
    pipeline.stop().await;
}
