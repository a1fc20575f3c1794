//! The operators' console at `/console`, in a real browser (headless Chromium through
//! `testkit::Browser`) against the whole pipeline: what a person sees and clicks, by the DOM
//! contract the page promises (ids and data attributes). Every test ends with no error in the
//! browser's console: no uncaught exception, no Content-Security-Policy violation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::{Browser, WebhookReceiver, wait_until};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(30);

/// The article's job (`product_description`, PROD-AC15), under `job_id`.
fn article_job(job_id: &str, callback_url: &str) -> Value {
    json!({
        "job_id": job_id,
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": {"capacity": "1.5 Ton", "energy_rating": "5 Star", "compressor": "Dual Inverter"},
        "callback_url": callback_url
    })
}

/// Submits `body` as the caller with `key` (none: an open gateway) and expects it accepted.
async fn submit(pipeline: &Pipeline, key: Option<&str>, body: &Value) {
    let request = pipeline
        .http
        .post(format!(
            "{}/api/v1/generate-description",
            pipeline.gateway_url
        ))
        .json(body);
    let request = match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    };
    let response = request.send().await.expect("POST to the gateway");
    let status = response.status();
    let answer = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
}

/// Waits until the job's status, as the caller with `key` sees it through the API, is
/// `status`.
async fn wait_for_status_as(pipeline: &Pipeline, key: &str, job_id: &str, status: &str) {
    let url = format!("{}/api/v1/jobs/{job_id}", pipeline.gateway_url);
    wait_until(&format!("job {job_id} to be {status}"), WAIT, || async {
        let response = pipeline.http.get(&url).bearer_auth(key).send().await.ok()?;
        let doc: Value = response.json().await.ok()?;
        (doc["status"] == status).then_some(())
    })
    .await;
}

fn console_url(pipeline: &Pipeline, route: &str) -> String {
    format!("{}/console{route}", pipeline.gateway_url)
}

/// Where the run's screenshots go: `target/console-screenshots/` every run, and `docs/` (the
/// README's pictures, committed) when `JETCALL_UPDATE_SCREENSHOTS=1` asks for new ones, so a
/// run does not leave the work tree changed by its own times and ports.
fn screenshot_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("services/e2e lies two levels below the workspace root");
    if std::env::var_os("JETCALL_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        return root.join("docs");
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

/// A PNG's width and height, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG"
    );
    let number = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    (number(16), number(20))
}

fn is_count_at_least(text: &str, at_least: u64) -> bool {
    text.trim().parse::<u64>().is_ok_and(|n| n >= at_least)
}

