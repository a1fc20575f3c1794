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
