//! The Message Batches API of the fake Anthropic server (`/v1/messages/batches`), in its wire
//! format: the `message_batch` object, its `in_progress` → `canceling` → `ended` life, the
//! list's cursors, and the results as a `.jsonl` stream in which each line carries its
//! `custom_id`, in an order other than the submission's, as the API warns it may be.
//!
//! A batch does its work at once, lazily: when it is read after its processing time has
//! passed, it has ended, every request with the outcome the test scripted for it
//! ([`BatchOutcome`], success by default). There is no background task, and nothing a batch
//! does takes the sync script's queued answers, cycle or delays: a test of one API does not
//! disturb a test of the other. The shapes follow the API reference
//! (<https://platform.claude.com/docs/en/api/messages/batches>) and the types the official
//! SDKs are generated from.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::fake_anthropic::{
    InputTokens, Served, check_body, check_headers, default_reply, error, error_for, message,
};
use crate::llm_script::first_user_line;

/// The most requests one batch may hold.
pub const MAX_BATCH_REQUESTS: usize = 100_000;
/// The largest body a batch creation may send (256 MB), far above axum's default 2 MB limit,
/// which is raised for that route alone.
pub const MAX_BATCH_BYTES: usize = 256 * 1024 * 1024;
/// How long a batch stays `in_progress` unless a test says otherwise.
const DEFAULT_PROCESSING_TIME: Duration = Duration::from_secs(1);
/// A batch expires (and, at the API, ends whatever is left) 24 hours after creation.
const BATCH_LIFETIME: time::Duration = time::Duration::hours(24);
const DEFAULT_LIST_LIMIT: usize = 20;
const MAX_LIST_LIMIT: usize = 1000;
/// Result lines per chunk of the streamed `.jsonl`: one chunk per line would make 100,000
/// tiny frames of a large batch's results.
const RESULTS_PER_CHUNK: usize = 256;

/// Batch ids count up across every fake in the process, so no two fakes' ids collide.
static NEXT_BATCH: AtomicU64 = AtomicU64::new(1);

/// How one request of a batch turns out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// A Message, as `/v1/messages` would have answered.
    Succeeded,
    /// An error response in place of the Message, e.g. `overloaded_error`.
    Errored { error_type: String, message: String },
    /// Not processed, as when the batch was canceled first.
    Canceled,
    /// Not processed before the batch's 24 hours ran out.
    Expired,
}

/// A batch as it was created, kept after it is deleted: what a test checks a client sent.
#[derive(Debug, Clone)]
pub struct CreatedBatch {
    pub id: String,
    pub custom_ids: Vec<String>,
    /// When it was created, on the server's clock.
    pub created_at: Instant,
}

/// The batches a fake holds and the test's controls over them, shared by
/// [`crate::FakeAnthropic`] and its routes.
#[derive(Debug)]
pub(crate) struct BatchState {
    /// `http` or `https`: the first part of a `results_url`.
    scheme: &'static str,
    reads: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    processing_time: Duration,
    /// How long a creation's answer is held back after the batch exists: a client that dies
    /// meanwhile has created a batch it never heard of.
    create_answer_delay: Duration,
    /// The pause before each chunk of a results file after the first.
    results_chunk_delay: Duration,
    /// The text of a succeeded request, when the test set one.
    reply: Option<Arc<str>>,
    /// Outcomes scripted per `custom_id`, each used by the next batch that contains it.
    outcomes: HashMap<String, VecDeque<BatchOutcome>>,
    /// How many creations are still to fail, and with which status.
    failing: (usize, u16),
    /// Every batch, in creation order; a deleted one stays, marked, for the list's cursors.
    batches: Vec<Batch>,
    created: Vec<CreatedBatch>,
}

/// One batch, holding of each request only what its result needs, never its params: a
/// 100,000-request batch with long prompts stays a few megabytes.
#[derive(Debug)]
struct Batch {
    id: String,
    created_at: OffsetDateTime,
    /// When its processing ends; `None` for a processing time too long to represent (never).
    due: Option<Instant>,
    /// The same moment in UTC, its `ended_at`.
    due_at: OffsetDateTime,
    requests: Arc<[BatchRequest]>,
    cancel_initiated_at: Option<OffsetDateTime>,
    ended: Option<Ended>,
    deleted: bool,
}

