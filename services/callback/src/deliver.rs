//! One webhook delivery attempt over HTTP.

use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, HeaderValue};
use time::OffsetDateTime;

use jetcall::signing::Signer;
use jetcall::status::DeliveryAttempt;

/// How much of a receiver's answer is kept in the attempt log.
const EXCERPT_BYTES: usize = 256;

/// How an attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again later.
    Retry,
    /// The receiver said never again (`410 Gone`).
    Stop,
}

#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
    signer: Signer,
}

impl Sender {
    pub fn new(
        signer: Signer,
        timeout: Duration,
        concurrency: usize,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // A redirect could lead to an address the allowlist never approved.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(concurrency)
            .user_agent(concat!("jetcall-callback/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, signer })
    }

    /// POSTs `body` to `url`, signed for `webhook_id`, and reports the attempt.
    pub async fn send(
        &self,
        url: &str,
        webhook_id: &str,
        body: &[u8],
    ) -> (Verdict, DeliveryAttempt) {
        let at = OffsetDateTime::now_utc();
        let timestamp = at.unix_timestamp();
        let started = Instant::now();
        let result = self
            .http
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                self.signer.signature(webhook_id, timestamp, body),
            )
            .body(body.to_vec())
            .send()
            .await;
        let (verdict, status_code, error) = match result {
            Ok(mut response) => {
                let status = response.status();
                let excerpt = match response.chunk().await {
                    Ok(Some(chunk)) => excerpt(&chunk),
                    _ => String::new(),
                };
                let verdict = if status.is_success() {
                    Verdict::Delivered
                } else if status == reqwest::StatusCode::GONE {
                    Verdict::Stop
                } else {
                    Verdict::Retry
                };
                let error = (!status.is_success()).then(|| {
                    let mut text = format!("HTTP {}", status.as_u16());
                    if !excerpt.is_empty() {
                        text.push_str(": ");
                        text.push_str(&excerpt);
                    }
                    text
                });
                (verdict, Some(status.as_u16()), error)
            }
            Err(err) => {
                let kind = if err.is_timeout() {
                    "timeout"
                } else if err.is_connect() {
                    "connection refused or unreachable"
                } else {
                    "request failed"
                };
                (Verdict::Retry, None, Some(format!("{kind}: {err}")))
            }
        };
        let attempt = DeliveryAttempt {
            at,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            status_code,
            error,
        };
        (verdict, attempt)
    }
}

/// The start of a receiver's answer on one line, for the attempt log.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
