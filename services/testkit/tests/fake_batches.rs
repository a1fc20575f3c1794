//! The fake Anthropic server's Message Batches API, driven over real HTTP as a client would:
//! the shapes of its objects, the batch's life, the results, and the test controls.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::fake_anthropic::{API_KEY, BatchOutcome, FakeAnthropic};
use testkit::wait_until;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Long enough that nothing in a test ends by itself.
const FOREVER: Duration = Duration::from_secs(600);
const WAIT: Duration = Duration::from_secs(20);

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    fn new(fake: &FakeAnthropic) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: fake.base_url(),
            key: API_KEY.to_owned(),
        }
    }

    fn with_key(fake: &FakeAnthropic, key: &str) -> Self {
        Self {
            key: key.to_owned(),
            ..Self::new(fake)
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let url = if url.starts_with("http") {
            url.to_owned()
        } else {
            format!("{}{url}", self.base)
        };
        self.http
            .request(method, url)
            .header("x-api-key", &self.key)
            .header("anthropic-version", "2023-06-01")
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("the fake answers");
        let status = response.status();
        let body = response.json::<Value>().await.expect("a JSON body");
        (status, body)
    }

    async fn create(&self, body: &Value) -> (StatusCode, Value) {
        self.send(
            self.request(reqwest::Method::POST, "/v1/messages/batches")
                .json(body),
        )
        .await
    }

    async fn retrieve(&self, id: &str) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/messages/batches/{id}")))
            .await
    }

    async fn cancel(&self, id: &str) -> (StatusCode, Value) {
        self.send(self.request(
            reqwest::Method::POST,
            &format!("/v1/messages/batches/{id}/cancel"),
        ))
        .await
    }

    async fn delete(&self, id: &str) -> (StatusCode, Value) {
        self.send(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/messages/batches/{id}"),
        ))
        .await
    }

    async fn list(&self, query: &str) -> (StatusCode, Value) {
        self.send(self.request(
            reqwest::Method::GET,
            &format!("/v1/messages/batches{query}"),
        ))
        .await
    }

    /// Polls the batch until it has ended, and answers it then.
    async fn ended(&self, id: &str) -> Value {
        wait_until(&format!("batch {id} to end"), WAIT, || async {
            let (status, batch) = self.retrieve(id).await;
            assert_eq!(status, StatusCode::OK, "{batch}");
            (batch["processing_status"] == "ended").then_some(batch)
        })
        .await
    }

    /// The results' lines, parsed, in the order they came.
    async fn results(&self, url: &str) -> Vec<Value> {
        let response = self
            .request(reqwest::Method::GET, url)
            .send()
            .await
            .expect("the fake answers");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "application/x-jsonl",
            "results are a .jsonl file"
        );
        let text = response.text().await.expect("the results");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect()
    }
}

fn params(prompt: &str) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": format!("{prompt}\nMore context.")}],
    })
}

fn batch_of(custom_ids: &[&str]) -> Value {
    let requests: Vec<Value> = custom_ids
        .iter()
        .map(|id| json!({"custom_id": id, "params": params(&format!("Prompt for {id}"))}))
        .collect();
    json!({ "requests": requests })
}

fn time_of(value: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(value.as_str().expect("a time string"), &Rfc3339)
        .unwrap_or_else(|err| panic!("{value} is not RFC 3339: {err}"))
}

fn by_custom_id(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut results = BTreeMap::new();
    for line in lines {
        let custom_id = line["custom_id"].as_str().expect("a custom_id").to_owned();
        let previous = results.insert(custom_id.clone(), line["result"].clone());
        assert!(previous.is_none(), "{custom_id} has two results");
    }
    results
}

