//! Connecting to NATS and provisioning the topology, patiently.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::topology::{Topology, provision};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid NATS URL `{url}` (nats.url / NATS_URL): {message}")]
    BadUrl { url: String, message: String },
    #[error("shut down before NATS became reachable")]
    Cancelled,
}

/// Connects with unlimited reconnects, so a NATS restart is ridden over rather than fatal.
/// The first connection is also retried: a service may start before its server.
pub async fn connect(config: &Config, name: &str) -> Result<async_nats::Client, ConnectError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .request_timeout(Some(config.nats.request_timeout))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        })
        .connect(config.nats.url.as_str())
        .await
        .map_err(|err| ConnectError::BadUrl {
            url: config.nats.url.clone(),
            message: err.to_string(),
        })
}

/// Provisions the topology, retrying until NATS answers or shutdown is requested.
pub async fn provision_with_retry(
    client: &async_nats::Client,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Topology, ConnectError> {
    let mut wait = Duration::from_millis(250);
    loop {
        match provision(client.clone(), config).await {
            Ok(topology) => return Ok(topology),
            Err(err) => tracing::warn!(error = %err, retry_in = ?wait, "NATS topology not ready"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(ConnectError::Cancelled),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}