#[derive(Debug)]
struct BatchRequest {
    custom_id: Box<str>,
    /// Shared between the requests that name the same model.
    model: Arc<str>,
    /// The first line of the prompt, which the default reply quotes.
    prompt: Box<str>,
    input: InputTokens,
    outcome: BatchOutcome,
}

/// How a batch ended, fixed when it did, so every later read agrees.
#[derive(Debug, Clone)]
struct Ended {
    at: OffsetDateTime,
    /// Canceled before its processing time was up: every request is canceled.
    canceled: bool,
    /// The reply set when it ended; `None` for the default reply.
    reply: Option<Arc<str>>,
    counts: Counts,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    processing: usize,
    succeeded: usize,
    errored: usize,
    canceled: usize,
    expired: usize,
}

impl Counts {
    fn json(self) -> Value {
        json!({
            "processing": self.processing,
            "succeeded": self.succeeded,
            "errored": self.errored,
            "canceled": self.canceled,
            "expired": self.expired,
        })
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

impl Batch {
    /// Ends the batch if it has ended by `now`: a cancel ends it at its next read, a batch
    /// left alone at its processing time.
    fn settle(&mut self, now: Instant, reply: Option<&Arc<str>>) {
        if self.ended.is_some() {
            return;
        }
        if self.cancel_initiated_at.is_some() {
            self.ended = Some(Ended {
                at: OffsetDateTime::now_utc(),
                canceled: true,
                reply: None,
                counts: Counts {
                    canceled: self.requests.len(),
                    ..Counts::default()
                },
            });
        } else if self.due.is_some_and(|due| now >= due) {
            let mut counts = Counts::default();
            for request in self.requests.iter() {
                match request.outcome {
                    BatchOutcome::Succeeded => counts.succeeded += 1,
                    BatchOutcome::Errored { .. } => counts.errored += 1,
                    BatchOutcome::Canceled => counts.canceled += 1,
                    BatchOutcome::Expired => counts.expired += 1,
                }
            }
            self.ended = Some(Ended {
                at: self.due_at,
                canceled: false,
                reply: reply.cloned(),
                counts,
            });
        }
    }

    /// The `message_batch` object; `base` is the scheme and host the request came to, for
    /// the `results_url`.
    fn view(&self, base: &str) -> Value {
        let status = match (&self.ended, self.cancel_initiated_at) {
            (Some(_), _) => "ended",
            (None, Some(_)) => "canceling",
            (None, None) => "in_progress",
        };
        let counts = self.ended.as_ref().map_or(
            Counts {
                processing: self.requests.len(),
                ..Counts::default()
            },
            |ended| ended.counts,
        );
        json!({
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts.json(),
            "ended_at": self.ended.as_ref().map(|ended| rfc3339(ended.at)),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + BATCH_LIFETIME),
            "archived_at": null,
            "cancel_initiated_at": self.cancel_initiated_at.map(rfc3339),
            "results_url": self
                .ended
                .as_ref()
                .map(|_| format!("{base}/v1/messages/batches/{}/results", self.id)),
        })
    }
}

impl BatchState {
    pub(crate) fn new(scheme: &'static str) -> Self {
        Self {
            scheme,
            reads: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                processing_time: DEFAULT_PROCESSING_TIME,
                create_answer_delay: Duration::ZERO,
                results_chunk_delay: Duration::ZERO,
                reply: None,
                outcomes: HashMap::new(),
                failing: (0, 500),
                batches: Vec::new(),
                created: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn set_reply(&self, text: String) {
        self.lock().reply = Some(text.into());
    }

    pub(crate) fn set_processing_time(&self, time: Duration) {
        self.lock().processing_time = time;
    }

    pub(crate) fn set_create_answer_delay(&self, delay: Duration) {
        self.lock().create_answer_delay = delay;
    }

    pub(crate) fn set_results_chunk_delay(&self, delay: Duration) {
        self.lock().results_chunk_delay = delay;
    }

    pub(crate) fn push_outcome(&self, custom_id: &str, outcome: BatchOutcome) {
        self.lock()
            .outcomes
            .entry(custom_id.to_owned())
            .or_default()
            .push_back(outcome);
    }

    pub(crate) fn fail_next_creations(&self, n: usize, status: u16) {
        self.lock().failing = (n, status);
    }

    pub(crate) fn created(&self) -> Vec<CreatedBatch> {
        self.lock().created.clone()
    }

    pub(crate) fn requests_per_custom_id(&self) -> BTreeMap<String, usize> {
        let mut sent = BTreeMap::new();
        for batch in &self.lock().created {
            for custom_id in &batch.custom_ids {
                *sent.entry(custom_id.clone()).or_insert(0) += 1;
            }
        }
        sent
    }

    pub(crate) fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    /// The status of a scripted creation failure, if the next creation is to fail.
    fn take_failure(&self) -> Option<u16> {
        let mut inner = self.lock();
        let (left, status) = inner.failing;
        (left > 0).then(|| {
            inner.failing.0 = left - 1;
            status
        })
    }

    /// Stores a new batch of `requests`, giving each the outcome scripted for its
    /// `custom_id`, and answers its `message_batch` object.
    fn insert(&self, mut requests: Vec<BatchRequest>, base: &str) -> Value {
        let mut inner = self.lock();
        if !inner.outcomes.is_empty() {
            for request in &mut requests {
                let Some(queue) = inner.outcomes.get_mut(&*request.custom_id) else {
                    continue;
                };
                if let Some(outcome) = queue.pop_front() {
                    request.outcome = outcome;
                }
                if queue.is_empty() {
                    inner.outcomes.remove(&*request.custom_id);
                }
            }
        }
        let id = format!(
            "msgbatch_{:024}",
            NEXT_BATCH.fetch_add(1, Ordering::Relaxed)
        );
        let now = Instant::now();
        let created_at = OffsetDateTime::now_utc();
        let processing = inner.processing_time;
        let due_at = time::Duration::try_from(processing)
            .ok()
            .and_then(|time| created_at.checked_add(time))
            .unwrap_or(created_at);
        inner.created.push(CreatedBatch {
            id: id.clone(),
            custom_ids: requests.iter().map(|r| r.custom_id.to_string()).collect(),
            created_at: now,
        });
        let batch = Batch {
            id,
            created_at,
            due: now.checked_add(processing),
            due_at,
            requests: requests.into(),
            cancel_initiated_at: None,
            ended: None,
            deleted: false,
        };
        let view = batch.view(base);
        inner.batches.push(batch);
        view
    }

    /// Runs `f` on the live batch `id`, settled as of now; 404 if there is none. A
    /// `canceling` batch ends here too, unless `end_canceling` is false (for a cancel, which
    /// would otherwise end the batch it repeats the cancel of).
    fn with_batch<T>(
        &self,
        id: &str,
        end_canceling: bool,
        f: impl FnOnce(&mut Batch) -> Result<T, Box<Response>>,
    ) -> Result<T, Box<Response>> {
        let mut inner = self.lock();
        let reply = inner.reply.clone();
        let batch = inner
            .batches
            .iter_mut()
            .find(|batch| batch.id == id && !batch.deleted)
            .ok_or_else(|| Box::new(not_found(id)))?;
        if end_canceling || batch.cancel_initiated_at.is_none() {
            batch.settle(Instant::now(), reply.as_ref());
        }
        f(batch)
    }
}

/// The batch routes, mounted by [`crate::fake_anthropic`]'s app beside `/v1/messages`.
pub(crate) fn routes() -> Router<Served> {
    Router::new()
        .route(
            "/v1/messages/batches",
            get(list).merge(post(create).layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))),
        )
        .route(
            "/v1/messages/batches/{id}",
            get(retrieve).delete(delete_batch),
        )
        .route("/v1/messages/batches/{id}/results", get(results))
        .route("/v1/messages/batches/{id}/cancel", post(cancel))
}

fn bad(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        &format!("Message Batch {id} not found"),
    )
}

