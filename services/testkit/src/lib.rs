//! Test support shared by every crate's integration tests: real servers on loopback, never
//! mocks of our own components. The remote LLM is the one thing faked, as an HTTP server that
//! speaks the real Anthropic Messages API wire format.

pub mod blackhole;
pub mod config;
pub mod fake_anthropic;
pub mod jobs;
pub mod nats;
pub mod procs;
pub mod receiver;
pub mod wait;

pub use blackhole::Blackhole;
pub use fake_anthropic::FakeAnthropic;
pub use nats::NatsServer;
pub use receiver::WebhookReceiver;
pub use wait::wait_until;

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
