//! HTTP/2 to one API through hyper's connection API: a fixed set of connections, each carrying
//! up to [`STREAMS_PER_CONNECTION`] calls, reopened when they close.
//!
//! A pooled reqwest client holds about 8 KB per call in flight (its pending request, hyper-util's
//! boxed pool checkout and request futures); a call here holds the h2 stream and hyper's small
//! response future, which is what keeps 10,000 calls in flight within the generator's memory
//! budget (`cargo xtask bench`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ::h2::Reason;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// Calls one connection is given. Servers commonly allow 100 or more concurrent streams; calls
/// beyond what a server allows wait on their connection.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// The largest answer body read; an LLM's JSON answer is far smaller.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// How often an idle-looking connection is pinged, and how long a ping may go unanswered
/// before the connection counts as dead: a silently dropped connection must not hold its
/// calls until their timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// How many times a call the server did not process is sent, in all, before it counts as a
/// connection error: connections closing one after another is a server in trouble.
const UNPROCESSED_TRIES: usize = 3;

/// What an API answered.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connecting to {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    #[error("TLS with {authority}: {source}")]
    Tls {
        authority: String,
        source: std::io::Error,
    },
    /// The server completed TLS without agreeing to HTTP/2.
    #[error("{authority} does not speak HTTP/2")]
    NotHttp2 { authority: String },
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The server refused the call before processing it: safe to send again.
    #[error("refused unprocessed: {0}")]
    Unprocessed(hyper::Error),
    #[error("the answer is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Where the connections go, and how.
#[derive(Clone)]
pub struct Target {
    host: String,
    port: u16,
    /// `None` for h2c: HTTP/2 on a plain TCP connection, known in advance to be spoken.
    tls: Option<TlsConnector>,
}

impl Target {
    /// `uri` must be absolute, `http` or `https`; `tls` is used for `https`.
    pub fn new(uri: &Uri, tls: TlsConnector) -> Option<Self> {
        let https = match uri.scheme_str()? {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        Some(Self {
            host: host.to_owned(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            tls: https.then_some(tls),
        })
    }

    fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("authority", &self.authority())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// An open connection: its handle, and a serial number that tells it from the connection
/// that may replace it in the same slot.
#[derive(Debug, Clone)]
struct Open {
    serial: u64,
    sender: Sender,
}

/// Connections to one API, taken in turn.
#[derive(Debug)]
pub struct Connections {
    target: Target,
    timeout: Duration,
    slots: Box<[Mutex<Option<Open>>]>,
    next: AtomicUsize,
    opened: AtomicU64,
}

impl Connections {
    /// Enough connections for `concurrency` calls; none is opened before its first call.
    pub fn new(target: Target, timeout: Duration, concurrency: usize) -> Arc<Self> {
        let count = concurrency.div_ceil(STREAMS_PER_CONNECTION).max(1);
        Arc::new(Self {
            target,
            timeout,
            slots: (0..count).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
        })
    }

    /// POSTs `body` to `uri` and reads the whole answer, all within the timeout. A call the
    /// server refused unprocessed (a connection closing gracefully, a refused stream) is sent
    /// again on a fresh connection, up to [`UNPROCESSED_TRIES`] times in all: it cannot be paid
    /// for twice, and it is no failure of the job.
    pub async fn post(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Answer, CallError> {
        let exchange = async {
            let mut tries = 1;
            let response = loop {
                match self.send(request(uri, headers, body.clone())).await {
                    Err(CallError::Unprocessed(err)) if tries < UNPROCESSED_TRIES => {
                        tracing::debug!(error = %err, "the LLM API did not take the call; sending it again");
                        tries += 1;
                    }
                    sent => break sent?,
                }
            };
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|err| match err.downcast::<hyper::Error>() {
                    Ok(err) => CallError::Http(*err),
                    Err(_) => CallError::TooLarge,
                })?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(CallError::Timeout(self.timeout)))
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, CallError> {
        let (turn, open) = self.open_in_turn().await?;
        let serial = open.serial;
        let response = {
            let mut sender = open.sender;
            // The call's stream lives in the connection; the sender is only a handle to it.
            sender.try_send_request(request)
        };
        let mut refused = match response.await {
            Ok(response) => return Ok(response),
            Err(refused) => refused,
        };
        // Handed back: it never left (the connection closed while it waited to go out).
        let never_sent = refused.take_message().is_some();
        let err = refused.into_error();
        if !never_sent && !unprocessed(&err) {
            return Err(CallError::Http(err));
        }
        // The connection takes no new calls: the next call in this slot opens another.
        let mut slot = self.slots[turn].lock().await;
        if slot.as_ref().is_some_and(|open| open.serial == serial) {
            *slot = None;
        }
        Err(CallError::Unprocessed(err))
    }

    /// The next connection in turn, opened first if it is not open. Calls that land on a
    /// connection being opened wait for it rather than opening their own.
    async fn open_in_turn(&self) -> Result<(usize, Open), CallError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[turn].lock().await;
        if let Some(open) = slot.as_ref().filter(|open| !open.sender.is_closed()) {
            return Ok((turn, open.clone()));
        }
        *slot = None;
        // Boxed: opening a connection (TLS included) takes kilobytes of state, which every
        // call in flight would otherwise carry.
        let sender = Box::pin(self.connect()).await?;
        let open = Open {
            serial: self.opened.fetch_add(1, Ordering::Relaxed),
            sender,
        };
        *slot = Some(open.clone());
        Ok((turn, open))
    }

    async fn connect(&self) -> Result<Sender, CallError> {
        let target = &self.target;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| CallError::Connect {
                authority: target.authority(),
                source,
            })?;
        // Each call is a few small frames that should leave at once.
        let _ = tcp.set_nodelay(true);
        match &target.tls {
            None => handshake(tcp).await,
            Some(tls) => {
                let name =
                    ServerName::try_from(target.host.clone()).map_err(|err| CallError::Tls {
                        authority: target.authority(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, err),
                    })?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|source| CallError::Tls {
                        authority: target.authority(),
                        source,
                    })?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(CallError::NotHttp2 {
                        authority: target.authority(),
                    });
                }
                handshake(stream).await
            }
        }
    }
}

fn request(uri: &Uri, headers: &HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    request
}

/// Whether the server says it did not process the call: it refused the stream, or it is
/// closing the connection gracefully (GOAWAY with NO_ERROR) and the call came after its last
/// stream. reqwest treats the same answers as safe to retry.
fn unprocessed(err: &hyper::Error) -> bool {
    let Some(h2) =
        std::error::Error::source(err).and_then(|cause| cause.downcast_ref::<::h2::Error>())
    else {
        return false;
    };
    let refused_stream = h2.is_reset() && h2.reason() == Some(Reason::REFUSED_STREAM);
    let graceful_close = h2.is_go_away() && h2.reason() == Some(Reason::NO_ERROR);
    h2.is_remote() && (refused_stream || graceful_close)
}

async fn handshake<S>(io: S) -> Result<Sender, CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "HTTP/2 connection to the LLM closed");
        }
    });
    Ok(sender)
}
