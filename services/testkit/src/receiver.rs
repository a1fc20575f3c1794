//! A webhook receiver on loopback that records every delivery and answers as scripted. It can
//! be stopped (connections are then refused) and started again on the same port, as a
//! receiver that goes down for a while. Given the signing secret ([`WebhookReceiver::verifying`])
//! it checks each delivery's Standard Webhooks signature as a customer would, and refuses a
//! bad one with 401: the receiver of `cargo xtask demo`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// Whether the signature verified, when the receiver checks them: `Err` says why not.
    pub signature: Option<Result<(), String>>,
}

impl Delivery {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

#[derive(Debug, Default)]
struct Inner {
    deliveries: Vec<Delivery>,
    /// Answers to give, in order, before the default 204.
    script: VecDeque<Reply>,
    /// How long each request is held, once recorded, before it is answered.
    delay: Duration,
    /// Each job's first attempts (told apart by `webhook-id`) get this status, after the
    /// script is used up: how many, and which status.
    fail_first: Option<(usize, u16)>,
    /// Requests seen so far per `webhook-id`, for `fail_first`.
    attempts_by_webhook: HashMap<String, usize>,
}

/// What the handler shares: the record, the verifier, and the count of deliveries for
/// waiters.
#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    verifier: Option<Verifier>,
    arrived: watch::Sender<usize>,
}

struct Verifier(standardwebhooks::Webhook);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

