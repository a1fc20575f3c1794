//! One webhook delivery attempt over HTTP, with the delivery-time SSRF checks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use time::OffsetDateTime;
use url::Url;

use jetcall::allowlist::{Allowlist, CallbackUrl};
use jetcall::config::{CallbackConfig, GatewayConfig};
use jetcall::retry::parse_retry_after;
use jetcall::signing::Signer;
use jetcall::ssrf::ForbiddenAddress;
use jetcall::status::DeliveryAttempt;
use jetcall::trace::{self, TraceParent};

/// How much of a receiver's answer is kept in the attempt log.
const EXCERPT_BYTES: usize = 256;

/// How an attempt ended, as far as what happens next is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again later; no sooner than `retry_after` if the receiver said so.
    Retry {
        retry_after: Option<Duration>,
    },
    /// Never try again: the receiver answered `410 Gone`, or the URL is not allowed.
    Stop(String),
}

/// Resolves callback hosts and refuses the name outright if any address it resolves to is
/// forbidden. reqwest connects only to addresses this returns, so the address checked is the
/// address used: a second, rebinding lookup cannot happen.
#[derive(Debug)]
struct CheckedResolver {
    allowlist: Arc<Allowlist>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allowlist = self.allowlist.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            for addr in &addrs {
                allowlist.check_address(addr.ip())?;
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
    allowlist: Arc<Allowlist>,
    /// Whose address and CIDR entries let a non-public address through
    /// (`GatewayConfig::address_exemptions`).
    exemptions: Arc<Allowlist>,
}

impl Sender {
    /// A sender for which `allowlist` both admits URLs and exempts the addresses it names: the
    /// rule when the API has no keys.
    pub fn new(config: &CallbackConfig, allowlist: Allowlist) -> Result<Self, reqwest::Error> {
        Self::with_exemptions(config, allowlist.clone(), allowlist)
    }

    /// A sender whose URLs pass `allowlist` and whose non-public addresses must be named in
    /// `exemptions`: one per tenant policy, since the check lives in the client's resolver.
    pub fn with_exemptions(
        config: &CallbackConfig,
        allowlist: Allowlist,
        exemptions: Allowlist,
    ) -> Result<Self, reqwest::Error> {
        let allowlist = Arc::new(allowlist);
        let exemptions = Arc::new(exemptions);
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            // A redirect could lead anywhere, including to an address we would refuse.
            .redirect(reqwest::redirect::Policy::none())
            // Every request a receiver sees is one attempt in the job's log: no retry hidden
            // inside the HTTP client.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver {
                allowlist: exemptions.clone(),
            }))
            .pool_max_idle_per_host(config.per_host_concurrency)
            .user_agent(concat!("jetcall-callback/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            allowlist,
            exemptions,
        })
    }

    /// Checks `url` against the allowlist as it is now (the configuration may have changed
    /// since the job was accepted), and an address written into it directly, which reqwest
    /// connects to without asking the resolver.
    fn check_url<'u>(&self, url: &'u CallbackUrl) -> Result<&'u Url, String> {
        self.allowlist
            .admits(url)
            .map_err(|err| format!("callback_url {err}"))?;
        self.exemptions
            .check_url_address(url)
            .map_err(|err| err.to_string())?;
        Ok(url.url())
    }

    /// POSTs `body` to `url`, signed for `webhook_id`, with `trace` as its W3C `traceparent`
    /// when given, and reports the attempt.
    pub async fn send(
        &self,
        url: &CallbackUrl,
        webhook_id: &str,
        body: &[u8],
        signer: &Signer,
        round: u32,
        trace: Option<&TraceParent>,
    ) -> (Verdict, DeliveryAttempt) {
        let at = OffsetDateTime::now_utc();
        let started = Instant::now();
        let mut attempt = DeliveryAttempt {
            at,
            duration_ms: 0,
            status_code: None,
            error_kind: None,
            error: None,
            response_excerpt: None,
            round,
        };
        let verdict = match self.check_url(url) {
            Err(reason) => {
                attempt.error_kind = Some("refused".into());
                attempt.error = Some(reason.clone());
                Verdict::Stop(reason)
            }
            Ok(url) => {
                let timestamp = at.unix_timestamp();
                let mut request = self
                    .http
                    .post(url.clone())
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .header("webhook-id", webhook_id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header(
                        "webhook-signature",
                        signer.signature(webhook_id, timestamp, body),
                    );
                if let Some(trace) = trace {
                    request = request.header(trace::HEADER, trace.to_string());
                }
                Self::post(request.body(body.to_vec()), &mut attempt).await
            }
        };
        attempt.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        (verdict, attempt)
    }

    /// Sends the signed `request` and reads what the receiver's answer means.
    async fn post(request: reqwest::RequestBuilder, attempt: &mut DeliveryAttempt) -> Verdict {
        let result = request.send().await;
        let mut response = match result {
            Ok(response) => response,
            Err(err) => {
                if let Some(forbidden) = forbidden_address(&err) {
                    let reason = forbidden.to_string();
                    attempt.error_kind = Some("refused".into());
                    attempt.error = Some(reason.clone());
                    return Verdict::Stop(reason);
                }
                let kind = if err.is_timeout() {
                    "timeout"
                } else if err.is_connect() {
                    "connect"
                } else {
                    "request"
                };
                attempt.error_kind = Some(kind.into());
                attempt.error = Some(error_chain(err));
                return Verdict::Retry { retry_after: None };
            }
        };
        let status = response.status();
        attempt.status_code = Some(status.as_u16());
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        // Only the first chunk is read: a receiver cannot make us buffer a large answer.
        if let Ok(Some(chunk)) = response.chunk().await {
            let excerpt = excerpt(&chunk);
            attempt.response_excerpt = (!excerpt.is_empty()).then_some(excerpt);
        }
        if status.is_success() {
            return Verdict::Delivered;
        }
        attempt.error_kind = Some("http_status".into());
        attempt.error = Some(format!("HTTP {status}"));
        if status == reqwest::StatusCode::GONE {
            Verdict::Stop("the receiver answered 410 Gone".into())
        } else {
            Verdict::Retry { retry_after }
        }
    }
}