#[tokio::test]
async fn a_batch_ends_after_its_processing_time_with_every_scripted_outcome() {
    let fake = FakeAnthropic::start().await;
    fake.set_batch_processing_time(Duration::from_secs(2));
    fake.push_batch_outcome(
        "req-1",
        BatchOutcome::Errored {
            error_type: "overloaded_error".into(),
            message: "Overloaded".into(),
        },
    );
    fake.push_batch_outcome("req-2", BatchOutcome::Expired);
    fake.push_batch_outcome("req_3", BatchOutcome::Canceled);
    let client = Client::new(&fake);
    let ids = ["req-0", "req-1", "req-2", "req_3", "REQ4"];

    let (status, created) = client.create(&batch_of(&ids)).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["id"].as_str().expect("an id").to_owned();
    assert!(id.starts_with("msgbatch_"), "{id}");
    assert_eq!(created["type"], "message_batch");
    assert_eq!(created["processing_status"], "in_progress");
    assert_eq!(
        created["request_counts"],
        json!({"processing": 5, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    );
    for field in [
        "ended_at",
        "archived_at",
        "cancel_initiated_at",
        "results_url",
    ] {
        assert_eq!(created[field], Value::Null, "{field}");
    }
    let created_at = time_of(&created["created_at"]);
    assert_eq!(
        time_of(&created["expires_at"]) - created_at,
        time::Duration::hours(24)
    );

    let (status, early) = client.retrieve(&id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(early["processing_status"], "in_progress");
    let early_results = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/messages/batches/{id}/results"),
        )
        .send()
        .await
        .expect("the fake answers");
    assert_eq!(early_results.status(), StatusCode::BAD_REQUEST);
    let body: Value = early_results.json().await.expect("an error body");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let ended = client.ended(&id).await;
    assert_eq!(
        ended["request_counts"],
        json!({"processing": 0, "succeeded": 2, "errored": 1, "canceled": 1, "expired": 1})
    );
    assert!(time_of(&ended["ended_at"]) >= created_at);
    assert_eq!(ended["cancel_initiated_at"], Value::Null);
    let results_url = ended["results_url"].as_str().expect("a results_url");
    assert_eq!(
        results_url,
        format!("{}/v1/messages/batches/{id}/results", fake.base_url())
    );

    let lines = client.results(results_url).await;
    let order: Vec<&str> = lines
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap_or_default())
        .collect();
    assert_ne!(
        order, ids,
        "results come in another order than the requests"
    );
    let results = by_custom_id(&lines);
    assert_eq!(
        results.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut sorted = ids.to_vec();
            sorted.sort_unstable();
            sorted
        },
        "every request has one result"
    );

    let succeeded = &results["req-0"];
    assert_eq!(succeeded["type"], "succeeded");
    let message = &succeeded["message"];
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "claude-sonnet-4-5");
    assert!(
        message["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_"))
    );
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Fake Claude reply to: Prompt for req-0"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["stop_sequence"], Value::Null);
    let usage = &message["usage"];
    assert_eq!(usage["output_tokens"], 7, "the words of the reply");
    assert!(usage["input_tokens"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert_eq!(usage["cache_read_input_tokens"], 0);
    assert_eq!(
        results["REQ4"]["message"]["content"][0]["text"],
        "Fake Claude reply to: Prompt for REQ4"
    );

    assert_eq!(
        results["req-1"],
        json!({
            "type": "errored",
            "error": {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        })
    );
    assert_eq!(results["req-2"], json!({"type": "expired"}));
    assert_eq!(results["req_3"], json!({"type": "canceled"}));

    let batches = fake.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].id, id);
    assert_eq!(batches[0].custom_ids, ids);
    assert!(
        fake.batch_reads() >= 2,
        "every retrieve counts: {}",
        fake.batch_reads()
    );
    assert_eq!(fake.calls(), 0, "batches are not calls to /v1/messages");
}

