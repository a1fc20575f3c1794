//! The generator against a misbehaving Claude: overload, rate limits, a refused key, and
//! answers that do not fit the kind.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use jetcall::Kind;
use jetcall::status::AttemptOutcome;
use testkit::FakeAnthropic;
use testkit::fake_anthropic::{API_KEY, Recorded, Scripted};
use testkit::tls::Serving;
use testkit::wait_until;

use testkit::metrics::sample;

use crate::harness::Harness;

fn arrival_order(mut requests: Vec<Recorded>) -> Vec<Recorded> {
    requests.sort_by_key(|request| request.at);
    requests
}

async fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{address}{path}"))
        .await
        .expect("generator HTTP");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_can_be_spoken_to_a_plain_http_server() {
    let harness = Harness::start(&[("anthropic.http2", json!(true))]).await;
    let (generator, _) = harness.run_generator();
    for i in 0..3 {
        harness.submit(&format!("H2-{i}")).await;
    }
    for i in 0..3 {
        harness
            .wait_for_status(&format!("H2-{i}"), "completed")
            .await;
    }
    generator.stop().await;
    let versions: Vec<_> = harness
        .claude
        .requests()
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, vec![reqwest::Version::HTTP_2; 3]);
}

/// Submits `count` jobs, then starts a generator (which takes them in a burst) and waits for
/// each to complete; the HTTP versions Claude was asked in.
async fn complete_jobs(harness: &Harness, prefix: &str, count: usize) -> Vec<reqwest::Version> {
    for i in 0..count {
        harness.submit(&format!("{prefix}-{i}")).await;
    }
    let (generator, _) = harness.run_generator();
    for i in 0..count {
        harness
            .wait_for_status(&format!("{prefix}-{i}"), "completed")
            .await;
    }
    generator.stop().await;
    harness
        .claude
        .requests()
        .iter()
        .map(|r| r.version)
        .collect()
}

