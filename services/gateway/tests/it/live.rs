//! Live status (server-sent events), the operators' job listing, and load shedding.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;

use jetcall::JobId;
use jetcall::batches::{BatchRecord, BatchRecords, BatchState};
use jetcall::status::{BatchRef, Status};
use testkit::metrics::sample;

use crate::harness::{Gateway, article_job};

const SUBMIT: &str = "/api/v1/generate-description";

/// One server-sent event.
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: String,
    data: String,
}

/// Reads server-sent events off a streaming response, as an `EventSource` would.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` once the server has ended the stream; keep-alive comments
    /// are skipped.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    id: String::new(),
                    data: String::new(),
                };
                let mut fields = false;
                for line in block.lines() {
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                    match name {
                        "event" => event.event = value,
                        "id" => event.id = value,
                        "data" => event.data = value,
                        _ => continue,
                    }
                    fields = true;
                }
                if fields {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.body.next())
                .await
                .expect("an event or the end of the stream within 20 s")?
                .expect("read the event stream");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    async fn next_status(&mut self) -> (String, Value) {
        let event = self.next().await.expect("another event");
        assert_eq!(event.event, "status", "{event:?}");
        let doc: Value = serde_json::from_str(&event.data).expect("a JSON status document");
        (event.id, doc)
    }
}

async fn open_events(
    gateway: &Gateway,
    job_id: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut request = gateway
        .http
        .get(format!("{}/api/v1/jobs/{job_id}/events", gateway.url));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    request.send().await.expect("GET events")
}