/// A JSON answer with the `request-id` header every answer of the API carries.
fn ok(body: Value) -> Response {
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("request-id", HeaderValue::from_static("req_fake_batch"));
    response
}

/// The scheme and host the request came to: `results_url` points back at this server as
/// the client reached it (HTTP/2 sends the host as the URI's authority, not `Host`).
fn base_url(scheme: &str, headers: &HeaderMap, uri: &Uri) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|authority| authority.as_str()))
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

/// The batch id of a path, or the 404 a path that cannot be one gets.
fn batch_id(path: Result<Path<String>, PathRejection>) -> Result<String, Box<Response>> {
    path.map(|Path(id)| id)
        .map_err(|_| Box::new(not_found("with that id")))
}

/// `custom_id` as the API constrains it: `^[a-zA-Z0-9_-]{1,64}$`.
fn valid_custom_id(custom_id: &str) -> bool {
    (1..=64).contains(&custom_id.len())
        && custom_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The checks of a batch creation's body; its requests, each as `(custom_id, params)`.
fn check_requests(body: &Value) -> Result<Vec<(&str, &Value)>, String> {
    let requests = body["requests"]
        .as_array()
        .ok_or_else(|| "requests: Field required".to_owned())?;
    if requests.is_empty() {
        return Err("requests: List should have at least 1 item after validation, not 0".into());
    }
    if requests.len() > MAX_BATCH_REQUESTS {
        return Err(format!(
            "requests: List should have at most {MAX_BATCH_REQUESTS} items after validation, not {}",
            requests.len()
        ));
    }
    let mut seen = HashSet::with_capacity(requests.len());
    let mut checked = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        if !request.is_object() {
            return Err(format!("requests.{i}: Input should be a valid dictionary"));
        }
        let custom_id = match &request["custom_id"] {
            Value::Null => return Err(format!("requests.{i}.custom_id: Field required")),
            Value::String(custom_id) => custom_id.as_str(),
            _ => {
                return Err(format!(
                    "requests.{i}.custom_id: Input should be a valid string"
                ));
            }
        };
        if !valid_custom_id(custom_id) {
            return Err(format!(
                "requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            ));
        }
        if !seen.insert(custom_id) {
            return Err(format!(
                "requests.{i}.custom_id: Duplicate custom_id '{custom_id}': each request in a Message Batch must have a unique custom_id"
            ));
        }
        let params = &request["params"];
        if !params.is_object() {
            return Err(format!("requests.{i}.params: Field required"));
        }
        check_body(params, &format!("requests.{i}.params"))?;
        checked.push((custom_id, params));
    }
    Ok(checked)
}

/// `POST /v1/messages/batches`.
async fn create(
    State(served): State<Served>,
    headers: HeaderMap,
    uri: Uri,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(response) = check_headers(&headers, served.script.accepted_key().as_deref()) {
        return *response;
    }
    let raw = match raw {
        Ok(raw) => raw,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error_for(413, None);
        }
        Err(rejection) => return bad(&rejection.body_text()),
    };
    let base = base_url(served.batches.scheme, &headers, &uri);
    let delay = served.batches.lock().create_answer_delay;
    // Parsing and checking 256 MB of JSON takes a while: off the runtime's threads.
    let answer = tokio::task::spawn_blocking(move || create_batch(&served, &raw, &base))
        .await
        .unwrap_or_else(|_| error_for(500, None));
    tokio::time::sleep(delay).await;
    answer
}

fn create_batch(served: &Served, raw: &[u8], base: &str) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(raw) else {
        return bad("Request body is not valid JSON");
    };
    let checked = match check_requests(&body) {
        Ok(checked) => checked,
        Err(message) => return bad(&message),
    };
    if let Some(status) = served.batches.take_failure() {
        return error_for(status, None);
    }
    let mut model: Arc<str> = Arc::from("");
    let requests = checked
        .into_iter()
        .map(|(custom_id, params)| {
            let named = params["model"].as_str().unwrap_or_default();
            if *model != *named {
                model = Arc::from(named);
            }
            BatchRequest {
                custom_id: custom_id.into(),
                model: model.clone(),
                prompt: first_user_line(params).into(),
                input: served.cache.split(params),
                outcome: BatchOutcome::Succeeded,
            }
        })
        .collect();
    ok(served.batches.insert(requests, base))
}