/// A harness whose Claude serves HTTPS as `serving` says, its CA trusted (`anthropic.tls_ca`).
async fn https_harness(serving: Serving, settings: &[(&str, Value)]) -> Harness {
    let claude = FakeAnthropic::start_tls(serving).await;
    let ca = claude.ca_file().expect("an HTTPS fake");
    let trust = [("anthropic.tls_ca", json!(ca))];
    Harness::start_with(claude, &[&trust[..], settings].concat()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_api_is_spoken_to_over_http2_trusting_a_configured_ca() {
    let harness = https_harness(Serving::http2(), &[]).await;
    let versions = complete_jobs(&harness, "TLS2", 3).await;
    assert_eq!(versions, vec![reqwest::Version::HTTP_2; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_api_that_declines_http2_is_spoken_to_over_http11() {
    let harness = https_harness(Serving::http1_only(), &[]).await;
    let versions = complete_jobs(&harness, "TLS1", 3).await;
    assert_eq!(versions, vec![reqwest::Version::HTTP_11; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_a_closing_connection_did_not_take_go_out_again_unpaid_for() {
    // One connection for every call, so each GOAWAY meets calls already on their way.
    let settings = [("generator.concurrency", json!(4))];
    let harness = https_harness(Serving::http2().closing_after(3), &settings).await;
    // Answers at staggered times, so calls start while a closing connection still carries
    // others, which is when the server refuses them.
    harness.claude.set_cycle(
        [0, 30, 60, 90]
            .map(|ms| Some(Scripted::Delay(Duration::from_millis(ms))))
            .to_vec(),
    );
    let jobs = 40;
    let versions = complete_jobs(&harness, "GOAWAY", jobs).await;
    // Each job paid for once, on its first attempt: no call was lost to a closing connection.
    assert_eq!(versions.len(), jobs);
    for i in 0..jobs {
        let doc = harness
            .status(&format!("GOAWAY-{i}"))
            .await
            .expect("status");
        assert_eq!(doc.generation_attempts, 1, "GOAWAY-{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_api_whose_certificate_is_not_trusted_gets_no_request() {
    let harness = Harness::start_with(FakeAnthropic::start_tls(Serving::http2()).await, &[]).await;
    let (generator, address) = harness.run_generator();
    harness.submit("UNTRUSTED-1").await;
    let refused = wait_until(
        "a failed call to be counted",
        Duration::from_secs(30),
        || async {
            let (_, metrics) = get(address, "/metrics").await;
            sample(
                &metrics,
                "jetcall_generator_llm_calls_total",
                &["outcome=\"connection_error\""],
            )
            .filter(|count| *count >= 1.0)
        },
    )
    .await;
    generator.stop().await;
    assert!(refused >= 1.0);
    assert!(harness.claude.requests().is_empty());
    let doc = harness
        .status("UNTRUSTED-1")
        .await
        .expect("status document");
    assert_ne!(doc.status.as_str(), "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_api_costs_a_bounded_number_of_calls_and_its_retry_after_is_honoured() {
    // Ten attempts make a job failing by bad luck vanishingly unlikely (0.3^10).
    let harness = Harness::start(&[("generator.max_attempts", json!(10))]).await;
    let overloaded = Some(Scripted::Error {
        status: 529,
        retry_after: None,
    });
    let rate_limited = Some(Scripted::Error {
        status: 429,
        retry_after: Some(1),
    });
    // Three answers in ten are errors.
    harness.claude.set_cycle(vec![
        overloaded.clone(),
        None,
        None,
        rate_limited,
        None,
        None,
        overloaded,
        None,
        None,
        None,
    ]);
    const JOBS: usize = 30;
    for i in 0..JOBS {
        harness.submit(&format!("FLAKY-{i}")).await;
    }
    let (generator, _) = harness.run_generator();
    for i in 0..JOBS {
        harness
            .wait_for_status(&format!("FLAKY-{i}"), "completed")
            .await;
    }
    generator.stop().await;

    let requests = arrival_order(harness.claude.requests());
    let answered = requests.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        answered, JOBS,
        "one successful call per job, never a second"
    );
    // With 3 failures in 10 the calls needed are JOBS / 0.7; a few more may be in flight
    // when the cycle turns.
    assert!(
        requests.len() <= JOBS * 10 / 7 + 3,
        "{} calls for {JOBS} jobs",
        requests.len()
    );
    let throttled: Vec<_> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == 429)
        .collect();
    assert!(
        !throttled.is_empty(),
        "the cycle answered 429 at least once"
    );
    for (i, refused) in throttled {
        let wait = Duration::from_secs(refused.retry_after.expect("429 carries retry-after"));
        let retry = requests[i + 1..]
            .iter()
            .find(|r| r.prompt() == refused.prompt())
            .expect("the throttled job was retried");
        let waited = retry.at.duration_since(refused.at);
        assert!(
            waited >= wait,
            "{} retried after {waited:?}, before its retry-after of {wait:?}",
            refused.prompt()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_pauses_the_generator_without_failing_jobs_until_it_is_fixed() {
    let harness = Harness::start(&[
        ("generator.probe_interval", json!("1s")),
        // One call at a time, so every call after the first is a probe.
        ("generator.concurrency", json!(1)),
        // A message already on its way when the pull stopped waits out ack_wait.
        ("generator.ack_wait", json!("5s")),
    ])
    .await;
    harness.claude.set_accepted_key("sk-ant-rotated-key");
    const JOBS: usize = 20;
    for i in 0..JOBS {
        harness.submit(&format!("AUTH-{i}")).await;
    }
    let (generator, admin) = harness.run_generator();
    wait_until("readiness to fail", Duration::from_secs(30), || async {
        (get(admin, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    wait_until(
        "two probes after the first refusal",
        Duration::from_secs(30),
        || async { (harness.claude.calls() >= 3).then_some(()) },
    )
    .await;

    let refused = arrival_order(harness.claude.requests());
    assert!(refused.iter().all(|r| r.status == 401));
    for pair in refused.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(900),
            "probes came {gap:?} apart: the queue is being burnt"
        );
    }
    // A refused call's attempt is given back right after the refusal, so the last probe's
    // job may still show it for a moment; it must come back to 0, and no job may fail.
    wait_until(
        "every refused call's attempt to be given back",
        Duration::from_secs(10),
        || async {
            for i in 0..JOBS {
                let doc = harness.status(&format!("AUTH-{i}")).await.expect("status");
                assert!(
                    matches!(doc.status.as_str(), "accepted" | "generating"),
                    "AUTH-{i} is {}",
                    doc.status.as_str()
                );
                if doc.generation_attempts != 0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let (_, metrics) = get(admin, "/metrics").await;
    assert_eq!(sample(&metrics, "jetcall_generator_paused", &[]), Some(1.0));
    // Operators see the pause and its cause where the console reads it.
    let report = wait_until(
        "the instance to report its pause",
        Duration::from_secs(15),
        || gate_report(&harness),
    )
    .await;
    assert!(report.paused, "{report:?}");
    assert!(
        report.reason.as_deref().is_some_and(|r| r.contains("401")),
        "{report:?}"
    );

    harness.claude.set_accepted_key(API_KEY);
    for i in 0..JOBS {
        harness
            .wait_for_status(&format!("AUTH-{i}"), "completed")
            .await;
    }
    assert_eq!(get(admin, "/readyz").await.0, 200);
    wait_until(
        "the instance to withdraw its report",
        Duration::from_secs(15),
        || async { gate_report(&harness).await.is_none().then_some(()) },
    )
    .await;
    let (_, metrics) = get(admin, "/metrics").await;
    assert_eq!(sample(&metrics, "jetcall_generator_paused", &[]), Some(0.0));
    let completed = sample(
        &metrics,
        "jetcall_generator_jobs_total",
        &["kind=\"product-description\"", "status=\"completed\""],
    );
    assert_eq!(completed, Some(JOBS as f64));
    let output_tokens = sample(
        &metrics,
        "jetcall_generator_tokens_total",
        &["direction=\"output\""],
    );
    assert!(output_tokens.is_some_and(|n| n > 0.0), "{metrics}");
    generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_does_not_fit_the_kind_is_asked_for_once_more_then_fails() {
    let harness = Harness::start(&[]).await;
    let return_analysis = Kind::parse("return-analysis").expect("kind");
    let input = json!({
        "order_id": "ORD-5521",
        "reason": "Stopped cooling after a week",
        "customer_message": "The AC blows warm air now."
    });
    let (generator, _) = harness.run_generator();

    // Mended on the second try.
    harness
        .claude
        .push(Scripted::Text("Sure! I would approve this one.".into()));
    harness.claude.push(Scripted::Text(
        r#"{"decision": "approve", "reason": "Defect within warranty", "customer_reply": "Sorry! A refund is on its way."}"#.into(),
    ));
    harness
        .submit_kind("RET-1", return_analysis.clone(), input.clone())
        .await;
    let doc = harness.wait_for_status("RET-1", "completed").await;
    assert_eq!(doc.result.expect("result")["decision"], "approve");
    assert_eq!(harness.claude.calls(), 2);
    let usage = doc.usage.expect("usage");
    assert!(
        usage.output_tokens > 6,
        "both calls' tokens are counted: {usage:?}"
    );

    // Wrong twice: the job fails, saying why.
    harness.claude.push(Scripted::Text("not JSON".into()));
    harness.claude.push(Scripted::Text(
        r#"{"decision": "maybe", "reason": "r", "customer_reply": "c"}"#.into(),
    ));
    harness.submit_kind("RET-2", return_analysis, input).await;
    let doc = harness.wait_for_status("RET-2", "failed").await;
    let error = doc.error.expect("error");
    assert_eq!(error.kind, "invalid_output");
    assert!(error.message.contains("`decision`"), "{}", error.message);
    assert!(error.message.contains("asked twice"), "{}", error.message);
    assert_eq!(harness.claude.calls(), 4);
    // Both unusable answers were paid for, so the failed job says what they cost.
    let usage = doc.usage.expect("the charged tokens are recorded");
    assert!(
        usage.input_tokens > 0 && usage.output_tokens > 0,
        "{usage:?}"
    );
    let price = harness
        .config
        .prices
        .price_of(&harness.config.anthropic.model)
        .expect("the default model has a price");
    assert_eq!(
        doc.cost,
        Some(price.cost(&usage, jetcall::cost::Path::Sync))
    );
    assert_eq!(
        harness
            .count_at_least("jobs.failed.return-analysis", 1)
            .await,
        1
    );
    generator.stop().await;
}

/// The one generator instance's gate report in `llm_limits`, once it has written one.
async fn gate_report(harness: &Harness) -> Option<jetcall::gate::GateReport> {
    use futures::StreamExt;
    let limits = &harness.topology.limits;
    let mut keys = limits.keys().await.expect("keys");
    while let Some(key) = keys.next().await {
        let key = key.expect("key");
        if key.starts_with(jetcall::subjects::GATE_KEY_PREFIX) {
            let value = limits.get(&key).await.expect("get")?;
            return Some(serde_json::from_slice(&value).expect("a gate report"));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attempt_is_kept_with_its_error_and_the_wait_before_the_next() {
    let harness = Harness::start(&[("generator.max_attempts", json!(3))]).await;
    harness.claude.push(Scripted::Error {
        status: 529,
        retry_after: None,
    });
    harness.submit("RETRIED-1").await;
    let (generator, _) = harness.run_generator();
    harness.wait_for_status("RETRIED-1", "completed").await;
    generator.stop().await;

    let doc = harness.status("RETRIED-1").await.expect("status document");
    let log: Vec<_> = doc
        .generations
        .iter()
        .map(|g| {
            (
                g.attempt,
                g.outcome,
                g.error.as_ref().map(|e| e.kind.as_str()),
            )
        })
        .collect();
    // The attempt that completed is the job's own `finished_at`, not an entry.
    assert_eq!(log, [(1, AttemptOutcome::Retry, Some("overloaded_error"))]);
    assert_eq!(doc.generation_attempts, 2);
    let retried = &doc.generations[0];
    assert!(retried.retry_in_ms.is_some_and(|ms| ms > 0), "{retried:?}");
    assert!(
        retried
            .started_at
            .is_some_and(|start| start <= retried.ended_at)
    );
    assert!(doc.finished_at >= Some(retried.ended_at));
    // The API shows the same history.
    let view = jetcall::view::JobView::from(doc);
    assert_eq!(view.generations.len(), 1);
}
