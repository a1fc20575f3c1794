//! A job's own signing secret: kept where a reader of the `job_status` bucket cannot use it,
//! and in no answer of the API.

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use jetcall::JobId;

use crate::harness::Gateway;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn with_secret(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "kind": "product-description",
        "input": {"product_id": "P-1", "product_name": "Kettle", "specs": "1.7 l"},
        "callback_url": "http://127.0.0.1:9/hook",
        "signing_secret": SECRET
    })
}

/// What a reader of the bucket sees: `nats kv get job_status <id>`.
async fn stored(gateway: &Gateway, id: &str) -> String {
    let value = testkit::jobs::status_bucket(&gateway.topology)
        .await
        .get(JobId::parse(id).expect("id").as_str())
        .await
        .expect("KV get")
        .expect("the job is recorded");
    String::from_utf8(value.to_vec()).expect("UTF-8")
}

/// `callback.secrets_key`, as a deployment sets it: 32 bytes in base64.
const SECRETS_KEY: &str = "c2VjcmV0cy1rZXktZm9yLXRoZS1nYXRld2F5LXRlc3Q=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_s_secret_is_not_readable_in_the_bucket_nor_in_any_answer() {
    let gateway = Gateway::start(&[("callback.secrets_key", json!(SECRETS_KEY))]).await;
    let (status, body) = gateway.post("/api/v1/jobs", &with_secret("JOB-S1")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let raw = stored(&gateway, "JOB-S1").await;
    assert!(!raw.contains(SECRET), "the secret in plain text: {raw}");
    let secret_body = SECRET.trim_start_matches("whsec_");
    assert!(
        !raw.contains(secret_body),
        "the secret in plain text: {raw}"
    );
    let doc: Value = serde_json::from_str(&raw).expect("JSON");
    assert!(doc.get("signing_secret").is_none(), "{raw}");

    // Neither the secret nor anything computed from it leaves through the API.
    let (status, shown) = gateway.get("/api/v1/jobs/JOB-S1").await;
    assert_eq!(status, StatusCode::OK);
    for field in ["signing_secret", "sealed_signing_secret", "request_digest"] {
        assert!(shown.get(field).is_none(), "`{field}` shown: {shown}");
    }
    let response = gateway
        .http
        .get(format!("{}/api/v1/jobs/JOB-S1/events", gateway.url))
        .send()
        .await
        .expect("GET events");
    let mut chunks = response.bytes_stream();
    let first = chunks.next().await.expect("an event").expect("bytes");
    let first = String::from_utf8_lossy(&first);
    for field in ["signing_secret", "request_digest", "whsec_"] {
        assert!(!first.contains(field), "`{field}` in the event: {first}");
    }
    // The same submission again is recognised as the same job.
    let (status, body) = gateway.post("/api/v1/jobs", &with_secret("JOB-S1")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let mut other_secret = with_secret("JOB-S1");
    other_secret["signing_secret"] = json!("whsec_bm90IHRoZSBzYW1lIHNlY3JldCBhdCBhbGw=");
    let (status, body) = gateway.post("/api/v1/jobs", &other_secret).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secrets_key_a_job_s_own_secret_is_refused() {
    let gateway = Gateway::start(&[]).await;
    let (status, error) = gateway.post("/api/v1/jobs", &with_secret("JOB-S2")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["field"], "signing_secret", "{error}");
    assert_eq!(gateway.recorded().await, 0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_schema_has_no_secret_of_a_job() {
    let gateway = Gateway::start(&[]).await;
    let (status, doc) = gateway.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let reference = doc["paths"]["/api/v1/jobs/{job_id}"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"]["$ref"]
        .as_str()
        .expect("the answer names its schema");
    let schema_name = reference.trim_start_matches("#/components/schemas/");
    let schema = &doc["components"]["schemas"][schema_name];
    assert!(schema["properties"].is_object(), "{schema_name}");
    for field in ["signing_secret", "sealed_signing_secret", "request_digest"] {
        assert!(
            schema["properties"].get(field).is_none(),
            "`{field}` in {schema_name}"
        );
    }
    gateway.stop().await;
}