#[tokio::test]
async fn a_scripted_outcome_is_for_the_next_batch_only_and_a_retry_succeeds() {
    let fake = FakeAnthropic::start().await;
    fake.set_batch_processing_time(Duration::ZERO);
    fake.set_reply("A quiet fan for hot afternoons.");
    fake.push_batch_outcome(
        "job-7",
        BatchOutcome::Errored {
            error_type: "api_error".into(),
            message: "Internal server error".into(),
        },
    );
    let client = Client::new(&fake);

    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let (status, created) = client.create(&batch_of(&["job-7", "job-8"])).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        let ended = client.ended(created["id"].as_str().expect("an id")).await;
        let results = by_custom_id(
            &client
                .results(ended["results_url"].as_str().unwrap_or_default())
                .await,
        );
        outcomes.push(results["job-7"].clone());
        assert_eq!(
            results["job-8"]["message"]["content"][0]["text"],
            "A quiet fan for hot afternoons."
        );
        assert_eq!(results["job-8"]["message"]["usage"]["output_tokens"], 6);
    }
    assert_eq!(outcomes[0]["type"], "errored");
    assert_eq!(outcomes[0]["error"]["error"]["type"], "api_error");
    assert_eq!(outcomes[1]["type"], "succeeded", "the retry succeeds");
    assert_eq!(
        fake.batch_requests_per_custom_id(),
        BTreeMap::from([("job-7".to_owned(), 2), ("job-8".to_owned(), 2)])
    );
}

