//! The limits the gateway enforces on its own: per job of a batch, on slow uploads, and on
//! event streams per API key.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::Gateway;

const BATCH: &str = "/api/v1/jobs/batch";

fn job(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "kind": "product-description",
        "input": {
            "product_id": "PROD-AC15",
            "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
            "specs": "1.5 Ton, 5 Star, Dual Inverter"
        },
        "callback_url": "http://127.0.0.1:9/webhooks/description"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_over_the_per_job_limits_is_refused_alone_and_for_good() {
    let gateway = Gateway::start(&[]).await;
    let mut big_metadata = job("JOB-BIG-METADATA");
    big_metadata["metadata"] = json!({ "notes": "x".repeat(20_000) });
    let mut deep_metadata = job("JOB-DEEP-METADATA");
    let mut deep = json!("bottom");
    for _ in 0..20 {
        deep = json!({ "level": deep });
    }
    deep_metadata["metadata"] = json!({ "tree": deep });
    // Each field within its own limit, the job over what a single submission may carry.
    let mut big_input = job("JOB-BIG-INPUT");
    for n in 0..10 {
        big_input["input"][format!("extra_{n}")] = json!("y".repeat(30_000));
    }
    let jobs = [
        job("JOB-FINE-1"),
        big_metadata,
        deep_metadata,
        big_input,
        job("JOB-FINE-2"),
    ];
    let (status, body) = gateway.post(BATCH, &json!({ "jobs": jobs })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().expect("results");
    let outcome = |index: usize| {
        let item = &results[index];
        (
            item["result"].as_str().unwrap_or_default().to_owned(),
            item["error"]["type"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    assert_eq!(outcome(0).0, "accepted", "{body}");
    assert_eq!(outcome(1), ("rejected".into(), "invalid_field".into()));
    assert_eq!(results[1]["error"]["field"], "metadata", "{body}");
    assert_eq!(outcome(2), ("rejected".into(), "invalid_field".into()));
    assert_eq!(outcome(3), ("rejected".into(), "payload_too_large".into()));
    assert_eq!(outcome(4).0, "accepted", "{body}");
    assert_eq!(gateway.published().await, 2);
    assert_eq!(gateway.recorded().await, 2);
    gateway.stop().await;
}

/// Opens a connection and sends `sent`, never the rest.
async fn stall(address: &str, sent: String) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.write_all(sent.as_bytes()).await.expect("send");
    stream
}

/// Reads until the gateway closes the connection; what it answered before closing.
async fn until_closed(mut stream: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    // Only a bound on a failure, which would otherwise hang the test.
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the gateway closes a stalled connection");
    // A reset is a close too.
    let _ = read;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_hold_no_place_and_are_cut_off() {
    let gateway = Gateway::start(&[
        ("gateway.max_in_flight", json!(4)),
        ("gateway.header_timeout", json!("1s")),
        ("gateway.body_timeout", json!("2s")),
    ])
    .await;
    let address = gateway.url.trim_start_matches("http://").to_owned();
    let mut bodies = Vec::new();
    for _ in 0..24 {
        let headers = format!(
            "POST /api/v1/jobs HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"job_id\": "
        );
        bodies.push(stall(&address, headers).await);
    }
    let mut headers = Vec::new();
    for _ in 0..12 {
        headers.push(
            stall(
                &address,
                format!("POST /api/v1/jobs HTTP/1.1\r\nhost: {address}\r\ncontent-"),
            )
            .await,
        );
    }

    // Six times `max_in_flight` uploads stalled, and a whole request still gets through.
    let (status, body) = gateway
        .post(
            "/api/v1/generate-description",
            &crate::harness::article_job("JOB-MEANWHILE"),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    for stream in bodies {
        let answer = until_closed(stream).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
    }
    for stream in headers {
        until_closed(stream).await;
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_key_cannot_hold_every_event_stream() {
    // beta is an operator, so it may watch alpha's job; each key's own list lets its jobs
    // call back to loopback.
    let gateway = Gateway::start(&[
        (
            "gateway.api_keys",
            json!([
                {"key": "alpha-key", "name": "alpha", "callback_allowlist": ["127.0.0.1"]},
                {"key": "beta-key", "name": "beta", "role": "admin", "callback_allowlist": ["127.0.0.1"]}
            ]),
        ),
        ("gateway.max_event_streams_per_key", json!(2)),
    ])
    .await;
    let submitted = gateway
        .http
        .post(format!("{}/api/v1/generate-description", gateway.url))
        .bearer_auth("alpha-key")
        .json(&crate::harness::article_job("JOB-WATCHED"))
        .send()
        .await
        .expect("POST");
    assert_eq!(submitted.status(), StatusCode::ACCEPTED);
    let open = |key: &'static str| {
        gateway
            .http
            .get(format!("{}/api/v1/jobs/JOB-WATCHED/events", gateway.url))
            .bearer_auth(key)
            .send()
    };
    // Held open: the job stays `accepted`, so neither stream ends.
    let first = open("alpha-key").await.expect("GET");
    let second = open("alpha-key").await.expect("GET");
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let refused = open("alpha-key").await.expect("GET");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let error: Value = refused.json().await.expect("JSON error");
    assert_eq!(error["type"], "overloaded", "{error}");
    let other = open("beta-key").await.expect("GET");
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "another key is not affected"
    );
    drop((first, second, other));
    gateway.stop().await;
}
