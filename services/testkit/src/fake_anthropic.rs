//! A local stand-in for the Anthropic Messages API (`POST /v1/messages`), speaking its wire
//! format: request validation, `content` blocks, `usage`, `request-id` and
//! `anthropic-ratelimit-*` headers, the documented error bodies, and prompt caching
//! (`cache_control` blocks, `cache_creation_input_tokens`, `cache_read_input_tokens`).

use std::collections::HashMap;
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

use crate::llm_script::{Answer, LlmScript, add_headers};
use crate::tls::{PrivateCa, Serving};

pub const API_KEY: &str = "sk-ant-test-key";

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
        let addr = crate::serve(app(&script), "fake Anthropic").await;
        Self {
            addr,
            script,
            tls: None,
        }
    }

    /// Over HTTPS, as the real API, with a certificate from a private CA ([`Self::ca_file`]).
    pub async fn start_tls(serving: Serving) -> Self {
        let script = Arc::new(LlmScript::new(Some(API_KEY)));
        let (addr, ca) = crate::tls::serve_tls(app(&script), serving, "fake Anthropic").await;
        Self {
            addr,
            script,
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
}

fn app(script: &Arc<LlmScript>) -> Router {
    let state = Served {
        script: script.clone(),
        cache: Arc::new(PromptCache::default()),
    };
    Router::new()
        .route("/v1/messages", post(messages))
        .with_state(state)
}

#[derive(Debug, Clone)]
struct Served {
    script: Arc<LlmScript>,
    cache: Arc<PromptCache>,
}

/// The prompt prefixes the API holds cached, by their text up to the last `cache_control`
/// breakpoint, with when each was last written or read (reads refresh the lifetime).
#[derive(Debug, Default)]
struct PromptCache(Mutex<HashMap<String, Instant>>);

/// How a request's input tokens split: plain, written to the cache, read from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InputTokens {
    plain: u64,
    cache_write: u64,
    cache_read: u64,
}

impl PromptCache {
    /// Splits the request's input tokens (a quarter of its JSON's length, like the rest of the
    /// fake's counts) the way the API does: the prefix up to the last `cache_control` block
    /// is read from the cache when it was cached within the TTL, written otherwise, and
    /// charged as plain input when shorter than [`MIN_CACHEABLE_TOKENS`].
    fn split(&self, body: &Value) -> InputTokens {
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

/// The checks the API makes of `cache_control` blocks.
fn check_cache_control(body: &Value) -> Result<(), String> {
    let mut blocks: Vec<(String, &Value)> = Vec::new();
    if let Some(system) = body["system"].as_array() {
        for (i, block) in system.iter().enumerate() {
            if block["type"] != "text" || !block["text"].is_string() {
                return Err(format!("system.{i}: Input should be a text block"));
            }
            blocks.push((format!("system.{i}"), block));
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
                blocks.push((format!("messages.{i}.content.{j}"), block));
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
        return Err(format!(
            "A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {breakpoints}."
        ));
    }
    Ok(())
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("request-id", HeaderValue::from_static("req_fake_error"));
    response
}

fn error_for(status: u16, retry_after: Option<u64>) -> Response {
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
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != accepted_key {
        return Err(Box::new(error_for(401, None)));
    }
    let bad = |message: &str| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message,
        ))
    };
    if headers
        .get("anthropic-version")
        .and_then(|v| v.to_str().ok())
        != Some("2023-06-01")
    {
        return Err(bad("anthropic-version: header is required"));
    }
    if !body["model"].is_string() {
        return Err(bad("model: Field required"));
    }
    if body["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return Err(bad("max_tokens: Field required"));
    }
    let messages = body["messages"]
        .as_array()
        .ok_or_else(|| bad("messages: Field required"))?;
    if messages.is_empty() {
        return Err(bad("messages: at least one message is required"));
    }
    for (i, message) in messages.iter().enumerate() {
        if !matches!(message["role"].as_str(), Some("user" | "assistant")) {
            return Err(bad(&format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            )));
        }
        if !(message["content"].is_string() || message["content"].is_array()) {
            return Err(bad(&format!("messages.{i}.content: Field required")));
        }
    }
    if !(body["system"].is_null() || body["system"].is_string() || body["system"].is_array()) {
        return Err(bad("system: Input should be a valid string"));
    }
    check_cache_control(body).map_err(|message| bad(&message))?;
    Ok(())
}

fn success(body: &Value, text: String, input: InputTokens) -> Response {
    let output_tokens = text.split_whitespace().count() as u64;
    let reply = json!({
        "id": "msg_fake_0001",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": input.plain,
            "cache_creation_input_tokens": input.cache_write,
            "cache_read_input_tokens": input.cache_read,
            "output_tokens": output_tokens,
        }
    });
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
            let text =
                text.unwrap_or_else(|| format!("Fake Claude reply to: {}", first_user_line(body)));
            success(body, text, served.cache.split(body))
        }
    }
}