/// The visible text of the whole page.
async fn page_text(browser: &Browser) -> String {
    browser
        .client()
        .execute("return document.body.innerText;", vec![])
        .await
        .ok()
        .and_then(|text| text.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_gateway_shows_the_article_job_from_overview_to_timeline() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;
    let browser = Browser::start().await;
    browser.set_window_size(1280, 800).await;

    browser.goto(&console_url(&pipeline, "")).await;
    let warning = browser
        .wait_for_text("#warning-open", |t| !t.is_empty())
        .await;
    assert!(warning.contains("no API keys"), "{warning}");
    assert!(
        !browser.is_displayed("#signin").await,
        "no sign-in without keys"
    );

    submit(
        &pipeline,
        None,
        &article_job("JOB-771", &receiver.url("/webhooks/description")),
    )
    .await;

    // The overview (the default route) counts it once it is delivered: it refreshes itself.
    browser.wait_for("#overview").await;
    browser
        .wait_for_text("#total-delivered", |t| is_count_at_least(t, 1))
        .await;
    browser
        .wait_for_text("#total-accepted", |t| is_count_at_least(t, 1))
        .await;
    for series in [
        "accepted",
        "completed",
        "failed",
        "delivered",
        "undeliverable",
    ] {
        browser
            .wait_for(&format!("svg.chart[data-series=\"{series}\"]"))
            .await;
    }
    browser
        .wait_for("#consumers tbody tr[data-consumer=\"generator\"]")
        .await;
    browser
        .wait_for("#consumers tbody tr[data-consumer=\"callback\"]")
        .await;
    browser
        .wait_for_text("#generator-state", |t| t == "running")
        .await;
    browser
        .wait_for_text("#latency-p50", |t| t.ends_with("ms"))
        .await;
    let screenshots = screenshot_dir();
    browser
        .screenshot(&screenshots.join("console-overview.png"))
        .await;

    // The jobs list, reached through the navigation.
    browser.click("nav a[href=\"#/jobs\"]").await;
    let row = "#jobs-table tbody tr[data-job-id=\"JOB-771\"]";
    browser
        .wait_for_text(&format!("{row} td.status"), |t| t == "delivered")
        .await;
    browser
        .wait_for_text(&format!("{row} td.age"), |t| t.contains("ago"))
        .await;

    // The job itself, through its row's link.
    browser.click(&format!("{row} a")).await;
    browser.wait_for("#job[data-job-id=\"JOB-771\"]").await;
    wait_for_delivered_timeline(&browser).await;
    let steps = step_names(&browser).await;
    assert_eq!(
        steps,
        [
            "accepted",
            "generation",
            "completed",
            "delivery",
            "delivered"
        ],
        "the whole life of the job, in order"
    );
    let redeliver = browser.wait_for("#btn-redeliver").await;
    assert!(
        !redeliver
            .is_enabled()
            .await
            .expect("#btn-redeliver's state"),
        "a delivered job cannot be redelivered"
    );
    // The picture is of the timeline, in the middle of the window.
    browser
        .client()
        .execute(
            "document.getElementById('timeline')\
               .scrollIntoView({block: 'center', behavior: 'instant'});",
            vec![],
        )
        .await
        .expect("scrolling to the timeline's end");
    browser
        .screenshot(&screenshots.join("console-job.png"))
        .await;

    // A phone: the page is laid out for its width, with nothing to scroll sideways.
    browser.set_window_size(390, 844).await;
    assert_eq!(
        browser.viewport().await,
        (390, 844),
        "the page is laid out for a phone's width (its viewport meta)"
    );
    browser
        .wait_for_text("#job-status", |t| t == "delivered")
        .await;
    let overflow = browser
        .client()
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            vec![],
        )
        .await
        .expect("measuring the page");
    assert!(
        overflow.as_i64().is_some_and(|px| px <= 0),
        "at 390 px the page is {overflow} px wider than the screen"
    );
    let phone = browser.screenshot_png().await;
    assert_eq!(png_size(&phone), (390, 844));

    receiver.wait_for(1, WAIT).await;
    browser.assert_no_console_errors().await;
    browser.close().await;
    pipeline.stop().await;
}

/// Waits until the job page shows its job delivered, status and timeline both.
async fn wait_for_delivered_timeline(browser: &Browser) {
    browser
        .wait_for_text("#job-status", |t| t == "delivered")
        .await;
    browser
        .wait_for("#timeline li[data-step=\"delivered\"]")
        .await;
}

