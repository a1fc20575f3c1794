//! API keys with policies of their own: a narrower callback allowlist, a request rate.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Gateway, article_job};

const PATH: &str = "/api/v1/generate-description";

async fn post_as(gateway: &Gateway, key: &str, path: &str, body: &Value) -> reqwest::Response {
    gateway
        .http
        .post(format!("{}{path}", gateway.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("POST")
}

fn to(job_id: &str, callback_url: &str) -> Value {
    let mut job = article_job(job_id);
    job["callback_url"] = json!(callback_url);
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_callback_allowlist_narrows_the_gateway_s() {
    let gateway = Gateway::start(&[
        (
            "gateway.callback_allowlist",
            json!(["127.0.0.1", "hooks.shop.example", "hooks.other.example"]),
        ),
        (
            "gateway.api_keys",
            json!([
                "open-key",
                {"key": "shop-key", "name": "shop", "callback_allowlist": ["hooks.shop.example"]}
            ]),
        ),
    ])
    .await;

    let refused = post_as(
        &gateway,
        "shop-key",
        PATH,
        &to("JOB-K1", "http://127.0.0.1:9/hook"),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error: Value = refused.json().await.expect("JSON");
    assert_eq!(error["type"], "invalid_callback_url");
    assert_eq!(error["field"], "callback_url");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`shop`"),
        "names the key's allowlist: {message}"
    );
    assert!(
        !message.contains("shop-key"),
        "never the key itself: {message}"
    );

    let accepted = post_as(
        &gateway,
        "shop-key",
        PATH,
        &to("JOB-K2", "https://hooks.shop.example/jobs"),
    )
    .await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    // A key without a list of its own has the gateway's hosts, but not its address
    // exemptions: those are for keys whose own list names the address.
    let open = post_as(
        &gateway,
        "open-key",
        PATH,
        &to("JOB-K3", "https://hooks.other.example/hook"),
    )
    .await;
    assert_eq!(open.status(), StatusCode::ACCEPTED);
    let loopback = post_as(
        &gateway,
        "open-key",
        PATH,
        &to("JOB-K3B", "http://127.0.0.1:9/hook"),
    )
    .await;
    assert_eq!(loopback.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error: Value = loopback.json().await.expect("JSON");
    assert_eq!(error["type"], "invalid_callback_url");

    // In a batch the key's list applies to each job.
    let batch = json!({"jobs": [
        {"job_id": "JOB-K4", "kind": "product-description", "callback_url": "http://127.0.0.1:9/hook",
         "input": {"product_id": "P", "product_name": "N", "specs": "S"}},
        {"job_id": "JOB-K5", "kind": "product-description", "callback_url": "https://hooks.shop.example/jobs",
         "input": {"product_id": "P", "product_name": "N", "specs": "S"}}
    ]});
    let answer: Value = post_as(&gateway, "shop-key", "/api/v1/jobs/batch", &batch)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(answer["results"][0]["result"], "rejected", "{answer}");
    assert_eq!(
        answer["results"][0]["error"]["type"],
        "invalid_callback_url"
    );
    assert_eq!(answer["results"][1]["result"], "accepted", "{answer}");
    assert_eq!(gateway.published().await, 3);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_request_rate_gets_429_and_other_keys_do_not() {
    let gateway = Gateway::start(&[(
        "gateway.api_keys",
        json!([{"key": "slow-key", "requests_per_second": 1}, "other-key"]),
    )])
    .await;
    let status_of = |key: &'static str| {
        let request = gateway
            .http
            .get(format!("{}/api/v1/jobs/NO-SUCH-JOB", gateway.url))
            .bearer_auth(key);
        async move { request.send().await.expect("GET") }
    };
    // A burst of one: of five requests sent back to back, at most one more gets through for
    // each second they take.
    let started = std::time::Instant::now();
    let mut limited = Vec::new();
    for _ in 0..5 {
        let response = status_of("slow-key").await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited.push(response);
        } else {
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
        }
    }
    let allowed = 1 + started.elapsed().as_secs() as usize;
    assert!(
        5 - limited.len() <= allowed,
        "{} of 5 passed in {:?}",
        5 - limited.len(),
        started.elapsed()
    );
    let refused = limited.pop().expect("some requests were limited");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|value| value.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let error: Value = refused.json().await.expect("JSON");
    assert_eq!(error["type"], "rate_limited");

    for _ in 0..5 {
        assert_eq!(status_of("other-key").await.status(), StatusCode::NOT_FOUND);
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_allowlist_refuses_loopback_and_private_destinations() {
    let default = jetcall::config::GatewayConfig::default().callback_allowlist;
    let gateway = Gateway::start(&[("gateway.callback_allowlist", json!(default))]).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::1]:9/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
    ] {
        let (status, error) = gateway.post(PATH, &to("JOB-D1", url)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {error}");
        assert_eq!(error["type"], "invalid_callback_url", "{url}");
    }
    assert_eq!(gateway.published().await, 0);
    gateway.stop().await;
}
