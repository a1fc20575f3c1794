//! HTTPS for fake servers: a private CA, as a company gateway or a self-hosted model server
//! would have, and a certificate it signed for 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
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
pub async fn serve_tls(app: axum::Router, alpn: Alpn, what: &str) -> (SocketAddr, PrivateCa) {
    let (ca, config) = certificates(alpn, what);
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
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    (addr, ca)
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
