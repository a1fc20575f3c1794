//! Fair share between tenants across two generator instances: one tenant's backlog does not
//! hold up another's jobs, weights divide the calls, a key's `max_concurrency` holds across
//! instances and both priorities, and a tenant's interactive jobs go before its bulk ones.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::fake_anthropic;
use testkit::wait::wait_until;
use testkit::{FakeAnthropic, WebhookReceiver};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(60);
/// The first words of every prompt of a product-description job, up to its product name.
const PROMPT: &str = "Write a product description for ";

/// A tenant of these tests: its key, and the product names its jobs carry, so a prompt the
/// fake LLM sees says whose it is.
#[derive(Clone, Copy)]
struct Tenant {
    key: &'static str,
    name: &'static str,
}

const CATALOGUE: Tenant = Tenant {
    key: "key-of-the-catalogue-import",
    name: "catalogue",
};
const PORTAL: Tenant = Tenant {
    key: "key-of-the-merchant-portal",
    name: "portal",
};

impl Tenant {
    fn key_config(self, policy: Value) -> Value {
        let mut key =
            json!({"key": self.key, "name": self.name, "callback_allowlist": ["127.0.0.1"]});
        if let (Some(key), Some(policy)) = (key.as_object_mut(), policy.as_object()) {
            key.extend(policy.clone());
        }
        key
    }

    fn job(self, n: usize, callback_url: &str, priority: &str) -> Value {
        json!({
            "job_id": format!("{}-{priority}-{n:05}", self.name),
            "kind": "product-description",
            "input": {"product_id": format!("P-{n}"), "product_name": format!("{}-{priority} {n}", self.name), "specs": "1.7 l"},
            "callback_url": callback_url,
            "priority": priority,
        })
    }

    /// The calls the fake LLM has had for this tenant's jobs at `priority`.
    fn calls(self, claude: &FakeAnthropic, priority: &str) -> usize {
        let prefix = format!("{PROMPT}{}-{priority} ", self.name);
        claude
            .requests()
            .iter()
            .filter(|request| request.prompt().starts_with(&prefix))
            .count()
    }

    /// Submits `jobs` in batches of a thousand.
    async fn submit_all(self, pipeline: &Pipeline, jobs: Vec<Value>) {
        for chunk in jobs.chunks(1000) {
            let response = pipeline
                .http
                .post(format!("{}/api/v1/jobs/batch", pipeline.gateway_url))
                .bearer_auth(self.key)
                .json(&json!({ "jobs": chunk }))
                .send()
                .await
                .expect("the gateway answers");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["accepted"], json!(chunk.len()), "{body}");
        }
    }

    /// Submits `job` to the gateway at `gateway_url`.
    async fn submit(self, pipeline: &Pipeline, gateway_url: &str, job: &Value) {
        let response = pipeline
            .http
            .post(format!("{gateway_url}/api/v1/jobs"))
            .bearer_auth(self.key)
            .json(job)
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }

    async fn status(self, pipeline: &Pipeline, job_id: &str) -> Value {
        pipeline
            .http
            .get(format!("{}/api/v1/jobs/{job_id}", pipeline.gateway_url))
            .bearer_auth(self.key)
            .send()
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("a status document")
    }
}

/// A pipeline with `tenants`' keys, a fake Claude answering after `delay`, and two generator
/// instances of `concurrency` calls each.
async fn two_generators(
    claude: &FakeAnthropic,
    delay: Duration,
    concurrency: usize,
    keys: Value,
) -> Pipeline {
    claude.set_delay(delay);
    let mut pipeline = Pipeline::start(&[
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
        ("generator.concurrency", json!(concurrency)),
        ("generator.lane_refresh", json!("200ms")),
        // Bulk jobs called one by one after interactive work, as without Message Batches.
        ("generator.batches", json!(false)),
        ("gateway.api_keys", keys),
    ])
    .await;
    pipeline.start_generator();
    ready(&pipeline, pipeline.admin_url("generator")).await;
    pipeline
}

