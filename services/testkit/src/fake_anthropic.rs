//! A local stand-in for the Anthropic Messages API (`POST /v1/messages`), speaking its wire
//! format: request validation, `content` blocks, `usage`, `request-id` and
//! `anthropic-ratelimit-*` headers, the documented error bodies, and prompt caching
//! (`cache_control` blocks, `cache_creation_input_tokens`, `cache_read_input_tokens`).
//! It also speaks the Message Batches API under the same base URL ([`crate::fake_batches`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::fake_batches::BatchState;
use crate::llm_script::{Answer, LlmScript, add_headers};
use crate::tls::{PrivateCa, Serving};

pub const API_KEY: &str = "sk-ant-test-key";

pub use crate::fake_batches::{BatchOutcome, CreatedBatch};
pub use crate::llm_script::{Recorded, Scripted, first_user_line};

/// The shortest prefix the API caches, in tokens (Claude Sonnet's and Opus 4's minimum); a
/// shorter one marked for caching is charged as plain input.
pub const MIN_CACHEABLE_TOKENS: u64 = 1024;
/// How long a cached prefix lives without being read: the default (`5m`) cache.
const CACHE_TTL: Duration = Duration::from_secs(300);
/// At most this many blocks may carry `cache_control` in one request.
const MAX_CACHE_BREAKPOINTS: usize = 4;

#[derive(Debug, Clone)]
pub struct FakeAnthropic {
    addr: SocketAddr,
    script: Arc<LlmScript>,
    /// The Message Batches the server holds, and the controls over them.
    batches: Arc<BatchState>,
    /// Set when it serves HTTPS: the CA its certificate chains to.
    tls: Option<Arc<PrivateCa>>,
}

/// The script's controls (`push`, `set_cycle`, `requests`, ...) on the server itself.
impl Deref for FakeAnthropic {
    type Target = LlmScript;

    fn deref(&self) -> &LlmScript {
        &self.script
    }
}

impl FakeAnthropic {
    pub async fn start() -> Self {
        let script = Arc::new(LlmScript::new(Some(API_KEY)));
        let batches = Arc::new(BatchState::new("http"));
        let addr = crate::serve(app(&script, &batches), "fake Anthropic").await;
        Self {
            addr,
            script,
            batches,
            tls: None,
        }
    }

    /// Over HTTPS, as the real API, with a certificate from a private CA ([`Self::ca_file`]).
    pub async fn start_tls(serving: Serving) -> Self {
        let script = Arc::new(LlmScript::new(Some(API_KEY)));
        let batches = Arc::new(BatchState::new("https"));
        let (addr, ca) =
            crate::tls::serve_tls(app(&script, &batches), serving, "fake Anthropic").await;
        Self {
            addr,
            script,
            batches,
            tls: Some(Arc::new(ca)),
        }
    }