/// `GET /v1/messages/batches/{id}`: the batch as it is now, which a client polls.
async fn retrieve(
    State(served): State<Served>,
    headers: HeaderMap,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    served.batches.reads.fetch_add(1, Ordering::Relaxed);
    if let Err(response) = check_headers(&headers, served.script.accepted_key().as_deref()) {
        return *response;
    }
    let base = base_url(served.batches.scheme, &headers, &uri);
    let answer = batch_id(path).and_then(|id| {
        served
            .batches
            .with_batch(&id, true, |batch| Ok(batch.view(&base)))
    });
    answer.map_or_else(|response| *response, ok)
}

/// `POST /v1/messages/batches/{id}/cancel`: an unfinished batch is `canceling`, and ends
/// with every request canceled when next read. Canceling it again answers it unchanged;
/// an ended batch cannot be canceled.
async fn cancel(
    State(served): State<Served>,
    headers: HeaderMap,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    if let Err(response) = check_headers(&headers, served.script.accepted_key().as_deref()) {
        return *response;
    }
    let base = base_url(served.batches.scheme, &headers, &uri);
    let answer = batch_id(path).and_then(|id| {
        served.batches.with_batch(&id, false, |batch| {
            if batch.ended.is_some() {
                return Err(Box::new(bad(&format!(
                    "Message Batch {id} has already ended and cannot be canceled"
                ))));
            }
            batch
                .cancel_initiated_at
                .get_or_insert_with(OffsetDateTime::now_utc);
            Ok(batch.view(&base))
        })
    });
    answer.map_or_else(|response| *response, ok)
}

