//! Tenants: a job belongs to the key that submitted it. Another key sees and acts on it as
//! if it did not exist; an operator's key (`role = "admin"`) sees and acts on every job.

use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;

use jetcall::JobId;
use jetcall::events::DeliveryReport;
use jetcall::publish::publish_event;
use jetcall::status::Status;
use jetcall::subjects::Event;

use crate::harness::{Gateway, article_job, listed_ids};

pub(crate) const KEYS: [(&str, &str); 3] = [("key-a", "a"), ("key-b", "b"), ("key-ops", "ops")];

pub(crate) async fn tenants() -> Gateway {
    Gateway::start(&[(
        "gateway.api_keys",
        json!([
            {"key": KEYS[0].0, "name": KEYS[0].1, "callback_allowlist": ["127.0.0.1"]},
            {"key": KEYS[1].0, "name": KEYS[1].1, "callback_allowlist": ["127.0.0.1"]},
            {"key": KEYS[2].0, "name": KEYS[2].1, "role": "admin"},
        ]),
    )])
    .await
}

pub(crate) async fn call(
    gateway: &Gateway,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (StatusCode, String) {
    let url = format!("{}{path}", gateway.url);
    let request = match method {
        "POST" => gateway.http.post(url),
        "DELETE" => gateway.http.delete(url),
        _ => gateway.http.get(url),
    };
    let request = match body {
        Some(body) => request.json(body),
        None => request,
    };
    let response = request.bearer_auth(key).send().await.expect("request");
    let status = response.status();
    // An event stream stays open: its status line is the answer.
    if response
        .headers()
        .get("content-type")
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"))
    {
        return (status, String::new());
    }
    (status, response.text().await.unwrap_or_default())
}

/// Makes the job undeliverable with a result, and publishes its dead letter, as the callback
/// service would after giving up.
pub(crate) async fn make_undeliverable(gateway: &Gateway, id: &str) {
    let job_id = JobId::parse(id).expect("id");
    let now = OffsetDateTime::now_utc();
    let updated = gateway
        .topology
        .status
        .update(&job_id, |doc| {
            doc.status = Status::Undeliverable;
            doc.result = Some(json!({"description": "Boils fast."}));
            doc.model = Some("claude-test".into());
            doc.finished_at = Some(now);
            doc.updated_at = now;
            true
        })
        .await
        .expect("KV update");
    let jetcall::store::Updated::Written(doc, _) = updated else {
        panic!("job {id} was not written");
    };
    let report = DeliveryReport {
        job_id: doc.job_id.clone(),
        kind: doc.kind.clone(),
        webhook_id: format!("msg_{id}"),
        callback_url: doc.callback_url.clone(),
        attempts: Vec::new(),
        reason: Some("gave up".into()),
        payload: json!({}),
        at: now,
    };
    publish_event(
        &gateway.topology.jetstream,
        Event::Undeliverable.subject(&doc.kind),
        &Event::Undeliverable.msg_id(&doc.job_id),
        &report,
    )
    .await
    .expect("publish the dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sees_and_acts_on_its_own_jobs_only() {
    let gateway = tenants().await;
    let (a, b, ops) = (KEYS[0].0, KEYS[1].0, KEYS[2].0);
    let submit = "/api/v1/generate-description";
    let (status, body) = call(&gateway, a, "POST", submit, Some(&article_job("JOB-OF-A"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = call(&gateway, b, "POST", submit, Some(&article_job("JOB-OF-B"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // Another tenant's job does not exist, whatever is asked of it.
    for (method, path) in [
        ("GET", "/api/v1/jobs/JOB-OF-A"),
        ("GET", "/api/v1/jobs/JOB-OF-A/events"),
        ("POST", "/api/v1/jobs/JOB-OF-A/redeliver"),
        ("DELETE", "/api/v1/jobs/JOB-OF-A"),
    ] {
        let (status, body) = call(&gateway, b, method, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert!(!body.contains("PROD-AC15"), "{method} {path}: {body}");
    }
    // Its owner and the operator see it.
    for key in [a, ops] {
        let (status, body) = call(&gateway, key, "GET", "/api/v1/jobs/JOB-OF-A", None).await;
        assert_eq!(status, StatusCode::OK, "{key}: {body}");
        let (status, _) = call(&gateway, key, "GET", "/api/v1/jobs/JOB-OF-A/events", None).await;
        assert_eq!(status, StatusCode::OK, "{key}");
    }

    // The listing holds the caller's own jobs; the operator's holds everyone's.
    let listed = |body: String| listed_ids(&serde_json::from_str(&body).expect("a job list"));
    let (_, body) = call(&gateway, b, "GET", "/api/v1/jobs", None).await;
    assert_eq!(listed(body), ["JOB-OF-B"]);
    let (_, body) = call(&gateway, ops, "GET", "/api/v1/jobs", None).await;
    let mut all = listed(body);
    all.sort();
    assert_eq!(all, ["JOB-OF-A", "JOB-OF-B"]);

    // Dead letters: a key puts back its own, never another's; the operator any.
    make_undeliverable(&gateway, "JOB-OF-A").await;
    make_undeliverable(&gateway, "JOB-OF-B").await;
    let window = "/api/v1/deliveries/redeliver?since=2020-01-01T00:00:00Z";
    let (status, body) = call(&gateway, b, "POST", window, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let result: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        result["requeued"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
    assert_eq!(result["requeued"][0]["job_id"], "JOB-OF-B", "{body}");
    assert!(!body.contains("JOB-OF-A"), "{body}");
    let (status, body) = call(&gateway, b, "POST", "/api/v1/jobs/JOB-OF-A/redeliver", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = call(
        &gateway,
        ops,
        "POST",
        "/api/v1/jobs/JOB-OF-A/redeliver",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cancels_its_own_jobs_and_an_operator_anyones() {
    let gateway = tenants().await;
    let (a, b, ops) = (KEYS[0].0, KEYS[1].0, KEYS[2].0);
    let submit = "/api/v1/generate-description";
    for id in ["JOB-A1", "JOB-A2"] {
        let (status, body) = call(&gateway, a, "POST", submit, Some(&article_job(id))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let both = json!({"job_ids": ["JOB-A1", "JOB-A2"]});
    let (status, body) = call(&gateway, b, "POST", "/api/v1/jobs/cancel", Some(&both)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (&answer["cancelled"], &answer["rejected"]),
        (&json!(0), &json!(2))
    );
    assert_eq!(answer["results"][0]["error"]["type"], "not_found", "{body}");
    assert!(!body.contains("PROD-AC15"), "{body}");

    let (status, body) = call(&gateway, a, "DELETE", "/api/v1/jobs/JOB-A1", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = call(&gateway, ops, "DELETE", "/api/v1/jobs/JOB-A2", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (&doc["status"], &doc["tenant"]),
        (&json!("cancelled"), &json!(KEYS[0].1))
    );
    assert!(
        doc["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains(KEYS[2].1)),
        "the document says who cancelled it: {doc}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_taken_by_another_tenant_is_a_conflict_that_shows_nothing_of_its_job() {
    let gateway = tenants().await;
    let (a, b) = (KEYS[0].0, KEYS[1].0);
    let submit = "/api/v1/generate-description";
    let job = article_job("JOB-TAKEN");
    let (status, body) = call(&gateway, a, "POST", submit, Some(&job)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // The very same body from another tenant is not a retry of A's job.
    let mut different = job.clone();
    different["product_name"] = json!("Another kettle");
    for body in [&job, &different] {
        let (status, answer) = call(&gateway, b, "POST", submit, Some(body)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        let error: Value = serde_json::from_str(&answer).expect("JSON");
        assert_eq!(error["type"], "job_conflict", "{answer}");
        for content in ["PROD-AC15", "LG 1.5", "accepted", "127.0.0.1"] {
            assert!(!answer.contains(content), "shows `{content}`: {answer}");
        }
    }
    // Nothing of B's was published under A's id.
    assert_eq!(gateway.published().await, 1);
    gateway.stop().await;
}