    /// The value for `anthropic.base_url` / `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The CA to trust (`anthropic.tls_ca`) when it serves HTTPS.
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|ca| ca.ca_file())
    }

    /// The text of every default answer, of `/v1/messages` and of succeeded batch requests
    /// alike. It shadows [`LlmScript::set_reply`] so the batches, which never take the
    /// script's answers, see it too: a batch quotes the reply set when it ends.
    pub fn set_reply(&self, text: impl Into<String>) {
        let text = text.into();
        self.batches.set_reply(text.clone());
        self.script.set_reply(text);
    }

    /// How long a Message Batch created from now on stays `in_progress` (1 s by default).
    pub fn set_batch_processing_time(&self, time: Duration) {
        self.batches.set_processing_time(time);
    }

    /// Holds each batch creation's answer back this long after the batch exists.
    pub fn set_batch_create_answer_delay(&self, delay: Duration) {
        self.batches.set_create_answer_delay(delay);
    }

    /// Pauses this long between the chunks (256 lines each) of every results file.
    pub fn set_batch_results_chunk_delay(&self, delay: Duration) {
        self.batches.set_results_chunk_delay(delay);
    }

    /// The outcome of `custom_id`'s request in the next batch that contains it; later
    /// batches with it succeed again, unless more are pushed (they queue).
    pub fn push_batch_outcome(&self, custom_id: &str, outcome: BatchOutcome) {
        self.batches.push_outcome(custom_id, outcome);
    }

    /// The next `n` batch creations that pass validation answer `status` with its documented
    /// error body, creating nothing.
    pub fn fail_next_batch_creations(&self, n: usize, status: u16) {
        self.batches.fail_next_creations(n, status);
    }

    /// Every batch created so far, in creation order, deleted ones too.
    pub fn batches(&self) -> Vec<CreatedBatch> {
        self.batches.created()
    }

    /// How many batches each `custom_id` was sent in: a request retried in a new batch
    /// counts twice.
    pub fn batch_requests_per_custom_id(&self) -> BTreeMap<String, usize> {
        self.batches.requests_per_custom_id()
    }

    /// How many `GET /v1/messages/batches/{id}` calls were made: what a client's polling
    /// cost.
    pub fn batch_reads(&self) -> usize {
        self.batches.reads()
    }
}

fn app(script: &Arc<LlmScript>, batches: &Arc<BatchState>) -> Router {
    let state = Served {
        script: script.clone(),
        cache: Arc::new(PromptCache::default()),
        batches: batches.clone(),
    };
    Router::new()
        .route("/v1/messages", post(messages))
        .merge(crate::fake_batches::routes())
        .with_state(state)
}

/// What every route of the server shares. Batches share the prompt cache with
/// `/v1/messages`, as they do at Anthropic.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub(crate) script: Arc<LlmScript>,
    pub(crate) cache: Arc<PromptCache>,
    pub(crate) batches: Arc<BatchState>,
}

/// The prompt prefixes the API holds cached, by their text up to the last `cache_control`
/// breakpoint, with when each was last written or read (reads refresh the lifetime).
#[derive(Debug, Default)]
pub(crate) struct PromptCache(Mutex<HashMap<String, Instant>>);

/// How a request's input tokens split: plain, written to the cache, read from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InputTokens {
    pub(crate) plain: u64,
    pub(crate) cache_write: u64,
    pub(crate) cache_read: u64,
}

impl PromptCache {
    /// Splits the request's input tokens (a quarter of its JSON's length, like the rest of the
    /// fake's counts) the way the API does: the prefix up to the last `cache_control` block
    /// is read from the cache when it was cached within the TTL, written otherwise, and
    /// charged as plain input when shorter than [`MIN_CACHEABLE_TOKENS`].
    pub(crate) fn split(&self, body: &Value) -> InputTokens {
        let total = body.to_string().len() as u64 / 4;
        let Some(prefix) = cached_prefix(body) else {
            return InputTokens {
                plain: total,
                ..InputTokens::default()
            };
        };
        let prefix_tokens = (prefix.len() as u64 / 4).min(total);
        if prefix_tokens < MIN_CACHEABLE_TOKENS {
            return InputTokens {
                plain: total,
                ..InputTokens::default()
            };
        }
        let now = Instant::now();
        let mut cached = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let hit = cached
            .get(&prefix)
            .is_some_and(|at| now.duration_since(*at) < CACHE_TTL);
        cached.insert(prefix, now);
        let plain = total - prefix_tokens;
        if hit {
            InputTokens {
                plain,
                cache_read: prefix_tokens,
                ..InputTokens::default()
            }
        } else {
            InputTokens {
                plain,
                cache_write: prefix_tokens,
                ..InputTokens::default()
            }
        }
    }
}