/// The server while it runs: the signal that stops it and its task.
#[derive(Debug)]
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Arc<Mutex<Option<Running>>>,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// `start`, verifying every delivery's signature with `signing_secret` (`whsec_...`):
    /// a good one is answered as scripted (204 by default), a bad one 401. Fails on an
    /// invalid secret.
    pub async fn verifying(signing_secret: &str) -> Result<Self, String> {
        let webhook = standardwebhooks::Webhook::new(signing_secret)
            .map_err(|err| format!("the webhook signing secret is invalid: {err}"))?;
        Ok(Self::start_with(Some(Verifier(webhook))).await)
    }

    async fn start_with(verifier: Option<Verifier>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook receiver");
        let addr = listener.local_addr().expect("local addr");
        let receiver = Self {
            addr,
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner::default()),
                verifier,
                arrived: watch::Sender::new(0),
            }),
            running: Arc::new(Mutex::new(None)),
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/{*path}", post(receive))
            .with_state(self.shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        let previous = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .replace(Running { stop, task });
        assert!(
            previous.is_none(),
            "the webhook receiver was already running"
        );
    }

    /// Stops listening and closes every connection once its request is answered: until
    /// `restart`, a delivery's connection is refused, as at a receiver that is down.
    pub async fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(Running { stop, task }) = running {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the webhook receiver closes its connections within 10 s")
                .expect("the webhook receiver's task");
        }
    }

    /// Listens again on the same port after `stop`, with everything recorded so far kept.
    pub async fn restart(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|err| {
                panic!("bind the webhook receiver again on {}: {err}", self.addr)
            });
        self.serve(listener);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A callback URL at this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Answer the next requests with these statuses, then 204 again.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.lock()
            .script
            .extend(statuses.iter().map(|status| Reply::status(*status)));
    }

    /// Answer the first `attempts` requests of each job (each `webhook-id`) with `status`,
    /// and its later ones 204: a receiver that fails every job's first tries and takes its
    /// retries. Scripted replies (`fail_next`, `reply_next`) still come first.
    pub fn fail_first_attempts_of_each_job(&self, attempts: usize, status: u16) {
        self.lock().fail_first = Some((attempts, status));
    }

    /// Hold every request this long, once recorded, before answering it: a receiver that
    /// takes its time, so deliveries are in flight when a test interrupts them.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Answer the next request with `reply`, after any already scripted.
    pub fn reply_next(&self, reply: Reply) {
        self.lock().script.push_back(reply);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }

    /// How many requests arrived so far, without copying them.
    pub fn count(&self) -> usize {
        self.lock().deliveries.len()
    }

    /// Waits until at least `count` deliveries arrived, copying none of them.
    pub async fn wait_for_count(&self, count: usize, timeout: Duration) {
        crate::wait_until(&format!("{count} webhook deliveries"), timeout, || async {
            (self.count() >= count).then_some(())
        })
        .await
    }

    /// Delivery number `n` (from 1), once it has arrived; waits as long as it takes.
    pub async fn arrival(&self, n: usize) -> Delivery {
        let mut arrived = self.shared.arrived.subscribe();
        let _ = arrived.wait_for(|count| *count >= n).await;
        self.lock().deliveries[n - 1].clone()
    }

    /// Waits until at least `count` deliveries arrived, and returns them all.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Delivery> {
        crate::wait_until(&format!("{count} webhook deliveries"), timeout, || async {
            let deliveries = self.deliveries();
            (deliveries.len() >= count).then_some(deliveries)
        })
        .await
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    let signature = shared.verifier.as_ref().map(|Verifier(webhook)| {
        webhook
            .verify(&body, &headers)
            .map_err(|error| error.to_string())
    });
    let forged = matches!(signature, Some(Err(_)));
    let (reply, delay) = {
        let mut inner = shared
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let webhook_id = headers
            .get("webhook-id")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        inner.deliveries.push(Delivery {
            headers,
            body,
            at,
            signature,
        });
        shared.arrived.send_replace(inner.deliveries.len());
        let seen = inner.attempts_by_webhook.entry(webhook_id).or_default();
        *seen += 1;
        let seen = *seen;
        let reply = inner.script.pop_front().or_else(|| {
            let (attempts, status) = inner.fail_first?;
            (seen <= attempts).then(|| Reply::status(status))
        });
        (reply, inner.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if forged {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(reply) = reply else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, format!("scripted {}", reply.status)).into_response();
    for (name, value) in reply.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;
    use standardwebhooks::Webhook;

    use super::WebhookReceiver;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    async fn post(url: &str, body: &'static str, headers: HeaderMap) -> reqwest::StatusCode {
        let response = reqwest::Client::new()
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .expect("the receiver answers");
        response.status()
    }

    fn signed_headers(secret: &str, body: &str) -> HeaderMap {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs();
        let timestamp = i64::try_from(timestamp).expect("a timestamp fits in i64");
        let signature = Webhook::new(secret)
            .expect("a valid secret")
            .sign("msg_1", timestamp, body.as_bytes())
            .expect("signing works");
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().expect("a header value"));
        headers.insert(
            "webhook-timestamp",
            timestamp.to_string().parse().expect("a header value"),
        );
        headers.insert(
            "webhook-signature",
            signature.parse().expect("a header value"),
        );
        headers
    }

    #[tokio::test]
    async fn a_verifying_receiver_accepts_a_good_signature_and_refuses_a_bad_one() {
        let receiver = WebhookReceiver::verifying(SECRET)
            .await
            .expect("the receiver starts");
        let url = receiver.url("/webhooks/description");
        let body = r#"{"job_id":"JOB-771"}"#;

        let good = signed_headers(SECRET, body);
        assert_eq!(post(&url, body, good).await, 204);
        let delivery = receiver.arrival(1).await;
        assert_eq!(delivery.signature, Some(Ok(())));
        assert_eq!(&delivery.body[..], body.as_bytes());

        let forged = signed_headers("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", body);
        assert_eq!(post(&url, body, forged).await, 401);
        let delivery = receiver.arrival(2).await;
        assert!(matches!(delivery.signature, Some(Err(_))));
    }

    #[tokio::test]
    async fn a_plain_receiver_checks_no_signature() {
        let receiver = WebhookReceiver::start().await;
        let status = post(&receiver.url("/hook"), "{}", HeaderMap::new()).await;
        assert_eq!(status, 204);
        assert_eq!(receiver.arrival(1).await.signature, None);
    }
}
