//! `POST /api/v1/jobs/batch`: one answer per job, each the one a single submission of it would
//! get; only accepted jobs are recorded and published.

use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{Value, json};

use jetcall::JobId;
use jetcall::status::Status;

use crate::harness::{self, Gateway};

const BATCH: &str = "/api/v1/jobs/batch";
const SINGLE: &str = "/api/v1/jobs";

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

fn batch(jobs: &[Value]) -> Value {
    json!({ "jobs": jobs })
}

fn many(prefix: &str, count: usize) -> Vec<Value> {
    (0..count).map(|n| job(&format!("{prefix}-{n}"))).collect()
}

async fn in_kv(gateway: &Gateway, id: &str) -> Option<Status> {
    let id = JobId::parse(id).expect("job id");
    let found = gateway.topology.status.get(&id).await.expect("KV read");
    found.map(|(doc, _)| doc.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_gets_one_answer_per_job_and_only_valid_jobs_are_kept() {
    let gateway = Gateway::start(&[]).await;
    // Submitted before, still waiting; and one that has moved on.
    for id in ["JOB-OLD", "JOB-TAKEN", "JOB-MOVED"] {
        let (status, body) = gateway.post(SINGLE, &job(id)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let moved = JobId::parse("JOB-MOVED").expect("id");
    gateway
        .topology
        .status
        .update(&moved, |doc| {
            doc.advance(Status::Generating, time::OffsetDateTime::now_utc())
        })
        .await
        .expect("advance");
    assert_eq!(gateway.published().await, 3);

    let mut unknown_kind = job("JOB-KIND");
    unknown_kind["kind"] = json!("haiku");
    let mut bad_callback = job("JOB-HOOK");
    bad_callback["callback_url"] = json!("https://example.com/hook");
    let mut missing_field = job("JOB-MISSING");
    missing_field
        .as_object_mut()
        .map(|m| m.remove("callback_url"));
    let mut missing_input = job("JOB-NO-SPECS");
    missing_input["input"]
        .as_object_mut()
        .map(|m| m.remove("specs"));
    let mut wrong_type = job("JOB-TYPE");
    wrong_type["input"] = json!("not an object");
    let bad_id = job("JOB.1");
    let mut conflicting = job("JOB-TAKEN");
    conflicting["input"]["product_name"] = json!("Another AC");
    let mut without_id = job("unused");
    without_id.as_object_mut().map(|m| m.remove("job_id"));

    let jobs = vec![
        job("JOB-NEW"),   // 0 accepted
        unknown_kind,     // 1 unknown_kind
        bad_callback,     // 2 invalid_callback_url
        missing_field,    // 3 invalid_field callback_url
        missing_input,    // 4 invalid_field specs
        wrong_type,       // 5 invalid_field input
        bad_id,           // 6 invalid_field job_id
        job("JOB-OLD"),   // 7 duplicate, still accepted
        job("JOB-MOVED"), // 8 duplicate, generating
        conflicting,      // 9 job_conflict
        without_id,       // 10 accepted, id made
        json!(42),        // 11 not an object
        job("JOB-NEW"),   // 12 duplicate_in_batch
    ];
    let (status, body) = gateway.post(BATCH, &batch(&jobs)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), jobs.len(), "{body}");
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["index"], index, "{result}");
    }

    let expected: [(&str, Option<&str>, Option<&str>); 13] = [
        ("accepted", Some("accepted"), None),
        ("rejected", None, Some("unknown_kind")),
        ("rejected", None, Some("invalid_callback_url")),
        ("rejected", None, Some("invalid_field")),
        ("rejected", None, Some("invalid_field")),
        ("rejected", None, Some("invalid_field")),
        ("rejected", None, Some("invalid_field")),
        ("duplicate", Some("accepted"), None),
        ("duplicate", Some("generating"), None),
        ("rejected", None, Some("job_conflict")),
        ("accepted", Some("accepted"), None),
        ("rejected", None, Some("invalid_field")),
        ("rejected", None, Some("duplicate_in_batch")),
    ];
    for (index, (result, status, error)) in expected.iter().enumerate() {
        let got = &results[index];
        assert_eq!(got["result"], *result, "{index}: {got}");
        assert_eq!(got["status"].as_str(), *status, "{index}: {got}");
        assert_eq!(got["error"]["type"].as_str(), *error, "{index}: {got}");
        if error.is_some() {
            assert!(
                got["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{index}: {got}"
            );
        }
    }
    assert_eq!(
        (&body["accepted"], &body["duplicates"], &body["rejected"]),
        (&json!(2), &json!(2), &json!(9)),
        "{body}"
    );

    // Ids: as named when valid, made when absent, null when there is no valid one.
    assert_eq!(results[0]["job_id"], "JOB-NEW");
    assert_eq!(results[1]["job_id"], "JOB-KIND");
    assert_eq!(results[6]["job_id"], Value::Null);
    assert_eq!(results[11]["job_id"], Value::Null);
    assert_eq!(results[12]["job_id"], "JOB-NEW");
    let made = results[10]["job_id"].as_str().expect("a made id");
    assert!(made.starts_with("job_"), "{made}");
    assert_eq!(results[3]["error"]["field"], "callback_url");
    assert_eq!(results[4]["error"]["field"], "specs");
    assert_eq!(results[5]["error"]["field"], "input");
    assert_eq!(results[6]["error"]["field"], "job_id");
    assert_eq!(results[12]["error"]["field"], "job_id");
    assert!(
        results[12]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("index 0")),
        "{}",
        results[12]
    );

    // Each rejection is what the single endpoint says about that job.
    for index in [1, 2, 3, 4, 5, 6, 9, 11] {
        let (_, alone) = gateway.post(SINGLE, &jobs[index]).await;
        let error = &results[index]["error"];
        assert_eq!(error["type"], alone["type"], "{index}: {error} / {alone}");
        assert_eq!(error["field"], alone["field"], "{index}: {error} / {alone}");
        let (short, long) = (
            error["message"].as_str().unwrap_or_default(),
            alone["message"].as_str().unwrap_or_default(),
        );
        if index == 11 {
            assert!(short.contains("JSON object"), "{short}");
        } else {
            assert!(long.starts_with(short), "{index}: {short:?} / {long:?}");
        }
    }

    // Only the two accepted jobs were added; the still-waiting duplicate was published again
    // and dropped by JetStream.
    assert_eq!(gateway.published().await, 5);
    assert_eq!(gateway.recorded().await, 5);
    assert_eq!(in_kv(&gateway, "JOB-NEW").await, Some(Status::Accepted));
    assert_eq!(in_kv(&gateway, made).await, Some(Status::Accepted));
    assert_eq!(in_kv(&gateway, "JOB-KIND").await, None);
    assert_eq!(in_kv(&gateway, "JOB-HOOK").await, None);
    let (_, taken) = gateway.get("/api/v1/jobs/JOB-TAKEN").await;
    assert_eq!(
        taken["input"]["product_name"],
        "LG 1.5 Ton 5 Star Inverter Split AC"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_are_accepted_and_sending_them_again_publishes_nothing() {
    let gateway = Gateway::start(&[]).await;
    let jobs = many("JOB", 1_000);
    let started = Instant::now();
    let (status, body) = gateway.post(BATCH, &batch(&jobs)).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 1_000, "{}", body["results"][0]);
    assert_eq!(
        (&body["duplicates"], &body["rejected"]),
        (&json!(0), &json!(0))
    );
    let results = body["results"].as_array().expect("results");
    assert!(
        results
            .iter()
            .enumerate()
            .all(|(n, r)| r["job_id"] == format!("JOB-{n}") && r["status"] == "accepted")
    );
    assert_eq!(gateway.published().await, 1_000);
    assert_eq!(gateway.recorded().await, 1_000);
    eprintln!("1,000 jobs in one batch: {took:?}");

    let (status, again) = gateway.post(BATCH, &batch(&jobs)).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (&again["accepted"], &again["duplicates"], &again["rejected"]),
        (&json!(0), &json!(1_000), &json!(0)),
        "{}",
        again["results"][0]
    );
    assert!(
        again["results"]
            .as_array()
            .expect("results")
            .iter()
            .all(|r| r["result"] == "duplicate" && r["status"] == "accepted")
    );
    assert_eq!(gateway.published().await, 1_000, "nothing new is stored");
    assert_eq!(gateway.recorded().await, 1_000);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_be_read_is_refused_whole_and_nothing_is_kept() {
    let gateway = Gateway::start(&[]).await;
    let cases: Vec<(&str, Value, StatusCode, &str, Option<&str>)> = vec![
        (
            "empty",
            batch(&[]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch_empty",
            Some("jobs"),
        ),
        (
            "1,001 jobs",
            batch(&many("JOB", 1_001)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch_too_large",
            Some("jobs"),
        ),
        (
            "no jobs",
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("jobs"),
        ),
        (
            "jobs not a list",
            json!({"jobs": job("JOB-1")}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("jobs"),
        ),
        (
            "unknown field",
            json!({"jobs": [job("JOB-1")], "priority": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("priority"),
        ),
        (
            "a bare list",
            json!([job("JOB-1")]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("."),
        ),
    ];
    for (what, body, status, kind, field) in cases {
        let (got, error) = gateway.post(BATCH, &body).await;
        assert_eq!(got, status, "{what}: {error}");
        assert_eq!(error["type"], kind, "{what}: {error}");
        assert_eq!(error["field"].as_str(), field, "{what}: {error}");
    }
    let raw: Vec<(&str, &str, &[u8], StatusCode, &str)> = vec![
        (
            "malformed",
            "application/json",
            b"{\"jobs\": [",
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "not JSON",
            "text/plain",
            b"{\"jobs\": []}",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (what, content_type, body, status, kind) in raw {
        let (got, error) = gateway.post_raw(BATCH, content_type, body.to_vec()).await;
        assert_eq!(
            (got, &error["type"]),
            (status, &json!(kind)),
            "{what}: {error}"
        );
    }
    assert_eq!(gateway.published().await, 0, "nothing may be published");
    assert_eq!(gateway.recorded().await, 0, "nothing may be recorded");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_has_its_own_body_limit() {
    let gateway = Gateway::start(&[
        ("gateway.max_body_bytes", json!(4096)),
        ("gateway.max_batch_bytes", json!(32_768)),
    ])
    .await;
    // Larger than a single submission may be, within the batch's limit.
    let jobs = many("JOB", 40);
    let size = batch(&jobs).to_string().len();
    assert!((4096..32_768).contains(&size), "{size}");
    let (status, body) = gateway.post(BATCH, &batch(&jobs)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 40);

    let (status, error) = gateway.post(BATCH, &batch(&many("BIG", 200))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert_eq!(error["type"], "payload_too_large");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("32768")),
        "{error}"
    );
    // The single endpoint keeps its own limit.
    let mut large = job("JOB-LARGE");
    large["input"]["specs"] = json!("x".repeat(5_000));
    let (status, error) = gateway.post(SINGLE, &large).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("4096")),
        "{error}"
    );
    assert_eq!(gateway.published().await, 40);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_publish_rejects_the_job_and_a_retry_repairs_it() {
    let gateway = Gateway::start(&[]).await;
    let config = harness::config(&gateway.nats, &[]);
    let stream = jetcall::topology::stream_config(&config).name;
    // Without the stream the status documents are written but no publish is confirmed: a
    // gateway that dies between its two writes leaves the same state behind.
    gateway
        .topology
        .jetstream
        .delete_stream(&stream)
        .await
        .expect("delete the stream");
    let jobs = many("JOB", 3);
    let (status, body) = gateway.post(BATCH, &batch(&jobs)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], 3, "{body}");
    for result in body["results"].as_array().expect("results") {
        assert_eq!(result["result"], "rejected", "{result}");
        assert_eq!(result["error"]["type"], "unavailable", "{result}");
    }
    assert_eq!(in_kv(&gateway, "JOB-0").await, Some(Status::Accepted));

    testkit::config::provision(&config).await;
    let (status, body) = gateway.post(BATCH, &batch(&jobs)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["duplicates"], 3,
        "the jobs were recorded before: {body}"
    );
    assert_eq!(gateway.published().await, 3, "and are now published");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_every_job_is_unavailable_and_a_retry_accepts_them() {
    let mut gateway = Gateway::start(&[]).await;
    gateway.nats.kill();
    let jobs = many("JOB", 3);
    let (status, body) = gateway.post(BATCH, &batch(&jobs)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], 3, "{body}");
    assert!(
        body["results"]
            .as_array()
            .expect("results")
            .iter()
            .all(|r| r["error"]["type"] == "unavailable"),
        "{body}"
    );

    gateway.nats.restart();
    gateway.wait_ready().await;
    let (status, body) = gateway.post(BATCH, &batch(&jobs)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A write NATS did not confirm may still have been made (the client sends what it
    // buffered once it reconnects), so a job may come back as recorded before: either way it
    // is in JetStream now.
    assert_eq!(body["rejected"], 0, "{body}");
    assert!(
        body["results"]
            .as_array()
            .expect("results")
            .iter()
            .all(
                |r| matches!(r["result"].as_str(), Some("accepted" | "duplicate"))
                    && r["status"] == "accepted"
            ),
        "{body}"
    );
    assert_eq!(gateway.published().await, 3);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_needs_the_api_key_and_a_job_named_batch_stays_readable() {
    let gateway = Gateway::start(&[(
        "gateway.api_keys",
        // Its own allowlist: only a key's own list lets its jobs call back to loopback.
        json!([{"key": "s3cret-key", "callback_allowlist": ["127.0.0.1"]}]),
    )])
    .await;
    let (status, error) = gateway.post(BATCH, &batch(&[job("batch")])).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error["type"], "unauthorized");
    assert_eq!(gateway.published().await, 0);

    let response = gateway
        .http
        .post(format!("{}{BATCH}", gateway.url))
        .bearer_auth("s3cret-key")
        .json(&batch(&[job("batch")]))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["accepted"], 1, "{body}");

    let response = gateway
        .http
        .get(format!("{}{BATCH}", gateway.url))
        .bearer_auth("s3cret-key")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.expect("JSON");
    assert_eq!(
        (&doc["job_id"], &doc["status"]),
        (&json!("batch"), &json!("accepted"))
    );
    gateway.stop().await;
}

#[test]
fn a_batch_limit_below_the_body_limit_stops_the_binary() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .env("JETCALL_GATEWAY__MAX_BATCH_BYTES", "1000")
        .env("JETCALL_CONFIG", "/dev/null")
        .output()
        .expect("run the gateway binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert!(stderr.contains("gateway.max_batch_bytes"), "{stderr}");
}
