//! `GET /openapi.json` describes what the gateway really does: it lists every route the router
//! serves, and real answers, success and error alike, have a status, a content type and a
//! body that the document gives for their operation. Object schemas are closed for the check,
//! so a field a handler adds without documenting it fails here too.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;

use jetcall::JobId;
use jetcall::cost::{Cost, Currency, Usage};
use jetcall::events::JobError;
use jetcall::status::{AttemptOutcome, DeliveryAttempt, GenerationAttempt, Status};

use crate::harness::{Gateway, article_job};

/// The router's source: the routes it declares are read from it, so a route added there and
/// not to the document fails [`every_route_the_router_serves_is_documented`].
const ROUTER_RS: &str = include_str!("../../src/app.rs");

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// (method, path) of every `.route(...)` in `app.rs`, the router.
fn declared_routes() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let mut rest = ROUTER_RS;
    while let Some(start) = rest.find(".route(") {
        let args = &rest[start + ".route(".len()..];
        let args = &args[..closing_paren(args)];
        let path = args
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("a route without a path literal: {args}"));
        let methods = methods_called(args);
        assert!(!methods.is_empty(), "no method for {path}: {args}");
        for method in methods {
            routes.insert((method.to_owned(), path.to_owned()));
        }
        rest = &rest[start + 1..];
    }
    assert!(routes.len() >= 10, "too few routes read: {routes:?}");
    routes
}

/// The length of `text` up to the `)` that closes the parenthesis opened just before it.
fn closing_paren(text: &str) -> usize {
    let mut depth = 1;
    for (at, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return at;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {text}");
}

/// The method routers named in a route's arguments: `post(handler)`, `.get(handler)`.
fn methods_called(args: &str) -> Vec<&'static str> {
    let mut found = Vec::new();
    for method in METHODS {
        let call = format!("{method}(");
        let mut from = 0;
        while let Some(at) = args[from..].find(&call) {
            let at = from + at;
            let before = args[..at].chars().next_back();
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                found.push(method);
            }
            from = at + call.len();
        }
    }
    found
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert((method.to_owned(), path.clone()));
            }
        }
    }
    routes
}

async fn fetch_doc(gateway: &Gateway) -> Value {
    let response = gateway
        .http
        .get(format!("{}/openapi.json", gateway.url))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = content_type(&response);
    let doc: Value = response.json().await.expect("JSON");
    check(&doc, "get", "/openapi.json", 200, &content_type, &doc);
    assert_eq!(doc["openapi"], "3.2.0");
    doc
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Asserts that the document gives `status` for the operation, with `content_type`, and that
/// `body` validates against its schema with every object schema closed.
fn check(doc: &Value, method: &str, path: &str, status: u16, content_type: &str, body: &Value) {
    if let Err(mismatch) = conforms(doc, method, path, status, content_type, body) {
        panic!("{mismatch}");
    }
}

/// What [`check`] checks, with what does not conform as the error.
fn conforms(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
    content_type: &str,
    body: &Value,
) -> Result<(), String> {
    let operation = &doc["paths"][path][method];
    if !operation.is_object() {
        return Err(format!("{method} {path} is not documented"));
    }
    let response = &operation["responses"][status.to_string()];
    if !response.is_object() {
        return Err(format!(
            "{method} {path} answered {status}, which is not documented: {body}"
        ));
    }
    let media = &response["content"][content_type];
    if !media.is_object() {
        return Err(format!(
            "{method} {path} {status} answered `{content_type}`; documented: {}",
            response["content"]
        ));
    }
    let mut root = media["schema"].clone();
    let mut components = doc["components"].clone();
    close_objects(&mut components);
    root["components"] = components;
    let validator = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|err| panic!("the schema of {method} {path} {status}: {err}"));
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|err| format!("{} at {}", err, err.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{method} {path} {status} does not match its schema: {errors:#?}\nbody: {body:#}"
        ))
    }
}

