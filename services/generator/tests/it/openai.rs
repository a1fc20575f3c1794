//! The generator with `generator.provider = "openai"` against a fake OpenAI-compatible
//! Chat Completions API: a real nats-server, jobs submitted the way the gateway does it.

use std::time::Duration;

use serde_json::{Value, json};

use jetcall::Kind;
use testkit::fake_openai::{API_KEY, Scripted};
use testkit::{FakeOpenAi, wait_until};

use crate::harness::{Harness, RunningGenerator};

struct Setup {
    harness: Harness,
    openai: FakeOpenAi,
    generator: RunningGenerator,
}

impl Setup {
    async fn start() -> Self {
        let openai = FakeOpenAi::start().await;
        let harness = Harness::start(&[
            ("generator.provider", json!("openai")),
            ("openai.base_url", json!(openai.base_url())),
            ("openai.api_key", json!(API_KEY)),
        ])
        .await;
        let (generator, _) = harness.run_generator();
        Self {
            harness,
            openai,
            generator,
        }
    }
}

fn product_input() -> Value {
    json!({"product_id": "P-1", "product_name": "Fan", "specs": "3 blades"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_description_is_generated_by_an_openai_compatible_api() {
    let setup = Setup::start().await;
    setup
        .openai
        .set_reply("A quiet fan with three blades for hot afternoons.");
    setup
        .harness
        .submit_kind("JOB-OAI-1", Kind::product_description(), product_input())
        .await;

    let doc = setup
        .harness
        .wait_for_status("JOB-OAI-1", "completed")
        .await;
    assert_eq!(
        doc.result,
        Some(json!({"description": "A quiet fan with three blades for hot afternoons."}))
    );
    assert_eq!(doc.model.as_deref(), Some("gpt-4o-mini"));
    let usage = doc.usage.expect("usage recorded");
    assert!(usage.input_tokens > 0, "{usage:?}");
    assert_eq!(usage.output_tokens, 9);
    wait_until("the completion event", Duration::from_secs(10), || async {
        (setup
            .harness
            .count("jobs.completed.product-description")
            .await
            == 1)
            .then_some(())
    })
    .await;

    let requests = setup.openai.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    let body = &request.body;
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["max_tokens"], 1024);
    assert!(body.get("temperature").is_none(), "{body}");
    let messages = body["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "system");
    assert!(
        messages[0]["content"]
            .as_str()
            .is_some_and(|system| system.contains("copywriter")),
        "{body}"
    );
    assert_eq!(messages[1]["role"], "user");
    assert!(
        messages[1]["content"]
            .as_str()
            .is_some_and(|user| user.contains("Fan") && user.contains("3 blades")),
        "{body}"
    );

    setup.generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_kind_is_generated_by_an_openai_compatible_api() {
    let setup = Setup::start().await;
    let answer = json!({
        "decision": "approve",
        "reason": "Damaged on arrival, within the return window.",
        "customer_reply": "Sorry about that: a pickup is booked and your refund follows."
    });
    setup.openai.push(Scripted::Text(answer.to_string()));
    setup
        .harness
        .submit_kind(
            "JOB-OAI-RET",
            Kind::parse("return-analysis").expect("kind"),
            json!({
                "order_id": "ORD-9",
                "reason": "damaged",
                "customer_message": "The box arrived crushed and the unit rattles."
            }),
        )
        .await;

    let doc = setup
        .harness
        .wait_for_status("JOB-OAI-RET", "completed")
        .await;
    assert_eq!(doc.result, Some(answer));
    assert_eq!(setup.openai.calls(), 1);
    let body = &setup.openai.requests()[0].body;
    assert!(
        body["messages"][1]["content"]
            .as_str()
            .is_some_and(|user| user.contains("ORD-9")),
        "{body}"
    );

    setup.generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_call_is_retried_after_retry_after() {
    let setup = Setup::start().await;
    setup.openai.push(Scripted::Error {
        status: 429,
        retry_after: Some(1),
    });
    setup
        .harness
        .submit_kind("JOB-OAI-429", Kind::product_description(), product_input())
        .await;

    let doc = setup
        .harness
        .wait_for_status("JOB-OAI-429", "completed")
        .await;
    assert_eq!(setup.openai.calls(), 2);
    assert_eq!(doc.generation_attempts, 2);
    let requests = setup.openai.requests();
    assert_eq!(
        (requests[0].status, requests[0].retry_after),
        (429, Some(1))
    );
    assert_eq!(requests[1].status, 200);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(900),
        "the retry waited for retry-after, not {waited:?}"
    );
    assert!(
        doc.result
            .is_some_and(|result| result["description"]
                .as_str()
                .is_some_and(|text| text
                    .starts_with("Fake GPT reply to: Write a product description for Fan"))),
    );

    setup.generator.stop().await;
}
