//! Connecting to NATS and provisioning the topology, patiently.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::topology::{Provisioner, Topology, attach, provision};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid NATS URL `{url}` (nats.url / NATS_URL): {message}")]
    BadUrl { url: String, message: String },
    #[error("shut down before NATS became reachable")]
    Cancelled,
}

/// The connection settings from `nats.*` that any client of ours shares: the user and
/// password, and the CA for a `tls://` URL. A `tls://` URL needs nothing more: the client then
/// refuses a server that does not offer TLS.
pub fn options(config: &Config) -> async_nats::ConnectOptions {
    let mut options =
        async_nats::ConnectOptions::new().request_timeout(Some(config.nats.request_timeout));
    if let (Some(user), Some(password)) = (&config.nats.user, &config.nats.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(ca) = &config.nats.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    options
}

/// The servers named by `nats.url`: one URL, or several separated by commas (every node of a
/// cluster), which async-nats wants as a list (as one string it is a single, invalid URL).
pub fn servers(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|server| !server.is_empty())
        .collect()
}

/// Connects with unlimited reconnects, so a NATS restart is ridden over rather than fatal.
/// The first connection is also retried: a service may start before its server.
pub async fn connect(config: &Config, name: &str) -> Result<async_nats::Client, ConnectError> {
    options(config)
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                // A refused password, or a permissions violation: the NATS user lacks a right
                // this service needs (nats/accounts.conf).
                async_nats::Event::ServerError(error) => {
                    tracing::error!(%error, "the NATS server refused something")
                }
                other => tracing::debug!(event = %other, "NATS event"),
            }
        })
        .connect(servers(&config.nats.url))
        .await
        .map_err(|err| ConnectError::BadUrl {
            url: config.nats.url.clone(),
            message: err.to_string(),
        })
}

/// Every service's start: connected to NATS as `service`, with the topology provisioned (or
/// found), retrying until NATS answers; `None` if `shutdown` came first.
pub async fn start(
    config: &Config,
    service: Provisioner,
    shutdown: &CancellationToken,
) -> Result<Option<(async_nats::Client, Topology)>, ConnectError> {
    let client = connect(config, service.client_name()).await?;
    match provision_with_retry(&client, config, service, shutdown).await {
        Ok(topology) => Ok(Some((client, topology))),
        Err(ConnectError::Cancelled) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Provisions the topology (or, with `nats.provision = false`, finds it), retrying until NATS
/// answers or shutdown is requested.
pub async fn provision_with_retry(
    client: &async_nats::Client,
    config: &Config,
    by: Provisioner,
    shutdown: &CancellationToken,
) -> Result<Topology, ConnectError> {
    let mut wait = Duration::from_millis(250);
    loop {
        let found = if config.nats.provision {
            provision(client.clone(), config, by).await
        } else {
            attach(client.clone(), config).await
        };
        match found {
            Ok(topology) => return Ok(topology),
            Err(err) if config.nats.provision => {
                tracing::warn!(error = %err, retry_in = ?wait, "NATS topology not ready")
            }
            Err(err) => tracing::warn!(
                error = %err,
                retry_in = ?wait,
                "NATS topology not there yet: with nats.provision = false an operator creates it \
                 (`jetcall topology`)"
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(ConnectError::Cancelled),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::servers;

    #[test]
    fn a_comma_separated_url_names_every_server_of_a_cluster() {
        assert_eq!(
            servers("nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224"),
            [
                "nats://127.0.0.1:4222",
                "nats://127.0.0.1:4223",
                "nats://127.0.0.1:4224"
            ]
        );
        assert_eq!(servers("nats://127.0.0.1:4222"), ["nats://127.0.0.1:4222"]);
    }
}
