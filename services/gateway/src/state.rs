//! What every handler shares.

use std::ops::Deref;
use std::sync::Arc;

use jetcall::Config;
use jetcall::allowlist::Allowlist;
use jetcall::topology::Topology;

/// axum clones the state for every layer and handler a request passes through, so it is one
/// pointer: cloning the NATS handles themselves (each stream handle carries its whole info)
/// cost hundreds of allocations a request and most of the gateway's CPU.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub topology: Topology,
    pub allowlist: Allowlist,
    /// Seals a job's own signing secret (`callback.secrets_key`); `None` refuses such jobs.
    pub secrets_key: Option<jetcall::sealing::SecretsKey>,
    /// The configured API keys; empty when the API is open.
    pub keys: crate::keys::Keys,
    pub metrics: crate::metrics::Metrics,
    /// The console overview's feed of the stream and its cached counts.
    pub overviews: crate::overview::Overviews,
    /// API requests being served (`gateway.max_in_flight`).
    pub in_flight: crate::shed::Limit,
    /// Open job event streams (`gateway.max_event_streams`).
    pub event_streams: crate::shed::Limit,
    /// Open job event streams of each API key (`gateway.max_event_streams_per_key`).
    pub event_streams_per_key: crate::shed::PerKey,
    /// Cancelled when the gateway stops: event streams end then, or a graceful shutdown
    /// would wait on them for ever.
    pub shutdown: tokio_util::sync::CancellationToken,
}
