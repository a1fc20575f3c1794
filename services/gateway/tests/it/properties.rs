//! Property test of the submission routes: whatever the body, content type or id, the gateway
//! answers 2xx or a 4xx JSON error `{type, message}`, never a 5xx, and publishes exactly the
//! jobs it accepted.

use std::collections::HashSet;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};

use crate::harness::Gateway;

const ROUTES: [&str; 3] = [
    "/api/v1/jobs",
    "/api/v1/generate-description",
    "/api/v1/jobs/batch",
];
const CONTENT_TYPES: [&str; 5] = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "",
];
/// Fields of both submission bodies, so mutations hit the validation of real fields as
/// often as unknown ones.
const FIELDS: [&str; 11] = [
    "job_id",
    "kind",
    "input",
    "callback_url",
    "metadata",
    "signing_secret",
    "product_id",
    "product_name",
    "specs",
    "jobs",
    "colour",
];

fn valid_job(route: &str, job_id: &str) -> Value {
    if route == "/api/v1/generate-description" {
        json!({
            "job_id": job_id,
            "product_id": "PROD-AC15",
            "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
            "specs": "1.5 Ton, 5 Star, Dual Inverter",
            "callback_url": "http://127.0.0.1:9/webhooks/description"
        })
    } else {
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
}

/// Text with the characters that matter to us: NATS subject tokens, controls, NUL, and any
/// Unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{1,12}",
        "[A-Za-z0-9.*> \\x00\\t\\n\\x7f\u{202e}é-]{0,16}",
        any::<String>(),
        Just(String::new()),
        (1usize..300_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Change {
    Set(&'static str, Value),
    Remove(&'static str),
    SetInput(String, Value),
}

#[derive(Debug, Clone)]
enum Body {
    /// A valid job with a few changes.
    Changed(Vec<Change>),
    /// Anything as JSON.
    Json(Value),
    /// An array nested this deep.
    Nested(usize),
    /// Raw bytes, valid UTF-8 or not.
    Bytes(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    let change = prop_oneof![
        (prop::sample::select(&FIELDS[..]), json_value()).prop_map(|(f, v)| Change::Set(f, v)),
        (
            prop::sample::select(&FIELDS[..]),
            text().prop_map(Value::from)
        )
            .prop_map(|(f, v)| Change::Set(f, v)),
        prop::sample::select(&FIELDS[..]).prop_map(Change::Remove),
        (text(), json_value()).prop_map(|(k, v)| Change::SetInput(k, v)),
    ];
    prop_oneof![
        4 => prop::collection::vec(change, 0..4).prop_map(Body::Changed),
        1 => json_value().prop_map(Body::Json),
        1 => (1usize..5_000).prop_map(Body::Nested),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Body::Bytes),
    ]
}

fn render(body: &Body, route: &str, case: usize) -> Vec<u8> {
    let json = match body {
        Body::Changed(changes) => {
            let mut job = valid_job(route, &format!("PROP-{case}"));
            for change in changes {
                match change {
                    Change::Set(field, value) => job[*field] = value.clone(),
                    Change::Remove(field) => {
                        job.as_object_mut().map(|job| job.remove(*field));
                    }
                    Change::SetInput(key, value) => {
                        if let Some(input) = job.get_mut("input").and_then(Value::as_object_mut) {
                            input.insert(key.clone(), value.clone());
                        }
                    }
                }
            }
            job
        }
        Body::Json(value) => value.clone(),
        Body::Nested(depth) => {
            return format!("{}{}", "[".repeat(*depth), "]".repeat(*depth)).into_bytes();
        }
        Body::Bytes(bytes) => return bytes.clone(),
    };
    let json = if route.ends_with("/batch") && !matches!(body, Body::Json(_)) {
        json!({"jobs": [json]})
    } else {
        json
    };
    json.to_string().into_bytes()
}

/// The ids of the jobs a 2xx answer says were accepted (newly or again).
fn accepted_ids(route: &str, answer: &Value) -> Vec<String> {
    if route.ends_with("/batch") {
        answer["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|item| item["result"] == "accepted")
            .filter_map(|item| item["job_id"].as_str().map(str::to_owned))
            .collect()
    } else {
        answer["job_id"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect()
    }
}

#[test]
fn no_request_body_makes_the_gateway_fail_or_publish_what_it_did_not_accept() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let gateway = runtime.block_on(Gateway::start(&[]));
    // The runner takes a `Fn`; the cases run one after another.
    let accepted = std::cell::RefCell::new(HashSet::new());
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::cell::Cell::new(0usize);
    let strategy = (
        prop::sample::select(&ROUTES[..]),
        prop::sample::select(&CONTENT_TYPES[..]),
        body(),
    );
    let result = runner.run(&strategy, |(route, content_type, body)| {
        case.set(case.get() + 1);
        let bytes = render(&body, route, case.get());
        let (status, answer) = runtime.block_on(gateway.post_raw(route, content_type, bytes));
        prop_assert!(
            status.is_success() || status.is_client_error(),
            "{route} answered {status}: {answer}"
        );
        if status.is_client_error() {
            prop_assert!(
                answer["type"].is_string() && answer["message"].is_string(),
                "{route} {status} without a JSON error: {answer}"
            );
        } else {
            for id in accepted_ids(route, &answer) {
                accepted.borrow_mut().insert(id);
            }
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let accepted = accepted.into_inner();
    let published = runtime.block_on(gateway.published());
    assert_eq!(
        published,
        accepted.len(),
        "every job published was accepted, once"
    );
    assert!(!accepted.is_empty(), "some generated jobs are valid");
    runtime.block_on(gateway.stop());
}
