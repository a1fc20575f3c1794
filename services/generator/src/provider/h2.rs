//! HTTP/2 to one API through hyper's connection API: a fixed set of connections, each carrying
//! up to [`STREAMS_PER_CONNECTION`] calls, reopened when they close.
//!
//! A pooled reqwest client holds about 8 KB per call in flight (its pending request, hyper-util's
//! boxed pool checkout and request futures); a call here holds the h2 stream and hyper's small
//! response future, which is what keeps 10,000 calls in flight within the generator's memory
//! budget (`cargo xtask bench`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode, Uri};
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

/// Connections to one API, taken in turn.
#[derive(Debug)]
pub struct Connections {
    target: Target,
    timeout: Duration,
    slots: Box<[Mutex<Option<Sender>>]>,
    next: AtomicUsize,
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
        })
    }

    /// Sends `request` and reads the whole answer, all within the timeout.
    pub async fn call(&self, request: Request<Full<Bytes>>) -> Result<Answer, CallError> {
        let exchange = async {
            let mut sender = self.sender().await?;
            let response = sender.send_request(request);
            // The call's stream lives in the connection; the sender is only a handle to it.
            drop(sender);
            let (parts, body) = response.await?.into_parts();
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

    /// The next connection in turn, opened first if it is not open. Calls that land on a
    /// connection being opened wait for it rather than opening their own.
    async fn sender(&self) -> Result<Sender, CallError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[turn].lock().await;
        if let Some(sender) = slot.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok(sender.clone());
        }
        *slot = None;
        // Boxed: opening a connection (TLS included) takes kilobytes of state, which every
        // call in flight would otherwise carry.
        let sender = Box::pin(self.connect()).await?;
        *slot = Some(sender.clone());
        Ok(sender)
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
