//! What every HTTP provider shares: the official SDKs' retry rules, their headers, and the
//! treatment of transport failures. OpenAI's SDKs follow the same rules as Anthropic's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use super::{Disposition, LlmError};

/// The longest a provider's rate-limit headers may hold every instance back at once; a reset
/// further away is re-read from the next answer instead.
pub const MAX_SLOW_DOWN: Duration = Duration::from_secs(60);

/// Calls one HTTP/2 connection is given. Servers commonly allow 100 or more concurrent streams;
/// beyond what a server allows, calls would queue on the connection.
const STREAMS_PER_CONNECTION: usize = 100;

/// HTTP clients to one provider, each with its own connections, taken in turn. Over HTTP/2 a
/// connection carries only as many calls as the server allows streams, so `concurrency` calls
/// are spread over enough clients; over HTTP/1.1 (a connection per call) it changes nothing.
#[derive(Debug, Clone)]
pub struct ClientPool {
    clients: Arc<[reqwest::Client]>,
    next: Arc<AtomicUsize>,
}

impl ClientPool {
    /// `h2c`: speak HTTP/2 to a plain-http server without negotiating it first (an `https`
    /// server negotiates HTTP/2 by itself).
    pub fn new(timeout: Duration, concurrency: usize, h2c: bool) -> Result<Self, reqwest::Error> {
        let clients = concurrency.div_ceil(STREAMS_PER_CONNECTION).max(1);
        let clients = (0..clients)
            .map(|_| {
                // Every retry is ours, counted against `generator.max_attempts`; reqwest's
                // own would also keep a copy of each request in flight (heaptrack: 3 MB at
                // 10,000 calls).
                let builder = reqwest::Client::builder()
                    .timeout(timeout)
                    .pool_max_idle_per_host(concurrency)
                    .retry(reqwest::retry::never().max_retries_per_request(0));
                let builder = if h2c {
                    builder.http2_prior_knowledge()
                } else {
                    builder
                };
                builder.build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            clients: clients.into(),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn client(&self) -> &reqwest::Client {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        &self.clients[turn % self.clients.len()]
    }
}

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
