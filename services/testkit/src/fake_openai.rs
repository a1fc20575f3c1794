//! A local stand-in for an OpenAI-compatible Chat Completions API
//! (`POST /v1/chat/completions`), speaking its wire format: bearer-key and request validation,
//! `choices`, `usage`, `x-request-id` and `x-ratelimit-*` headers, and OpenAI's error bodies
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! [`FakeOpenAi::start`] behaves like OpenAI itself (key required, rate-limit headers);
//! [`FakeOpenAi::start_without_key`] like a local server such as Ollama or vLLM (no key, no
//! rate-limit headers).

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::llm_script::{Answer, LlmScript, add_headers};
/// The same script and record as the fake Anthropic API.
pub use crate::llm_script::{Recorded, Scripted, first_user_line};

pub const API_KEY: &str = "sk-proj-test-key";

#[derive(Debug, Clone)]
pub struct FakeOpenAi {
    addr: SocketAddr,
    script: Arc<LlmScript>,
}

/// The script's controls (`push`, `set_cycle`, `requests`, ...) on the server itself.
impl Deref for FakeOpenAi {
    type Target = LlmScript;

    fn deref(&self) -> &LlmScript {
        &self.script
    }
}

impl FakeOpenAi {
    /// Like OpenAI: every request needs `Authorization: Bearer` [`API_KEY`].
    pub async fn start() -> Self {
        Self::serve(Some(API_KEY)).await
    }

    /// Like a local server (Ollama, vLLM, llama.cpp): no key needed, no rate-limit headers.
    pub async fn start_without_key() -> Self {
        Self::serve(None).await
    }

    async fn serve(accepted_key: Option<&str>) -> Self {
        let script = Arc::new(LlmScript::new(accepted_key));
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(script.clone());
        let addr = crate::serve(app, "fake OpenAI").await;
        Self { addr, script }
    }

    /// The value for `openai.base_url` / `OPENAI_BASE_URL`, up to and including `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

fn error(status: StatusCode, kind: Option<&str>, code: Option<&str>, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-request-id", HeaderValue::from_static("req_fake_error"));
    response
}

fn bad_request(message: &str) -> Box<Response> {
    Box::new(error(
        StatusCode::BAD_REQUEST,
        Some("invalid_request_error"),
        None,
        message,
    ))
}

fn error_for(status: u16, retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, error_code, message) = match status {
        400 => (
            "invalid_request_error",
            None,
            "There was an issue with the request.",
        ),
        401 => (
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided: sk-***. You can find your API key at https://platform.openai.com/account/api-keys.",
        ),
        403 => (
            "invalid_request_error",
            Some("unsupported_country_region_territory"),
            "Country, region, or territory not supported",
        ),
        404 => (
            "invalid_request_error",
            Some("model_not_found"),
            "The model does not exist or you do not have access to it.",
        ),
        429 => (
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for requests. Please try again later.",
        ),
        503 => (
            "server_error",
            None,
            "The engine is currently overloaded, please try again later.",
        ),
        _ => (
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
    };
    let mut response = error(code, Some(kind), error_code, message);
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
    }
    response
}

/// The checks the real API makes before it will answer, as far as a client can get wrong.
fn validate(
    accepted_key: Option<&str>,
    headers: &HeaderMap,
    body: &Value,
) -> Result<(), Box<Response>> {
    if let Some(accepted_key) = accepted_key {
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer.is_none() {
            return Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                Some("invalid_request_error"),
                None,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )));
        }
        if bearer != Some(accepted_key) {
            return Err(Box::new(error_for(401, None)));
        }
    }
    if !body["model"].is_string() {
        return Err(bad_request("you must provide a model parameter"));
    }
    let messages = body["messages"]
        .as_array()
        .ok_or_else(|| bad_request("Missing required parameter: 'messages'."))?;
    if messages.is_empty() {
        return Err(bad_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        ));
    }
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str();
        if !matches!(
            role,
            Some("system" | "developer" | "user" | "assistant" | "tool")
        ) {
            return Err(bad_request(&format!(
                "Invalid value for 'messages[{i}].role': expected one of 'system', 'developer', 'user', 'assistant' or 'tool'."
            )));
        }
        let content = &message["content"];
        let content_ok = content.is_string()
            || content.is_array()
            || (role == Some("assistant") && content.is_null());
        if !content_ok {
            return Err(bad_request(&format!(
                "Missing required parameter: 'messages[{i}].content'."
            )));
        }
    }
    if !body["max_tokens"].is_null() && body["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return Err(bad_request(
            "Invalid 'max_tokens': expected a positive integer.",
        ));
    }
    if !body["temperature"].is_null()
        && body["temperature"]
            .as_f64()
            .is_none_or(|t| !(0.0..=2.0).contains(&t))
    {
        return Err(bad_request(
            "Invalid 'temperature': expected a number between 0 and 2.",
        ));
    }
    Ok(())
}

fn success(cloud: bool, body: &Value, text: String) -> Response {
    let prompt_tokens = body["messages"].to_string().len() as u64 / 4;
    let completion_tokens = text.split_whitespace().count() as u64;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let reply = json!({
        "id": "chatcmpl-fake0001",
        "object": "chat.completion",
        "created": created,
        "model": body["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        },
        "system_fingerprint": "fp_fake"
    });
    let mut response = (StatusCode::OK, axum::Json(reply)).into_response();
    let headers = response.headers_mut();
    headers.insert("x-request-id", HeaderValue::from_static("req_fake_0001"));
    if cloud {
        for (name, value) in [
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-limit-tokens", "200000"),
            ("x-ratelimit-remaining-tokens", "199000"),
            ("x-ratelimit-reset-tokens", "300ms"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    response
}

async fn chat_completions(
    State(script): State<Arc<LlmScript>>,
    version: Version,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let body = serde_json::from_slice::<Value>(&raw).unwrap_or(Value::Null);
    let index = script.arrive(version, &headers, &body);
    let response = answer(&script, &headers, &body).await;
    script.answered(index, &response);
    response
}

async fn answer(script: &LlmScript, headers: &HeaderMap, body: &Value) -> Response {
    if body.is_null() {
        return *bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly.)",
        );
    }
    let accepted_key = script.accepted_key();
    if let Err(response) = validate(accepted_key.as_deref(), headers, body) {
        return *response;
    }
    // OpenAI itself (with a key) sends rate-limit headers; local servers do not.
    let cloud = accepted_key.is_some();
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
                text.unwrap_or_else(|| format!("Fake GPT reply to: {}", first_user_line(body)));
            success(cloud, body, text)
        }
    }
}