/// The `data-step` of each timeline entry, in order.
async fn step_names(browser: &Browser) -> Vec<String> {
    let mut steps = Vec::new();
    for li in browser.find_all("#timeline li").await {
        steps.push(
            li.attr("data-step")
                .await
                .ok()
                .flatten()
                .unwrap_or_default(),
        );
    }
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_replayed_by_clicking() {
    let receiver = WebhookReceiver::start().await;
    // Every attempt fails until the receiver is told otherwise.
    receiver.fail_first_attempts_of_each_job(usize::MAX, 500);
    let pipeline = Pipeline::start(&[
        ("callback.retry_schedule", json!(["50ms", "50ms"])),
        // A breaker that opened would turn attempts into skips; closing it at once keeps each
        // attempt a real request.
        ("callback.breaker_cooldown", json!("1ms")),
    ])
    .await;
    submit(
        &pipeline,
        None,
        &article_job("JOB-DLQ", &receiver.url("/webhooks/description")),
    )
    .await;
    pipeline
        .wait_for_status("JOB-DLQ", "undeliverable", WAIT)
        .await;
    let failed_attempts = receiver.count();
    assert_eq!(failed_attempts, 3, "first try and two retries");

    let browser = Browser::start().await;
    browser.set_window_size(1280, 800).await;
    browser
        .goto(&console_url(&pipeline, "#/dead-letters"))
        .await;
    let destination = format!("127.0.0.1:{}", receiver.port());
    let section = format!("#dead-letters section.destination[data-destination=\"{destination}\"]");
    let row = format!("{section} tr[data-job-id=\"JOB-DLQ\"]");
    browser.wait_for(&row).await;
    browser.wait_for_text(&section, |t| t.contains("500")).await;

    // Cancelled, nothing is sent.
    browser.click(&format!("{row} button.replay")).await;
    browser
        .wait_for_text("#confirm-message", |t| t.contains("JOB-DLQ"))
        .await;
    browser.click("#confirm-cancel").await;
    browser.wait_for_hidden("#confirm").await;

    // Confirmed, it is delivered again: to a receiver that works by now.
    browser.click(&format!("{row} button.replay")).await;
    browser.wait_for("#confirm").await;
    receiver.fail_first_attempts_of_each_job(0, 500);
    browser.click("#confirm-ok").await;
    browser.wait_for_hidden("#confirm").await;

    let deliveries = receiver.wait_for(failed_attempts + 1, WAIT).await;
    assert_eq!(
        deliveries.len(),
        failed_attempts + 1,
        "one delivery for the confirmed replay, none for the cancelled one"
    );
    assert_eq!(deliveries[failed_attempts].json()["job_id"], "JOB-DLQ");

    browser
        .goto(&console_url(&pipeline, "#/jobs/JOB-DLQ"))
        .await;
    wait_for_delivered_timeline(&browser).await;
    browser.click("nav a[href=\"#/dead-letters\"]").await;
    browser.wait_for("#dead-letters").await;
    browser.wait_for_hidden(&row).await;

    browser.assert_no_console_errors().await;
    browser.close().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_dead_letters_is_replayed_by_clicking() {
    let receiver = WebhookReceiver::start().await;
    receiver.fail_first_attempts_of_each_job(usize::MAX, 503);
    let pipeline = Pipeline::start(&[
        ("callback.retry_schedule", json!(["50ms"])),
        ("callback.breaker_cooldown", json!("1ms")),
    ])
    .await;
    for job in ["JOB-W1", "JOB-W2"] {
        submit(&pipeline, None, &article_job(job, &receiver.url("/cb"))).await;
        pipeline.wait_for_status(job, "undeliverable", WAIT).await;
    }

    let browser = Browser::start().await;
    browser.set_window_size(1280, 800).await;
    browser
        .goto(&console_url(&pipeline, "#/dead-letters"))
        .await;
    let row = |job: &str| format!("#dead-letters tr[data-job-id=\"{job}\"]");
    browser.wait_for(&row("JOB-W1")).await;
    browser.wait_for(&row("JOB-W2")).await;

    // A date picker's value is set as its own UI would set it, then announced.
    browser.wait_for("#replay-window-since").await;
    browser
        .client()
        .execute(
            "const since = document.getElementById('replay-window-since');\
             since.value = '2020-01-01T00:00';\
             since.dispatchEvent(new Event('input', {bubbles: true}));\
             since.dispatchEvent(new Event('change', {bubbles: true}));",
            vec![],
        )
        .await
        .expect("setting the window's start");
    browser.click("#btn-replay-window").await;
    browser.wait_for("#confirm").await;
    receiver.fail_first_attempts_of_each_job(0, 503);
    browser.click("#confirm-ok").await;
    let result = browser
        .wait_for_text("#replay-result", |t| !t.is_empty())
        .await;
    if browser.is_displayed("#error-banner").await {
        let banner = browser.wait_for("#error-banner").await.text().await;
        let log = browser.browser_log().await;
        panic!(
            "the window's replay failed: {result:?}; error banner: {banner:?}; console: {log:?}"
        );
    }
    browser.wait_for_hidden(&row("JOB-W1")).await;
    browser.wait_for_hidden(&row("JOB-W2")).await;
    for job in ["JOB-W1", "JOB-W2"] {
        pipeline.wait_for_status(job, "delivered", WAIT).await;
    }

    browser.assert_no_console_errors().await;
    browser.close().await;
    pipeline.stop().await;
}

const KEY_A: &str = "console-key-tenant-a";
const KEY_B: &str = "console-key-tenant-b";
const KEY_ADMIN: &str = "console-key-operator";

/// What only tenant B's job holds: none of it may reach tenant A's page.
const B_PRODUCT: &str = "Tenant B Secret Kettle";
const B_HOOK: &str = "/webhooks/tenant-b-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_key_shows_its_own_jobs_and_an_admin_key_all() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[(
        "gateway.api_keys",
        json!([
            {
                "key": KEY_A, "name": "tenant-a", "callback_allowlist": ["127.0.0.1"],
                "budget": {"per_day_usd": 20.0},
            },
            {"key": KEY_B, "name": "tenant-b", "callback_allowlist": ["127.0.0.1"]},
            {"key": KEY_ADMIN, "name": "ops", "role": "admin"},
        ]),
    )])
    .await;
    submit(
        &pipeline,
        Some(KEY_A),
        &article_job("JOB-A1", &receiver.url("/webhooks/tenant-a")),
    )
    .await;
    let mut b_job = article_job("JOB-B1", &receiver.url(B_HOOK));
    b_job["product_name"] = json!(B_PRODUCT);
    submit(&pipeline, Some(KEY_B), &b_job).await;
    wait_for_status_as(&pipeline, KEY_A, "JOB-A1", "delivered").await;
    wait_for_status_as(&pipeline, KEY_B, "JOB-B1", "delivered").await;

    let browser = Browser::start().await;
    browser.set_window_size(1280, 800).await;
    browser.goto(&console_url(&pipeline, "")).await;

    // Keys are required: the sign-in form, no warning, and a wrong key is refused.
    browser.wait_for("#signin").await;
    assert!(!browser.is_displayed("#warning-open").await);
    browser
        .fill("#signin-key", "not-a-key-of-this-gateway")
        .await;
    browser.click("#signin-submit").await;
    browser
        .wait_for_text("#signin-error", |t| !t.is_empty())
        .await;

    // Tenant A: its own jobs, none of B's, and no operators' views.
    browser.fill("#signin-key", KEY_A).await;
    browser.click("#signin-submit").await;
    browser
        .wait_for_text("#who", |t| t.contains("tenant-a") && t.contains("user"))
        .await;
    browser.wait_for_hidden("#signin").await;
    browser.wait_for("nav a[href=\"#/jobs\"]").await;
    browser.wait_for_hidden("nav a[href=\"#/overview\"]").await;
    browser
        .wait_for_hidden("nav a[href=\"#/dead-letters\"]")
        .await;
    browser.click("nav a[href=\"#/jobs\"]").await;
    browser
        .wait_for_text(
            "#jobs-table tbody tr[data-job-id=\"JOB-A1\"] td.status",
            |t| t == "delivered",
        )
        .await;
    browser.wait_for_hidden("#filter-tenant").await;
    // Its budget above its jobs (the offline writer is unpriced, so nothing is used).
    browser
        .wait_for_text("#budget", |t| {
            t.contains("Today: $0.00 of $20.00 used, $20.00 left")
        })
        .await;
    assert!(
        browser
            .find_all("#jobs-table tbody tr[data-job-id=\"JOB-B1\"]")
            .await
            .is_empty(),
        "tenant A's list holds tenant B's job"
    );

    // B's id typed in: not found, and nothing of B's on the page.
    browser.fill("#search-id", "JOB-B1\u{E007}").await;
    wait_until("the URL to name JOB-B1", WAIT, || async {
        browser.url().await.ends_with("#/jobs/JOB-B1").then_some(())
    })
    .await;
    let said = wait_until("the page to say JOB-B1 was not found", WAIT, || async {
        let text = page_text(&browser).await;
        let lower = text.to_lowercase();
        (lower.contains("not found") || lower.contains("no job")).then_some(text)
    })
    .await;
    let source = browser.client().source().await.expect("the page's source");
    for secret in [B_PRODUCT, B_HOOK, "tenant-b"] {
        assert!(!said.contains(secret), "B's `{secret}` shown to A: {said}");
        assert!(!source.contains(secret), "B's `{secret}` in A's page");
    }
    for status in browser.find_all("#job-status").await {
        let shown = status.text().await.unwrap_or_default();
        assert!(
            !shown.contains("delivered"),
            "A is shown a status for B's job: {shown}"
        );
    }

    // The operator sees both tenants' jobs, and the overview.
    browser.click("#signout").await;
    browser.wait_for("#signin").await;
    browser.fill("#signin-key", KEY_ADMIN).await;
    browser.click("#signin-submit").await;
    browser.wait_for_text("#who", |t| t.contains("admin")).await;
    browser.wait_for("nav a[href=\"#/overview\"]").await;
    browser.click("nav a[href=\"#/jobs\"]").await;
    for job in ["JOB-A1", "JOB-B1"] {
        browser
            .wait_for_text(
                &format!("#jobs-table tbody tr[data-job-id=\"{job}\"] td.status"),
                |t| t == "delivered",
            )
            .await;
    }
    browser.wait_for("#filter-tenant").await;
    // The operator's own key has no budget: none is shown, and A's is gone with A's key.
    assert!(!browser.is_displayed("#budget").await);

    // The refusals this test caused on purpose are the only errors: the wrong key's (and the
    // first visit's, before any key) 401 and the 404 of B's job asked for with A's key.
    browser
        .assert_no_console_errors_but(&[&["/api/v1/", "401"], &["/api/v1/jobs/JOB-B1", "404"]])
        .await;
    browser.close().await;
    pipeline.stop().await;
}

