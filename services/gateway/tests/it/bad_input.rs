//! Every bad request gets a 4xx JSON error naming the problem, and nothing is recorded or
//! published.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Gateway, article_job};

const PATH: &str = "/api/v1/generate-description";

fn with(field: &str, value: Value) -> Value {
    let mut body = article_job("JOB-1");
    body[field] = value;
    body
}

fn without(field: &str) -> Value {
    let mut body = article_job("JOB-1");
    body.as_object_mut().map(|map| map.remove(field));
    body
}

/// (what, body, expected status, expected `type`, text the message must contain)
fn json_cases() -> Vec<(&'static str, Value, u16, &'static str, &'static str)> {
    vec![
        (
            "missing product_name",
            without("product_name"),
            422,
            "invalid_field",
            "product_name",
        ),
        (
            "missing callback_url",
            without("callback_url"),
            422,
            "invalid_field",
            "callback_url",
        ),
        (
            "product_id a number",
            with("product_id", json!(15)),
            422,
            "invalid_field",
            "product_id",
        ),
        (
            "specs empty",
            with("specs", json!("")),
            422,
            "invalid_field",
            "specs",
        ),
        (
            "product_name blank",
            with("product_name", json!("   ")),
            422,
            "invalid_field",
            "product_name",
        ),
        (
            "job id with a dot",
            with("job_id", json!("JOB.771")),
            422,
            "invalid_field",
            "job_id",
        ),
        (
            "job id with a space",
            with("job_id", json!("JOB 771")),
            422,
            "invalid_field",
            "job_id",
        ),
        (
            "job id with a wildcard",
            with("job_id", json!("JOB>")),
            422,
            "invalid_field",
            "job_id",
        ),
        (
            "job id with NUL",
            with("job_id", json!("JOB\u{0}1")),
            422,
            "invalid_field",
            "job_id",
        ),
        (
            "job id too long",
            with("job_id", json!("J".repeat(129))),
            422,
            "invalid_field",
            "job_id",
        ),
        (
            "empty job id",
            with("job_id", json!("")),
            422,
            "invalid_field",
            "job_id",
        ),
        (
            "control character in a field",
            with("product_name", json!("AC\u{7}")),
            422,
            "invalid_field",
            "product_name",
        ),
        (
            "nested specs",
            with("specs", json!({"a": {"b": 1}})),
            422,
            "invalid_field",
            "specs.a",
        ),
        (
            "unknown field",
            with("colour", json!("white")),
            422,
            "invalid_field",
            "colour",
        ),
        (
            "ftp callback",
            with("callback_url", json!("ftp://127.0.0.1/x")),
            422,
            "invalid_callback_url",
            "http or https",
        ),
        (
            "callback not allowlisted",
            with("callback_url", json!("https://example.com/hook")),
            422,
            "invalid_callback_url",
            "allowlist",
        ),
        (
            "callback with userinfo",
            with("callback_url", json!("http://user:pw@localhost/x")),
            422,
            "invalid_callback_url",
            "user name",
        ),
        (
            "callback not a URL",
            with("callback_url", json!("not a url")),
            422,
            "invalid_callback_url",
            "valid URL",
        ),
        (
            "a JSON array",
            json!(["JOB-1", "P", "N", "S", "http://localhost/"]),
            422,
            "invalid_field",
            "JSON object",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_bodies_are_refused_with_the_field_named() {
    let gateway = Gateway::start(&[]).await;
    for (what, body, status, kind, needle) in json_cases() {
        let (got, error) = gateway.post(PATH, &body).await;
        assert_eq!(got.as_u16(), status, "{what}: {error}");
        assert_eq!(error["type"], kind, "{what}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{what}: message {message:?} lacks {needle:?}: {error}"
        );
    }
    assert_eq!(gateway.published().await, 0, "nothing may be published");
    assert_eq!(gateway.recorded().await, 0, "nothing may be recorded");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_oversized_bodies_are_refused() {
    let gateway = Gateway::start(&[("gateway.max_body_bytes", json!(4096))]).await;
    let deep = format!(r#"{{"specs": {}{}}}"#, "[".repeat(200), "]".repeat(200));
    let cases: Vec<(&str, &str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            "application/json",
            b"{\"job_id\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "trailing garbage",
            "application/json",
            b"{} {}".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "invalid UTF-8",
            "application/json",
            b"{\"job_id\": \"\xff\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "deeply nested",
            "application/json",
            deep.into_bytes(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "empty body",
            "application/json",
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "form body",
            "application/x-www-form-urlencoded",
            b"a=b".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "oversized",
            "application/json",
            vec![b' '; 10_000],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (what, content_type, body, status, kind) in cases {
        let (got, error) = gateway.post_raw(PATH, content_type, body).await;
        assert_eq!(got, status, "{what}: {error}");
        assert_eq!(error["type"], kind, "{what}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {error}"
        );
    }
    assert_eq!(gateway.published().await, 0);
    assert_eq!(gateway.recorded().await, 0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_methods_and_jobs_are_json_errors() {
    let gateway = Gateway::start(&[]).await;
    for (path, status, kind) in [
        ("/nope", 404, "not_found"),
        ("/api/v1/jobs/JOB-404", 404, "not_found"),
        ("/api/v1/jobs/JOB.1", 404, "not_found"),
        ("/api/v1/generate-description", 405, "method_not_allowed"),
    ] {
        let (got, error) = gateway.get(path).await;
        assert_eq!(got.as_u16(), status, "{path}: {error}");
        assert_eq!(error["type"], kind, "{path}");
    }
    gateway.stop().await;
}

/// Callback URLs that try to reach what they should not, each refused at submission with a
/// 422 that names the rule. Only names are allowlisted here, so every address form fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_vectors_are_refused_at_submission() {
    let gateway = Gateway::start(&[(
        "gateway.callback_allowlist",
        json!(["localhost", "*.shop.example"]),
    )])
    .await;
    let vectors = [
        ("http://127.0.0.1/cb", "allowlist"),
        ("http://2130706433/cb", "allowlist"), // decimal 127.0.0.1
        ("http://0177.0.0.1/cb", "allowlist"), // octal
        ("http://0x7f000001/cb", "allowlist"), // hex
        ("http://0x7f.0x0.0x0.0x1/cb", "allowlist"), // dotted hex
        ("http://127.1/cb", "allowlist"),      // short form
        ("http://[::1]/cb", "allowlist"),
        ("http://[::ffff:127.0.0.1]/cb", "allowlist"),
        ("http://[::ffff:7f00:1]/cb", "allowlist"),
        ("http://0.0.0.0/cb", "allowlist"),
        ("http://0/cb", "allowlist"),
        ("http://localhost./cb", "allowlist"), // trailing dot
        ("http://169.254.169.254/latest/meta-data/", "allowlist"),
        ("http://[fd00:ec2::254]/", "allowlist"),
        ("http://metadata.google.internal/", "allowlist"),
        ("http://shop.example/cb", "allowlist"), // a pattern does not cover its apex
        ("http://evilshop.example/cb", "allowlist"),
        ("http://hooks.shop.example.attacker.test/cb", "allowlist"),
        ("http://10.0.0.1/cb", "allowlist"),
        ("http://allowed@127.0.0.1/cb", "user name"),
        ("http://localhost@169.254.169.254/", "user name"),
        ("http://localhost:80@10.0.0.1/", "user name"),
        ("file:///etc/passwd", "http or https"),
        ("gopher://localhost:25/", "http or https"),
        ("ftp://localhost/", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("//localhost/cb", "valid URL"),
    ];
    for (url, rule) in vectors {
        let (status, error) = gateway.post(PATH, &with("callback_url", json!(url))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {error}");
        assert_eq!(error["type"], "invalid_callback_url", "{url}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(rule),
            "{url}: {message:?} does not name {rule:?}"
        );
    }
    // The allowlisted forms pass.
    for (n, url) in ["http://localhost:9/cb", "https://hooks.shop.example/cb"]
        .iter()
        .enumerate()
    {
        let mut body = with("callback_url", json!(url));
        body["job_id"] = json!(format!("JOB-OK-{n}"));
        let (status, answer) = gateway.post(PATH, &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{url}: {answer}");
    }
    assert_eq!(
        gateway.published().await,
        2,
        "only the allowed URLs were published"
    );
    gateway.stop().await;
}

/// A job whose prompt could never be sent is refused at the door, not failed later by the
/// generator: the caller hears at once, and nothing is recorded or published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_prompt_would_pass_max_prompt_bytes_is_refused() {
    let gateway = Gateway::start(&[("generator.max_prompt_bytes", json!(2000))]).await;
    let (got, error) = gateway
        .post(PATH, &with("specs", json!("1.5 Ton, ".repeat(300))))
        .await;
    assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["type"], "invalid_field", "{error}");
    assert_eq!(error["field"], "input", "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("generator.max_prompt_bytes"), "{error}");
    assert_eq!(gateway.published().await, 0, "nothing may be published");
    assert_eq!(gateway.recorded().await, 0, "nothing may be recorded");

    let (got, answer) = gateway.post(PATH, &with("specs", json!("1.5 Ton"))).await;
    assert_eq!(
        got,
        StatusCode::ACCEPTED,
        "a prompt within the bound: {answer}"
    );
    gateway.stop().await;
}

/// `ttl` and `expires_at` are checked as any field: one or the other, a duration, within a
/// year and at least a second ahead. What is accepted is stored as a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_is_a_duration_or_a_moment_within_bounds() {
    let gateway = Gateway::start(&[]).await;
    let job = |extra: Value| {
        let mut body = json!({
            "job_id": "JOB-TTL", "kind": "product-description",
            "callback_url": "http://127.0.0.1:9/hook",
            "input": {"product_id": "P", "product_name": "N", "specs": "S"},
        });
        body.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        body
    };
    let in_an_hour = (time::OffsetDateTime::now_utc() + time::Duration::HOUR)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a time");
    let cases = [
        (
            json!({"ttl": "2h", "expires_at": in_an_hour}),
            "ttl",
            "not both",
        ),
        (json!({"ttl": "soon"}), "ttl", "duration"),
        (json!({"ttl": "0s"}), "ttl", "between 1 s and 365 days"),
        (json!({"ttl": "400days"}), "ttl", "between 1 s and 365 days"),
        (json!({"ttl": "99999999999999999999y"}), "ttl", "duration"),
        (json!({"ttl": 60}), "ttl", "ttl"),
        (
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
            "expires_at",
            "between 1 s",
        ),
        (
            json!({"expires_at": "9999-12-31T23:59:59Z"}),
            "expires_at",
            "between 1 s",
        ),
        (
            json!({"expires_at": "tomorrow"}),
            "expires_at",
            "expires_at",
        ),
    ];
    for (extra, field, needle) in cases {
        let (status, error) = gateway.post("/api/v1/jobs", &job(extra.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{extra}: {error}");
        assert_eq!(error["field"], field, "{extra}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{extra}: {error}");
    }
    assert_eq!(gateway.recorded().await, 0, "nothing may be recorded");

    let (status, body) = gateway
        .post("/api/v1/jobs", &job(json!({"ttl": "2h"})))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, doc) = gateway.get("/api/v1/jobs/JOB-TTL").await;
    let expires_at = time::OffsetDateTime::parse(
        doc["expires_at"].as_str().expect("expires_at is shown"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    let ahead = expires_at - time::OffsetDateTime::now_utc();
    assert!(
        ahead > time::Duration::minutes(119) && ahead <= time::Duration::HOUR * 2,
        "{ahead}"
    );
    gateway.stop().await;
}

/// `priority` is one of two words; anything else is the caller's 422, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_is_interactive_or_bulk() {
    let gateway = Gateway::start(&[]).await;
    let job = |job_id: &str, priority: Value| {
        json!({
            "job_id": job_id, "kind": "product-description",
            "callback_url": "http://127.0.0.1:9/hook",
            "input": {"product_id": "P", "product_name": "N", "specs": "S"},
            "priority": priority,
        })
    };
    for priority in [
        json!("urgent"),
        json!("Bulk"),
        json!(1),
        json!({"bulk": true}),
    ] {
        let (status, error) = gateway
            .post("/api/v1/jobs", &job("JOB-P", priority.clone()))
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{priority}: {error}"
        );
        assert_eq!(error["field"], "priority", "{priority}: {error}");
    }
    assert_eq!(gateway.recorded().await, 0, "nothing may be recorded");

    for (job_id, priority, shown) in [
        ("JOB-BULK", json!("bulk"), "bulk"),
        ("JOB-DEFAULT", Value::Null, "interactive"),
    ] {
        let (status, body) = gateway.post("/api/v1/jobs", &job(job_id, priority)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let (_, doc) = gateway.get(&format!("/api/v1/jobs/{job_id}")).await;
        assert_eq!(doc["priority"], shown, "{doc}");
    }
    gateway.stop().await;
}