/// `DELETE /v1/messages/batches/{id}`: only once it has ended; it is gone afterwards.
async fn delete_batch(
    State(served): State<Served>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    if let Err(response) = check_headers(&headers, served.script.accepted_key().as_deref()) {
        return *response;
    }
    let answer = batch_id(path).and_then(|id| {
        served.batches.with_batch(&id, true, |batch| {
            if batch.ended.is_none() {
                return Err(Box::new(bad(&format!(
                    "Message Batch {id} cannot be deleted while it is processing; cancel it first"
                ))));
            }
            batch.deleted = true;
            batch.requests = Arc::from(Vec::new());
            Ok(json!({"id": id, "type": "message_batch_deleted"}))
        })
    });
    answer.map_or_else(|response| *response, ok)
}

/// `GET /v1/messages/batches/{id}/results`: one `.jsonl` line per request, streamed, last
/// request first, so a client that relies on the submission order fails its test.
async fn results(
    State(served): State<Served>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    if let Err(response) = check_headers(&headers, served.script.accepted_key().as_deref()) {
        return *response;
    }
    let snapshot = batch_id(path).and_then(|id| {
        served.batches.with_batch(&id, true, |batch| match &batch.ended {
            Some(ended) => Ok((batch.id.clone(), batch.requests.clone(), ended.clone())),
            None => Err(Box::new(bad(&format!(
                "Message Batch {id} has not ended yet: its results are not available until processing ends"
            )))),
        })
    });
    let (id, requests, ended) = match snapshot {
        Ok(snapshot) => snapshot,
        Err(response) => return *response,
    };
    let total = requests.len();
    let chunks = total.div_ceil(RESULTS_PER_CHUNK);
    let pause = served.batches.lock().results_chunk_delay;
    let lines = futures::StreamExt::then(futures::stream::iter(0..chunks), move |chunk| {
        let (id, requests, ended) = (id.clone(), requests.clone(), ended.clone());
        async move {
            if chunk > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let high = total - chunk * RESULTS_PER_CHUNK;
            let low = high.saturating_sub(RESULTS_PER_CHUNK);
            let mut text = String::new();
            for i in (low..high).rev() {
                text.push_str(&result_line(&id, i, &requests[i], &ended).to_string());
                text.push('\n');
            }
            Ok::<_, Infallible>(text)
        }
    });
    let mut response = Response::new(Body::from_stream(lines));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-jsonl"),
    );
    headers.insert("request-id", HeaderValue::from_static("req_fake_batch"));
    response
}

