//! What every HTTP provider shares: the way to its API ([`Transport`]), the official SDKs'
//! retry rules, their headers, and the treatment of transport failures. OpenAI's SDKs follow
//! the same rules as Anthropic's.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use ::http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use ::http::{StatusCode, Uri};
use bytes::Bytes;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::h2::{self, Answer};
use super::{Disposition, LlmError, MAX_PROVIDER_WAIT, ProviderSetupError};

/// A provider's way to its API endpoint.
///
/// HTTP/2 goes through [`h2::Connections`]: to an `https` API (which negotiates it) and to a
/// plain-`http` one configured to speak it (h2c). Everything else goes through reqwest: HTTP/1.1,
/// an `https` server that declines HTTP/2, and any API reached through a proxy named in the
/// environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`), which only reqwest follows.
#[derive(Debug, Clone)]
pub struct Transport(Arc<Route>);

#[derive(Debug)]
struct Route {
    url: String,
    uri: Uri,
    direct: Option<Arc<h2::Connections>>,
    /// Set once the `https` server declines HTTP/2; every later call goes through `pooled`.
    declined: AtomicBool,
    pooled: ClientPool,
}

/// How a provider reaches its API.
#[derive(Debug, Clone)]
pub struct Settings<'a> {
    /// The endpoint every call is POSTed to.
    pub url: String,
    /// For one whole call, answer included.
    pub timeout: Duration,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Speak HTTP/2 to a plain-`http` URL without negotiating it first.
    pub h2c: bool,
    /// CA certificates (PEM) trusted besides the Mozilla roots.
    pub tls_ca: Option<&'a Path>,
}