/// Sets `additionalProperties: false` on every object schema that lists its properties and
/// says nothing of others.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Sends a request and checks its answer against the document; returns the status and body.
async fn call(
    gateway: &Gateway,
    doc: &Value,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let template = template_of(doc, method, path);
    let url = format!("{}{path}", gateway.url);
    let mut request = match method {
        "get" => gateway.http.get(url),
        "post" => gateway.http.post(url),
        "delete" => gateway.http.delete(url),
        other => panic!("no {other} here"),
    };
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let content_type = content_type(&response);
    let text = response.text().await.expect("body");
    let body = if content_type.starts_with("application/json") {
        serde_json::from_str(&text).expect("a JSON body")
    } else {
        Value::String(text)
    };
    check(doc, method, &template, status, &content_type, &body);
    (status, body)
}

/// The documented path that `path` (with its query) is an instance of.
fn template_of(doc: &Value, method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let paths = doc["paths"].as_object().expect("paths");
    if paths
        .get(path)
        .is_some_and(|item| item.get(method).is_some())
    {
        return path.to_owned();
    }
    let segments: Vec<&str> = path.split('/').collect();
    paths
        .iter()
        .filter(|(_, item)| item.get(method).is_some())
        .map(|(template, _)| template)
        .find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(&segments)
                    .all(|(part, segment)| part.starts_with('{') || part == segment)
        })
        .unwrap_or_else(|| panic!("no documented {method} operation for {path}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_the_router_serves_is_documented() {
    let gateway = Gateway::start(&[]).await;
    let doc = fetch_doc(&gateway).await;
    let declared = declared_routes();
    let documented = documented_routes(&doc);
    // Each one is really served: neither the fallback's 404 nor a 405. (The source is read only
    // to find the routes; this is what the server does with them.)
    for (method, path) in declared.union(&documented) {
        let path = path.replace("{job_id}", "JOB-PROBE");
        let url = format!("{}{path}", gateway.url);
        let request = match method.as_str() {
            "get" => gateway.http.get(url),
            "post" => gateway.http.post(url).json(&json!({})),
            "delete" => gateway.http.delete(url),
            other => panic!("no probe for {other}"),
        };
        let response = request.send().await.expect("probe");
        let status = response.status();
        let body = if status == StatusCode::NOT_FOUND {
            response.text().await.unwrap_or_default()
        } else {
            String::new()
        };
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !body.contains("no such route"),
            "{method} {path} is documented but not served: {body}"
        );
    }
    // The check itself refuses drift: an undocumented field, a value outside its enum, a
    // missing field, an undocumented status or content type.
    let accepted = json!({"job_id": "J", "status": "accepted", "message": "m"});
    check(
        &doc,
        "post",
        "/api/v1/jobs",
        202,
        "application/json",
        &accepted,
    );
    let drifted = [
        (
            202,
            "application/json",
            json!({"job_id": "J", "status": "accepted", "message": "m", "extra": 1}),
        ),
        (
            202,
            "application/json",
            json!({"job_id": "J", "status": "queued", "message": "m"}),
        ),
        (
            202,
            "application/json",
            json!({"job_id": "J", "status": "accepted"}),
        ),
        (418, "application/json", accepted.clone()),
        (202, "text/plain", accepted.clone()),
    ];
    for (status, content_type, body) in drifted {
        let result = conforms(&doc, "post", "/api/v1/jobs", status, content_type, &body);
        assert!(
            result.is_err(),
            "{status} {content_type} {body} passed the check"
        );
    }

    // Without API keys the document asks for none, and promises no 401.
    let submit = &doc["paths"]["/api/v1/jobs"]["post"];
    assert!(submit.get("security").is_none(), "{submit:#}");
    assert!(submit["responses"].get("401").is_none(), "{submit:#}");
    assert!(submit["responses"].get("429").is_some(), "{submit:#}");
    assert!(
        doc["paths"]["/healthz"]["get"]["responses"]
            .get("429")
            .is_none()
    );
    gateway.stop().await;

    let missing: Vec<_> = declared.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes the router serves that /openapi.json does not describe: {missing:?}; annotate \
         their handlers with #[utoipa::path] and list them in openapi.rs"
    );
    let extra: Vec<_> = documented.difference(&declared).collect();
    assert!(
        extra.is_empty(),
        "/openapi.json describes routes the router does not declare: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_the_documented_schemas() {
    let mut gateway = Gateway::start(&[
        ("gateway.max_body_bytes", json!(8192)),
        // JOB-B brings its own signing secret, which the gateway keeps sealed under it.
        (
            "callback.secrets_key",
            json!("c2VjcmV0cy1rZXktZm9yLXRoZS1nYXRld2F5LXRlc3Q="),
        ),
    ])
    .await;
    let doc = fetch_doc(&gateway).await;
    let submit = "/api/v1/generate-description";

    // 202, then the status document of a job just accepted.
    let (status, body) = call(&gateway, &doc, "post", submit, Some(article_job("JOB-A"))).await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = call(&gateway, &doc, "get", "/api/v1/jobs/JOB-A", None).await;
    assert_eq!(status, 200);

    // A job with every optional field: completed, then undeliverable after attempts that
    // failed each in its own way.
    let mut generic = json!({
        "job_id": "JOB-B",
        "kind": "product-description",
        "input": {"product_id": "P-1", "product_name": "Kettle", "specs": {"litres": 1.7}},
        "callback_url": "http://127.0.0.1:9/hook",
        "metadata": {"batch": 7},
        "signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    });
    let (status, body) = call(
        &gateway,
        &doc,
        "post",
        "/api/v1/jobs",
        Some(generic.clone()),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let now = OffsetDateTime::now_utc();
    let attempt = |status_code: Option<u16>, error_kind: &str| DeliveryAttempt {
        at: now,
        duration_ms: 12,
        status_code,
        error_kind: Some(error_kind.into()),
        error: Some(format!("{error_kind} went wrong")),
        response_excerpt: status_code.map(|_| "Service Unavailable".into()),
        round: 0,
    };
    advance(&gateway, "JOB-B", |doc| {
        doc.status = Status::Undeliverable;
        doc.generation_attempts = 1;
        doc.result = Some(json!({"description": "Boils fast."}));
        doc.model = Some("claude-test".into());
        doc.usage = Some(Usage {
            input_tokens: 100,
            output_tokens: 20,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 1500,
        });
        doc.cost = Some(Cost {
            microdollars: 1050,
            currency: Currency::Usd,
        });
        doc.finished_at = Some(now);
        doc.deliveries = vec![attempt(Some(503), "http_status"), attempt(None, "timeout")];
        doc.generations = vec![
            GenerationAttempt {
                attempt: 1,
                started_at: Some(now),
                ended_at: now,
                outcome: AttemptOutcome::Retry,
                error: Some(JobError {
                    kind: "overloaded_error".into(),
                    message: "Overloaded".into(),
                }),
                retry_in_ms: Some(2000),
            },
            GenerationAttempt {
                attempt: 2,
                started_at: None,
                ended_at: now,
                outcome: AttemptOutcome::Completed,
                error: None,
                retry_in_ms: None,
            },
        ];
    })
    .await;
    let (status, shown) = call(&gateway, &doc, "get", "/api/v1/jobs/JOB-B", None).await;
    assert_eq!(status, 200);
    assert!(shown.get("signing_secret").is_none(), "{shown}");
    assert_eq!(shown["metadata"]["batch"], 7);

    // What the console reads: the listing with its filters, the caller, the overview.
    for path in [
        "/api/v1/jobs?limit=5&offset=1",
        "/api/v1/jobs?status=undeliverable&tenant=nobody&since=2020-01-01T00:00:00Z",
        "/api/v1/whoami",
        "/api/v1/overview",
    ] {
        let (status, body) = call(&gateway, &doc, "get", path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }

    // Moved on: the same submission is a 200, a different one a 409.
    let (status, body) = call(
        &gateway,
        &doc,
        "post",
        "/api/v1/jobs",
        Some(generic.clone()),
    )
    .await;
    assert_eq!((status, &body["status"]), (200, &json!("undeliverable")));
    generic["metadata"]["batch"] = json!(8);
    let (status, body) = call(&gateway, &doc, "post", "/api/v1/jobs", Some(generic)).await;
    assert_eq!((status, &body["type"]), (409, &json!("job_conflict")));

    // Redelivery: 202 for the undeliverable job, 409 for one still waiting, 404 for none.
    let path = "/api/v1/jobs/JOB-B/redeliver";
    let (status, body) = call(&gateway, &doc, "post", path, None).await;
    assert_eq!((status, &body["delivery_round"]), (202, &json!(1)));
    let path = "/api/v1/jobs/JOB-A/redeliver";
    let (status, body) = call(&gateway, &doc, "post", path, None).await;
    assert_eq!((status, &body["type"]), (409, &json!("not_undeliverable")));
    let path = "/api/v1/jobs/NOPE/redeliver";
    assert_eq!(call(&gateway, &doc, "post", path, None).await.0, 404);

    // A failed job, delivered: `error` and `delivered_at`.
    let (status, _) = call(&gateway, &doc, "post", submit, Some(article_job("JOB-C"))).await;
    assert_eq!(status, 202);
    advance(&gateway, "JOB-C", |doc| {
        doc.status = Status::Delivered;
        doc.error = Some(JobError {
            kind: "invalid_output".into(),
            message: "the model's answer was empty".into(),
        });
        doc.finished_at = Some(now);
        doc.delivered_at = Some(now);
        doc.deliveries = vec![DeliveryAttempt {
            at: now,
            duration_ms: 3,
            status_code: Some(204),
            error_kind: None,
            error: None,
            response_excerpt: None,
            round: 0,
        }];
    })
    .await;
    assert_eq!(
        call(&gateway, &doc, "get", "/api/v1/jobs/JOB-C", None)
            .await
            .0,
        200
    );

    // 404s, 422s, 400, 415 and 413.
    for path in [
        "/api/v1/jobs/JOB-404",
        "/api/v1/jobs/JOB.1",
        "/api/v1/jobs/batch",
    ] {
        let (status, body) = call(&gateway, &doc, "get", path, None).await;
        assert_eq!(
            (status, &body["type"]),
            (404, &json!("not_found")),
            "{path}"
        );
    }
    let mut bad = article_job("JOB-D");
    bad["callback_url"] = json!("ftp://127.0.0.1/x");
    let (status, body) = call(&gateway, &doc, "post", submit, Some(bad)).await;
    assert_eq!((status, &body["field"]), (422, &json!("callback_url")));
    let (status, body) = call(&gateway, &doc, "post", submit, Some(json!({"colour": 1}))).await;
    assert_eq!((status, &body["type"]), (422, &json!("invalid_field")));
    for (content_type, bytes, expected) in [
        ("application/json", b"{\"job_id\": ".to_vec(), 400),
        ("text/plain", b"{}".to_vec(), 415),
        ("application/json", vec![b' '; 10_000], 413),
    ] {
        let response = gateway
            .http
            .post(format!("{}{submit}", gateway.url))
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        let answered = self::content_type(&response);
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(status, expected, "{body}");
        check(&doc, "post", submit, status, &answered, &body);
    }

    // A batch: accepted, duplicate and rejected jobs; and an empty one.
    let jobs = json!({"jobs": [
        {"job_id": "JOB-E", "kind": "product-description", "callback_url": "http://127.0.0.1:9/h",
         "input": {"product_id": "P", "product_name": "N", "specs": "S"}},
        {"job_id": "JOB-A", "kind": "product-description", "callback_url": "http://127.0.0.1:9/webhooks/description",
         "input": {"product_id": "PROD-AC15", "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
                   "specs": "1.5 Ton, 5 Star, Dual Inverter"}},
        {"kind": "haiku", "callback_url": "http://127.0.0.1:9/h", "input": {}},
        42
    ]});
    let batch = "/api/v1/jobs/batch";
    let (status, body) = call(&gateway, &doc, "post", batch, Some(jobs)).await;
    assert_eq!(status, 200, "{body}");
    let outcomes: Vec<&str> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["result"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(outcomes, ["accepted", "duplicate", "rejected", "rejected"]);
    assert_eq!(body["results"][3]["job_id"], Value::Null);
    let (status, body) = call(&gateway, &doc, "post", batch, Some(json!({"jobs": []}))).await;
    assert_eq!((status, &body["type"]), (422, &json!("batch_empty")));

    // Cancellation: one job given two hours to start, cancelled (twice, answered alike); a
    // delivered job not cancellable; in bulk, an answer per id.
    let callback_url = article_job("JOB-X")["callback_url"].clone();
    let (status, body) = call(
        &gateway,
        &doc,
        "post",
        "/api/v1/jobs",
        Some(json!({
            "job_id": "JOB-X", "kind": "product-description", "callback_url": callback_url,
            "input": {"product_id": "P", "product_name": "N", "specs": "S"}, "ttl": "2h"
        })),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    for _ in 0..2 {
        let (status, body) = call(&gateway, &doc, "delete", "/api/v1/jobs/JOB-X", None).await;
        assert_eq!(
            (status, &body["status"]),
            (202, &json!("cancelled")),
            "{body}"
        );
        assert_eq!(body["ended_as"], "cancelled");
        assert!(body["expires_at"].is_string(), "{body}");
    }
    let (status, body) = call(&gateway, &doc, "delete", "/api/v1/jobs/JOB-C", None).await;
    assert_eq!(
        (status, &body["type"], &body["status"]),
        (409, &json!("not_cancellable"), &json!("delivered"))
    );
    assert_eq!(
        call(&gateway, &doc, "delete", "/api/v1/jobs/NOPE", None)
            .await
            .0,
        404
    );
    let ids = json!({"job_ids": ["JOB-X", "JOB-C", "NOPE", "not.an.id"]});
    let (status, body) = call(&gateway, &doc, "post", "/api/v1/jobs/cancel", Some(ids)).await;
    assert_eq!(status, 200, "{body}");
    let codes: Vec<&Value> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| &r["status_code"])
        .collect();
    assert_eq!(codes, [&json!(202), &json!(409), &json!(404), &json!(422)]);
    assert_eq!(
        (&body["cancelled"], &body["rejected"]),
        (&json!(1), &json!(3))
    );
    let empty = json!({"job_ids": []});
    let (status, body) = call(&gateway, &doc, "post", "/api/v1/jobs/cancel", Some(empty)).await;
    assert_eq!((status, &body["field"]), (422, &json!("job_ids")));
    let (status, body) = call(&gateway, &doc, "get", "/api/v1/jobs/cancel", None).await;
    assert_eq!((status, &body["type"]), (404, &json!("not_found")));

    // Redelivery by time window.
    let window = "/api/v1/deliveries/redeliver?since=2020-01-01T00:00:00Z";
    assert_eq!(call(&gateway, &doc, "post", window, None).await.0, 200);
    let window = "/api/v1/deliveries/redeliver?since=yesterday";
    assert_eq!(call(&gateway, &doc, "post", window, None).await.0, 422);

    // Operations: health, readiness, metrics in their own content type.
    assert_eq!(call(&gateway, &doc, "get", "/healthz", None).await.0, 200);
    assert_eq!(call(&gateway, &doc, "get", "/readyz", None).await.0, 200);
    assert_eq!(call(&gateway, &doc, "get", "/metrics", None).await.0, 200);

    // Without NATS: 503 with `retry-after`, and readiness says so in its documented shape.
    gateway.nats.kill();
    let (status, _) = call(&gateway, &doc, "post", submit, Some(article_job("JOB-F"))).await;
    assert_eq!(status, 503);
    assert_eq!(call(&gateway, &doc, "get", "/readyz", None).await.0, 503);
    gateway.nats.restart();
    gateway.wait_ready().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_the_document_asks_for_a_bearer_key_and_promises_401() {
    let gateway = Gateway::start(&[("gateway.api_keys", json!(["s3cret-key"]))]).await;
    // The document itself needs no key.
    let doc = fetch_doc(&gateway).await;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    for (method, path) in documented_routes(&doc) {
        let operation = &doc["paths"][&path][&method];
        let api = path.starts_with("/api/");
        assert_eq!(
            operation.get("security").is_some(),
            api,
            "{method} {path}: {operation:#}"
        );
        assert_eq!(operation["responses"].get("401").is_some(), api, "{path}");
    }
    let (status, body) = call(&gateway, &doc, "get", "/api/v1/jobs/JOB-1", None).await;
    assert_eq!((status, &body["type"]), (401, &json!("unauthorized")));
    gateway.stop().await;
}

/// Rewrites a job's status document, as the generator and the callback service would.
async fn advance(gateway: &Gateway, id: &str, change: impl Fn(&mut jetcall::status::JobStatus)) {
    let id = JobId::parse(id).expect("id");
    gateway
        .topology
        .status
        .update(&id, |doc| {
            change(doc);
            doc.updated_at = OffsetDateTime::now_utc();
            true
        })
        .await
        .expect("KV update");
}
