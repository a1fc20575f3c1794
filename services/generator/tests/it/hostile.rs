//! Hostile input from both sides: a job whose values are built to multiply the prompt, and a
//! provider whose `retry-after` is infinite, unreadable or a day long.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use jetcall::Kind;
use testkit::fake_anthropic::Scripted;
use testkit::wait_until;

use crate::harness::Harness;

/// The README's promise: no answer from the provider holds the generators back longer.
const MAX_PROVIDER_WAIT: Duration = Duration::from_secs(60);

/// A product-description input whose every value holds the other fields' placeholders:
/// substituted field after field, each pass multiplies the text (here to about 2.6 MB); in one
/// pass over the template it is about the size of the input.
fn template_bomb() -> Value {
    json!({
        "product_id": "{{product_name}}".repeat(160),
        "product_name": "{{specs}}".repeat(160),
        "specs": "x".repeat(100),
    })
}

/// The bytes of every value in `input`, which a one-pass render adds to the template.
fn value_bytes(input: &Value) -> usize {
    input
        .as_object()
        .map(|fields| {
            fields
                .values()
                .map(|v| v.as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_in_values_reach_the_model_as_literal_text() {
    let harness = Harness::start(&[]).await;
    let (generator, _) = harness.run_generator();
    let input = template_bomb();
    harness
        .submit_kind("BOMB-LITERAL", Kind::product_description(), input.clone())
        .await;
    harness.wait_for_status("BOMB-LITERAL", "completed").await;

    let requests = harness.claude.requests();
    assert_eq!(requests.len(), 1);
    let prompt = requests[0].body["messages"][0]["content"]
        .as_str()
        .expect("a text user message")
        .to_owned();
    let template = &harness.config.kinds["product-description"].template;
    assert!(
        prompt.len() <= template.len() + value_bytes(&input),
        "the prompt is {} bytes, more than the template and the values",
        prompt.len()
    );
    assert!(
        prompt.contains("(catalogue id {{product_name}}{{product_name}}"),
        "a value's placeholders stay as they were written"
    );
    generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_over_max_prompt_bytes_fails_the_job_without_an_llm_call() {
    let harness = Harness::start(&[("generator.max_prompt_bytes", json!(2048))]).await;
    let (generator, _) = harness.run_generator();
    harness
        .submit_kind("BOMB-CAPPED", Kind::product_description(), template_bomb())
        .await;
    let doc = harness.wait_for_status("BOMB-CAPPED", "failed").await;
    let error = doc.error.expect("the failure is recorded");
    assert_eq!(error.kind, "invalid_input");
    assert!(
        error.message.contains("generator.max_prompt_bytes"),
        "{}",
        error.message
    );
    assert_eq!(harness.claude.calls(), 0, "the model is never asked");
    assert_eq!(harness.count_at_least("jobs.failed.>", 1).await, 1);

    // The same generator goes on serving.
    harness.submit("AFTER-BOMB").await;
    harness.wait_for_status("AFTER-BOMB", "completed").await;
    assert_eq!(harness.claude.calls(), 1);
    generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_infinite_retry_after_falls_back_to_the_backoff() {
    // A handler that panics leaves its request to JetStream's redelivery after `ack_wait`:
    // set far beyond the test's wait, only the worker's own retry can finish the jobs.
    let harness = Harness::start(&[("generator.ack_wait", json!("10m"))]).await;
    let (generator, _) = harness.run_generator();
    let hostile = [
        ("retry-after", "inf"),
        ("retry-after", "1e400"),
        ("retry-after", "NaN"),
        ("retry-after", "-5"),
        ("retry-after-ms", "1e400"),
    ];
    for (i, (name, value)) in hostile.iter().enumerate() {
        harness.claude.push(Scripted::ErrorWithHeaders {
            status: 429,
            headers: vec![(name, (*value).to_owned())],
        });
        let job_id = format!("RETRY-AFTER-{i}");
        harness.submit(&job_id).await;
        let doc = harness.wait_for_status(&job_id, "completed").await;
        assert_eq!(doc.generation_attempts, 2, "{name}: {value}");
        let pause = limiter_pause(&harness).await;
        assert!(
            pause <= unix_micros(SystemTime::now() + MAX_PROVIDER_WAIT),
            "{name}: {value} paused the generators beyond the documented minute"
        );
    }
    assert_eq!(harness.claude.calls(), 2 * hostile.len());
    generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_a_day_pauses_every_instance_for_at_most_a_minute() {
    let harness = Harness::start(&[]).await;
    let (generator, _) = harness.run_generator();
    harness.claude.push(Scripted::ErrorWithHeaders {
        status: 429,
        headers: vec![("retry-after", "86400".to_owned())],
    });
    let before = SystemTime::now();
    harness.submit("A-DAY").await;
    let pause = wait_until(
        "the 429 to pause the generators",
        Duration::from_secs(30),
        || async {
            let pause = limiter_pause(&harness).await;
            (pause > 0).then_some(pause)
        },
    )
    .await;
    let after = SystemTime::now();
    assert!(
        pause <= unix_micros(after + MAX_PROVIDER_WAIT),
        "paused until {}s after the 429, not at most a minute",
        (pause - unix_micros(before)) / 1_000_000
    );
    assert!(
        pause >= unix_micros(before + MAX_PROVIDER_WAIT),
        "the provider asked for long: the whole minute is honoured"
    );
    generator.stop().await;
}

/// The moment (Unix microseconds) until which the shared limiter holds every instance back; 0
/// before any pause.
async fn limiter_pause(harness: &Harness) -> i64 {
    let stored = harness
        .topology
        .limits
        .get("anthropic")
        .await
        .expect("read llm_limits");
    stored
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|budget| budget["not_before"].as_i64())
        .unwrap_or(0)
}

fn unix_micros(at: SystemTime) -> i64 {
    let since = at.duration_since(UNIX_EPOCH).expect("after 1970");
    i64::try_from(since.as_micros()).expect("in range")
}
