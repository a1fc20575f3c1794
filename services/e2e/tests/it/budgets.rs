//! A key's budget held across two gateways: concurrent submissions that straddle the limit
//! never reserve past it, a refused job says when the budget resets, a cancelled job gives
//! its reservation back, and a completed one settles it to what it cost.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use jetcall::budget::{self, Period};
use jetcall::cost::PriceTable;
use testkit::fake_anthropic;
use testkit::wait::wait_until;
use testkit::{FakeAnthropic, WebhookReceiver};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "key-of-the-shop";
const TENANT: &str = "shop";
/// Another tenant's key, without a budget.
const OTHER_KEY: &str = "key-of-the-other-shop";
const OPERATOR_KEY: &str = "key-of-the-operator";
const MODEL: &str = "claude-test-model";
/// Jobs whose estimates the day's budget holds, and then half of one more.
const ROOM_FOR: u64 = 10;

fn job(n: usize, callback_url: &str) -> Value {
    json!({
        "job_id": format!("JOB-{n:02}"),
        "kind": "product-description",
        // The same length for every job, so every estimate is the same.
        "input": {"product_id": format!("P-{n:02}"), "product_name": "Kettle", "specs": "1.7 l"},
        "callback_url": callback_url,
    })
}

/// What the gateway reserves for each job: the budget module's estimate of its prompt.
fn estimate_of_one_job(prices: &PriceTable) -> u64 {
    let spec = jetcall::kinds::builtin_kinds()
        .remove("product-description")
        .expect("a built-in kind");
    let input = job(0, "http://127.0.0.1/")["input"]
        .as_object()
        .cloned()
        .expect("an input");
    let prompt = spec.check_prompt(&input, usize::MAX).expect("a prompt");
    budget::estimate(prices, MODEL, &spec, spec.system.len() + prompt).expect("a priced model")
}

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<&Value>,
) -> (StatusCode, Value, Option<String>) {
    send_as(KEY, http, method, url, body).await
}

async fn send_as(
    key: &str,
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<&Value>,
) -> (StatusCode, Value, Option<String>) {
    let mut request = http.request(method, url).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("a gateway answers");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        retry_after,
    )
}

