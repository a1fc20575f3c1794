//! What the console reads: the page itself, `whoami`, the overview, and the listing's filters.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use jetcall::JobId;
use jetcall::gate::GateReport;
use jetcall::publish::publish_event;
use jetcall::subjects::{Event, GATE_KEY_PREFIX};
use testkit::wait_until;

use crate::harness::{Gateway, article_job, listed_ids};
use crate::tenants::{KEYS, call, make_undeliverable, tenants};

const WAIT: Duration = Duration::from_secs(20);

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not JSON ({err}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_under_a_policy_that_lets_nothing_else_run() {
    let gateway = Gateway::start(&[]).await;
    let page = gateway
        .http
        .get(format!("{}/console", gateway.url))
        .send()
        .await
        .expect("GET /console");
    assert_eq!(page.status(), StatusCode::OK);
    let header = |name: &str| {
        page.headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(header("content-type").starts_with("text/html"));
    let policy = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} missing: {policy}");
    }
    assert_eq!(header("x-content-type-options"), "nosniff");
    let html = page.text().await.expect("body");
    assert!(html.contains("/console/app.js"), "{html}");
    // Nothing inline for the policy to refuse, and nothing from elsewhere.
    assert!(!html.contains("<script>"), "inline script");
    assert!(!html.contains(" style="), "inline style");
    assert!(!html.contains("https://") && !html.contains("http://"));

    for (path, content_type) in [
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
        ("/console/favicon.svg", "image/svg+xml"),
    ] {
        let asset = gateway
            .http
            .get(format!("{}{path}", gateway.url))
            .send()
            .await
            .expect("asset");
        assert_eq!(asset.status(), StatusCode::OK, "{path}");
        let got = asset.headers()["content-type"].to_str().unwrap_or_default();
        assert!(got.starts_with(content_type), "{path}: {got}");
    }
    gateway.stop().await;

    let without = Gateway::start(&[("gateway.console", json!(false))]).await;
    let (status, body) = without.get("/console").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["type"], "not_found", "{body}");
    without.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_tells_the_page_whether_to_ask_for_a_key_and_what_to_show() {
    let open = Gateway::start(&[]).await;
    let (status, body) = open.get("/api/v1/whoami").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"keys_required": false, "tenant": null, "role": "admin"})
    );
    open.stop().await;

    let gateway = tenants().await;
    let (status, body) = gateway.get("/api/v1/whoami").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["type"], "unauthorized");
    let (status, body) = call(&gateway, KEYS[0].0, "GET", "/api/v1/whoami", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json_of(&body),
        json!({"keys_required": true, "tenant": "a", "role": "user"})
    );
    let (_, body) = call(&gateway, KEYS[2].0, "GET", "/api/v1/whoami", None).await;
    assert_eq!(json_of(&body)["role"], "admin");
    gateway.stop().await;
}

