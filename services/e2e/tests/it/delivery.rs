//! Webhook delivery: retries, Retry-After, 410, dead letters and their redelivery, refusals
//! at delivery time, and no head-of-line blocking behind a dead receiver.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::receiver::Reply;
use testkit::{Blackhole, WebhookReceiver, wait_until};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(30);

fn job(job_id: &str, callback_url: &str) -> Value {
    json!({
        "job_id": job_id,
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": "1.5 Ton, 5 Star",
        "callback_url": callback_url
    })
}

async fn submit(pipeline: &Pipeline, job_id: &str, callback_url: &str) {
    let (status, body) = pipeline
        .post("/api/v1/generate-description", &job(job_id, callback_url))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_stops_at_once() {
    let receiver = WebhookReceiver::start().await;
    receiver.fail_next(&[410]);
    let pipeline = Pipeline::start(&[("callback.retry_schedule", json!(["50ms", "50ms"]))]).await;
    submit(&pipeline, "JOB-410", &receiver.url("/cb")).await;

    let doc = pipeline
        .wait_for_status("JOB-410", "undeliverable", WAIT)
        .await;
    assert_eq!(receiver.deliveries().len(), 1, "no attempt after 410 Gone");
    assert_eq!(doc["deliveries"][0]["status_code"], 410);
    assert_eq!(doc["deliveries"][0]["error_kind"], "http_status");
    assert_eq!(
        pipeline
            .count_at_least("jobs.undeliverable.product-description", 1)
            .await,
        1
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let receiver = WebhookReceiver::start().await;
    receiver.reply_next(Reply::status(429).header("retry-after", "2"));
    let pipeline = Pipeline::start(&[("callback.retry_schedule", json!(["100ms", "100ms"]))]).await;
    submit(&pipeline, "JOB-429", &receiver.url("/cb")).await;

    let deliveries = receiver.wait_for(2, WAIT).await;
    let gap = deliveries[1].at - deliveries[0].at;
    assert!(
        gap >= Duration::from_secs(2),
        "retried after {gap:?}, before Retry-After: 2"
    );
    let doc = pipeline.wait_for_status("JOB-429", "delivered", WAIT).await;
    assert_eq!(doc["deliveries"][0]["status_code"], 429);
    assert_eq!(doc["deliveries"][0]["response_excerpt"], "scripted 429");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_reported_and_can_be_redelivered() {
    let receiver = WebhookReceiver::start().await;
    receiver.fail_next(&[500; 6]);
    let pipeline = Pipeline::start(&[
        ("callback.retry_schedule", json!(["50ms", "50ms"])),
        // Five failures in a row open the receiver's circuit; closing it again at once keeps
        // every attempt here a real request.
        ("callback.breaker_cooldown", json!("1ms")),
    ])
    .await;
    submit(&pipeline, "JOB-A", &receiver.url("/cb")).await;
    let doc = pipeline
        .wait_for_status("JOB-A", "undeliverable", WAIT)
        .await;
    submit(&pipeline, "JOB-B", &receiver.url("/cb")).await;
    pipeline
        .wait_for_status("JOB-B", "undeliverable", WAIT)
        .await;
    assert_eq!(
        doc["deliveries"].as_array().map(Vec::len),
        Some(3),
        "first try and two retries"
    );

    // The dead letter carries the payload and the attempt log. It is published after the
    // status is written, so wait for JOB-B's to be stored before reading the latest.
    assert_eq!(
        pipeline
            .count_at_least("jobs.undeliverable.product-description", 2)
            .await,
        2
    );
    let letter = pipeline
        .topology
        .stream
        .get_last_raw_message_by_subject("jobs.undeliverable.product-description")
        .await
        .expect("an undeliverable event");
    let letter: Value = serde_json::from_slice(&letter.payload).expect("JSON");
    assert_eq!(letter["job_id"], "JOB-B");
    assert_eq!(letter["payload"]["job_id"], "JOB-B");
    assert_eq!(letter["attempts"].as_array().map(Vec::len), Some(3));
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("gave up after 3 attempts"))
    );

    // One job by id; the receiver works again now.
    let (status, body) = pipeline
        .post("/api/v1/jobs/JOB-A/redeliver", &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["delivery_round"], 1);
    let doc = pipeline.wait_for_status("JOB-A", "delivered", WAIT).await;
    assert_eq!(doc["deliveries"].as_array().map(Vec::len), Some(4));
    let (status, body) = pipeline
        .post("/api/v1/jobs/JOB-A/redeliver", &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["type"], "not_undeliverable");

    // Every dead letter of a window: JOB-B is re-queued, JOB-A is no longer undeliverable.
    let (status, body) = pipeline
        .post(
            "/api/v1/deliveries/redeliver?since=2020-01-01T00:00:00Z",
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["requeued"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["requeued"][0]["job_id"], "JOB-B");
    assert_eq!(body["skipped"], json!(["JOB-A"]));
    pipeline.wait_for_status("JOB-B", "delivered", WAIT).await;

    let (status, body) = pipeline
        .post("/api/v1/deliveries/redeliver?since=yesterday", &json!({}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_resolves_to_a_forbidden_address_is_refused_at_delivery() {
    let receiver = WebhookReceiver::start().await;
    // `localhost` is allowed by name, but not its loopback addresses.
    let pipeline = Pipeline::start(&[("gateway.callback_allowlist", json!(["localhost"]))]).await;
    let url = receiver.url("/cb").replace("127.0.0.1", "localhost");
    submit(&pipeline, "JOB-SSRF", &url).await;

    let doc = pipeline
        .wait_for_status("JOB-SSRF", "undeliverable", WAIT)
        .await;
    assert!(
        receiver.deliveries().is_empty(),
        "nothing may reach the address"
    );
    assert_eq!(
        doc["deliveries"].as_array().map(Vec::len),
        Some(1),
        "refusals are not retried"
    );
    assert_eq!(doc["deliveries"][0]["error_kind"], "refused");
    let error = doc["deliveries"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("loopback"), "{error}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed() {
    let receiver = WebhookReceiver::start().await;
    receiver.reply_next(
        Reply::status(302).header("location", "http://169.254.169.254/latest/meta-data/"),
    );
    let pipeline = Pipeline::start(&[("callback.retry_schedule", json!(["50ms"]))]).await;
    submit(&pipeline, "JOB-302", &receiver.url("/cb")).await;

    let doc = pipeline.wait_for_status("JOB-302", "delivered", WAIT).await;
    assert_eq!(
        doc["deliveries"][0]["status_code"], 302,
        "a 3xx is a failed attempt"
    );
    assert_eq!(
        doc["deliveries"][1]["status_code"], 204,
        "retried at the same URL"
    );
    assert_eq!(receiver.deliveries().len(), 2);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_does_not_hold_up_healthy_ones() {
    const DEAD_JOBS: usize = 30;
    let dead = Blackhole::start().await;
    let healthy = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[
        ("callback.timeout", json!("3s")),
        ("callback.concurrency", json!(8)),
        ("callback.per_host_concurrency", json!(2)),
        ("callback.retry_schedule", json!(["10m"])),
    ])
    .await;
    for n in 0..DEAD_JOBS {
        submit(&pipeline, &format!("DEAD-{n}"), &dead.url("/cb")).await;
    }
    for n in 0..10 {
        submit(&pipeline, &format!("LIVE-{n}"), &healthy.url("/cb")).await;
    }
    healthy.wait_for(10, WAIT).await;
    // Had the dead receiver been allowed every slot, each of its jobs would have been tried
    // (and timed out) before the healthy ones got a turn.
    let tried = dead.accepted();
    assert!(
        tried < DEAD_JOBS / 2,
        "{tried} attempts at the dead receiver went first"
    );
    for n in 0..10 {
        pipeline
            .wait_for_status(&format!("LIVE-{n}"), "delivered", WAIT)
            .await;
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_can_bring_its_own_signing_secret() {
    let receiver = WebhookReceiver::start().await;
    // The gateway seals the job's secret under this key and the callback opens it.
    let pipeline = Pipeline::start(&[(
        "callback.secrets_key",
        json!("c2VjcmV0cy1rZXktZm9yLXRoZS1nYXRld2F5LXRlc3Q="),
    )])
    .await;
    let secret = jetcall::signing::SigningKey::generate();
    let (status, body) = pipeline
        .post(
            "/api/v1/jobs",
            &json!({
                "job_id": "JOB-OWN",
                "kind": "product-description",
                "input": {"product_id": "P", "product_name": "Fan", "specs": "3 blades"},
                "callback_url": receiver.url("/cb"),
                "signing_secret": secret
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let delivery = &receiver.wait_for(1, WAIT).await[0];
    standardwebhooks::Webhook::new(&secret)
        .expect("secret")
        .verify(&delivery.body, &delivery.headers)
        .expect("signed with the job's own secret");
    assert!(
        standardwebhooks::Webhook::new(&pipeline.secret)
            .expect("secret")
            .verify(&delivery.body, &delivery.headers)
            .is_err(),
        "not with the service's"
    );
    let (_, doc) = pipeline.status("JOB-OWN").await;
    assert!(
        doc.get("signing_secret").is_none(),
        "the secret is never shown"
    );
    // Nor readable in the bucket, as `nats kv get job_status JOB-OWN` shows it.
    let stored = testkit::jobs::status_bucket(&pipeline.topology)
        .await
        .get("JOB-OWN")
        .await
        .expect("KV get")
        .expect("recorded");
    let stored = String::from_utf8_lossy(&stored);
    let key_material = secret.trim_start_matches("whsec_");
    assert!(!stored.contains(key_material), "{stored}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receivers_circuit_opens_and_its_jobs_follow_their_schedule_without_requests() {
    const JOBS: usize = 20;
    const PER_HOST: usize = 2;
    let dead = Blackhole::start().await;
    let pipeline = Pipeline::start(&[
        ("callback.timeout", json!("1s")),
        ("callback.per_host_concurrency", json!(PER_HOST)),
        ("callback.breaker_cooldown", json!("10m")),
        // Each failure counts from its start: the first timeouts span the window.
        ("callback.breaker_window", json!("500ms")),
        ("callback.retry_schedule", json!(["10m"])),
    ])
    .await;
    for n in 0..JOBS {
        submit(&pipeline, &format!("DEAD-{n}"), &dead.url("/cb")).await;
    }
    let mut kinds = Vec::new();
    for n in 0..JOBS {
        let doc = wait_until(&format!("DEAD-{n}'s first attempt"), WAIT, || async {
            let (_, doc) = pipeline.status(&format!("DEAD-{n}")).await;
            doc["deliveries"].get(0).is_some().then_some(doc)
        })
        .await;
        kinds.push(
            doc["deliveries"][0]["error_kind"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let contacted = dead.accepted();
    assert!(
        contacted <= callback::BREAKER_THRESHOLD as usize + PER_HOST,
        "{contacted} requests reached a receiver that stopped answering"
    );
    let skipped = kinds.iter().filter(|kind| *kind == "circuit_open").count();
    assert_eq!(skipped + contacted, JOBS, "{kinds:?}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_callback_service_does_not_wait_for_a_dead_receiver() {
    let dead = Blackhole::start().await;
    let pipeline = Pipeline::start(&[("callback.timeout", json!("1h"))]).await;
    submit(&pipeline, "JOB-HUNG", &dead.url("/cb")).await;
    wait_until("the attempt to reach the dead receiver", WAIT, || async {
        (dead.accepted() > 0).then_some(())
    })
    .await;
    // `stop` fails the test if a service takes more than 20 s; the attempt would take an hour.
    pipeline.stop().await;
}