/// The model and the system blocks up to and including the last one with `cache_control`
/// (the fake caches system prompts, which is what Jetcall marks), as one string.
fn cached_prefix(body: &Value) -> Option<String> {
    let blocks = body["system"].as_array()?;
    let last = blocks
        .iter()
        .rposition(|block| block.get("cache_control").is_some())?;
    let mut prefix = body["model"].as_str().unwrap_or_default().to_owned();
    for block in &blocks[..=last] {
        prefix.push('\n');
        prefix.push_str(block["text"].as_str().unwrap_or_default());
    }
    Some(prefix)
}

/// `field`'s path in the JSON sent, for an error message: the Messages request sits at `at`
/// (empty for `/v1/messages`, `requests.<i>.params` in a batch).
fn path(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

/// The checks the API makes of `cache_control` blocks.
fn check_cache_control(body: &Value, at: &str) -> Result<(), String> {
    let mut blocks: Vec<(String, &Value)> = Vec::new();
    if let Some(system) = body["system"].as_array() {
        for (i, block) in system.iter().enumerate() {
            let field = path(at, &format!("system.{i}"));
            if block["type"] != "text" || !block["text"].is_string() {
                return Err(format!("{field}: Input should be a text block"));
            }
            blocks.push((field, block));
        }
    }
    if let Some(messages) = body["messages"].as_array() {
        for (i, message) in messages.iter().enumerate() {
            for (j, block) in message["content"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                blocks.push((path(at, &format!("messages.{i}.content.{j}")), block));
            }
        }
    }
    let mut breakpoints = 0;
    for (path, block) in blocks {
        let Some(control) = block.get("cache_control") else {
            continue;
        };
        breakpoints += 1;
        if control["type"] != "ephemeral" {
            return Err(format!(
                "{path}.cache_control.type: Input should be 'ephemeral'"
            ));
        }
        if !matches!(
            control.get("ttl").map(Value::as_str),
            None | Some(Some("5m" | "1h"))
        ) {
            return Err(format!(
                "{path}.cache_control.ttl: Input should be '5m' or '1h'"
            ));
        }
    }
    if breakpoints > MAX_CACHE_BREAKPOINTS {
        let whose = if at.is_empty() {
            String::new()
        } else {
            format!("{at}: ")
        };
        return Err(format!(
            "{whose}A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {breakpoints}."
        ));
    }
    Ok(())
}

pub(crate) fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("request-id", HeaderValue::from_static("req_fake_error"));
    response
}

pub(crate) fn error_for(status: u16, retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, message) = match status {
        400 => (
            "invalid_request_error",
            "There was an issue with the request.",
        ),
        401 => ("authentication_error", "invalid x-api-key"),
        402 => ("billing_error", "Your credit balance is too low."),
        403 => ("permission_error", "Your API key does not have permission."),
        404 => ("not_found_error", "The requested resource was not found."),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed size.",
        ),
        429 => (
            "rate_limit_error",
            "Number of requests has exceeded your rate limit.",
        ),
        529 => ("overloaded_error", "Overloaded"),
        _ => ("api_error", "Internal server error"),
    };
    let mut response = error(code, kind, message);
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
    }
    response
}

/// The checks the real API makes before it will answer, as far as a client can get wrong.
fn validate(
    headers: &HeaderMap,
    body: &Value,
    accepted_key: Option<&str>,
) -> Result<(), Box<Response>> {
    check_headers(headers, accepted_key)?;
    check_body(body, "").map_err(|message| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &message,
        ))
    })
}

/// The checks of the headers every endpoint makes: the key (401 otherwise) and the API
/// version.
pub(crate) fn check_headers(
    headers: &HeaderMap,
    accepted_key: Option<&str>,
) -> Result<(), Box<Response>> {
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != accepted_key {
        return Err(Box::new(error_for(401, None)));
    }
    if headers
        .get("anthropic-version")
        .and_then(|v| v.to_str().ok())
        != Some("2023-06-01")
    {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        )));
    }
    Ok(())
}

