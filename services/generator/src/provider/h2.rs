//! HTTP/2 to one API with the h2 crate: a fixed set of connections, each carrying up to
//! [`STREAMS_PER_CONNECTION`] calls, reopened when they close.
//!
//! A call in flight holds its h2 stream and the small futures here, nothing more. Pooled
//! reqwest clients held about 8 KB more per call (their pending request, hyper-util's boxed
//! futures), and hyper's own HTTP/2 client spawns a task of about 3 KB per request. With
//! 10,000 calls in flight the generator's peak RSS was 222 to 232 MiB through reqwest, up to
//! 200 MiB through hyper over TLS, and is about 145 MiB this way (`cargo xtask bench`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ::h2::client::{self, SendRequest};
use ::h2::{Reason, RecvStream};
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// Calls one connection is given. Servers commonly allow 100 or more concurrent streams; calls
/// beyond what a server allows wait on their connection.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// The largest answer body read; an LLM's JSON answer is far smaller.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// TCP keep-alive: after this long without traffic the kernel probes the peer, and again at
/// this interval, so a silently dropped connection does not hold its calls until their
/// timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Unanswered probes before the kernel gives the connection up: about 80 s in all.
const KEEP_ALIVE_PROBES: u32 = 3;

/// Flow-control windows we grant the server, as hyper's defaults: an allowance, not memory
/// set aside, so answers are not held back on their way to us.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

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
    #[error("HTTP/2: {0}")]
    Http2(#[from] ::h2::Error),
    /// The server did not process the call (it was never sent, or refused): safe to send
    /// again.
    #[error("refused unprocessed: {0}")]
    Unprocessed(::h2::Error),
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
    /// The host and port of `uri`, an absolute URL; `tls` for an `https` one, `None` for h2c.
    pub fn new(uri: &Uri, tls: Option<TlsConnector>) -> Option<Self> {
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let default_port = if tls.is_some() { 443 } else { 80 };
        Some(Self {
            host: host.to_owned(),
            port: uri.port_u16().unwrap_or(default_port),
            tls,
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

type Sender = SendRequest<Bytes>;

/// An open connection: its handle, whether it has closed, and a serial number that tells it
/// from the connection that may replace it in the same slot.
#[derive(Debug, Clone)]
struct Open {
    serial: u64,
    sender: Sender,
    closed: Arc<AtomicBool>,
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
                match self
                    .send(request(uri, headers, body.len()), body.clone())
                    .await
                {
                    Err(CallError::Unprocessed(err)) if tries < UNPROCESSED_TRIES => {
                        tracing::debug!(error = %err, "the LLM API did not take the call; sending it again");
                        tries += 1;
                    }
                    sent => break sent?,
                }
            };
            let (parts, mut stream) = response.into_parts();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body: read_body(&mut stream).await?,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(CallError::Timeout(self.timeout)))
    }

    async fn send(
        &self,
        request: Request<()>,
        body: Bytes,
    ) -> Result<Response<RecvStream>, CallError> {
        let (turn, open) = self.open_in_turn().await?;
        let sent = send_on(open.sender, request, body).await;
        let err = match sent {
            Ok(response) => return Ok(response),
            Err(Refusal::PerhapsProcessed(err)) => return Err(CallError::Http2(err)),
            Err(Refusal::Unprocessed(err)) => err,
        };
        // The connection takes no new calls: the next call in this slot opens another.
        let mut slot = self.slots[turn].lock().await;
        if slot.as_ref().is_some_and(|now| now.serial == open.serial) {
            *slot = None;
        }
        Err(CallError::Unprocessed(err))
    }

    /// The next connection in turn, opened first if it is not open. Calls that land on a
    /// connection being opened wait for it rather than opening their own.
    async fn open_in_turn(&self) -> Result<(usize, Open), CallError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[turn].lock().await;
        if let Some(open) = slot
            .as_ref()
            .filter(|open| !open.closed.load(Ordering::Relaxed))
        {
            return Ok((turn, open.clone()));
        }
        *slot = None;
        // Boxed: opening a connection (TLS included) takes kilobytes of state, which every
        // call in flight would otherwise carry.
        let (sender, closed) = Box::pin(self.connect()).await?;
        let open = Open {
            serial: self.opened.fetch_add(1, Ordering::Relaxed),
            sender,
            closed,
        };
        *slot = Some(open.clone());
        Ok((turn, open))
    }

    async fn connect(&self) -> Result<(Sender, Arc<AtomicBool>), CallError> {
        let target = &self.target;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| CallError::Connect {
                authority: target.authority(),
                source,
            })?;
        // Each call is a few small frames that should leave at once.
        let _ = tcp.set_nodelay(true);
        let keepalive = TcpKeepalive::new()
            .with_time(KEEP_ALIVE)
            .with_interval(KEEP_ALIVE)
            .with_retries(KEEP_ALIVE_PROBES);
        let _ = SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
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

fn request(uri: &Uri, headers: &HeaderMap, length: usize) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    request
}

/// Why a call failed, and whether the server can have processed it.
enum Refusal {
    PerhapsProcessed(::h2::Error),
    Unprocessed(::h2::Error),
}

/// Sends one call on a connection and waits for its answer's head.
async fn send_on(
    sender: Sender,
    request: Request<()>,
    body: Bytes,
) -> Result<Response<RecvStream>, Refusal> {
    // Until a stream is opened nothing has left: a connection closing or closed refuses here.
    let mut sender = sender.ready().await.map_err(Refusal::Unprocessed)?;
    let (response, mut stream) = sender
        .send_request(request, body.is_empty())
        .map_err(Refusal::Unprocessed)?;
    drop(sender);
    let refusal = |err: ::h2::Error| {
        if unprocessed(&err) {
            Refusal::Unprocessed(err)
        } else {
            Refusal::PerhapsProcessed(err)
        }
    };
    if !body.is_empty() {
        // A body of a few kilobytes, already in memory: h2 sends it as the server's window
        // allows.
        stream.send_data(body, true).map_err(refusal)?;
    }
    response.await.map_err(refusal)
}

async fn read_body(stream: &mut RecvStream) -> Result<Bytes, CallError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk?;
        // Read at once, so the server may send as much again.
        let _ = stream.flow_control().release_capacity(chunk.len());
        if body.len() + chunk.len() > MAX_BODY {
            return Err(CallError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Whether the server says it did not process the call: it refused the stream, or it is
/// closing the connection gracefully (GOAWAY with NO_ERROR) and the call came after its last
/// stream. reqwest treats the same answers as safe to retry.
fn unprocessed(err: &::h2::Error) -> bool {
    let refused_stream = err.is_reset() && err.reason() == Some(Reason::REFUSED_STREAM);
    let graceful_close = err.is_go_away() && err.reason() == Some(Reason::NO_ERROR);
    err.is_remote() && (refused_stream || graceful_close)
}

async fn handshake<S>(io: S) -> Result<(Sender, Arc<AtomicBool>), CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let closing = closed.clone();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "HTTP/2 connection to the LLM closed");
        }
        closing.store(true, Ordering::Relaxed);
    });
    Ok((sender, closed))
}
