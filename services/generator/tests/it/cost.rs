//! What jobs cost: prompt caching in the Messages API's wire format, every kind of token in
//! the status document, and its price in micro-dollars there and in the metrics.

use serde_json::{Value, json};

use jetcall::Kind;
use jetcall::cost::{Currency, Usage};
use jetcall::status::JobStatus;
use testkit::fake_anthropic::MIN_CACHEABLE_TOKENS;
use testkit::metrics::sample;

use crate::harness::Harness;

const KIND: &str = "catalogue-copy";

/// A kind whose system prompt (a house style guide, long enough for the API to cache) is
/// marked for caching when `cache` is.
fn catalogue_kind(cache: bool) -> Value {
    let style_guide = "Write in plain British English; name the product first; never promise \
                       delivery dates; keep prices out of the copy. "
        .repeat(60);
    assert!(
        style_guide.len() as u64 / 4 > MIN_CACHEABLE_TOKENS,
        "long enough to cache"
    );
    json!({
        "system": style_guide,
        "cache": cache,
        "template": "Describe {{product_name}}.",
        "required_fields": ["product_name"],
        "max_tokens": 256,
        "output": {"type": "text", "field": "description"},
    })
}

/// Dollars per million tokens times tokens, summed in floating point and rounded: the price
/// table's sum worked out another way.
fn expected_microdollars(usage: &Usage, prices: [f64; 4]) -> u64 {
    let [input, output, cache_write, cache_read] = prices;
    (usage.input_tokens as f64 * input
        + usage.output_tokens as f64 * output
        + usage.cache_creation_input_tokens as f64 * cache_write
        + usage.cache_read_input_tokens as f64 * cache_read)
        .round() as u64
}

async fn complete_one(harness: &Harness, job_id: &str) -> JobStatus {
    let kind = Kind::parse(KIND).expect("a kind name");
    harness
        .submit_kind(job_id, kind, json!({"product_name": job_id}))
        .await;
    harness.wait_for_status(job_id, "completed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_system_prompt_is_written_once_then_read_and_each_job_priced_by_its_tokens() {
    // Sonnet 4.5's published prices: $3 input, $15 output, $3.75 cache write, $0.30 cache read.
    let sonnet = [3.0, 15.0, 3.75, 0.30];
    let harness = Harness::start(&[
        ("anthropic.model", json!("claude-sonnet-4-5")),
        (&format!("kinds.{KIND}"), catalogue_kind(true)),
    ])
    .await;
    let (generator, admin) = harness.run_generator();
    // One at a time, so the first writes the cache and the others find it.
    let mut docs = Vec::new();
    for job_id in ["COPY-1", "COPY-2", "COPY-3"] {
        docs.push(complete_one(&harness, job_id).await);
    }
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    generator.stop().await;

    for request in harness.claude.requests() {
        assert_eq!(
            request.body["system"][0]["cache_control"],
            json!({"type": "ephemeral"}),
            "the system prompt is one text block marked for the cache"
        );
        assert_eq!(request.body["system"][0]["type"], "text");
        assert_eq!(request.status, 200);
    }
    let usage: Vec<Usage> = docs
        .iter()
        .map(|doc| doc.usage.expect("usage recorded"))
        .collect();
    assert!(usage[0].cache_creation_input_tokens > MIN_CACHEABLE_TOKENS);
    assert_eq!(usage[0].cache_read_input_tokens, 0);
    for later in &usage[1..] {
        assert_eq!(later.cache_creation_input_tokens, 0);
        assert_eq!(
            later.cache_read_input_tokens, usage[0].cache_creation_input_tokens,
            "the whole prefix is read back"
        );
        assert!(
            later.input_tokens < 100,
            "only the job's own message is plain input"
        );
    }

    let mut total = 0;
    for (doc, usage) in docs.iter().zip(&usage) {
        let cost = doc.cost.expect("a priced model's job has a cost");
        assert_eq!(cost.currency, Currency::Usd);
        assert_eq!(cost.microdollars, expected_microdollars(usage, sonnet));
        assert_eq!(
            doc.finished_event().and_then(|event| match event.outcome {
                jetcall::events::Outcome::Completed { cost, .. } => cost,
                _ => None,
            }),
            Some(cost),
            "the completed event carries the same cost"
        );
        total += cost.microdollars;
    }
    let first = docs[0].cost.expect("cost").microdollars;
    let second = docs[1].cost.expect("cost").microdollars;
    assert!(
        second * 5 < first,
        "a cache read costs far less than the write: {second} against {first}"
    );
    let counted = sample(
        &metrics,
        "jetcall_generator_cost_microdollars_total",
        &[&format!("kind=\"{KIND}\""), "key=\"\"", "path=\"sync\""],
    );
    assert_eq!(counted, Some(total as f64));
    let cache_read = sample(
        &metrics,
        "jetcall_generator_tokens_total",
        &[&format!("kind=\"{KIND}\""), "direction=\"cache_read\""],
    );
    assert_eq!(
        cache_read,
        Some((usage[1].cache_read_input_tokens * 2) as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_not_marked_sends_plain_text_and_a_model_without_a_price_has_no_cost() {
    let harness = Harness::start(&[
        ("anthropic.model", json!("claude-unreleased-9")),
        (&format!("kinds.{KIND}"), catalogue_kind(false)),
        // A price added in configuration is used for the model it names, beside the table's.
        (
            "prices.claude-house-model",
            json!({"input": 1.0, "output": 2.0}),
        ),
    ])
    .await;
    assert!(
        harness
            .config
            .prices
            .price_of("claude-house-model")
            .is_some()
    );
    assert!(
        harness
            .config
            .prices
            .price_of("claude-sonnet-4-5")
            .is_some()
    );
    let (generator, _) = harness.run_generator();
    let doc = complete_one(&harness, "PLAIN-1").await;
    generator.stop().await;

    let requests = harness.claude.requests();
    assert!(requests[0].body["system"].is_string(), "no cache_control");
    let usage = doc.usage.expect("usage");
    assert_eq!(
        (
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens
        ),
        (0, 0)
    );
    assert!(usage.input_tokens > MIN_CACHEABLE_TOKENS);
    assert_eq!(doc.cost, None, "no price, no guess");
}