/// A sender for each tenant policy: which non-public addresses a job may reach depends on the
/// key that submitted it (`GatewayConfig::address_exemptions`).
#[derive(Debug)]
pub struct Senders {
    /// Tenants whose key has an allowlist of its own, so exemptions of its own.
    by_tenant: HashMap<String, Sender>,
    /// Everyone else: without keys the one tenant, with the gateway's exemptions; with keys,
    /// keys without a list of their own (and tenants no key names any more), with none.
    others: Sender,
}

impl Senders {
    pub fn new(config: &CallbackConfig, gateway: &GatewayConfig) -> Result<Self, reqwest::Error> {
        let allowlist = &gateway.callback_allowlist;
        let exemptions_of = |tenant: Option<&str>| {
            gateway
                .address_exemptions(tenant)
                .cloned()
                .unwrap_or_default()
        };
        let mut by_tenant = HashMap::new();
        for (index, key) in gateway.api_keys.iter().enumerate() {
            let tenant = key.tenant(index);
            if key.callback_allowlist().is_some() && !by_tenant.contains_key(&tenant) {
                let exemptions = exemptions_of(Some(&tenant));
                let sender = Sender::with_exemptions(config, allowlist.clone(), exemptions)?;
                by_tenant.insert(tenant, sender);
            }
        }
        let others = Sender::with_exemptions(config, allowlist.clone(), exemptions_of(None))?;
        Ok(Self { by_tenant, others })
    }

    pub fn for_tenant(&self, tenant: Option<&str>) -> &Sender {
        tenant
            .and_then(|tenant| self.by_tenant.get(tenant))
            .unwrap_or(&self.others)
    }
}

/// The refusal our resolver raised, if that is why the request failed.
fn forbidden_address(err: &reqwest::Error) -> Option<ForbiddenAddress> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(forbidden) = current.downcast_ref::<ForbiddenAddress>() {
            return Some(*forbidden);
        }
        source = current.source();
    }
    None
}

/// reqwest's own message is often just "error sending request"; the cause is further down.
/// Without the URL, which reqwest puts in its message: its query or userinfo may be the
/// receiver's credential, and this text goes into the attempt log and the service's log.
fn error_chain(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of a receiver's answer on one line, for the attempt log.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
