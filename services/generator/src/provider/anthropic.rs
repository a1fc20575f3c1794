//! The Anthropic Messages API: `POST {base_url}/v1/messages`.

use std::time::Duration;

use ::http::StatusCode;
use ::http::header::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use jetcall::config::{LlmEndpointConfig, Secret};
use jetcall::events::Usage;
use jetcall::kinds::KindSpec;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{
    Disposition, Generation, GenerationRequest, LlmError, MAX_PROVIDER_WAIT, ProviderSetupError,
    http,
};

const API_VERSION: &str = "2023-06-01";

#[derive(Debug, Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    system: System<'a>,
    messages: [MessageParam<'a>; 1],
}

/// The system prompt: plain text, or one text block marked for the prompt cache.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum System<'a> {
    Text(&'a str),
    Cached([SystemBlock<'a>; 1]),
}

impl<'a> System<'a> {
    fn of(spec: &'a KindSpec) -> Self {
        if spec.cache {
            Self::Cached([SystemBlock {
                kind: "text",
                text: &spec.system,
                cache_control: CacheControl { kind: "ephemeral" },
            }])
        } else {
            Self::Text(&spec.system)
        }
    }
}

#[derive(Debug, Serialize)]
struct SystemBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    cache_control: CacheControl,
}

/// The default five-minute cache: writes cost 1.25 times input, reads a tenth.
#[derive(Debug, Serialize)]
struct CacheControl {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Debug, Serialize)]
struct MessageParam<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Deserialize)]
pub(super) struct MessagesResponse {
    model: String,
    content: Vec<ContentBlock>,
    usage: ApiUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentBlock {
    Text {
        text: String,
    },
    #[serde(other)]
    Other,
}

/// `cache_*` are absent or `null` from calls that touch no cache.
#[derive(Debug, Deserialize)]
struct ApiUsage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ErrorResponse {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

#[derive(Debug, Clone)]
pub struct Anthropic {
    http: http::Transport,
    /// `x-api-key` and `anthropic-version`, the same on every call.
    headers: HeaderMap,
    default_model: String,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
}

impl Anthropic {
    pub fn new(
        config: &LlmEndpointConfig,
        api_key: Secret,
        concurrency: usize,
    ) -> Result<Self, ProviderSetupError> {
        let url = format!("{}/v1/messages", config.base_url.trim_end_matches('/'));
        let http = http::Transport::new(http::Settings {
            url,
            timeout: config.timeout,
            concurrency,
            h2c: config.http2,
            tls_ca: config.tls_ca.as_deref(),
        })?;
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", http::secret_header(api_key.expose())?);
        headers.insert("anthropic-version", HeaderValue::from_static(API_VERSION));
        Ok(Self {
            http,
            headers,
            default_model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
        })
    }

    /// The Messages request for `request`, as one call sends it and a batch holds it.
    fn request<'a>(&'a self, request: &GenerationRequest<'a>) -> MessagesRequest<'a> {
        MessagesRequest {
            model: request.spec.model.as_deref().unwrap_or(&self.default_model),
            max_tokens: request.max_tokens(self.max_tokens),
            temperature: self.temperature,
            system: System::of(request.spec),
            messages: [MessageParam {
                role: "user",
                content: request.prompt,
            }],
        }
    }

    /// `{"custom_id": …, "params": …}`: one request of a Message Batch, as JSON.
    pub fn batch_request(
        &self,
        custom_id: &str,
        request: &GenerationRequest<'_>,
    ) -> Result<Vec<u8>, LlmError> {
        #[derive(Serialize)]
        struct BatchRequest<'a> {
            custom_id: &'a str,
            params: MessagesRequest<'a>,
        }
        http::json(&BatchRequest {
            custom_id,
            params: self.request(request),
        })
    }

    pub async fn generate(&self, request: GenerationRequest<'_>) -> Result<Generation, LlmError> {
        let body = self.request(&request);
        let answer = self.http.post(&self.headers, http::json(&body)?).await?;
        let (status, headers) = (answer.status, answer.headers);
        if !status.is_success() {
            return Err(api_error(status, &headers, &answer.body));
        }
        let reply: MessagesResponse = serde_json::from_slice(&answer.body).map_err(|err| {
            LlmError::new(
                Disposition::Retry { retry_after: None },
                "invalid_response",
                format!("the Messages API answered with an unexpected body: {err}"),
            )
        })?;
        Ok(Generation {
            slow_down: slow_down(&headers, OffsetDateTime::now_utc()),
            ..generation_of(reply)
        })
    }
}

/// What a Message says, from a call's answer or a batch's result.
pub(super) fn generation_of(reply: MessagesResponse) -> Generation {
    let text = reply
        .content
        .into_iter()
        .filter_map(|block| match block {
            ContentBlock::Text { text } => Some(text),
            ContentBlock::Other => None,
        })
        .collect::<Vec<_>>()
        .join("");
    Generation {
        text,
        model: reply.model,
        usage: Usage {
            input_tokens: reply.usage.input_tokens,
            output_tokens: reply.usage.output_tokens,
            cache_creation_input_tokens: reply.usage.cache_creation_input_tokens.unwrap_or(0),
            cache_read_input_tokens: reply.usage.cache_read_input_tokens.unwrap_or(0),
        },
        slow_down: None,
    }
}

/// Classifies an error answer the way the official SDKs do.
pub(super) fn api_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> LlmError {
    let (error_type, message) = match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(parsed) => (parsed.error.kind, parsed.error.message),
        Err(_) => http::unparsed_error(status, body),
    };
    http::api_error(status, headers, error_type, message)
}

