//! Acceptance, idempotent resubmission, unavailability and authentication.

use reqwest::StatusCode;
use serde_json::json;

use testkit::metrics::sample;

use crate::harness::{Gateway, article_job};

const PATH: &str = "/api/v1/generate-description";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_job_is_recorded_and_published_once() {
    let gateway = Gateway::start(&[]).await;
    let (status, body) = gateway.post(PATH, &article_job("JOB-771")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job_id"], "JOB-771");
    assert_eq!(body["status"], "accepted");

    let (status, doc) = gateway.get("/api/v1/jobs/JOB-771").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["status"], "accepted");
    assert_eq!(doc["kind"], "product-description");
    assert_eq!(doc["input"]["product_id"], "PROD-AC15");
    assert_eq!(gateway.published().await, 1);

    // The request event carries the job and is deduplicated by its Nats-Msg-Id.
    let message = gateway
        .topology
        .stream
        .get_last_raw_message_by_subject("jobs.requested.product-description")
        .await
        .expect("request event");
    let headers = message.headers;
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("JOB-771.requested")
    );
    let event: serde_json::Value = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!(event["job_id"], "JOB-771");
    assert_eq!(
        event["input"]["product_name"],
        "LG 1.5 Ton 5 Star Inverter Split AC"
    );
    gateway.stop().await;
}

/// The generator fills the template in one pass, so a value's `{{placeholder}}` is only text
/// to it: the gateway takes such a body as it is, and the job's input keeps it verbatim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_holding_template_placeholders_are_accepted_verbatim() {
    let gateway = Gateway::start(&[]).await;
    let mut body = article_job("JOB-BRACES");
    body["product_name"] = json!("{{specs}}{{product_id}} AC");
    body["specs"] = json!({"note": "{{product_name}}", "{{key}}": "}}{{"});
    let (status, answer) = gateway.post(PATH, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");

    let (status, doc) = gateway.get("/api/v1/jobs/JOB-BRACES").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["input"]["product_name"], "{{specs}}{{product_id}} AC");
    assert_eq!(doc["input"]["specs"]["{{key}}"], "}}{{");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_an_id_gets_one() {
    let gateway = Gateway::start(&[]).await;
    let mut body = article_job("unused");
    body.as_object_mut().map(|m| m.remove("job_id"));
    let (status, accepted) = gateway.post(PATH, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = accepted["job_id"].as_str().expect("generated id");
    assert!(id.starts_with("job_"), "{id}");
    let (status, doc) = gateway.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!((status, &doc["job_id"]), (StatusCode::OK, &json!(id)));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_is_idempotent_and_a_different_body_conflicts() {
    let gateway = Gateway::start(&[]).await;
    let job = article_job("JOB-771");
    assert_eq!(gateway.post(PATH, &job).await.0, StatusCode::ACCEPTED);
    let (status, again) = gateway.post(PATH, &job).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["job_id"], "JOB-771");
    assert_eq!(gateway.published().await, 1, "a retry is stored once");

    let mut changed = job.clone();
    changed["product_name"] = json!("Another AC");
    let (status, error) = gateway.post(PATH, &changed).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert_eq!(error["type"], "job_conflict");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("JOB-771"))
    );
    assert_eq!(gateway.published().await, 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_a_job_is_refused_with_503_and_accepted_on_retry() {
    let mut gateway = Gateway::start(&[]).await;
    gateway.nats.kill();
    let (status, error) = gateway.post(PATH, &article_job("JOB-771")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["type"], "unavailable");
    let (status, _) = gateway.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    gateway.nats.restart();
    gateway.wait_ready().await;
    let (status, body) = gateway.post(PATH, &article_job("JOB-771")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(gateway.published().await, 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_when_configured() {
    let gateway = Gateway::start(&[(
        "gateway.api_keys",
        // Its own allowlist: only a key's own list lets its jobs call back to loopback.
        json!([{"key": "s3cret-key", "callback_allowlist": ["127.0.0.1"]}]),
    )])
    .await;
    let (status, error) = gateway.post(PATH, &article_job("JOB-1")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error["type"], "unauthorized");

    let response = gateway
        .http
        .post(format!("{}{PATH}", gateway.url))
        .bearer_auth("s3cret-key")
        .json(&article_job("JOB-1"))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // Health endpoints stay open for probes.
    assert_eq!(gateway.get("/healthz").await.0, StatusCode::OK);
    gateway.stop().await;
}

#[test]
fn an_invalid_setting_stops_the_binary_naming_the_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .env("JETCALL_GATEWAY__LISTEN", "not-an-address")
        .env("JETCALL_CONFIG", "/dev/null")
        .output()
        .expect("run the gateway binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert!(stderr.contains("gateway.listen"), "{stderr}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .env("JETCALL_GATEWAY__LISTN", "127.0.0.1:0")
        .env("JETCALL_CONFIG", "/dev/null")
        .output()
        .expect("run the gateway binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert!(
        stderr.contains("listn"),
        "a misspelt key is named: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_status_and_new_jobs_by_kind() {
    let gateway = Gateway::start(&[]).await;
    assert_eq!(
        gateway.post(PATH, &article_job("JOB-M1")).await.0,
        StatusCode::ACCEPTED
    );
    // The same job again is not a new one.
    assert_eq!(
        gateway.post(PATH, &article_job("JOB-M1")).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        gateway.get("/api/v1/jobs/NOPE").await.0,
        StatusCode::NOT_FOUND
    );

    let (status, metrics) = gateway.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let metrics = metrics.as_str().expect("text exposition");
    let posted = sample(
        metrics,
        "jetcall_gateway_http_requests_total",
        &[
            "route=\"/api/v1/generate-description\"",
            "method=\"POST\"",
            "status=\"202\"",
        ],
    );
    assert_eq!(posted, Some(2.0), "{metrics}");
    let missing = sample(
        metrics,
        "jetcall_gateway_http_requests_total",
        &["route=\"/api/v1/jobs/{job_id}\"", "status=\"404\""],
    );
    assert_eq!(missing, Some(1.0), "{metrics}");
    let accepted = sample(
        metrics,
        "jetcall_gateway_jobs_accepted_total",
        &["kind=\"product-description\""],
    );
    assert_eq!(accepted, Some(1.0), "{metrics}");
    let timed = sample(
        metrics,
        "jetcall_gateway_http_request_duration_seconds_count",
        &["route=\"/api/v1/generate-description\""],
    );
    assert_eq!(timed, Some(2.0), "{metrics}");
    gateway.stop().await;
}