async fn overview(gateway: &Gateway) -> Value {
    let (status, body) = call(gateway, KEYS[2].0, "GET", "/api/v1/overview", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    json_of(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_is_an_operators_and_shows_the_flow_the_backlog_the_pauses_and_dead_letters() {
    let gateway = tenants().await;
    let (status, body) = call(&gateway, KEYS[0].0, "GET", "/api/v1/overview", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(json_of(&body)["type"], "forbidden");

    let first = overview(&gateway).await;
    assert_eq!(first["window_seconds"], 900);
    assert_eq!(
        first["series"]["accepted"].as_array().map(Vec::len),
        Some(180)
    );
    assert_eq!(first["latency_ms"]["count"], 0);
    assert_eq!(first["latency_ms"]["p50"], Value::Null);
    assert_eq!(first["generator"]["paused"], false);

    let submit = "/api/v1/generate-description";
    for id in ["JOB-O1", "JOB-O2", "JOB-O3"] {
        let (status, body) =
            call(&gateway, KEYS[0].0, "POST", submit, Some(&article_job(id))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    // Nothing consumes here, so all three wait for the generator.
    let seen = wait_until("three requests in the overview", WAIT, || async {
        let seen = overview(&gateway).await;
        (seen["totals"]["accepted"] == 3 && seen["catching_up"] == false).then_some(seen)
    })
    .await;
    let generator = &seen["consumers"][0];
    assert_eq!(generator["name"], "generator");
    assert_eq!(generator["waiting"], 3, "{seen}");
    assert!(
        generator["oldest_unfinished_seconds"].as_f64().is_some(),
        "{seen}"
    );
    assert_eq!(seen["consumers"][1]["name"], "callback");
    assert_eq!(seen["consumers"][1]["waiting"], 0);
    assert_eq!(
        seen["consumers"][1]["oldest_unfinished_seconds"],
        Value::Null
    );

    // A delivery is timed from its job's request.
    let doc = gateway
        .topology
        .status
        .get(&JobId::parse("JOB-O1").expect("id"))
        .await
        .expect("read")
        .expect("JOB-O1")
        .0;
    publish_event(
        &gateway.topology.jetstream,
        Event::Delivered.subject(&doc.kind),
        &Event::Delivered.msg_id(&doc.job_id),
        &json!({"job_id": "JOB-O1"}),
    )
    .await
    .expect("publish a delivery");
    make_undeliverable(&gateway, "JOB-O2").await;
    let seen = wait_until("a delivery and a dead letter", WAIT, || async {
        let seen = overview(&gateway).await;
        (seen["totals"]["delivered"] == 1 && seen["dead_letters"] == 1).then_some(seen)
    })
    .await;
    assert_eq!(seen["latency_ms"]["count"], 1, "{seen}");
    assert!(seen["latency_ms"]["p99"].as_f64().is_some(), "{seen}");
    assert_eq!(seen["totals"]["undeliverable"], 1, "{seen}");
    assert_eq!(seen["dead_letters_complete"], true);

    // The provider's shared pause, and one instance's closed gate.
    let until = OffsetDateTime::now_utc() + Duration::from_secs(60);
    let not_before = (until.unix_timestamp_nanos() / 1_000) as i64;
    let limits = &gateway.topology.limits;
    limits
        .put(
            "anthropic",
            serde_json::to_vec(
                &json!({"requests_tat": 0, "tokens_tat": 0, "not_before": not_before}),
            )
            .expect("JSON")
            .into(),
        )
        .await
        .expect("pause");
    let report = GateReport {
        instance: "generator-1".into(),
        paused: true,
        reason: Some("the provider refused the API key (401)".into()),
        since: Some(OffsetDateTime::now_utc()),
        reported_at: OffsetDateTime::now_utc(),
    };
    limits
        .put(
            format!("{GATE_KEY_PREFIX}generator-1"),
            serde_json::to_vec(&report).expect("JSON").into(),
        )
        .await
        .expect("gate report");
    let seen = overview(&gateway).await;
    let paused = &seen["generator"];
    assert_eq!(paused["paused"], true, "{seen}");
    let paused_until = paused["paused_until"].as_str().expect("paused_until");
    let paused_until = OffsetDateTime::parse(paused_until, &Rfc3339).expect("RFC 3339");
    assert!((paused_until - until).abs() < time::Duration::seconds(1));
    assert!(paused["reason"].as_str().is_some_and(|r| r.contains("429")));
    assert_eq!(paused["instances"][0]["instance"], "generator-1");
    assert_eq!(
        paused["instances"][0]["reason"],
        "the provider refused the API key (401)"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_filters_by_tenant_and_time_and_pages() {
    let gateway = tenants().await;
    let submit = "/api/v1/generate-description";
    for n in 0..5 {
        let id = format!("JOB-A{n}");
        let (status, body) =
            call(&gateway, KEYS[0].0, "POST", submit, Some(&article_job(&id))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, body) = call(
        &gateway,
        KEYS[1].0,
        "POST",
        submit,
        Some(&article_job("JOB-B0")),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    make_undeliverable(&gateway, "JOB-A0").await;
    let ops = KEYS[2].0;
    let (_, body) = call(&gateway, ops, "GET", "/api/v1/jobs?tenant=b", None).await;
    assert_eq!(listed_ids(&json_of(&body)), ["JOB-B0"]);
    // A tenant's key cannot ask for another's jobs.
    let (_, body) = call(&gateway, KEYS[0].0, "GET", "/api/v1/jobs?tenant=b", None).await;
    assert!(listed_ids(&json_of(&body)).is_empty(), "{body}");

    // Newest change first, in pages.
    let (_, body) = call(&gateway, ops, "GET", "/api/v1/jobs?tenant=a&limit=2", None).await;
    let first = json_of(&body);
    assert_eq!(listed_ids(&first), ["JOB-A0", "JOB-A4"], "{first}");
    assert_eq!(first["more"], true);
    let (_, body) = call(
        &gateway,
        ops,
        "GET",
        "/api/v1/jobs?tenant=a&limit=2&offset=4",
        None,
    )
    .await;
    let last = json_of(&body);
    assert_eq!(listed_ids(&last), ["JOB-A1"], "{last}");
    assert_eq!(
        (last["offset"].clone(), last["more"].clone()),
        (json!(4), json!(false))
    );

    let dead = &first["jobs"][0];
    assert_eq!(dead["status"], "undeliverable");
    assert_eq!(dead["destination"], "127.0.0.1:9", "{dead}");

    // A window of time: nothing changed in the future, everything since a minute ago.
    let later = (OffsetDateTime::now_utc() + Duration::from_secs(60))
        .format(&Rfc3339)
        .expect("format");
    let (_, body) = call(
        &gateway,
        ops,
        "GET",
        &format!("/api/v1/jobs?since={later}"),
        None,
    )
    .await;
    assert!(listed_ids(&json_of(&body)).is_empty(), "{body}");
    let (_, body) = call(
        &gateway,
        ops,
        "GET",
        &format!("/api/v1/jobs?until={later}"),
        None,
    )
    .await;
    assert_eq!(listed_ids(&json_of(&body)).len(), 6, "{body}");
    // Past what one listing reads, and past what any integer holds: the same clear 422.
    for offset in ["20001", "77483812858344603648"] {
        let path = format!("/api/v1/jobs?offset={offset}");
        let (status, body) = call(&gateway, ops, "GET", &path, None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(json_of(&body)["type"], "invalid_field");
    }
    let (status, body) = call(&gateway, ops, "GET", "/api/v1/jobs?since=yesterday", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(json_of(&body)["type"], "invalid_field");
    gateway.stop().await;
}
