//! Issue 7's observability through the whole pipeline: the caller's W3C `traceparent` reaches
//! the webhook (every hop a span of its own in the same trace), a job without one gets a
//! trace of its own, and every service's `/metrics` shows its work and its consumer's lag.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use jetcall::Kind;
use jetcall::subjects::Event;
use jetcall::trace::TraceParent;
use testkit::metrics::sample;
use testkit::{WebhookReceiver, wait_until};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(30);

fn job(job_id: &str, callback_url: &str) -> Value {
    json!({
        "job_id": job_id,
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": {"capacity": "1.5 Ton"},
        "callback_url": callback_url
    })
}

/// POSTs `body` to the gateway's `path` with `traceparent` headers, as many as given.
async fn post_traced(
    pipeline: &Pipeline,
    path: &str,
    body: &Value,
    traceparents: &[&str],
) -> (StatusCode, Value) {
    let mut request = pipeline
        .http
        .post(format!("{}{path}", pipeline.gateway_url))
        .json(body);
    for value in traceparents {
        request = request.header("traceparent", *value);
    }
    let response = request.send().await.expect("POST to the gateway");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The `traceparent` of the last event on `event`'s subject for product descriptions, waited
/// for: a service publishes its event just after it writes the status a test waits for.
async fn event_trace(pipeline: &Pipeline, event: Event) -> TraceParent {
    let subject = event.subject(&Kind::product_description());
    let message = wait_until(&format!("a message on {subject}"), WAIT, || async {
        pipeline
            .topology
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .ok()
    })
    .await;
    TraceParent::from_headers(Some(&message.headers))
        .unwrap_or_else(|| panic!("{subject} carries a valid traceparent: {message:?}"))
}

fn webhook_trace(delivery: &testkit::receiver::Delivery) -> TraceParent {
    let value = delivery.header("traceparent");
    TraceParent::parse(value)
        .unwrap_or_else(|| panic!("the webhook carries a valid traceparent, not {value:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_trace_reaches_the_webhook_through_every_service() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;
    let caller = TraceParent::start();

    let (status, body) = post_traced(
        &pipeline,
        "/api/v1/generate-description",
        &job("JOB-TRACED", &receiver.url("/hook")),
        &[&caller.to_string()],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deliveries = receiver.wait_for(1, WAIT).await;
    let webhook = webhook_trace(&deliveries[0]);
    assert_eq!(webhook.trace_id(), caller.trace_id(), "the caller's trace");
    assert_ne!(
        webhook.span_id(),
        caller.span_id(),
        "the callback's own span"
    );
    assert!(webhook.sampled(), "the caller's flags are kept");

    // Each hop is a span of its own in the caller's trace.
    let doc = pipeline
        .wait_for_status("JOB-TRACED", "delivered", WAIT)
        .await;
    assert_eq!(
        doc["trace_id"],
        caller.trace_id(),
        "kept in the status document"
    );
    let requested = event_trace(&pipeline, Event::Requested).await;
    let completed = event_trace(&pipeline, Event::Completed).await;
    let delivered = event_trace(&pipeline, Event::Delivered).await;
    let spans = [
        caller.span_id(),
        requested.span_id(),
        completed.span_id(),
        webhook.span_id(),
    ];
    for (hop, trace) in [
        ("gateway", requested),
        ("generator", completed),
        ("callback", delivered),
    ] {
        assert_eq!(trace.trace_id(), caller.trace_id(), "{hop}'s event");
    }
    for (i, span) in spans.iter().enumerate() {
        assert!(
            !spans[..i].contains(span),
            "every hop has its own span id: {spans:?}"
        );
    }
    assert_eq!(
        delivered.span_id(),
        webhook.span_id(),
        "the delivery report is the webhook's span"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_a_valid_traceparent_gets_a_trace_of_its_own() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;
    let zeros = format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32));
    let valid = TraceParent::start().to_string();
    let cases: [(&str, Vec<&str>); 4] = [
        ("JOB-NONE", vec![]),
        ("JOB-ZEROS", vec![zeros.as_str()]),
        (
            "JOB-UPPER",
            vec!["00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"],
        ),
        // Two headers: which one would be the caller's?
        ("JOB-TWICE", vec![valid.as_str(), valid.as_str()]),
    ];
    for (job_id, headers) in &cases {
        let (status, body) = post_traced(
            &pipeline,
            "/api/v1/generate-description",
            &job(job_id, &receiver.url("/hook")),
            headers,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job_id}: {body}");
    }
    let deliveries = receiver.wait_for(cases.len(), WAIT).await;
    let mut traces = Vec::new();
    for (job_id, _) in &cases {
        let delivery = deliveries
            .iter()
            .find(|delivery| delivery.json()["job_id"] == *job_id)
            .unwrap_or_else(|| panic!("{job_id}'s webhook"));
        let trace = webhook_trace(delivery);
        let doc = pipeline.wait_for_status(job_id, "delivered", WAIT).await;
        assert_eq!(doc["trace_id"], trace.trace_id(), "{job_id}'s own trace");
        traces.push(trace.trace_id());
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), cases.len(), "a new trace each: {traces:?}");
    assert!(!traces.contains(&"0".repeat(32)));
    assert!(
        !traces.contains(&valid[3..35].to_owned()),
        "a repeated header is not trusted"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_batch_puts_every_job_in_the_callers_trace() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;
    let caller = TraceParent::start();
    let jobs: Vec<Value> = ["JOB-B1", "JOB-B2"]
        .iter()
        .map(|id| {
            json!({
                "job_id": id,
                "kind": "product-description",
                "input": {"product_id": id, "product_name": "AC", "specs": "1.5 Ton"},
                "callback_url": receiver.url("/hook"),
            })
        })
        .collect();
    let (status, body) = post_traced(
        &pipeline,
        "/api/v1/jobs/batch",
        &json!({"jobs": jobs}),
        &[&caller.to_string()],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    let deliveries = receiver.wait_for(2, WAIT).await;
    let spans: Vec<String> = deliveries
        .iter()
        .map(|delivery| {
            let trace = webhook_trace(delivery);
            assert_eq!(trace.trace_id(), caller.trace_id());
            trace.span_id()
        })
        .collect();
    assert_ne!(spans[0], spans[1], "a span per job");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_consuming_service_shows_its_work_and_its_consumers_lag() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;
    let (status, body) = pipeline
        .post(
            "/api/v1/generate-description",
            &job("JOB-M", &receiver.url("/hook")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    pipeline.wait_for_status("JOB-M", "delivered", WAIT).await;

    // Once the job is through, both consumers are idle, as a scrape shows.
    for service in ["generator", "callback"] {
        let prefix = format!("jetcall_{service}_consumer");
        let metrics = wait_until(&format!("{service}'s consumer idle"), WAIT, || async {
            let metrics = pipeline.metrics(service).await;
            let idle = ["pending", "ack_pending", "redelivered"]
                .iter()
                .all(|gauge| sample(&metrics, &format!("{prefix}_{gauge} "), &[]) == Some(0.0));
            idle.then_some(metrics)
        })
        .await;
        assert!(metrics.ends_with("# EOF\n"), "OpenMetrics text");
        let ready = pipeline
            .http
            .get(format!("{}/readyz", pipeline.admin_url(service)))
            .send()
            .await
            .expect("GET /readyz");
        assert_eq!(ready.status(), StatusCode::OK, "{service} is ready");
    }
    let metrics = pipeline.metrics("callback").await;
    let attempts = sample(
        &metrics,
        "jetcall_callback_attempts_total",
        &["outcome=\"delivered\""],
    );
    assert_eq!(attempts, Some(1.0), "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "jetcall_callback_delivery_latency_seconds_count",
            &[]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "jetcall_callback_in_flight", &[]),
        Some(0.0)
    );
    let generated = sample(
        &pipeline.metrics("generator").await,
        "jetcall_generator_jobs_total",
        &["status=\"completed\""],
    );
    assert_eq!(generated, Some(1.0));
    pipeline.stop().await;
}