/// Moves a job on as the generator and the callback service would.
async fn advance(gateway: &Gateway, job_id: &str, next: Status) {
    let id = JobId::parse(job_id).expect("job id");
    gateway
        .topology
        .status
        .update(&id, |doc| doc.advance(next, OffsetDateTime::now_utc()))
        .await
        .expect("status update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_s_events_follow_its_status_until_it_is_delivered() {
    let gateway = Gateway::start(&[]).await;
    let (status, _) = gateway.post(SUBMIT, &article_job("JOB-SSE")).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let response = open_events(&gateway, "JOB-SSE", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().ok(),
        Some("text/event-stream")
    );
    let mut events = SseReader::new(response);
    let (first_id, doc) = events.next_status().await;
    assert_eq!(doc["status"], "accepted");
    assert_eq!(doc["job_id"], "JOB-SSE");

    let mut seen = vec![first_id];
    for next in [Status::Generating, Status::Completed, Status::Delivered] {
        advance(&gateway, "JOB-SSE", next).await;
        let (id, doc) = events.next_status().await;
        assert_eq!(doc["status"], next.as_str());
        seen.push(id);
    }
    assert!(
        events.next().await.is_none(),
        "the stream ends after the final state"
    );
    let revisions: Vec<u64> = seen
        .iter()
        .map(|id| id.parse().expect("numeric id"))
        .collect();
    assert!(
        revisions.windows(2).all(|pair| pair[0] < pair[1]),
        "{revisions:?}"
    );

    // A client that reconnects having seen the end is told there is nothing more (204 stops
    // an EventSource); one that missed the end gets the final state at once.
    let last = seen.last().expect("ids");
    let again = open_events(&gateway, "JOB-SSE", Some(last)).await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
    let missed = open_events(&gateway, "JOB-SSE", Some(&seen[1])).await;
    let mut missed = SseReader::new(missed);
    assert_eq!(missed.next_status().await.1["status"], "delivered");
    assert!(missed.next().await.is_none());
    gateway.stop().await;
}

/// A bulk job waiting in a Message Batch: its `batched` event names the batch once the
/// generator has created it, although only the batch's record, not the job's document, says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_job_s_events_name_its_batch_once_it_is_created() {
    let gateway = Gateway::start(&[]).await;
    let (status, _) = gateway.post(SUBMIT, &article_job("JOB-BATCHED")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Gathered into a batch not yet created at the API, as the generator records it.
    let now = OffsetDateTime::now_utc();
    let id = JobId::parse("JOB-BATCHED").expect("job id");
    let mut record = BatchRecord {
        record: BatchRecord::new_id(),
        state: BatchState::Creating,
        jobs: vec![id.clone()],
        batch_id: None,
        recorded_at: now,
        holder: "generator-1".into(),
        until: now + Duration::from_secs(60),
        next_poll_at: now,
        polls: 0,
    };
    let records = BatchRecords::new(gateway.topology.status.clone());
    let revision = records.create(&record).await.expect("the batch record");
    gateway
        .topology
        .status
        .update(&id, |doc| {
            doc.batch = Some(BatchRef {
                record: record.record.clone(),
                id: None,
            });
            doc.advance(Status::Batched, OffsetDateTime::now_utc())
        })
        .await
        .expect("status update");

    let mut events = SseReader::new(open_events(&gateway, "JOB-BATCHED", None).await);
    let (first_id, doc) = events.next_status().await;
    assert_eq!(doc["status"], "batched", "{doc}");
    assert!(doc.get("batch_id").is_none(), "not created yet: {doc}");

    // Created: the record alone gets the API's id.
    record.state = BatchState::Submitted;
    record.batch_id = Some("msgbatch_01TEST".into());
    records
        .update(&record, revision)
        .await
        .expect("the record written")
        .expect("at the revision read");
    // Keep-alive comments would keep `next_status` waiting for ever: the whole wait is bounded.
    let (id_again, doc) = tokio::time::timeout(Duration::from_secs(10), events.next_status())
        .await
        .expect("the batched state again, with its batch, within 10 s");
    assert_eq!(doc["status"], "batched", "{doc}");
    assert_eq!(doc["batch_id"], "msgbatch_01TEST", "{doc}");
    assert_eq!(
        id_again, first_id,
        "the same state of the job, now with its batch"
    );

    // A stream opened now names it at once.
    let mut late = SseReader::new(open_events(&gateway, "JOB-BATCHED", None).await);
    assert_eq!(late.next_status().await.1["batch_id"], "msgbatch_01TEST");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_an_unknown_job_are_a_404_and_open_streams_end_when_the_gateway_stops() {
    let gateway = Gateway::start(&[]).await;
    let (status, body) = gateway.get("/api/v1/jobs/NO-SUCH-JOB/events").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["type"], "not_found");

    gateway.post(SUBMIT, &article_job("JOB-OPEN")).await;
    let mut events = SseReader::new(open_events(&gateway, "JOB-OPEN", None).await);
    assert_eq!(events.next_status().await.1["status"], "accepted");
    // `stop` fails the test if a graceful shutdown waits on the open stream.
    gateway.stop().await;
    assert!(events.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_past_the_limit_are_refused_until_one_ends() {
    let gateway = Gateway::start(&[("gateway.max_event_streams", json!(1))]).await;
    for id in ["JOB-A", "JOB-B"] {
        gateway.post(SUBMIT, &article_job(id)).await;
    }
    let mut first = SseReader::new(open_events(&gateway, "JOB-A", None).await);
    first.next_status().await;

    let refused = open_events(&gateway, "JOB-B", None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.expect("JSON error");
    assert_eq!(body["type"], "overloaded");

    // Other requests are not affected by the streams' limit.
    let (status, _) = gateway.get("/api/v1/jobs/JOB-B").await;
    assert_eq!(status, StatusCode::OK);

    advance(&gateway, "JOB-A", Status::Undeliverable).await;
    assert_eq!(first.next_status().await.1["status"], "undeliverable");
    assert!(first.next().await.is_none());
    // The ended stream gave its place back.
    let mut second = SseReader::new(open_events(&gateway, "JOB-B", None).await);
    assert_eq!(second.next_status().await.1["status"], "accepted");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_requests_get_429_and_nothing_is_published() {
    let gateway = Gateway::start(&[
        ("gateway.max_in_flight", json!(1)),
        ("nats.request_timeout", json!("30s")),
    ])
    .await;
    // A request waiting on NATS holds the one place (an upload still arriving holds none:
    // see `limits`). The server is frozen, so the request waits until it thaws.
    gateway.nats.freeze(true);
    let held = tokio::spawn({
        let http = gateway.http.clone();
        let url = format!("{}{SUBMIT}", gateway.url);
        async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(article_job("JOB-SLOW").to_string())
                .send()
                .await
                .expect("POST")
                .status()
        }
    });
    testkit::wait_until(
        "the waiting request to hold the place",
        Duration::from_secs(10),
        || async {
            let text = gateway
                .http
                .get(format!("{}/metrics", gateway.url))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (sample(&text, "jetcall_gateway_http_requests_in_flight", &[]) == Some(1.0))
                .then_some(())
        },
    )
    .await;

    let refused = gateway
        .http
        .post(format!("{}{SUBMIT}", gateway.url))
        .header("content-type", "application/json")
        .body(article_job("JOB-SHED").to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.expect("JSON error");
    assert_eq!(body["type"], "overloaded");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    // Health and metrics stay outside the limit, so a loaded gateway is still observable.
    let (status, _) = gateway.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);

    gateway.nats.freeze(false);
    assert_eq!(held.await.expect("request task"), StatusCode::ACCEPTED);
    let (status, _) = gateway.post(SUBMIT, &article_job("JOB-SHED")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "the place is free again");
    assert_eq!(gateway.published().await, 2);
    gateway.stop().await;
}

fn return_job(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "kind": "return-analysis",
        "input": {
            "order_id": "ORD-5521",
            "reason": "Stopped cooling after a week",
            "customer_message": "The AC blows warm air now."
        },
        "callback_url": "http://127.0.0.1:9/webhooks/returns"
    })
}

fn ids(list: &Value) -> Vec<&str> {
    list["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|job| job["job_id"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_recent_jobs_by_status_and_kind() {
    let gateway = Gateway::start(&[]).await;
    for id in ["JOB-L1", "JOB-L2", "JOB-L3"] {
        let (status, _) = gateway.post(SUBMIT, &article_job(id)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let (status, _) = gateway.post("/api/v1/jobs", &return_job("RET-L4")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    advance(&gateway, "JOB-L1", Status::Generating).await;
    advance(&gateway, "JOB-L1", Status::Failed).await;

    let (status, all) = gateway.get("/api/v1/jobs").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    // Newest change first: JOB-L1 was written last.
    assert_eq!(ids(&all), ["JOB-L1", "RET-L4", "JOB-L3", "JOB-L2"]);
    assert_eq!(all["complete"], true);
    assert_eq!(all["jobs"][0]["status"], "failed");
    assert_eq!(all["jobs"][0]["kind"], "product-description");
    assert!(all["jobs"][0].get("input").is_none(), "summaries only");

    let (_, failed) = gateway.get("/api/v1/jobs?status=failed").await;
    assert_eq!(ids(&failed), ["JOB-L1"]);
    let (_, returns) = gateway.get("/api/v1/jobs?kind=return-analysis").await;
    assert_eq!(ids(&returns), ["RET-L4"]);
    let (_, accepted_products) = gateway
        .get("/api/v1/jobs?status=accepted&kind=product-description&limit=1")
        .await;
    assert_eq!(ids(&accepted_products), ["JOB-L3"]);

    for (query, field, kind) in [
        ("limit=0", "limit", "invalid_field"),
        ("limit=1001", "limit", "invalid_field"),
        ("limit=many", "query", "invalid_field"),
        ("status=lost", "query", "invalid_field"),
        ("colour=red", "query", "invalid_field"),
        ("kind=haiku", "kind", "unknown_kind"),
    ] {
        let (status, error) = gateway.get(&format!("/api/v1/jobs?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {error}");
        assert_eq!(
            (error["type"].as_str(), error["field"].as_str()),
            (Some(kind), Some(field)),
            "{query}"
        );
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_bucket_lists_no_jobs() {
    let gateway = Gateway::start(&[]).await;
    let (status, list) = gateway.get("/api/v1/jobs").await;
    assert_eq!(status, StatusCode::OK);
    // The one write there may be is the sweep's lease, which is no job.
    assert_eq!(list["jobs"], json!([]), "{list}");
    assert_eq!(list["complete"], true, "{list}");
    gateway.stop().await;
}
