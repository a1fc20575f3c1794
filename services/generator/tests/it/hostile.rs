//! Hostile input: a job whose values are built to multiply the prompt.

use serde_json::{Value, json};

use jetcall::Kind;

use crate::harness::Harness;

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
    assert_eq!(harness.count("jobs.failed.>").await, 1);

    // The same generator goes on serving.
    harness.submit("AFTER-BOMB").await;
    harness.wait_for_status("AFTER-BOMB", "completed").await;
    assert_eq!(harness.claude.calls(), 1);
    generator.stop().await;
}
