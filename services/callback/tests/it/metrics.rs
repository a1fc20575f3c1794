//! The callback service's `/healthz`, `/readyz` and `/metrics`: attempts by outcome, their
//! durations, delivery latency, open circuits, and the `callback` consumer's backlog.

use serde_json::json;

use jetcall::status::Status;
use testkit::metrics::sample;
use testkit::{Blackhole, WebhookReceiver, wait_until};

use crate::running::{Running, WAIT};

fn value(metrics: &str, metric: &str, labels: &[&str]) -> f64 {
    sample(metrics, metric, labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_counted_by_outcome_and_deliveries_timed() {
    let running =
        Running::start(&[("callback.retry_schedule", json!(["50ms", "50ms", "50ms"]))]).await;
    let (status, body) = running.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let before = running.metrics().await;
    assert_eq!(value(&before, "jetcall_callback_in_flight", &[]), 0.0);
    assert!(sample(&before, "jetcall_callback_consumer_pending", &[]).is_some());

    let ok = WebhookReceiver::start().await;
    let flaky = WebhookReceiver::start().await;
    flaky.fail_next(&[503, 500]);
    let gone = WebhookReceiver::start().await;
    gone.fail_next(&[410]);
    running.completed("JOB-OK", &ok.url("/hook")).await;
    running.completed("JOB-FLAKY", &flaky.url("/hook")).await;
    running.completed("JOB-GONE", &gone.url("/hook")).await;
    running.wait_for_status("JOB-OK", Status::Delivered).await;
    running
        .wait_for_status("JOB-FLAKY", Status::Delivered)
        .await;
    running
        .wait_for_status("JOB-GONE", Status::Undeliverable)
        .await;

    let metrics = running
        .wait_for_metrics("every attempt counted", |metrics| {
            value(
                metrics,
                "jetcall_callback_delivery_duration_seconds_count",
                &[],
            ) == 5.0
        })
        .await;
    let attempts = |outcome: &str, error_kind: &str| {
        value(
            &metrics,
            "jetcall_callback_attempts_total",
            &[
                &format!("outcome=\"{outcome}\""),
                &format!("error_kind=\"{error_kind}\""),
            ],
        )
    };
    assert_eq!(attempts("delivered", "none"), 2.0, "{metrics}");
    assert_eq!(attempts("retry", "http_status"), 2.0, "{metrics}");
    assert_eq!(attempts("undeliverable", "http_status"), 1.0, "{metrics}");
    let jobs = |status: &str| {
        value(
            &metrics,
            "jetcall_callback_jobs_total",
            &[&format!("status=\"{status}\"")],
        )
    };
    assert_eq!(jobs("delivered"), 2.0);
    assert_eq!(jobs("undeliverable"), 1.0);
    assert_eq!(
        value(
            &metrics,
            "jetcall_callback_delivery_latency_seconds_count",
            &[]
        ),
        2.0,
        "one latency per delivered job"
    );
    let latency = value(
        &metrics,
        "jetcall_callback_delivery_latency_seconds_sum",
        &[],
    );
    assert!(
        latency > 0.0 && latency < WAIT.as_secs_f64() * 2.0,
        "{latency}"
    );
    assert_eq!(value(&metrics, "jetcall_callback_in_flight", &[]), 0.0);
    assert_eq!(value(&metrics, "jetcall_callback_open_circuits", &[]), 0.0);
    for gauge in ["pending", "ack_pending", "redelivered"] {
        assert_eq!(
            value(
                &metrics,
                &format!("jetcall_callback_consumer_{gauge} "),
                &[]
            ),
            0.0,
            "{gauge}: every job is finished"
        );
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_destination_shows_as_an_open_circuit() {
    let running = Running::start(&[
        ("callback.retry_schedule", json!(vec!["20ms"; 10])),
        ("callback.breaker_cooldown", json!("1h")),
        // Opened by its first five failures, however quick; and the job kept waiting.
        ("callback.breaker_window", json!("1ms")),
        ("callback.max_round_age", json!("1h")),
    ])
    .await;
    let dead = WebhookReceiver::start().await;
    dead.fail_next(&[500; 20]);
    running.completed("JOB-DEAD", &dead.url("/hook")).await;

    let metrics = running
        .wait_for_metrics("the circuit to open and be noted", |metrics| {
            value(metrics, "jetcall_callback_open_circuits", &[]) == 1.0
                && value(
                    metrics,
                    "jetcall_callback_attempts_total",
                    &["error_kind=\"circuit_open\""],
                ) == 1.0
        })
        .await;
    assert_eq!(
        value(
            &metrics,
            "jetcall_callback_attempts_total",
            &["outcome=\"retry\"", "error_kind=\"http_status\""],
        ),
        f64::from(callback::BREAKER_THRESHOLD),
        "requests until the circuit opened: {metrics}"
    );
    assert_eq!(
        dead.deliveries().len(),
        callback::BREAKER_THRESHOLD as usize
    );
    // The job waits in JetStream for the circuit to close.
    let metrics = running
        .wait_for_metrics("the job waiting for its retry", |metrics| {
            value(metrics, "jetcall_callback_consumer_ack_pending", &[]) == 1.0
        })
        .await;
    assert_eq!(
        value(&metrics, "jetcall_callback_consumer_pending", &[]),
        0.0
    );

    // Another destination is not held back by it.
    let alive = WebhookReceiver::start().await;
    running.completed("JOB-ALIVE", &alive.url("/hook")).await;
    running
        .wait_for_status("JOB-ALIVE", Status::Delivered)
        .await;
    let metrics = running.metrics().await;
    assert_eq!(value(&metrics, "jetcall_callback_open_circuits", &[]), 1.0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumers_backlog_is_shown_and_kept_while_nats_is_away() {
    const JOBS: usize = 5;
    // One delivery at a time, stuck on a receiver that never answers: the rest wait.
    let mut running = Running::start(&[
        ("callback.concurrency", json!(1)),
        ("callback.timeout", json!("1m")),
    ])
    .await;
    let blackhole = Blackhole::start().await;
    for n in 0..JOBS {
        running
            .completed(&format!("JOB-{n}"), &blackhole.url("/hook"))
            .await;
    }
    let metrics = running
        .wait_for_metrics("a backlog behind one stuck delivery", |metrics| {
            let pending = value(metrics, "jetcall_callback_consumer_pending", &[]);
            let ack_pending = value(metrics, "jetcall_callback_consumer_ack_pending", &[]);
            value(metrics, "jetcall_callback_in_flight", &[]) == 1.0
                && pending + ack_pending == JOBS as f64
                && pending >= 1.0
        })
        .await;
    assert_eq!(blackhole.accepted(), 1, "one attempt at a time");
    let pending = value(&metrics, "jetcall_callback_consumer_pending", &[]);

    // NATS goes away: not ready, but a scrape still answers with the last values.
    running.nats.kill();
    wait_until("/readyz to say unavailable", WAIT, || async {
        let (status, body) = running.get("/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    let metrics = running.metrics().await;
    assert_eq!(
        value(&metrics, "jetcall_callback_consumer_pending", &[]),
        pending
    );
    assert!(
        value(&metrics, "jetcall_callback_consumer_info_errors_total", &[]) >= 1.0,
        "{metrics}"
    );
    running.nats.restart();
    wait_until("/readyz once NATS is back", WAIT, || async {
        let (status, body) = running.get("/readyz").await;
        (status == 200).then_some(body)
    })
    .await;
    running.stop().await;
}