/// The day's period of `tenant`'s budget (the key's own without one) as `key` sees it at
/// `GET /api/v1/budget`: the only period a day budget has.
async fn budget_of(
    http: &reqwest::Client,
    key: &str,
    gateway_url: &str,
    tenant: Option<&str>,
) -> Value {
    let query = tenant
        .map(|tenant| format!("?tenant={tenant}"))
        .unwrap_or_default();
    let url = format!("{gateway_url}/api/v1/budget{query}");
    let (status, body, _) = send_as(key, http, reqwest::Method::GET, url, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tenant"], TENANT, "{body}");
    let periods = body["periods"].as_array().expect("periods");
    assert_eq!(periods.len(), 1, "{body}");
    periods[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_across_gateways_and_settles_to_what_jobs_cost() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    let price = json!({"input": 3.0, "output": 15.0});
    let prices: PriceTable =
        serde_json::from_value(json!({ MODEL: price })).expect("a price table");
    let estimate = estimate_of_one_job(&prices);
    let limit = ROOM_FOR * estimate + estimate / 2;
    let pipeline = Pipeline::start(&[
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
        ("anthropic.model", json!(MODEL)),
        (&format!("prices.{MODEL}"), price),
        (
            "gateway.api_keys",
            json!([
                {
                    "key": KEY, "name": TENANT, "callback_allowlist": ["127.0.0.1"],
                    "budget": {"per_day_usd": limit as f64 / 1e6},
                },
                {"key": OTHER_KEY, "name": "other-shop"},
                {"key": OPERATOR_KEY, "name": "ops", "role": "admin"},
            ]),
        ),
    ])
    .await;
    // A second gateway on the same NATS: the budget is the tenant's, not an instance's.
    let second = testkit::loopback_listener();
    let second_url = format!("http://{}", second.local_addr().expect("an address"));
    let stop_second = CancellationToken::new();
    let second_gateway = tokio::spawn(gateway::run(
        pipeline.config.clone(),
        second,
        stop_second.clone(),
    ));
    let gateways = [pipeline.gateway_url.clone(), second_url];
    let http = reqwest::Client::new();
    wait_until("the second gateway to be ready", WAIT, || async {
        let response = http
            .get(format!("{}/readyz", gateways[1]))
            .send()
            .await
            .ok()?;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;

    // Calls that do not answer while the budget is contended: nothing settles meanwhile.
    claude.set_delay(Duration::from_secs(600));
    let hook = receiver.url("/cb");
    let answers = futures::future::join_all((0..2 * ROOM_FOR as usize).map(|n| {
        let (http, url, body) = (
            &http,
            format!("{}/api/v1/jobs", gateways[n % 2]),
            job(n, &hook),
        );
        async move { send(http, reqwest::Method::POST, url, Some(&body)).await }
    }))
    .await;
    let accepted: Vec<String> = answers
        .iter()
        .filter(|(status, ..)| *status == StatusCode::ACCEPTED)
        .map(|(_, body, _)| body["job_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        accepted.len() as u64,
        ROOM_FOR,
        "exactly what fits: {answers:?}"
    );
    let now = time::OffsetDateTime::now_utc();
    let today = Period::Day.key(now);
    let total = || async {
        pipeline
            .topology
            .budgets
            .total(TENANT, Period::Day, &today)
            .await
    };
    let reserved = total().await.expect("the day's total");
    assert!(
        reserved <= i128::from(limit),
        "{reserved} reserved past {limit}"
    );
    assert_eq!(reserved, i128::from(ROOM_FOR * estimate));
    // The key sees the same at the API, from either gateway: reservations count as used.
    let day = budget_of(&http, KEY, &gateways[1], None).await;
    assert_eq!(day["period"], "day", "{day}");
    assert_eq!(day["key"], json!(today), "{day}");
    assert_eq!(day["limit"]["microdollars"], json!(limit), "{day}");
    assert_eq!(day["used"]["microdollars"], json!(reserved), "{day}");
    assert_eq!(
        day["remaining"]["microdollars"],
        json!(limit - ROOM_FOR * estimate),
        "{day}"
    );
    let resets_at = Period::Day
        .resets_at(now)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a time");
    assert_eq!(day["resets_at"], json!(resets_at), "{day}");
    // An operator may look at it; another tenant may not.
    let seen_by_operator = budget_of(&http, OPERATOR_KEY, &gateways[0], Some(TENANT)).await;
    assert_eq!(seen_by_operator, day);
    let url = format!("{}/api/v1/budget?tenant={TENANT}", gateways[0]);
    let (status, body, _) = send_as(OTHER_KEY, &http, reqwest::Method::GET, url, None).await;
    assert_eq!(
        (status, &body["type"]),
        (StatusCode::FORBIDDEN, &json!("forbidden")),
        "{body}"
    );
    let (status, body, _) = send_as(
        OTHER_KEY,
        &http,
        reqwest::Method::GET,
        format!("{}/api/v1/budget", gateways[0]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"tenant": "other-shop", "periods": []}),
        "a key without a budget"
    );
    let url = format!("{}/api/v1/budget?tenant=nobody", gateways[0]);
    let (status, body, _) = send_as(OPERATOR_KEY, &http, reqwest::Method::GET, url, None).await;
    assert_eq!(
        (status, &body["type"]),
        (StatusCode::NOT_FOUND, &json!("not_found")),
        "{body}"
    );
    for (status, body, retry_after) in answers.iter().filter(|(s, ..)| *s != StatusCode::ACCEPTED) {
        assert_eq!(*status, StatusCode::PAYMENT_REQUIRED, "{body}");
        assert_eq!(body["type"], "budget_exceeded", "{body}");
        let resets_at = Period::Day.resets_at(now);
        let resets_text = resets_at
            .format(&time::format_description::well_known::Rfc3339)
            .expect("a time");
        assert_eq!(body["resets_at"], json!(resets_text), "{body}");
        let seconds: i64 = retry_after
            .as_deref()
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!(seconds > 0 && seconds <= 86_400, "{seconds}");
    }

    // A retry of an accepted job is answered as before, full budget or not.
    let n: usize = accepted[0]["JOB-".len()..].parse().expect("a job number");
    let (status, body, _) = send(
        &http,
        reqwest::Method::POST,
        format!("{}/api/v1/jobs", gateways[1]),
        Some(&job(n, &hook)),
    )
    .await;
    assert!(
        matches!(status, StatusCode::OK | StatusCode::ACCEPTED),
        "{status}: {body}"
    );
    assert_eq!(body["job_id"], json!(accepted[0]), "{body}");
    assert_eq!(total().await.expect("the day's total"), reserved);

    // Cancelled, the jobs give their reservations back.
    let (status, body, _) = send(
        &http,
        reqwest::Method::POST,
        format!("{}/api/v1/jobs/cancel", gateways[1]),
        Some(&json!({ "job_ids": accepted })),
    )
    .await;
    assert_eq!(
        (status, &body["cancelled"]),
        (StatusCode::OK, &json!(ROOM_FOR)),
        "{body}"
    );
    assert_eq!(total().await.expect("the day's total"), 0);

    // A job that completes settles to what it cost.
    claude.set_delay(Duration::ZERO);
    claude.set_reply("Boils a litre in a minute.");
    let (status, body, _) = send(
        &http,
        reqwest::Method::POST,
        format!("{}/api/v1/jobs", gateways[0]),
        Some(&job(99, &hook)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let doc = wait_until("JOB-99 to be delivered", WAIT, || async {
        let (_, doc, _) = send(
            &http,
            reqwest::Method::GET,
            format!("{}/api/v1/jobs/JOB-99", gateways[0]),
            None,
        )
        .await;
        (doc["status"] == "delivered").then_some(doc)
    })
    .await;
    let cost = doc["cost"]["microdollars"]
        .as_u64()
        .expect("a priced job has a cost");
    assert!(
        cost > 0 && cost < estimate,
        "{cost} against an estimate of {estimate}"
    );
    assert_eq!(total().await.expect("the day's total"), i128::from(cost));
    let day = budget_of(&http, KEY, &gateways[0], None).await;
    assert_eq!(day["used"]["microdollars"], json!(cost), "{day}");
    assert_eq!(
        day["remaining"]["microdollars"],
        json!(limit - cost),
        "{day}"
    );

    stop_second.cancel();
    second_gateway
        .await
        .expect("the second gateway's task")
        .expect("the second gateway stops cleanly");
    pipeline.stop().await;
}
