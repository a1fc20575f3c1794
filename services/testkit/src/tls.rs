//! HTTPS for fake servers: a private CA, as a company gateway or a self-hosted model server
//! would have, and a certificate it signed for 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// What the server agrees to speak when the client offers HTTP/2 and HTTP/1.1 (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http2,
    /// As an older server or proxy: HTTP/1.1 only.
    Http1Only,
}

/// How an HTTPS fake serves its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    pub alpn: Alpn,
    /// Closes each connection gracefully (an HTTP/2 GOAWAY) once it has taken this many
    /// requests, as nginx does after `keepalive_requests`.
    pub requests_per_connection: Option<usize>,
}

impl Serving {
    pub fn http2() -> Self {
        Self {
            alpn: Alpn::Http2,
            requests_per_connection: None,
        }
    }

    pub fn http1_only() -> Self {
        Self {
            alpn: Alpn::Http1Only,
            requests_per_connection: None,
        }
    }

    pub fn closing_after(self, requests: usize) -> Self {
        Self {
            requests_per_connection: Some(requests),
            ..self
        }
    }
}

/// An HTTPS server's trust material; the CA's PEM file lives as long as this does.
#[derive(Debug)]
pub struct PrivateCa {
    dir: tempfile::TempDir,
}

impl PrivateCa {
    /// The CA certificate (PEM), for a client's `tls_ca` setting.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

/// Serves `app` over HTTPS on a free loopback port with a certificate from a new private CA.
pub async fn serve_tls(app: axum::Router, serving: Serving, what: &str) -> (SocketAddr, PrivateCa) {
    let (ca, config) = certificates(serving.alpn, what);
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("bind {what}: {err}"));
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that refuses our certificate ends here, as it should.
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve_connection(tls, app, serving.requests_per_connection).await;
                }
            });
        }
    });
    (addr, ca)
}

async fn serve_connection<S>(io: S, app: axum::Router, limit: Option<usize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let taken = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(Notify::new());
    let app = {
        let (taken, enough) = (taken.clone(), enough.clone());
        app.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                if Some(taken.fetch_add(1, Ordering::SeqCst) + 1) == limit {
                    enough.notify_one();
                }
                next.run(request)
            },
        ))
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = enough.notified() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

fn certificates(alpn: Alpn, what: &str) -> (PrivateCa, ServerConfig) {
    let fail = |step: &str, err: &dyn std::fmt::Display| -> ! { panic!("{what}: {step}: {err}") };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())
        .unwrap_or_else(|err| fail("CA parameters", &err));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Jetcall test CA");
    let ca_key = KeyPair::generate().unwrap_or_else(|err| fail("CA key", &err));
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)
        .unwrap_or_else(|err| fail("CA certificate", &err));

    let server_key = KeyPair::generate().unwrap_or_else(|err| fail("server key", &err));
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .and_then(|params| params.signed_by(&server_key, &ca))
        .unwrap_or_else(|err| fail("server certificate", &err));

    let dir = tempfile::tempdir().unwrap_or_else(|err| fail("temporary directory", &err));
    let ca_file: &Path = &dir.path().join("ca.pem");
    std::fs::write(ca_file, ca.pem()).unwrap_or_else(|err| fail("writing the CA", &err));

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(vec![server_cert.der().clone(), ca.der().clone()], key)
        })
        .unwrap_or_else(|err| fail("TLS configuration", &err));
    config.alpn_protocols = match alpn {
        Alpn::Http2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Alpn::Http1Only => vec![b"http/1.1".to_vec()],
    };
    (PrivateCa { dir }, config)
}