#[tokio::test]
async fn a_batch_shares_the_prompt_cache_and_may_exceed_the_default_body_limit() {
    let fake = FakeAnthropic::start().await;
    fake.set_batch_processing_time(Duration::ZERO);
    let client = Client::new(&fake);
    let system = "Write product copy. ".repeat(400);
    // About 3 MB in all: over axum's default 2 MB limit, far under the API's 256 MB.
    let requests: Vec<Value> = (0..400)
        .map(|i| {
            json!({
                "custom_id": format!("copy-{i}"),
                "params": {
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 256,
                    "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                    "messages": [{"role": "user", "content": format!("Product {i}\n{}", "detail ".repeat(1000))}],
                },
            })
        })
        .collect();
    let body = json!({ "requests": requests });
    assert!(body.to_string().len() > 3_000_000);

    let (status, created) = client.create(&body).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let ended = client.ended(created["id"].as_str().expect("an id")).await;
    let results = by_custom_id(
        &client
            .results(ended["results_url"].as_str().unwrap_or_default())
            .await,
    );
    assert_eq!(results.len(), 400);
    let usage = |id: &str| results[id]["message"]["usage"].clone();
    assert!(
        usage("copy-0")["cache_creation_input_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "the first request writes the cache: {}",
        usage("copy-0")
    );
    assert_eq!(usage("copy-0")["cache_read_input_tokens"], 0);
    assert_eq!(
        usage("copy-1")["cache_read_input_tokens"],
        usage("copy-0")["cache_creation_input_tokens"],
        "later ones read it"
    );
}

#[tokio::test]
async fn invalid_batches_are_refused_with_the_documented_errors() {
    let fake = FakeAnthropic::start().await;
    let client = Client::new(&fake);
    let expect_bad = |body: Value, naming: &'static str| {
        let client = &client;
        async move {
            let (status, error) = client.create(&body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
            assert_eq!(error["type"], "error");
            assert_eq!(error["error"]["type"], "invalid_request_error");
            let message = error["error"]["message"].as_str().expect("a message");
            assert!(message.starts_with(naming), "{message} names {naming}");
        }
    };

    expect_bad(batch_of(&["same", "other", "same"]), "requests.2.custom_id").await;
    expect_bad(batch_of(&["has space"]), "requests.0.custom_id").await;
    expect_bad(batch_of(&["ok", ""]), "requests.1.custom_id").await;
    expect_bad(batch_of(&[&"x".repeat(65)]), "requests.0.custom_id").await;
    let mut no_max_tokens = batch_of(&["a", "b"]);
    no_max_tokens["requests"][1]["params"]
        .as_object_mut()
        .expect("params")
        .remove("max_tokens");
    expect_bad(
        no_max_tokens,
        "requests.1.params.max_tokens: Field required",
    )
    .await;
    let mut bad_role = batch_of(&["a"]);
    bad_role["requests"][0]["params"]["messages"][0]["role"] = json!("system");
    expect_bad(bad_role, "requests.0.params.messages.0.role").await;
    expect_bad(json!({"requests": []}), "requests").await;
    expect_bad(json!({}), "requests: Field required").await;
    expect_bad(
        json!({"requests": [{"params": params("x")}]}),
        "requests.0.custom_id",
    )
    .await;
    expect_bad(
        json!({"requests": [{"custom_id": "x"}]}),
        "requests.0.params",
    )
    .await;

    let (status, error) = Client::with_key(&fake, "sk-ant-wrong")
        .create(&batch_of(&["a"]))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error["error"]["type"], "authentication_error");

    let (status, error) = client
        .send(
            client
                .http
                .post(format!("{}/v1/messages/batches", client.base))
                .header("x-api-key", API_KEY)
                .json(&batch_of(&["a"])),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no anthropic-version");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    let (status, error) = client.retrieve("msgbatch_unknown").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error["error"]["type"], "not_found_error");
    let (status, _) = Client::with_key(&fake, "sk-ant-wrong")
        .retrieve("msgbatch_unknown")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    assert!(fake.batches().is_empty(), "nothing was created");
}

#[tokio::test]
async fn a_canceled_batch_ends_with_every_request_canceled() {
    let fake = FakeAnthropic::start().await;
    fake.set_batch_processing_time(FOREVER);
    let client = Client::new(&fake);
    let (_, created) = client.create(&batch_of(&["a", "b", "c"])).await;
    let id = created["id"].as_str().expect("an id");

    let (status, canceling) = client.cancel(id).await;
    assert_eq!(status, StatusCode::OK, "{canceling}");
    assert_eq!(canceling["processing_status"], "canceling");
    assert!(time_of(&canceling["cancel_initiated_at"]) >= time_of(&canceling["created_at"]));
    assert_eq!(canceling["ended_at"], Value::Null);
    assert_eq!(canceling["request_counts"]["processing"], 3);
    let (status, again) = client.cancel(id).await;
    assert_eq!(status, StatusCode::OK, "canceling twice is harmless");
    assert_eq!(
        again["cancel_initiated_at"],
        canceling["cancel_initiated_at"]
    );

    let ended = client.ended(id).await;
    assert_eq!(
        ended["request_counts"],
        json!({"processing": 0, "succeeded": 0, "errored": 0, "canceled": 3, "expired": 0})
    );
    assert_eq!(
        ended["cancel_initiated_at"],
        canceling["cancel_initiated_at"]
    );
    let results = by_custom_id(
        &client
            .results(ended["results_url"].as_str().unwrap_or_default())
            .await,
    );
    assert_eq!(results.len(), 3);
    assert!(
        results
            .values()
            .all(|result| *result == json!({"type": "canceled"})),
        "{results:?}"
    );

    let (status, error) = client.cancel(id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an ended batch: {error}");
    let (status, _) = client.cancel("msgbatch_unknown").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Too late: the batch has done its work by the time the cancel arrives.
    fake.set_batch_processing_time(Duration::ZERO);
    fake.set_reply("Done before the cancel.");
    let (_, created) = client.create(&batch_of(&["late"])).await;
    let id = created["id"].as_str().expect("an id");
    let (status, error) = client.cancel(id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let ended = client.ended(id).await;
    assert_eq!(ended["cancel_initiated_at"], Value::Null);
    let results = by_custom_id(
        &client
            .results(ended["results_url"].as_str().unwrap_or_default())
            .await,
    );
    assert_eq!(
        results["late"]["message"]["content"][0]["text"],
        "Done before the cancel."
    );
}

#[tokio::test]
async fn the_list_is_newest_first_and_pages_both_ways() {
    let fake = FakeAnthropic::start().await;
    fake.set_batch_processing_time(FOREVER);
    let client = Client::new(&fake);
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, created) = client.create(&batch_of(&[&format!("list-{i}")])).await;
        assert_eq!(status, StatusCode::OK);
        ids.push(created["id"].as_str().expect("an id").to_owned());
    }
    let page_ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|batch| batch["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    let (status, all) = client.list("").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page_ids(&all), newest_first);
    assert_eq!(all["has_more"], false);
    assert_eq!(all["data"][0]["type"], "message_batch");

    let (_, first) = client.list("?limit=2").await;
    assert_eq!(page_ids(&first), newest_first[..2]);
    assert_eq!(first["has_more"], true);
    assert_eq!(first["first_id"], newest_first[0].as_str());
    assert_eq!(first["last_id"], newest_first[1].as_str());

    let (_, second) = client
        .list(&format!("?limit=2&after_id={}", newest_first[1]))
        .await;
    assert_eq!(page_ids(&second), newest_first[2..4]);
    assert_eq!(second["has_more"], true);
    let (_, last) = client
        .list(&format!("?limit=2&after_id={}", newest_first[3]))
        .await;
    assert_eq!(page_ids(&last), newest_first[4..]);
    assert_eq!(last["has_more"], false);

    let (_, back) = client
        .list(&format!("?limit=2&before_id={}", newest_first[4]))
        .await;
    assert_eq!(page_ids(&back), newest_first[2..4], "the page just before");
    assert_eq!(back["has_more"], true);
    let (_, front) = client
        .list(&format!("?limit=2&before_id={}", newest_first[1]))
        .await;
    assert_eq!(page_ids(&front), newest_first[..1]);
    assert_eq!(front["has_more"], false);

    let (status, empty) = client.list(&format!("?after_id={}", newest_first[4])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(empty["data"], json!([]));
    assert_eq!(empty["first_id"], Value::Null);
    assert_eq!(empty["last_id"], Value::Null);

    for query in ["?limit=0", "?limit=1001", "?limit=many"] {
        let (status, error) = client.list(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    let (status, page) = client.list("?limit=1000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page_ids(&page).len(), 5);
}

#[tokio::test]
async fn only_an_ended_batch_can_be_deleted() {
    let fake = FakeAnthropic::start().await;
    fake.set_batch_processing_time(FOREVER);
    let client = Client::new(&fake);
    let (_, created) = client.create(&batch_of(&["keep", "drop"])).await;
    let id = created["id"].as_str().expect("an id");

    let (status, error) = client.delete(id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "in progress: {error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    client.cancel(id).await;
    client.ended(id).await;
    let (status, deleted) = client.delete(id).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted, json!({"id": id, "type": "message_batch_deleted"}));

    let (status, _) = client.retrieve(id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = client.delete(id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, all) = client.list("").await;
    assert_eq!(all["data"], json!([]));
    assert_eq!(fake.batches().len(), 1, "the record of what was sent stays");
}

#[tokio::test]
async fn scripted_creation_failures_create_nothing() {
    let fake = FakeAnthropic::start().await;
    fake.fail_next_batch_creations(2, 529);
    let client = Client::new(&fake);
    for _ in 0..2 {
        let (status, error) = client.create(&batch_of(&["a"])).await;
        assert_eq!(status.as_u16(), 529);
        assert_eq!(
            error,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
    }
    assert!(fake.batches().is_empty());
    let (status, created) = client.create(&batch_of(&["a"])).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(fake.batches().len(), 1);
    assert_eq!(
        fake.batch_requests_per_custom_id(),
        BTreeMap::from([("a".to_owned(), 1)])
    );
}

#[tokio::test]
async fn over_https_and_http2_the_results_url_points_back_at_the_server() {
    let fake = FakeAnthropic::start_tls(testkit::tls::Serving::http2()).await;
    fake.set_batch_processing_time(Duration::ZERO);
    let pem = std::fs::read(fake.ca_file().expect("an HTTPS fake")).expect("the CA file");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM certificate"))
        .build()
        .expect("a client");
    let client = Client {
        http,
        ..Client::new(&fake)
    };
    let (status, created) = client.create(&batch_of(&["tls"])).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let ended = client.ended(created["id"].as_str().expect("an id")).await;
    let results_url = ended["results_url"].as_str().expect("a results_url");
    assert!(
        results_url.starts_with(&format!("{}/v1/messages/batches/", fake.base_url())),
        "{results_url}"
    );
    let lines = client.results(results_url).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["result"]["type"], "succeeded");
}
