//! Test support shared by every crate's integration tests: real servers on loopback, never
//! mocks of our own components. The remote LLM is the one thing faked, as an HTTP server that
//! speaks the real wire format of the Anthropic Messages API (and its Message Batches API) or
//! of an OpenAI-compatible Chat Completions API.

pub mod blackhole;
pub mod browser;
pub mod closed_port;
pub mod config;
pub mod deployment;
pub mod fake_anthropic;
pub mod fake_batches;
pub mod fake_openai;
pub mod jobs;
pub mod llm_script;
pub mod metrics;
pub mod nats;
pub mod procs;
pub mod receiver;
pub mod service;
pub mod tls;
pub mod wait;

pub use blackhole::Blackhole;
pub use browser::Browser;
pub use closed_port::ClosedPort;
pub use deployment::{Deployment, Instance, Service};
pub use fake_anthropic::FakeAnthropic;
pub use fake_openai::FakeOpenAi;
pub use nats::{NatsCluster, NatsOptions, NatsServer};
pub use receiver::WebhookReceiver;
pub use service::{Launch, ServiceProcess, service_binary};
pub use wait::wait_until;

/// Serves `app` on a free loopback port for as long as the test runs; `what` names it if the
/// port cannot be had.
pub async fn serve(app: axum::Router, what: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("bind {what}: {err}"));
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A listener on a free loopback port, for a service's HTTP surface in a test.
pub fn loopback_listener() -> tokio::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    tokio::net::TcpListener::from_std(listener).expect("listener inside a Tokio runtime")
}

/// The Python `cargo xtask test` installs (a venv with nats-py), named by `JETCALL_PYTHON`:
/// the one interpreter the suite knows it has, rather than whatever `python3` a version
/// manager's shim resolves to. Its absence fails the test: a suite that silently skipped
/// what needs it would look green and prove nothing.
pub fn python() -> std::path::PathBuf {
    let path = std::env::var_os("JETCALL_PYTHON").unwrap_or_else(|| {
        panic!(
            "JETCALL_PYTHON is not set: run the suite with `cargo xtask test`, which installs \
             nats-py into target/tools/venv, or point it at a Python that has nats-py"
        )
    });
    let path = std::path::PathBuf::from(path);
    assert!(
        path.is_file(),
        "JETCALL_PYTHON={} does not exist: run `cargo xtask test` to install it",
        path.display()
    );
    path
}

/// A loopback port free at this moment, for a child process to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Quiet logs unless `TEST_LOG` is set, as in zero-to-production: failures stay readable.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
            ))
            .with_test_writer()
            .try_init();
    }
}
