//! A local stand-in for the Anthropic Messages API (`POST /v1/messages`), speaking its wire
//! format: request validation, `content` blocks, `usage`, `request-id` and
//! `anthropic-ratelimit-*` headers, and the documented error bodies.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

pub const API_KEY: &str = "sk-ant-test-key";

/// One scripted answer, used once, before the default behaviour resumes.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// An API error with the documented body for `status`, e.g. 429 or 529.
    Error {
        status: u16,
        retry_after: Option<u64>,
    },
    /// A normal answer whose text is this.
    Text(String),
    /// Wait this long before answering normally.
    Delay(Duration),
}

/// What the server saw of one request, and the status it answered with.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub headers: HeaderMap,
    pub body: Value,
    /// When the request arrived, on the server's clock.
    pub at: Instant,
    pub status: u16,
    /// The `retry-after` seconds the answer carried.
    pub retry_after: Option<u64>,
    pub version: Version,
}

impl Recorded {
    /// The first line of the user message: which job a request was for. Status 0 while the
    /// answer is still being made.
    pub fn prompt(&self) -> String {
        first_user_line(&self.body)
    }
}

#[derive(Debug)]
struct Inner {
    script: VecDeque<Scripted>,
    /// Repeats over the requests the script does not answer; `None` is a normal answer.
    cycle: Vec<Option<Scripted>>,
    answered: usize,
    requests: Vec<Recorded>,
    delay: Duration,
    reply: Option<String>,
    accepted_key: String,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            script: VecDeque::new(),
            cycle: Vec::new(),
            answered: 0,
            requests: Vec::new(),
            delay: Duration::ZERO,
            reply: None,
            accepted_key: API_KEY.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeAnthropic {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeAnthropic {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Anthropic");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    /// The value for `anthropic.base_url` / `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    pub fn push(&self, scripted: Scripted) {
        self.lock().script.push_back(scripted);
    }

    /// A delay before every default answer.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The text of every default answer; by default it quotes the first line of the prompt.
    pub fn set_reply(&self, text: impl Into<String>) {
        self.lock().reply = Some(text.into());
    }

    /// A pattern of answers repeated over every request the script does not take, e.g. three
    /// errors in ten for a flaky API.
    pub fn set_cycle(&self, cycle: Vec<Option<Scripted>>) {
        self.lock().cycle = cycle;
    }

    /// The only `x-api-key` accepted; others get 401, as after a key rotation.
    pub fn set_accepted_key(&self, key: impl Into<String>) {
        self.lock().accepted_key = key.into();
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn calls(&self) -> usize {
        self.lock().requests.len()
    }
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
fn validate(headers: &HeaderMap, body: &Value, accepted_key: &str) -> Result<(), Box<Response>> {
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(accepted_key) {
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
    Ok(())
}

/// The first line of the first user message (OpenAI puts the system prompt before it).
pub fn first_user_line(body: &Value) -> String {
    let content = body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().find(|m| m["role"] == "user"))
        .map_or(&Value::Null, |message| &message["content"]);
    let text = match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|block| block["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    };
    text.lines().next().unwrap_or_default().to_owned()
}

fn success(body: &Value, text: String) -> Response {
    let input_tokens = body.to_string().len() as u64 / 4;
    let output_tokens = text.split_whitespace().count() as u64;
    let reply = json!({
        "id": "msg_fake_0001",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
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
    State(inner): State<Arc<Mutex<Inner>>>,
    version: Version,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let body = serde_json::from_slice::<Value>(&raw).unwrap_or(Value::Null);
    // Recorded on arrival, so a call still hanging is counted; its status follows.
    let index = {
        let mut inner = lock(&inner);
        inner.requests.push(Recorded {
            headers: headers.clone(),
            body: body.clone(),
            at: Instant::now(),
            status: 0,
            retry_after: None,
            version,
        });
        inner.requests.len() - 1
    };
    let response = answer(&inner, &headers, &body).await;
    if let Some(recorded) = lock(&inner).requests.get_mut(index) {
        recorded.status = response.status().as_u16();
        recorded.retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
    }
    response
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn answer(inner: &Mutex<Inner>, headers: &HeaderMap, body: &Value) -> Response {
    if body.is_null() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Request body is not valid JSON",
        );
    }
    let (scripted, delay, reply) = {
        let mut inner = lock(inner);
        if let Err(response) = validate(headers, body, &inner.accepted_key) {
            return *response;
        }
        let scripted = match inner.script.pop_front() {
            Some(scripted) => Some(scripted),
            None if inner.cycle.is_empty() => None,
            None => {
                let step = inner.cycle[inner.answered % inner.cycle.len()].clone();
                inner.answered += 1;
                step
            }
        };
        (scripted, inner.delay, inner.reply.clone())
    };
    let text = reply.unwrap_or_else(|| format!("Fake Claude reply to: {}", first_user_line(body)));
    match scripted {
        Some(Scripted::Error {
            status,
            retry_after,
        }) => error_for(status, retry_after),
        Some(Scripted::Text(text)) => success(body, text),
        Some(Scripted::Delay(extra)) => {
            tokio::time::sleep(extra).await;
            success(body, text)
        }
        None => {
            tokio::time::sleep(delay).await;
            success(body, text)
        }
    }
}
