//! The gateway: the only door callers see. It validates a job, records it in the
//! `job_status` bucket, publishes it on `jobs.requested.<kind>` and answers `202` once
//! JetStream has stored it.

mod accept;
mod app;
mod batch;
mod budget;
mod cancel;
mod console;
mod error;
mod events;
mod extract;
mod feed;
mod input_schema;
mod keys;
mod listing;
mod metrics;
mod middleware;
mod openapi;
mod overview;
mod redeliver;
mod routes;
mod serve;
mod shed;
mod state;
mod submission;
mod sweep;
mod trace;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::connect::{ConnectError, start};
use jetcall::topology::Provisioner;

pub use error::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes in-flight
/// requests and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let Some((client, topology)) = start(&config, Provisioner::Gateway, &shutdown).await? else {
        return Ok(());
    };
    if config.gateway.api_keys.is_empty() {
        tracing::warn!(
            "gateway.api_keys is empty: the API accepts requests without authentication"
        );
    }
    // What callers may make the callback service reach: worth seeing at start, since it
    // decides which hosts and internal addresses a submission can point at.
    tracing::info!(
        callback_allowlist = ?config.gateway.callback_allowlist.written(),
        keys_with_own_allowlist = config
            .gateway
            .api_keys
            .iter()
            .filter(|key| key.callback_allowlist().is_some())
            .count(),
        "callback destinations allowed (`*`: any public address; loopback and private ones only where an entry names their address)"
    );
    let state = state::AppState::new(state::Shared {
        allowlist: config.gateway.callback_allowlist.clone(),
        secrets_key: config.callback.secrets_key.clone(),
        keys: keys::Keys::new(&config.gateway.api_keys),
        in_flight: shed::Limit::new(config.gateway.max_in_flight),
        event_streams: shed::Limit::new(config.gateway.max_event_streams),
        event_streams_per_key: shed::PerKey::new(config.gateway.max_event_streams_per_key),
        config,
        topology,
        metrics: metrics::Metrics::default(),
        overviews: overview::Overviews::default(),
        shutdown: shutdown.clone(),
    });
    // Jobs a gateway recorded but died before publishing: repaired while this one serves, at
    // start and every `gateway.sweep_interval`.
    let sweeping = tokio::spawn(sweep::periodically(state.clone(), shutdown.clone()));
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    let header_timeout = state.config.gateway.header_timeout;
    serve::serve(listener, app::router(state), header_timeout, shutdown).await;
    // The sweep hands its lease back before the connection goes.
    let _ = sweeping.await;
    // Make sure nothing we published is still sitting in the client's buffer.
    let _ = client.flush().await;
    tracing::info!("gateway stopped");
    Ok(())
}
