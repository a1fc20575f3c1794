//! A webhook receiver on loopback that records every delivery and answers as scripted. It can
//! be stopped (connections are then refused) and started again on the same port, as a
//! receiver that goes down for a while.

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
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
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

/// The server while it runs: the signal that stops it and its task.
#[derive(Debug)]
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    running: Arc<Mutex<Option<Running>>>,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook receiver");
        let addr = listener.local_addr().expect("local addr");
        let receiver = Self {
            addr,
            inner: Arc::new(Mutex::new(Inner::default())),
            running: Arc::new(Mutex::new(None)),
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/{*path}", post(receive))
            .with_state(self.inner.clone());
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
        self.inner
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

    /// Waits until at least `count` deliveries arrived, and returns them all.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Delivery> {
        crate::wait_until(&format!("{count} webhook deliveries"), timeout, || async {
            let deliveries = self.deliveries();
            (deliveries.len() >= count).then_some(deliveries)
        })
        .await
    }
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (reply, delay) = {
        let mut inner = inner
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
            at: Instant::now(),
        });
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
