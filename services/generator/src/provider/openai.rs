//! Any OpenAI-compatible Chat Completions API: `POST {base_url}/chat/completions`.
//! OpenAI itself, and local servers such as Ollama, vLLM and llama.cpp, which may need no key,
//! leave out `usage`, or answer with a looser error body.

use std::time::Duration;

use ::http::StatusCode;
use ::http::header::{AUTHORIZATION, HeaderMap};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use jetcall::config::LlmEndpointConfig;
use jetcall::events::Usage;

use super::{Disposition, Generation, GenerationRequest, LlmError, ProviderSetupError, http};

#[derive(Debug, Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: [ChatMessage<'a>; 2],
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Deserialize)]
struct ChatResponse {
    /// Some local servers leave it out; the model asked for stands in.
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<ApiUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Debug, Deserialize)]
struct ChoiceMessage {
    /// `null` when the model answered with a refusal or tool calls only.
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ApiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    /// OpenAI caches long prompts by itself and counts the tokens it read from the cache
    /// here, within `prompt_tokens`.
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct OpenAi {
    http: http::Transport,
    /// `authorization`, when a key is configured.
    headers: HeaderMap,
    default_model: String,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
}

impl OpenAi {
    pub fn new(config: &LlmEndpointConfig, concurrency: usize) -> Result<Self, ProviderSetupError> {
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let http = http::Transport::new(http::Settings {
            url,
            timeout: config.timeout,
            concurrency,
            h2c: config.http2,
            tls_ca: config.tls_ca.as_deref(),
        })?;
        let mut headers = HeaderMap::new();
        if let Some(key) = &config.api_key {
            let bearer = format!("Bearer {}", key.expose());
            headers.insert(AUTHORIZATION, http::secret_header(&bearer)?);
        }
        Ok(Self {
            http,
            headers,
            default_model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
        })
    }

    pub async fn generate(&self, request: GenerationRequest<'_>) -> Result<Generation, LlmError> {
        let model = request.spec.model.as_deref().unwrap_or(&self.default_model);
        let body = chat_request(request, model, request.prompt, self.temperature);
        let body = ChatRequest {
            max_tokens: request.max_tokens(self.max_tokens),
            ..body
        };
        let answer = self.http.post(&self.headers, http::json(&body)?).await?;
        let (status, headers) = (answer.status, answer.headers);
        if !status.is_success() {
            return Err(api_error(status, &headers, &answer.body));
        }
        let mut generation = parse_success(&answer.body, model)?;
        generation.slow_down = slow_down(&headers);
        Ok(generation)
    }
}

fn chat_request<'a>(
    request: GenerationRequest<'a>,
    model: &'a str,
    user: &'a str,
    temperature: Option<f64>,
) -> ChatRequest<'a> {
    ChatRequest {
        model,
        messages: [
            ChatMessage {
                role: "system",
                content: &request.spec.system,
            },
            ChatMessage {
                role: "user",
                content: user,
            },
        ],
        max_tokens: request.spec.max_tokens,
        temperature,
    }
}

/// A 2xx answer to a `Generation`, without `slow_down`, which comes from the headers.
fn parse_success(body: &[u8], requested_model: &str) -> Result<Generation, LlmError> {
    let invalid = |problem: String| {
        LlmError::new(
            Disposition::Retry { retry_after: None },
            "invalid_response",
            format!("the Chat Completions API answered with an unexpected body: {problem}"),
        )
    };
    let reply: ChatResponse =
        serde_json::from_slice(body).map_err(|err| invalid(err.to_string()))?;
    let choice = reply
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| invalid("no choices".into()))?;
    let usage = reply.usage.map_or_else(Usage::default, |usage| {
        let cached = usage
            .prompt_tokens_details
            .and_then(|details| details.cached_tokens)
            .unwrap_or(0)
            .min(usage.prompt_tokens);
        Usage {
            input_tokens: usage.prompt_tokens - cached,
            output_tokens: usage.completion_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: cached,
        }
    });
    Ok(Generation {
        text: choice.message.content.unwrap_or_default(),
        model: reply.model.unwrap_or_else(|| requested_model.to_owned()),
        usage,
        slow_down: None,
    })
}

/// `{"error": {"message", "type", "code", "param"}}`; `type` is null on some servers, so
/// `code` stands in for it, then `http_<status>`. A bare `{"error": "message"}` is read too.
fn api_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> LlmError {
    let parsed = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| match value.get("error")? {
            Value::Object(error) => {
                let text = |key: &str| match error.get(key) {
                    Some(Value::String(text)) if !text.is_empty() => Some(text.clone()),
                    Some(Value::Number(number)) => Some(number.to_string()),
                    _ => None,
                };
                Some((
                    text("type").or_else(|| text("code")),
                    text("message").unwrap_or_default(),
                ))
            }
            Value::String(message) => Some((None, message.clone())),
            _ => None,
        });
    let (error_type, message) = match parsed {
        Some((error_type, message)) => (
            error_type.unwrap_or_else(|| format!("http_{}", status.as_u16())),
            message,
        ),
        None => http::unparsed_error(status, body),
    };
    http::api_error(status, headers, error_type, message)
}