/// The checks of a Messages request's body, wherever it sits: `at` is its path in the JSON
/// sent (empty for `/v1/messages`, `requests.<i>.params` in a batch), which the message of
/// the error names with the field, as the API's messages do.
pub(crate) fn check_body(body: &Value, at: &str) -> Result<(), String> {
    let field = |name: &str| path(at, name);
    if !body["model"].is_string() {
        return Err(format!("{}: Field required", field("model")));
    }
    if body["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return Err(format!("{}: Field required", field("max_tokens")));
    }
    let messages = body["messages"]
        .as_array()
        .ok_or_else(|| format!("{}: Field required", field("messages")))?;
    if messages.is_empty() {
        return Err(format!(
            "{}: at least one message is required",
            field("messages")
        ));
    }
    for (i, message) in messages.iter().enumerate() {
        if !matches!(message["role"].as_str(), Some("user" | "assistant")) {
            return Err(format!(
                "{}: Input should be 'user' or 'assistant'",
                field(&format!("messages.{i}.role"))
            ));
        }
        if !(message["content"].is_string() || message["content"].is_array()) {
            return Err(format!(
                "{}: Field required",
                field(&format!("messages.{i}.content"))
            ));
        }
    }
    if !(body["system"].is_null() || body["system"].is_string() || body["system"].is_array()) {
        return Err(format!(
            "{}: Input should be a valid string",
            field("system")
        ));
    }
    check_cache_control(body, at)
}

/// A Message object as the API answers one, `/v1/messages` and a batch's succeeded result
/// alike: the output tokens are the words of `text`.
pub(crate) fn message(id: &str, model: &str, text: &str, input: InputTokens) -> Value {
    let output_tokens = text.split_whitespace().count() as u64;
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": input.plain,
            "cache_creation_input_tokens": input.cache_write,
            "cache_read_input_tokens": input.cache_read,
            "output_tokens": output_tokens,
        }
    })
}

fn success(body: &Value, text: String, input: InputTokens) -> Response {
    let model = body["model"].as_str().unwrap_or_default();
    let reply = message("msg_fake_0001", model, &text, input);
    let mut response = (StatusCode::OK, axum::Json(reply)).into_response();
    let headers = response.headers_mut();
    headers.insert("request-id", HeaderValue::from_static("req_fake_0001"));
    headers.insert(
        "anthropic-ratelimit-requests-limit",
        HeaderValue::from(4000),
    );
    headers.insert(
        "anthropic-ratelimit-requests-remaining",
        HeaderValue::from(3999),
    );
    headers.insert(
        "anthropic-ratelimit-tokens-limit",
        HeaderValue::from(400_000),
    );
    headers.insert(
        "anthropic-ratelimit-tokens-remaining",
        HeaderValue::from(399_000),
    );
    response
}

async fn messages(
    State(served): State<Served>,
    version: Version,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let body = serde_json::from_slice::<Value>(&raw).unwrap_or(Value::Null);
    let index = served.script.arrive(version, &headers, &body);
    let response = answer(&served, &headers, &body).await;
    served.script.answered(index, &response);
    response
}

/// The text of a default answer: it quotes the first line of the prompt
/// ([`first_user_line`]).
pub(crate) fn default_reply(first_line: &str) -> String {
    format!("Fake Claude reply to: {first_line}")
}

async fn answer(served: &Served, headers: &HeaderMap, body: &Value) -> Response {
    let script = &served.script;
    if body.is_null() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Request body is not valid JSON",
        );
    }
    if let Err(response) = validate(headers, body, script.accepted_key().as_deref()) {
        return *response;
    }
    match script.next().await {
        Answer::Error {
            status,
            retry_after,
            headers,
        } => {
            let mut response = error_for(status, retry_after);
            add_headers(&mut response, headers);
            response
        }
        Answer::Text(text) => {
            let text = text.unwrap_or_else(|| default_reply(&first_user_line(body)));
            success(body, text, served.cache.split(body))
        }
    }
}