/// One line of the results: `{"custom_id": ..., "result": {"type": ..., ...}}`.
fn result_line(batch_id: &str, index: usize, request: &BatchRequest, ended: &Ended) -> Value {
    let outcome = if ended.canceled {
        &BatchOutcome::Canceled
    } else {
        &request.outcome
    };
    let result = match outcome {
        BatchOutcome::Succeeded => {
            let text = ended
                .reply
                .as_deref()
                .map_or_else(|| default_reply(&request.prompt), str::to_owned);
            let id = format!("msg_{}_{index}", batch_id.trim_start_matches("msgbatch_"));
            json!({
                "type": "succeeded",
                "message": message(&id, &request.model, &text, request.input),
            })
        }
        BatchOutcome::Errored {
            error_type,
            message,
        } => json!({
            "type": "errored",
            "error": {
                "type": "error",
                "error": {"type": error_type, "message": message},
            },
        }),
        BatchOutcome::Canceled => json!({"type": "canceled"}),
        BatchOutcome::Expired => json!({"type": "expired"}),
    };
    json!({"custom_id": request.custom_id, "result": result})
}

/// `GET /v1/messages/batches?limit=&before_id=&after_id=`: the live batches, newest first,
/// a page at a time. `after_id` pages on to older batches, `before_id` back to newer ones.
async fn list(
    State(served): State<Served>,
    headers: HeaderMap,
    uri: Uri,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    if let Err(response) = check_headers(&headers, served.script.accepted_key().as_deref()) {
        return *response;
    }
    let Ok(Query(query)) = query else {
        return bad("The query string is not valid");
    };
    let limit = match query.get("limit").map(|limit| limit.parse::<usize>()) {
        None => DEFAULT_LIST_LIMIT,
        Some(Err(_)) => return bad("limit: Input should be a valid integer"),
        Some(Ok(0)) => return bad("limit: Input should be greater than or equal to 1"),
        Some(Ok(limit)) if limit > MAX_LIST_LIMIT => {
            return bad(&format!(
                "limit: Input should be less than or equal to {MAX_LIST_LIMIT}"
            ));
        }
        Some(Ok(limit)) => limit,
    };
    let before = query.get("before_id");
    let after = query.get("after_id");
    if before.is_some() && after.is_some() {
        return bad("Only one of before_id and after_id may be given");
    }
    let base = base_url(served.batches.scheme, &headers, &uri);
    let mut inner = served.batches.lock();
    let reply = inner.reply.clone();
    let now = Instant::now();
    for batch in inner.batches.iter_mut().filter(|batch| !batch.deleted) {
        batch.settle(now, reply.as_ref());
    }
    let position = |id: &String| inner.batches.iter().position(|batch| &batch.id == id);
    // Creation order is oldest first; the list is newest first.
    let live = |range: std::ops::Range<usize>| {
        inner.batches[range]
            .iter()
            .rev()
            .filter(|batch| !batch.deleted)
            .collect::<Vec<_>>()
    };
    let (page, has_more) = match (before, after) {
        (Some(id), _) => {
            let Some(at) = position(id) else {
                return bad(&format!("before_id: no Message Batch {id}"));
            };
            let newer = live(at + 1..inner.batches.len());
            let skip = newer.len().saturating_sub(limit);
            (newer[skip..].to_vec(), skip > 0)
        }
        (None, Some(id)) => {
            let Some(at) = position(id) else {
                return bad(&format!("after_id: no Message Batch {id}"));
            };
            let older = live(0..at);
            let more = older.len() > limit;
            (older.into_iter().take(limit).collect(), more)
        }
        (None, None) => {
            let all = live(0..inner.batches.len());
            let more = all.len() > limit;
            (all.into_iter().take(limit).collect(), more)
        }
    };
    let body = json!({
        "data": page.iter().map(|batch| batch.view(&base)).collect::<Vec<_>>(),
        "has_more": has_more,
        "first_id": page.first().map(|batch| &batch.id),
        "last_id": page.last().map(|batch| &batch.id),
    });
    drop(inner);
    ok(body)
}