/// Reads `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`: when either budget is nearly
/// spent, how long until it resets.
fn slow_down(headers: &HeaderMap) -> Option<Duration> {
    ["requests", "tokens"]
        .iter()
        .filter_map(|budget| {
            let header =
                |part: &str| http::header_str(headers, &format!("x-ratelimit-{part}-{budget}"));
            let number = |part: &str| header(part).and_then(|v| v.trim().parse::<f64>().ok());
            if !http::nearly_spent(number("limit")?, number("remaining")?) {
                return None;
            }
            header("reset")
                .and_then(parse_go_duration)
                .filter(|wait| !wait.is_zero())
        })
        .max()
        .map(|wait| wait.min(super::MAX_PROVIDER_WAIT))
}

/// A Go `time.Duration` as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`,
/// `1m30.5s`; humantime reads them all, given Go's bare `0`.
fn parse_go_duration(text: &str) -> Option<Duration> {
    match text.trim() {
        "0" => Some(Duration::ZERO),
        text => humantime::parse_duration(text).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetcall::kinds::builtin_kinds;
    use reqwest::header::{HeaderName, HeaderValue};
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).expect("status")
    }

    #[test]
    fn the_request_has_a_system_and_a_user_message() {
        let kinds = builtin_kinds();
        let spec = &kinds["product-description"];
        let input = json!({"product_id": "P-1", "product_name": "Fan", "specs": "3 blades"});
        let input = input.as_object().expect("object");
        let user = spec.render(input, usize::MAX).expect("no bound");
        let request = GenerationRequest {
            spec,
            input,
            prompt: &user,
        };
        let body =
            serde_json::to_value(chat_request(request, "gpt-4o-mini", &user, None)).expect("JSON");
        assert_eq!(
            body,
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": spec.system},
                    {"role": "user", "content": user},
                ],
                "max_tokens": spec.max_tokens,
            })
        );
        assert!(user.contains("Fan"));
        let body =
            serde_json::to_value(chat_request(request, "m", &user, Some(0.2))).expect("JSON");
        assert_eq!(body["temperature"], json!(0.2));
    }

    #[test]
    fn a_completion_becomes_a_generation() {
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0}}
        });
        let generation = parse_success(body.to_string().as_bytes(), "gpt-4o-mini").expect("ok");
        assert_eq!(
            generation,
            Generation {
                text: "Hello".into(),
                model: "gpt-4o-mini-2024-07-18".into(),
                usage: Usage {
                    input_tokens: 4,
                    output_tokens: 3,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 8,
                },
                slow_down: None,
            }
        );
    }

    #[test]
    fn null_content_and_missing_usage_and_model_are_tolerated() {
        let body = json!({"choices": [{"message": {"role": "assistant", "content": null}}]});
        let generation = parse_success(body.to_string().as_bytes(), "llama3.2").expect("ok");
        assert_eq!(generation.text, "");
        assert_eq!(generation.model, "llama3.2");
        assert_eq!(generation.usage, Usage::default());
        let body =
            json!({"model": "m", "choices": [{"message": {"role": "assistant"}}], "usage": null});
        assert_eq!(
            parse_success(body.to_string().as_bytes(), "x")
                .expect("ok")
                .text,
            ""
        );
    }

    #[test]
    fn an_unexpected_success_body_is_retried() {
        for body in [&b"not json"[..], br#"{"model":"m","choices":[]}"#] {
            let err = parse_success(body, "m").expect_err("invalid");
            assert_eq!(err.error_type, "invalid_response");
            assert_eq!(err.disposition, Disposition::Retry { retry_after: None });
        }
    }

    #[test]
    fn errors_are_classified_like_the_sdks() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-x.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let err = api_error(status(401), &HeaderMap::new(), body);
        assert_eq!(err.disposition, Disposition::Configuration);
        assert_eq!(err.error_type, "invalid_request_error");
        assert!(err.message.starts_with("Incorrect API key provided"));

        let body = br#"{"error":{"message":"bad","type":"invalid_request_error","param":"messages","code":null}}"#;
        let err = api_error(status(400), &HeaderMap::new(), body);
        assert_eq!(err.disposition, Disposition::Permanent);

        let body = br#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#;
        for code in [500, 503] {
            let err = api_error(status(code), &HeaderMap::new(), body);
            assert_eq!(err.disposition, Disposition::Retry { retry_after: None });
            assert_eq!(err.error_type, "server_error");
            assert!(!err.rate_limited);
        }
    }

    #[test]
    fn a_429_is_rate_limited_and_honours_retry_after() {
        let body = br#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        let err = api_error(status(429), &headers(&[("retry-after", "1")]), body);
        assert!(err.rate_limited);
        assert_eq!(err.error_type, "requests");
        assert_eq!(
            err.disposition,
            Disposition::Retry {
                retry_after: Some(Duration::from_secs(1))
            }
        );
        let err = api_error(status(429), &headers(&[("retry-after-ms", "250")]), body);
        assert_eq!(
            err.disposition,
            Disposition::Retry {
                retry_after: Some(Duration::from_millis(250))
            }
        );
    }

    #[test]
    fn a_missing_type_falls_back_to_the_code_then_the_status() {
        let body =
            br#"{"error":{"message":"model not found","type":null,"code":"model_not_found"}}"#;
        let err = api_error(status(404), &HeaderMap::new(), body);
        assert_eq!(err.error_type, "model_not_found");
        assert_eq!(err.disposition, Disposition::Permanent);

        let body = br#"{"error":{"message":"boom","type":"","code":null}}"#;
        assert_eq!(
            api_error(status(500), &HeaderMap::new(), body).error_type,
            "http_500"
        );
        let body = br#"{"error":{"message":"bad","code":400}}"#;
        assert_eq!(
            api_error(status(400), &HeaderMap::new(), body).error_type,
            "400"
        );
        let body = br#"{"error":"model 'x' not found"}"#;
        let err = api_error(status(404), &HeaderMap::new(), body);
        assert_eq!(err.error_type, "http_404");
        assert!(err.message.starts_with("model 'x' not found"));
    }

    #[test]
    fn a_non_json_error_body_is_kept_as_an_excerpt() {
        let err = api_error(
            status(502),
            &HeaderMap::new(),
            b"<html>502 Bad Gateway</html>",
        );
        assert_eq!(err.error_type, "http_502");
        assert!(err.message.contains("502 Bad Gateway"));
        assert_eq!(err.disposition, Disposition::Retry { retry_after: None });
        let err = api_error(
            status(429),
            &headers(&[("retry-after", "3")]),
            b"Too Many Requests",
        );
        assert!(err.rate_limited);
        assert_eq!(
            err.disposition,
            Disposition::Retry {
                retry_after: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn go_durations_are_parsed() {
        let cases = [
            ("1s", Duration::from_secs(1)),
            ("20ms", Duration::from_millis(20)),
            ("6m0s", Duration::from_secs(360)),
            ("1m30.5s", Duration::from_millis(90_500)),
            ("1h2m3s", Duration::from_secs(3723)),
            ("0.5s", Duration::from_millis(500)),
            ("100us", Duration::from_micros(100)),
            ("7µs", Duration::from_micros(7)),
            ("0", Duration::ZERO),
            (" 2s ", Duration::from_secs(2)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_go_duration(text), Some(expected), "{text}");
        }
        for text in ["", "s", "5", "1x", "1.2.3s", "-1s", "1s2"] {
            assert_eq!(parse_go_duration(text), None, "{text}");
        }
    }

    #[test]
    fn slow_down_waits_for_a_nearly_spent_budget() {
        let plenty = headers(&[
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-limit-tokens", "200000"),
            ("x-ratelimit-remaining-tokens", "150000"),
            ("x-ratelimit-reset-tokens", "15s"),
        ]);
        assert_eq!(slow_down(&plenty), None);
        assert_eq!(slow_down(&HeaderMap::new()), None);

        let low_tokens = headers(&[
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-limit-tokens", "200000"),
            ("x-ratelimit-remaining-tokens", "10000"),
            ("x-ratelimit-reset-tokens", "1m30.5s"),
        ]);
        assert_eq!(
            slow_down(&low_tokens),
            Some(super::super::MAX_PROVIDER_WAIT)
        );

        let both_low = headers(&[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "2s"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "50"),
            ("x-ratelimit-reset-tokens", "800ms"),
        ]);
        assert_eq!(slow_down(&both_low), Some(Duration::from_secs(2)));

        let unreadable_reset = headers(&[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "1"),
            ("x-ratelimit-reset-requests", "soon"),
        ]);
        assert_eq!(slow_down(&unreadable_reset), None);

        for (reset, wait) in [
            ("876000h", Some(super::super::MAX_PROVIDER_WAIT)),
            ("99999999999999999999999h", None),
            ("inf", None),
            ("-5s", None),
        ] {
            let spent = HeaderMap::from_iter(
                [
                    ("x-ratelimit-limit-requests", "100"),
                    ("x-ratelimit-remaining-requests", "1"),
                    ("x-ratelimit-reset-requests", reset),
                ]
                .map(|(name, value)| {
                    (
                        HeaderName::from_static(name),
                        HeaderValue::from_static(value),
                    )
                }),
            );
            assert_eq!(slow_down(&spent), wait, "{reset}");
        }
    }
}