/// Waits for the service at `base_url` to answer `/readyz` with 200.
async fn ready(pipeline: &Pipeline, base_url: &str) {
    let url = format!("{base_url}/readyz");
    wait_until(&format!("{url} to answer 200"), WAIT, || async {
        let response = pipeline.http.get(&url).send().await.ok()?;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_one_tenant_does_not_hold_up_another() {
    const BACKLOG: usize = 5_000;
    const FEW: usize = 50;
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    let pipeline = two_generators(
        &claude,
        Duration::from_millis(100),
        4,
        json!([
            CATALOGUE.key_config(json!({})),
            PORTAL.key_config(json!({}))
        ]),
    )
    .await;
    let hook = receiver.url("/cb");

    let backlog = (0..BACKLOG)
        .map(|n| CATALOGUE.job(n, &hook, "interactive"))
        .collect();
    CATALOGUE.submit_all(&pipeline, backlog).await;
    // The generators count what waits in each lane.
    wait_until("the backlog in the metrics", WAIT, || async {
        let metrics = pipeline.metrics("generator").await;
        let waiting = testkit::metrics::sample(
            &metrics,
            "jetcall_generator_jobs_waiting",
            &["priority=\"interactive\"", "tenant=\"catalogue\""],
        )?;
        (waiting > (BACKLOG / 2) as f64).then_some(())
    })
    .await;
    // The portal's jobs come one at a time while the backlog waits.
    for n in 0..FEW {
        let job = PORTAL.job(n, &hook, "interactive");
        PORTAL.submit(&pipeline, &pipeline.gateway_url, &job).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 0..FEW {
        let job_id = format!("portal-interactive-{n:05}");
        wait_until(&format!("{job_id} to be generated"), WAIT, || async {
            let doc = PORTAL.status(&pipeline, &job_id).await;
            matches!(doc["status"].as_str(), Some("completed" | "delivered")).then_some(())
        })
        .await;
    }
    // Calls made, so at least the backlog's completed jobs.
    let backlog_calls = CATALOGUE.calls(&claude, "interactive");
    assert!(
        backlog_calls < BACKLOG / 2,
        "the portal's jobs waited for {backlog_calls} of the catalogue's"
    );
    // First in, first out, the portal's first job alone would have waited for all of them.
    assert_eq!(PORTAL.calls(&claude, "interactive"), FEW);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_divide_the_calls_between_tenants_with_waiting_work() {
    const EACH: usize = 800;
    const WINDOW: usize = 400;
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    let pipeline = two_generators(
        &claude,
        Duration::from_millis(20),
        8,
        json!([
            CATALOGUE.key_config(json!({"weight": 3})),
            PORTAL.key_config(json!({"weight": 1}))
        ]),
    )
    .await;
    let hook = receiver.url("/cb");
    let catalogue = (0..EACH)
        .map(|n| CATALOGUE.job(n, &hook, "interactive"))
        .collect();
    let portal = (0..EACH)
        .map(|n| PORTAL.job(n, &hook, "interactive"))
        .collect();
    tokio::join!(
        CATALOGUE.submit_all(&pipeline, catalogue),
        PORTAL.submit_all(&pipeline, portal)
    );
    wait_until("the calls of the window", WAIT, || async {
        (claude.calls() > 2 * WINDOW).then_some(())
    })
    .await;

    // The calls once both tenants had work waiting: neither backlog can run out within them
    // (the catalogue would need 300 of its 800, the portal 100).
    let requests = claude.requests();
    let first_of_each = |tenant: Tenant| {
        let prefix = format!("{PROMPT}{}-", tenant.name);
        requests
            .iter()
            .position(|request| request.prompt().starts_with(&prefix))
            .expect("a call for each tenant")
    };
    let start = first_of_each(CATALOGUE).max(first_of_each(PORTAL));
    let window = &requests[start..start + WINDOW];
    let catalogue_calls = window
        .iter()
        .filter(|request| request.prompt().starts_with(&format!("{PROMPT}catalogue-")))
        .count();
    let portal_calls = WINDOW - catalogue_calls;
    let ratio = catalogue_calls as f64 / portal_calls.max(1) as f64;
    assert!(
        (2.4..=3.6).contains(&ratio),
        "weights 3:1 gave {catalogue_calls}:{portal_calls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_holds_across_generator_instances() {
    const JOBS: usize = 30;
    const CAP: usize = 3;
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    let pipeline = two_generators(
        &claude,
        Duration::from_millis(300),
        8,
        json!([
            CATALOGUE.key_config(json!({"max_concurrency": CAP})),
            PORTAL.key_config(json!({}))
        ]),
    )
    .await;
    let hook = receiver.url("/cb");
    // The capped key's jobs at both priorities: two lanes, one cap.
    let capped = (0..JOBS)
        .flat_map(|n| {
            [
                CATALOGUE.job(n, &hook, "interactive"),
                CATALOGUE.job(n, &hook, "bulk"),
            ]
        })
        .collect();
    let free = (0..JOBS)
        .map(|n| PORTAL.job(n, &hook, "interactive"))
        .collect();
    tokio::join!(
        CATALOGUE.submit_all(&pipeline, capped),
        PORTAL.submit_all(&pipeline, free)
    );
    wait_until("every job to be generated", WAIT, || async {
        let answered = claude
            .requests()
            .iter()
            .filter(|request| request.answered_at.is_some())
            .count();
        (answered == 3 * JOBS).then_some(())
    })
    .await;
    let prefix = |tenant: Tenant| format!("{PROMPT}{}-", tenant.name);
    assert_eq!(claude.most_at_once(&prefix(CATALOGUE)), CAP);
    // Both of its lanes were called.
    assert_eq!(CATALOGUE.calls(&claude, "bulk"), JOBS);
    // The cap is the key's: the other tenant used more of the sixteen slots.
    assert!(claude.most_at_once(&prefix(PORTAL)) > CAP);
    // The generators' metrics saw each capped call wait for its place, and give it back.
    let cap_metric = |name: &str, tenant: Tenant| {
        let name = format!("jetcall_generator_{name}");
        let tenant = format!("tenant=\"{}\"", tenant.name);
        let pipeline = &pipeline;
        async move {
            let mut total = None;
            for url in pipeline.admin_urls("generator") {
                let metrics = pipeline.metrics_at(&url).await;
                if let Some(value) = testkit::metrics::sample(&metrics, &name, &[&tenant]) {
                    total = Some(total.unwrap_or(0.0) + value);
                }
            }
            total
        }
    };
    wait_until("every place to be given back", WAIT, || async {
        (cap_metric("cap_held", CATALOGUE).await == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(cap_metric("cap_waiting", CATALOGUE).await, Some(0.0));
    assert_eq!(
        cap_metric("cap_wait_duration_seconds_count", CATALOGUE).await,
        Some((2 * JOBS) as f64)
    );
    assert_eq!(
        cap_metric("cap_held", PORTAL).await,
        None,
        "an uncapped key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_jobs_go_before_the_same_tenants_bulk_ones() {
    const BULK: usize = 400;
    const INTERACTIVE: usize = 40;
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    let pipeline = two_generators(
        &claude,
        Duration::from_millis(50),
        4,
        json!([CATALOGUE.key_config(json!({}))]),
    )
    .await;
    let hook = receiver.url("/cb");
    let bulk = (0..BULK).map(|n| CATALOGUE.job(n, &hook, "bulk")).collect();
    CATALOGUE.submit_all(&pipeline, bulk).await;
    let interactive = (0..INTERACTIVE)
        .map(|n| CATALOGUE.job(n, &hook, "interactive"))
        .collect();
    CATALOGUE.submit_all(&pipeline, interactive).await;
    wait_until("the interactive jobs' calls", WAIT, || async {
        (CATALOGUE.calls(&claude, "interactive") == INTERACTIVE).then_some(())
    })
    .await;
    let bulk_calls = CATALOGUE.calls(&claude, "bulk");
    assert!(
        bulk_calls < BULK / 2,
        "the interactive jobs waited for {bulk_calls} bulk ones"
    );
    // While interactive jobs waited, one pick in five went to bulk: taking turns would have
    // made it one in two.
    let prompts: Vec<String> = claude.requests().iter().map(|r| r.prompt()).collect();
    let interactive = format!("{PROMPT}catalogue-interactive ");
    let first = prompts.iter().position(|p| p.starts_with(&interactive));
    let last = prompts.iter().rposition(|p| p.starts_with(&interactive));
    let (Some(first), Some(last)) = (first, last) else {
        panic!("no interactive call among {prompts:?}");
    };
    let bulk_meanwhile = last + 1 - first - INTERACTIVE;
    assert!(
        bulk_meanwhile <= INTERACTIVE / 2,
        "{bulk_meanwhile} bulk calls among the {INTERACTIVE} interactive ones"
    );
    // Bulk still moves, and its jobs say what they are.
    wait_until("bulk calls", WAIT, || async {
        (CATALOGUE.calls(&claude, "bulk") > bulk_calls).then_some(())
    })
    .await;
    let doc = CATALOGUE.status(&pipeline, "catalogue-bulk-00000").await;
    assert_eq!(doc["priority"], "bulk", "{doc}");
}

/// A key added by a rolling deploy (a gateway started with it) while the generators are busy
/// with another tenant's backlog: they find its lane at their next listing and give it its
/// share, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_while_the_generators_are_busy_gets_its_share() {
    const BACKLOG: usize = 3_000;
    const FEW: usize = 10;
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    let pipeline = two_generators(
        &claude,
        Duration::from_millis(100),
        4,
        json!([CATALOGUE.key_config(json!({}))]),
    )
    .await;
    let hook = receiver.url("/cb");
    let backlog = (0..BACKLOG)
        .map(|n| CATALOGUE.job(n, &hook, "interactive"))
        .collect();
    CATALOGUE.submit_all(&pipeline, backlog).await;

    let mut config = pipeline.config.clone();
    config.gateway.api_keys = serde_json::from_value(json!([
        CATALOGUE.key_config(json!({})),
        PORTAL.key_config(json!({}))
    ]))
    .expect("the keys");
    let listener = testkit::loopback_listener();
    let new_gateway = format!("http://{}", listener.local_addr().expect("an address"));
    let stop = tokio_util::sync::CancellationToken::new();
    let gateway = tokio::spawn(gateway::run(config, listener, stop.clone()));
    ready(&pipeline, &new_gateway).await;
    for n in 0..FEW {
        let job = PORTAL.job(n, &hook, "interactive");
        PORTAL.submit(&pipeline, &new_gateway, &job).await;
    }
    wait_until("the new key's calls", WAIT, || async {
        (PORTAL.calls(&claude, "interactive") == FEW).then_some(())
    })
    .await;
    let backlog_calls = CATALOGUE.calls(&claude, "interactive");
    assert!(
        backlog_calls < BACKLOG / 2,
        "the new key's jobs waited for {backlog_calls} of the backlog's"
    );
    stop.cancel();
    let _ = gateway.await;
}
