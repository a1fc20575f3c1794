//! What every HTTP provider shares: the official SDKs' retry rules, their headers, and the
//! treatment of transport failures. OpenAI's SDKs follow the same rules as Anthropic's.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use super::{Disposition, LlmError};

/// The longest a provider's rate-limit headers may hold every instance back at once; a reset
/// further away is re-read from the next answer instead.
pub const MAX_SLOW_DOWN: Duration = Duration::from_secs(60);

/// The lowest share of a rate-limit budget we spend before every instance waits for its reset.
const LOW_HEADROOM: f64 = 0.05;

/// Whether a budget the provider reports (`limit`, `remaining`) is nearly spent.
pub fn nearly_spent(limit: f64, remaining: f64) -> bool {
    limit > 0.0 && remaining <= limit * LOW_HEADROOM
}

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

pub fn transport_error(err: reqwest::Error) -> LlmError {
    let error_type = if err.is_timeout() {
        "timeout"
    } else {
        "connection_error"
    };
    LlmError::new(
        Disposition::Retry { retry_after: None },
        error_type,
        err.to_string(),
    )
}

/// The type and message for an error answer whose body is not the provider's error JSON.
pub fn unparsed_error(status: StatusCode, body: &[u8]) -> (String, String) {
    (
        format!("http_{}", status.as_u16()),
        String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    )
}

/// Classifies an error answer the way the official SDKs do: `x-should-retry` first, then
/// 408/409/429/5xx retry and the rest do not; 401-403 are our configuration, not the job.
pub fn api_error(
    status: StatusCode,
    headers: &HeaderMap,
    error_type: String,
    message: String,
) -> LlmError {
    let retry = || Disposition::Retry {
        retry_after: retry_after(headers),
    };
    let disposition = match status.as_u16() {
        401..=403 => Disposition::Configuration,
        _ => match should_retry_header(headers) {
            Some(true) => retry(),
            Some(false) => Disposition::Permanent,
            None if matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error() => {
                retry()
            }
            None => Disposition::Permanent,
        },
    };
    LlmError {
        rate_limited: status == StatusCode::TOO_MANY_REQUESTS,
        ..LlmError::new(
            disposition,
            error_type,
            format!("{} (HTTP {})", message, status.as_u16()),
        )
    }
}

fn should_retry_header(headers: &HeaderMap) -> Option<bool> {
    match header_str(headers, "x-should-retry")? {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// `retry-after-ms`, else `retry-after` in seconds; an HTTP-date is left to our own backoff.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) =
        header_str(headers, "retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok())
    {
        return (ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    header_str(headers, "retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|secs| *secs >= 0.0)
        .map(Duration::from_secs_f64)
}