/// Reads `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`:
/// when any budget is nearly spent, how long until it resets.
fn slow_down(headers: &HeaderMap, now: OffsetDateTime) -> Option<Duration> {
    ["requests", "tokens", "input-tokens", "output-tokens"]
        .iter()
        .filter_map(|budget| {
            let number = |part: &str| {
                http::header_str(headers, &format!("anthropic-ratelimit-{budget}-{part}"))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            };
            if !http::nearly_spent(number("limit")?, number("remaining")?) {
                return None;
            }
            let reset = http::header_str(headers, &format!("anthropic-ratelimit-{budget}-reset"))
                .and_then(|v| OffsetDateTime::parse(v.trim(), &Rfc3339).ok())?;
            let wait = reset - now;
            wait.is_positive()
                .then(|| Duration::try_from(wait).ok())
                .flatten()
        })
        .max()
        .map(|wait| wait.min(MAX_PROVIDER_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_body(kind: &str) -> Vec<u8> {
        format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"m"}}}}"#).into_bytes()
    }

    #[test]
    fn retryable_statuses_follow_the_sdks() {
        for status in [408, 409, 429, 500, 502, 503, 504, 529] {
            let err = api_error(
                StatusCode::from_u16(status).expect("status"),
                &HeaderMap::new(),
                &error_body("x"),
            );
            assert_eq!(
                err.disposition,
                Disposition::Retry { retry_after: None },
                "{status}"
            );
        }
        for status in [400, 404, 413] {
            let err = api_error(
                StatusCode::from_u16(status).expect("status"),
                &HeaderMap::new(),
                &error_body("x"),
            );
            assert_eq!(err.disposition, Disposition::Permanent, "{status}");
        }
        for status in [401, 402, 403] {
            let err = api_error(
                StatusCode::from_u16(status).expect("status"),
                &HeaderMap::new(),
                &error_body("x"),
            );
            assert_eq!(err.disposition, Disposition::Configuration, "{status}");
        }
    }

    #[test]
    fn retry_after_headers_are_honoured() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("2"));
        let err = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            &headers,
            &error_body("rate_limit_error"),
        );
        assert_eq!(
            err.disposition,
            Disposition::Retry {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(err.error_type, "rate_limit_error");
        headers.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(
            http::retry_after(&headers),
            Some(Duration::from_millis(150))
        );
    }

    #[test]
    fn a_reset_far_away_or_unreadable_is_bounded_or_ignored() {
        let now = OffsetDateTime::parse("2026-12-03T09:00:00Z", &Rfc3339).expect("time");
        let spent = |reset: &'static str| {
            let mut headers = HeaderMap::new();
            for (name, value) in [
                ("anthropic-ratelimit-requests-limit", "100"),
                ("anthropic-ratelimit-requests-remaining", "1"),
                ("anthropic-ratelimit-requests-reset", reset),
            ] {
                headers.insert(name, HeaderValue::from_static(value));
            }
            slow_down(&headers, now)
        };
        assert_eq!(spent("2026-12-03T09:00:20Z"), Some(Duration::from_secs(20)));
        assert_eq!(spent("2026-12-04T09:00:00Z"), Some(MAX_PROVIDER_WAIT));
        assert_eq!(spent("9999-12-31T23:59:59Z"), Some(MAX_PROVIDER_WAIT));
        assert_eq!(spent("2026-12-03T08:59:00Z"), None);
        assert_eq!(spent("inf"), None);
        assert_eq!(spent("+999999-01-01T00:00:00Z"), None);
    }

    #[test]
    fn x_should_retry_overrides_the_status() {
        let mut headers = HeaderMap::new();
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
        let err = api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers,
            &error_body("api_error"),
        );
        assert_eq!(err.disposition, Disposition::Permanent);
        headers.insert("x-should-retry", HeaderValue::from_static("true"));
        let err = api_error(
            StatusCode::BAD_REQUEST,
            &headers,
            &error_body("invalid_request_error"),
        );
        assert_eq!(err.disposition, Disposition::Retry { retry_after: None });
    }
}