impl Transport {
    pub fn new(settings: Settings<'_>) -> Result<Self, TransportError> {
        let Settings {
            url,
            timeout,
            concurrency,
            h2c,
            tls_ca,
        } = settings;
        let extra_roots = match tls_ca {
            Some(path) => std::fs::read(path)
                .map_err(|err| TransportError::Ca(format!("reading {}: {err}", path.display())))?,
            None => Vec::new(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|err| TransportError::Url(format!("{url}: {err}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(TransportError::Url(format!("{url}: not an http(s) URL"))),
        };
        let direct = if (https || h2c) && !proxy_configured(https) {
            // TLS (its root store of some 150 CAs) only for an `https` API.
            let tls = https.then(|| tls_connector(&extra_roots)).transpose()?;
            let target = h2::Target::new(&uri, tls)
                .ok_or_else(|| TransportError::Url(format!("{url}: no host")))?;
            Some(h2::Connections::new(target, timeout, concurrency))
        } else {
            None
        };
        // As a fallback, one client: calls reach it over HTTP/1.1, a connection each.
        let clients = if direct.is_some() {
            1
        } else {
            concurrency.div_ceil(h2::STREAMS_PER_CONNECTION)
        };
        let pooled = ClientPool::new(
            timeout,
            clients,
            concurrency,
            h2c && direct.is_none(),
            &extra_roots,
        )?;
        Ok(Self(Arc::new(Route {
            url,
            uri,
            direct,
            declined: AtomicBool::new(false),
            pooled,
        })))
    }

    /// POSTs `body` (JSON) with `headers`, and reads the whole answer.
    pub async fn post(&self, headers: &HeaderMap, body: Vec<u8>) -> Result<Answer, LlmError> {
        let route = &*self.0;
        let body = Bytes::from(body);
        if let Some(direct) = route.direct.as_ref()
            && !route.declined.load(Ordering::Relaxed)
        {
            match direct.post(&route.uri, headers, body.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(h2::CallError::NotHttp2 { authority }) => {
                    if !route.declined.swap(true, Ordering::Relaxed) {
                        tracing::info!(%authority, "the LLM API declined HTTP/2; using HTTP/1.1");
                    }
                }
                Err(err) => return Err(call_error(err)),
            }
        }
        Box::pin(route.pooled.post(&route.url, headers, body)).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid API URL {0}")]
    Url(String),
    #[error("TLS set-up: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    #[error("the trusted CA file: {0}")]
    Ca(String),
    #[error("could not build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Whether reqwest would send calls to an API with this scheme through a proxy.
fn proxy_configured(https: bool) -> bool {
    let names: &[&str] = if https {
        &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
    };
    names
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// TLS as reqwest's is configured (ring, the Mozilla roots, plus `extra_roots` in PEM),
/// offering HTTP/2 first.
fn tls_connector(extra_roots: &[u8]) -> Result<TlsConnector, TransportError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if !extra_roots.is_empty() {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(extra_roots) {
            let cert = cert.map_err(|err| TransportError::Ca(err.to_string()))?;
            roots.add(cert)?;
            added += 1;
        }
        if added == 0 {
            return Err(TransportError::Ca("it holds no PEM certificate".into()));
        }
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

fn call_error(err: h2::CallError) -> LlmError {
    let error_type = match err {
        h2::CallError::Timeout(_) => "timeout",
        _ => "connection_error",
    };
    LlmError::new(
        Disposition::Retry { retry_after: None },
        error_type,
        err.to_string(),
    )
}

/// reqwest clients to one API, each with its own connections, taken in turn. Over HTTP/2 a
/// connection carries only as many calls as the server allows streams, so `concurrency` calls
/// are spread over enough clients; over HTTP/1.1 (a connection per call) one would do.
#[derive(Debug, Clone)]
struct ClientPool {
    clients: Arc<[reqwest::Client]>,
    next: Arc<AtomicUsize>,
}

impl ClientPool {
    fn new(
        timeout: Duration,
        clients: usize,
        concurrency: usize,
        h2c: bool,
        extra_roots: &[u8],
    ) -> Result<Self, reqwest::Error> {
        let extra_roots = if extra_roots.is_empty() {
            Vec::new()
        } else {
            reqwest::Certificate::from_pem_bundle(extra_roots)?
        };
        let clients = (0..clients.max(1))
            .map(|_| {
                // Every retry is ours, counted against `generator.max_attempts`; reqwest's
                // own would also keep a copy of each request in flight (heaptrack: 3 MB at
                // 10,000 calls).
                let builder = reqwest::Client::builder()
                    .timeout(timeout)
                    .pool_max_idle_per_host(concurrency)
                    .retry(reqwest::retry::never().max_retries_per_request(0));
                let builder = extra_roots.iter().fold(builder, |builder, cert| {
                    builder.add_root_certificate(cert.clone())
                });
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

    fn client(&self) -> &reqwest::Client {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        &self.clients[turn % self.clients.len()]
    }

    async fn post(&self, url: &str, headers: &HeaderMap, body: Bytes) -> Result<Answer, LlmError> {
        let response = self
            .client()
            .post(url)
            .headers(headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(transport_error)?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

/// A header value that carries a secret, kept out of debug output.
pub fn secret_header(secret: &str) -> Result<HeaderValue, ProviderSetupError> {
    let mut value = HeaderValue::from_str(secret).map_err(|_| ProviderSetupError::InvalidApiKey)?;
    value.set_sensitive(true);
    Ok(value)
}

/// A request body as JSON.
pub fn json(body: &impl serde::Serialize) -> Result<Vec<u8>, LlmError> {
    serde_json::to_vec(body)
        .map_err(|err| LlmError::new(Disposition::Permanent, "invalid_request", err.to_string()))
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

/// The most of a provider's error `type` and `message` kept. They come from whatever answered
/// (the provider, or a proxy in front of it, up to the 16 MiB an answer may be) and are
/// stored: in the job's `generations` on every retry, in its `error`, in a paused instance's
/// gate report, in logs and in the errors metric's label.
const MAX_ERROR_TYPE_CHARS: usize = 64;
const MAX_ERROR_MESSAGE_CHARS: usize = 500;

fn bounded(text: String, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Classifies an error answer the way the official SDKs do: `x-should-retry` first, then
/// 408/409/429/5xx retry and the rest do not; 401-403 are our configuration, not the job.
pub fn api_error(
    status: StatusCode,
    headers: &HeaderMap,
    error_type: String,
    message: String,
) -> LlmError {
    let error_type = bounded(error_type, MAX_ERROR_TYPE_CHARS);
    let message = bounded(message, MAX_ERROR_MESSAGE_CHARS);
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

/// How long the provider asks us to wait before the next call: `retry-after-ms`, else
/// `retry-after` in seconds or as an HTTP-date; at most [`MAX_PROVIDER_WAIT`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, SystemTime::now())
}

/// [`retry_after`] with the clock given. The headers are the provider's word, not to be
/// trusted with our time: what is no finite wait of zero or more (`inf`, `NaN`, `1e400`,
/// `-5`, text) is ignored, leaving the SDKs' backoff, and a longer wait is cut to the bound.
fn retry_after_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let millis = header_str(headers, "retry-after-ms").and_then(|ms| bounded_wait(ms, 1000.0));
    if millis.is_some() {
        return millis;
    }
    let value = header_str(headers, "retry-after")?;
    bounded_wait(value, 1.0).or_else(|| {
        jetcall::retry::parse_retry_after(value, now).map(|wait| wait.min(MAX_PROVIDER_WAIT))
    })
}

/// A number of `units_per_second` as a wait of at most [`MAX_PROVIDER_WAIT`]; `None` unless it
/// is a finite number of zero or more. Bounded before it becomes a `Duration`, which panics
/// on what it cannot hold.
fn bounded_wait(text: &str, units_per_second: f64) -> Option<Duration> {
    let seconds = text.trim().parse::<f64>().ok()? / units_per_second;
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| Duration::from_secs_f64(seconds.min(MAX_PROVIDER_WAIT.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::MAX_PROVIDER_WAIT;

    #[test]
    fn an_error_answer_s_type_and_message_are_kept_bounded() {
        let huge = "é".repeat(100_000);
        let err = api_error(
            StatusCode::from_u16(529).expect("status"),
            &HeaderMap::new(),
            huge.clone(),
            huge,
        );
        assert_eq!(err.error_type.chars().count(), MAX_ERROR_TYPE_CHARS + 1);
        assert!(err.error_type.ends_with('…'));
        // The message, then " (HTTP 529)".
        assert!(
            err.message.chars().count() <= MAX_ERROR_MESSAGE_CHARS + 20,
            "{}",
            err.message.len()
        );
        assert!(
            err.message.ends_with("… (HTTP 529)"),
            "{}",
            &err.message[err.message.len() - 20..]
        );
        let short = api_error(
            StatusCode::from_u16(529).expect("status"),
            &HeaderMap::new(),
            "overloaded_error".into(),
            "Overloaded".into(),
        );
        assert_eq!(
            (short.error_type.as_str(), short.message.as_str()),
            ("overloaded_error", "Overloaded (HTTP 529)")
        );
    }

    /// Each of 10,000 calls in flight holds this future: opening a connection (TLS state) and
    /// the reqwest fallback are boxed so that neither sizes it (unboxed, it was 8.7 KB).
    #[test]
    fn a_call_in_flight_holds_a_small_future() {
        let transport = Transport::new(Settings {
            url: "https://api.example.com/v1/messages".into(),
            timeout: Duration::from_secs(1),
            concurrency: 10,
            h2c: false,
            tls_ca: None,
        })
        .expect("transport");
        let headers = HeaderMap::new();
        let call = transport.post(&headers, Vec::new());
        let size = std::mem::size_of_val(&call);
        assert!(size <= 2048, "a call's future is {size} bytes");
    }

    fn retry_after_of(name: &'static str, value: &'static str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        retry_after(&headers)
    }

    #[test]
    fn a_retry_after_that_is_no_finite_wait_is_ignored() {
        for value in [
            "inf", "-inf", "infinity", "NaN", "1e400", "-5", "-0.5", "soon", "",
        ] {
            assert_eq!(
                retry_after_of("retry-after", value),
                None,
                "retry-after: {value}"
            );
            assert_eq!(
                retry_after_of("retry-after-ms", value),
                None,
                "retry-after-ms: {value}"
            );
        }
    }

    #[test]
    fn a_retry_after_is_capped_at_the_documented_minute() {
        assert_eq!(
            retry_after_of("retry-after", "86400"),
            Some(MAX_PROVIDER_WAIT)
        );
        assert_eq!(
            retry_after_of("retry-after", "18446744073709551616"),
            Some(MAX_PROVIDER_WAIT)
        );
        assert_eq!(
            retry_after_of("retry-after-ms", "1e300"),
            Some(MAX_PROVIDER_WAIT)
        );
        assert_eq!(
            retry_after_of("retry-after-ms", "9223372036854775807"),
            Some(MAX_PROVIDER_WAIT)
        );
        assert_eq!(
            retry_after_of("retry-after", "2.5"),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(retry_after_of("retry-after", "0"), Some(Duration::ZERO));
    }

    #[test]
    fn an_http_date_retry_after_is_honoured_within_the_bound() {
        // RFC 9110's example date, 784111777 s after the epoch.
        let mut headers = HeaderMap::new();
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        let at = |unix: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(unix);
        assert_eq!(
            retry_after_at(&headers, at(784_111_777 - 30)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after_at(&headers, at(784_111_777 - 86_400)),
            Some(MAX_PROVIDER_WAIT)
        );
        assert_eq!(
            retry_after_at(&headers, at(784_111_777 + 5)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("jetcall-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = dir.join("empty.pem");
        std::fs::write(&ca, "not a certificate\n").expect("write");
        let refused = Transport::new(Settings {
            url: "https://api.example.com/v1/messages".into(),
            timeout: Duration::from_secs(1),
            concurrency: 1,
            h2c: false,
            tls_ca: Some(&ca),
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(refused, Err(TransportError::Ca(_))), "{refused:?}");
    }
}
