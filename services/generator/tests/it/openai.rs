//! The generator with `generator.provider = "openai"` against a fake OpenAI-compatible
//! Chat Completions API: a real nats-server, jobs submitted the way the gateway does it.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jetcall::events::JobRequested;
use jetcall::status::JobStatus;
use jetcall::subjects::Event;
use jetcall::topology::Topology;
use jetcall::{JobId, Kind};
use testkit::fake_openai::{API_KEY, Scripted};
use testkit::{FakeOpenAi, NatsServer, wait_until};

struct Setup {
    _nats: NatsServer,
    openai: FakeOpenAi,
    topology: Topology,
    stop: CancellationToken,
    generator: JoinHandle<Result<(), generator::GeneratorError>>,
}

impl Setup {
    async fn start() -> Self {
        testkit::init_logs();
        let nats = NatsServer::start();
        let openai = FakeOpenAi::start().await;
        let config = testkit::config::config(
            &nats.url(),
            &[
                ("generator.provider", "openai".into()),
                ("openai.base_url", openai.base_url().into()),
                ("openai.api_key", API_KEY.into()),
            ],
        );
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let topology = jetcall::topology::provision(client, &config)
            .await
            .expect("provision");
        let stop = CancellationToken::new();
        let generator = tokio::spawn(generator::run(
            config,
            testkit::loopback_listener(),
            stop.clone(),
        ));
        Self {
            _nats: nats,
            openai,
            topology,
            stop,
            generator,
        }
    }

    /// Records the job as accepted, then publishes its request, as the gateway does.
    async fn submit(&self, job_id: &str, kind: Kind, input: Value) {
        let request = JobRequested {
            job_id: JobId::parse(job_id).expect("valid id"),
            kind,
            input: input.as_object().cloned().unwrap_or_else(Map::new),
            callback_url: "http://127.0.0.1:9/cb".into(),
            metadata: Default::default(),
            requested_at: OffsetDateTime::now_utc(),
        };
        self.topology
            .status
            .create(&JobStatus::accepted(&request, "digest".into()))
            .await
            .expect("status document");
        let payload = serde_json::to_vec(&request).expect("JSON");
        self.topology
            .jetstream
            .send_publish(
                Event::Requested.subject(&request.kind),
                PublishMessage::build()
                    .payload(payload.into())
                    .message_id(Event::Requested.msg_id(&request.job_id)),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    async fn wait_for_status(&self, job_id: &str, status: &str) -> JobStatus {
        let id = JobId::parse(job_id).expect("valid id");
        wait_until(
            &format!("job {job_id} to be {status}"),
            Duration::from_secs(30),
            || async {
                self.topology
                    .status
                    .get(&id)
                    .await
                    .expect("status store")
                    .map(|(doc, _)| doc)
                    .filter(|doc| doc.status.as_str() == status)
            },
        )
        .await
    }

    async fn count(&self, filter: &str) -> usize {
        testkit::nats::count_messages(&self.topology.stream, filter).await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.generator
            .await
            .expect("task")
            .expect("generator stops cleanly");
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
        .submit("JOB-OAI-1", Kind::product_description(), product_input())
        .await;

    let doc = setup.wait_for_status("JOB-OAI-1", "completed").await;
    assert_eq!(
        doc.result,
        Some(json!({"description": "A quiet fan with three blades for hot afternoons."}))
    );
    assert_eq!(doc.model.as_deref(), Some("gpt-4o-mini"));
    let usage = doc.usage.expect("usage recorded");
    assert!(usage.input_tokens > 0, "{usage:?}");
    assert_eq!(usage.output_tokens, 9);
    wait_until("the completion event", Duration::from_secs(10), || async {
        (setup.count("jobs.completed.product-description").await == 1).then_some(())
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

    setup.stop().await;
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
        .submit(
            "JOB-OAI-RET",
            Kind::parse("return-analysis").expect("kind"),
            json!({
                "order_id": "ORD-9",
                "reason": "damaged",
                "customer_message": "The box arrived crushed and the unit rattles."
            }),
        )
        .await;

    let doc = setup.wait_for_status("JOB-OAI-RET", "completed").await;
    assert_eq!(doc.result, Some(answer));
    assert_eq!(setup.openai.calls(), 1);
    let body = &setup.openai.requests()[0].body;
    assert!(
        body["messages"][1]["content"]
            .as_str()
            .is_some_and(|user| user.contains("ORD-9")),
        "{body}"
    );

    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_call_is_retried_after_retry_after() {
    let setup = Setup::start().await;
    setup.openai.push(Scripted::Error {
        status: 429,
        retry_after: Some(1),
    });
    setup
        .submit("JOB-OAI-429", Kind::product_description(), product_input())
        .await;

    let doc = setup.wait_for_status("JOB-OAI-429", "completed").await;
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

    setup.stop().await;
}