/// A job whose call is taking long is cancelled from its page: the call is abandoned, the
/// timeline ends `cancelled`, and the caller gets `job.cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_job_is_cancelled_by_clicking() {
    let receiver = WebhookReceiver::start().await;
    let claude = testkit::FakeAnthropic::start().await;
    claude.push(testkit::fake_anthropic::Scripted::Delay(
        Duration::from_secs(600),
    ));
    let pipeline = Pipeline::start(&[
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(testkit::fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
        ("generator.ack_wait", json!("300s")),
    ])
    .await;
    submit(
        &pipeline,
        None,
        &article_job("JOB-SLOW", &receiver.url("/webhooks/description")),
    )
    .await;
    pipeline
        .wait_for_status("JOB-SLOW", "generating", WAIT)
        .await;

    let browser = Browser::start().await;
    browser.set_window_size(1280, 800).await;
    browser
        .goto(&console_url(&pipeline, "#/jobs/JOB-SLOW"))
        .await;
    browser.wait_for("#btn-cancel-job:enabled").await;
    browser.click("#btn-cancel-job").await;
    browser
        .wait_for_text("#confirm-message", |t| t.contains("abandoned"))
        .await;
    browser.click("#confirm-ok").await;
    browser.wait_for_hidden("#confirm").await;

    let payload = receiver.wait_for(1, WAIT).await[0].json();
    assert_eq!(payload["type"], "job.cancelled", "{payload}");
    browser
        .wait_for("#timeline li[data-step=\"cancelled\"]")
        .await;
    browser.wait_for("#btn-cancel-job:disabled").await;
    assert_eq!(claude.calls(), 1);
    browser.assert_no_console_errors().await;
    browser.close().await;
    pipeline.stop().await;
}
