//! The article's job and its variations, through every service.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::fake_anthropic::{self, Scripted};
use testkit::{FakeAnthropic, WebhookReceiver};

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(30);

fn article_job(callback_url: &str) -> Value {
    json!({
        "job_id": "JOB-771",
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": {"capacity": "1.5 Ton", "energy_rating": "5 Star", "compressor": "Dual Inverter"},
        "callback_url": callback_url
    })
}

/// The generator on the fake Claude, with the key it accepts.
fn claude_settings(claude: &FakeAnthropic) -> Vec<(&'static str, Value)> {
    vec![
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
    ]
}

fn verifier(pipeline: &Pipeline) -> standardwebhooks::Webhook {
    standardwebhooks::Webhook::new(&pipeline.secret).expect("valid secret")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_article_job_is_accepted_generated_and_delivered_signed() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;

    let (status, body) = pipeline
        .post(
            "/api/v1/generate-description",
            &article_job(&receiver.url("/webhooks/description")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job_id"], "JOB-771");
    assert_eq!(body["status"], "accepted");
    assert!(body["message"].is_string());

    let deliveries = receiver.wait_for(1, WAIT).await;
    let webhook = &deliveries[0];
    verifier(&pipeline)
        .verify(&webhook.body, &webhook.headers)
        .expect("the signature verifies with an independent Standard Webhooks implementation");
    assert_eq!(webhook.header("content-type"), "application/json");
    assert_eq!(webhook.header("webhook-id"), "msg_JOB-771");
    let payload = webhook.json();
    assert_eq!(payload["type"], "job.completed");
    assert_eq!(payload["job_id"], "JOB-771");
    assert_eq!(payload["status"], "completed");
    assert_eq!(payload["kind"], "product-description");
    assert_eq!(payload["product_id"], "PROD-AC15");
    let description = payload["description"].as_str().expect("description");
    assert!(
        description.contains("LG 1.5 Ton 5 Star Inverter Split AC"),
        "{description}"
    );
    assert_eq!(payload["result"]["description"], payload["description"]);

    let doc = pipeline.wait_for_status("JOB-771", "delivered", WAIT).await;
    assert_eq!(doc["result"]["description"], description);
    assert_eq!(doc["generation_attempts"], 1);
    assert_eq!(doc["deliveries"].as_array().map(Vec::len), Some(1));
    assert_eq!(doc["deliveries"][0]["status_code"], 204);
    assert!(doc["delivered_at"].is_string());

    assert_eq!(
        pipeline
            .count_at_least("jobs.requested.product-description", 1)
            .await,
        1
    );
    assert_eq!(
        pipeline
            .count_at_least("jobs.completed.product-description", 1)
            .await,
        1
    );
    assert_eq!(
        pipeline
            .count_at_least("jobs.delivered.product-description", 1)
            .await,
        1
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_is_called_over_the_messages_api_when_a_key_is_set() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    claude.set_reply("Beat the heat with the LG 1.5 Ton inverter AC.");
    let pipeline = Pipeline::start(&[
        ("generator.provider", json!("auto")),
        ("anthropic.api_key", json!(fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
        ("anthropic.model", json!("claude-test-model")),
        (
            "prices.claude-test-model",
            json!({"input": 3.0, "output": 15.0}),
        ),
    ])
    .await;

    let (status, _) = pipeline
        .post(
            "/api/v1/generate-description",
            &article_job(&receiver.url("/cb")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let payload = receiver.wait_for(1, WAIT).await[0].json();
    assert_eq!(
        payload["description"],
        "Beat the heat with the LG 1.5 Ton inverter AC."
    );
    assert_eq!(payload["model"], "claude-test-model");
    let tokens = |name: &str| payload["usage"][name].as_u64().expect(name);
    assert!(tokens("output_tokens") > 0);
    assert_eq!(tokens("cache_creation_input_tokens"), 0);
    assert_eq!(tokens("cache_read_input_tokens"), 0);
    // $3 and $15 per million input and output tokens is 3 and 15 micro-dollars a token.
    assert_eq!(
        payload["cost"],
        json!({
            "microdollars": tokens("input_tokens") * 3 + tokens("output_tokens") * 15,
            "currency": "USD",
        })
    );

    let requests = claude.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0].body;
    assert_eq!(request["model"], "claude-test-model");
    assert!(
        request["system"]
            .as_str()
            .is_some_and(|s| s.contains("copywriter"))
    );
    let prompt = request["messages"][0]["content"]
        .as_str()
        .expect("user message");
    assert!(
        prompt.contains("LG 1.5 Ton 5 Star Inverter Split AC"),
        "{prompt}"
    );
    assert!(prompt.contains("energy rating: 5 Star"), "{prompt}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_with_the_same_webhook_id() {
    let receiver = WebhookReceiver::start().await;
    receiver.fail_next(&[500, 503]);
    let pipeline =
        Pipeline::start(&[("callback.retry_schedule", json!(["200ms", "400ms", "1s"]))]).await;

    let (status, _) = pipeline
        .post(
            "/api/v1/generate-description",
            &article_job(&receiver.url("/cb")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let deliveries = receiver.wait_for(3, WAIT).await;
    let ids: Vec<&str> = deliveries.iter().map(|d| d.header("webhook-id")).collect();
    assert_eq!(ids, ["msg_JOB-771"; 3]);
    for delivery in &deliveries {
        verifier(&pipeline)
            .verify(&delivery.body, &delivery.headers)
            .expect("signed");
    }
    // Each retry waits its scheduled delay, less at most 20 % jitter.
    assert!(deliveries[1].at - deliveries[0].at >= Duration::from_millis(160));
    assert!(deliveries[2].at - deliveries[1].at >= Duration::from_millis(320));

    let doc = pipeline.wait_for_status("JOB-771", "delivered", WAIT).await;
    let codes: Vec<&Value> = doc["deliveries"]
        .as_array()
        .expect("attempt log")
        .iter()
        .map(|attempt| &attempt["status_code"])
        .collect();
    assert_eq!(codes, [&json!(500), &json!(503), &json!(204)]);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_model_refuses_is_delivered_as_failed() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    claude.push(Scripted::Error {
        status: 400,
        retry_after: None,
    });
    let pipeline = Pipeline::start(&claude_settings(&claude)).await;

    pipeline
        .post(
            "/api/v1/generate-description",
            &article_job(&receiver.url("/cb")),
        )
        .await;
    let payload = receiver.wait_for(1, WAIT).await[0].json();
    assert_eq!(payload["type"], "job.failed");
    assert_eq!(payload["status"], "failed");
    assert_eq!(payload["error"]["type"], "invalid_request_error");
    assert_eq!(claude.calls(), 1, "a 400 is not retried");
    pipeline.wait_for_status("JOB-771", "delivered", WAIT).await;
    assert_eq!(
        pipeline
            .count_at_least("jobs.failed.product-description", 1)
            .await,
        1
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_model_is_retried_until_it_answers() {
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    claude.push(Scripted::Error {
        status: 529,
        retry_after: None,
    });
    claude.push(Scripted::Error {
        status: 429,
        retry_after: Some(1),
    });
    let pipeline = Pipeline::start(&claude_settings(&claude)).await;

    pipeline
        .post(
            "/api/v1/generate-description",
            &article_job(&receiver.url("/cb")),
        )
        .await;
    let payload = receiver.wait_for(1, WAIT).await[0].json();
    assert_eq!(payload["type"], "job.completed");
    let requests = claude.requests();
    assert_eq!(requests.len(), 3);
    // The third call honoured the 429's `retry-after: 1`.
    assert!(requests[2].at - requests[1].at >= Duration::from_secs(1));
    let doc = pipeline.wait_for_status("JOB-771", "delivered", WAIT).await;
    assert_eq!(doc["generation_attempts"], 3);
    pipeline.stop().await;
}

/// Runs the `nats` CLI against the pipeline's server and returns its standard output.
fn nats_cli(pipeline: &Pipeline, args: &[&str]) -> String {
    let output = std::process::Command::new(testkit::nats::nats_cli_binary())
        .arg("--server")
        .arg(pipeline.nats_url())
        .args(args)
        .output()
        .expect("run the nats CLI");
    assert!(
        output.status.success(),
        "nats {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_follow_a_job_with_the_nats_cli() {
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;
    pipeline
        .post(
            "/api/v1/generate-description",
            &article_job(&receiver.url("/cb")),
        )
        .await;
    pipeline.wait_for_status("JOB-771", "delivered", WAIT).await;

    let doc: Value = serde_json::from_str(&nats_cli(
        &pipeline,
        &["kv", "get", "job_status", "JOB-771", "--raw"],
    ))
    .expect("the status document is JSON");
    assert_eq!(doc["status"], "delivered");
    assert_eq!(doc["input"]["product_id"], "PROD-AC15");

    // The table shows the first 15 characters of each value: enough to tell the states apart.
    let history = nats_cli(&pipeline, &["kv", "history", "job_status", "JOB-771"]);
    for step in ["acce", "gene", "comp", "deli"] {
        let start = format!(r#"{{"status":"{step}"#);
        assert!(history.contains(&start), "history lacks {start}: {history}");
    }

    let stream: Value =
        serde_json::from_str(&nats_cli(&pipeline, &["stream", "info", "JOBS", "--json"]))
            .expect("stream info JSON");
    assert_eq!(stream["config"]["subjects"], json!(["jobs.>"]));
    let consumer: Value = serde_json::from_str(&nats_cli(
        &pipeline,
        &["consumer", "info", "JOBS", "callback", "--json"],
    ))
    .expect("consumer info JSON");
    assert_eq!(
        consumer["config"]["filter_subjects"],
        json!([
            "jobs.completed.>",
            "jobs.failed.>",
            "jobs.cancelled.>",
            "jobs.expired.>"
        ])
    );
    pipeline.stop().await;
}

/// Runs the `nats` CLI against the pipeline's server on a terminal, as an operator does, for
/// the commands that need one, and returns what it wrote.
fn nats_cli_on_terminal(pipeline: &Pipeline, args: &[&str]) -> String {
    let server = pipeline.nats_url();
    let args = [&["--server", server.as_str()], args].concat();
    let (status, output) = crate::terminal::run(&testkit::nats::nats_cli_binary(), &args, WAIT);
    assert!(status.success(), "nats {args:?} ({status}): {output}");
    output
}

/// Whether some connection to the pipeline's server has a plain (core NATS) subscription on
/// `subject`, from the server's own connection report (`$SYS.REQ.ACCOUNT.PING.CONNZ`, which
/// any account may ask about itself).
async fn has_subscription(client: &async_nats::Client, subject: &str) -> bool {
    let Ok(reply) = client
        .request(
            "$SYS.REQ.ACCOUNT.PING.CONNZ",
            r#"{"subscriptions": true}"#.into(),
        )
        .await
    else {
        return false;
    };
    let Ok(report) = serde_json::from_slice::<Value>(&reply.payload) else {
        return false;
    };
    report["data"]["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|connection| connection["subscriptions_list"].as_array())
        .flatten()
        .any(|sub| sub == subject)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_watch_completions_and_dead_letters_with_the_nats_cli() {
    let receiver = WebhookReceiver::start().await;
    let gone = WebhookReceiver::start().await;
    gone.fail_next(&[410]);
    let pipeline = Pipeline::start(&[]).await;

    // `nats sub 'jobs.completed.>'`, as the README has it, started before the job.
    let sub = tokio::process::Command::new(testkit::nats::nats_cli_binary())
        .arg("--server")
        .arg(pipeline.nats_url())
        .args(["sub", "jobs.completed.>", "--count", "1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run nats sub");
    let client = async_nats::connect(pipeline.nats_url())
        .await
        .expect("connect to NATS");
    testkit::wait_until("`nats sub` to be subscribed", WAIT, || async {
        has_subscription(&client, "jobs.completed.>")
            .await
            .then_some(())
    })
    .await;
    let (status, body) = pipeline
        .post(
            "/api/v1/generate-description",
            &article_job(&receiver.url("/cb")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let output = tokio::time::timeout(WAIT, sub.wait_with_output())
        .await
        .expect("`nats sub --count 1` to exit after the completion")
        .expect("the output of nats sub");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "nats sub: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.contains(r#"Received on "jobs.completed.product-description""#),
        "{printed}"
    );
    assert!(printed.contains(r#""job_id":"JOB-771""#), "{printed}");
    assert!(
        printed.contains("LG 1.5 Ton 5 Star Inverter Split AC"),
        "{printed}"
    );
    pipeline.wait_for_status("JOB-771", "delivered", WAIT).await;

    // A dead letter: the receiver answers 410 Gone.
    let mut dead = article_job(&gone.url("/cb"));
    dead["job_id"] = json!("JOB-410");
    let (status, body) = pipeline.post("/api/v1/generate-description", &dead).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    pipeline
        .wait_for_status("JOB-410", "undeliverable", WAIT)
        .await;
    let dead_letters = nats_cli_on_terminal(
        &pipeline,
        &[
            "stream",
            "view",
            "JOBS",
            "--subject",
            "jobs.undeliverable.>",
        ],
    );
    assert!(
        dead_letters.contains("jobs.undeliverable.product-description"),
        "{dead_letters}"
    );
    assert!(
        dead_letters.contains(r#""job_id":"JOB-410""#),
        "{dead_letters}"
    );
    assert!(
        dead_letters.contains(r#""status_code":410"#),
        "the attempt log: {dead_letters}"
    );
    assert!(!dead_letters.contains("JOB-771"), "{dead_letters}");
    // The same without a terminal, as a script reads them.
    let scripted = nats_cli(
        &pipeline,
        &[
            "sub",
            "jobs.undeliverable.>",
            "--stream",
            "JOBS",
            "--all",
            "--terminate-at-end",
        ],
    );
    assert!(scripted.contains(r#""job_id":"JOB-410""#), "{scripted}");
    assert!(!scripted.contains("JOB-771"), "{scripted}");

    // Both jobs' events of one kind, from the last hour.
    let of_kind = nats_cli_on_terminal(
        &pipeline,
        &[
            "stream",
            "view",
            "JOBS",
            "--subject",
            "jobs.*.product-description",
            "--since",
            "1h",
        ],
    );
    for subject in [
        "jobs.requested.product-description",
        "jobs.completed.product-description",
        "jobs.delivered.product-description",
        "jobs.undeliverable.product-description",
    ] {
        assert!(of_kind.contains(subject), "{subject}: {of_kind}");
    }

    // The fields the README's troubleshooting paragraph reads, under the consumers' names.
    for consumer in ["generator", "callback"] {
        let info = nats_cli(&pipeline, &["consumer", "info", "JOBS", consumer]);
        for field in [
            "Unprocessed Messages",
            "Outstanding Acks",
            "Redelivered Messages",
        ] {
            assert!(info.contains(field), "{consumer} lacks {field}: {info}");
        }
    }
    let report = nats_cli(&pipeline, &["consumer", "report", "JOBS"]);
    assert!(
        report.contains("generator") && report.contains("callback"),
        "{report}"
    );
    let keys = nats_cli(&pipeline, &["kv", "ls", "job_status"]);
    assert!(
        keys.contains("JOB-771") && keys.contains("JOB-410"),
        "{keys}"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_ride_over_a_nats_server_restart() {
    let receiver = WebhookReceiver::start().await;
    let mut pipeline = Pipeline::start(&[]).await;
    let url = receiver.url("/webhooks/description");
    let (status, body) = pipeline
        .post("/api/v1/generate-description", &article_job(&url))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    receiver.wait_for(1, WAIT).await;

    pipeline.restart_nats();
    // The gateway answers 503 until it has reconnected; a client retries.
    let mut second = article_job(&url);
    second["job_id"] = json!("JOB-772");
    testkit::wait_until("the gateway to accept again", WAIT, || async {
        let (status, _) = pipeline.post("/api/v1/generate-description", &second).await;
        matches!(status, StatusCode::ACCEPTED | StatusCode::OK).then_some(())
    })
    .await;
    // Delivered only if the generator's and the callback's pulls came back by themselves.
    let deliveries = receiver.wait_for(2, Duration::from_secs(60)).await;
    assert!(
        deliveries
            .iter()
            .any(|d| d.header("webhook-id") == "msg_JOB-772")
    );
    pipeline.wait_for_status("JOB-772", "delivered", WAIT).await;
    pipeline.stop().await;
}
