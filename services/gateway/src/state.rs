//! What every handler shares.

use std::sync::Arc;

use jetcall::Config;
use jetcall::allowlist::Allowlist;
use jetcall::topology::Topology;

#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub topology: Topology,
    pub allowlist: Arc<Allowlist>,
    /// SHA-256 digests of the configured API keys: compared instead of the keys themselves so
    /// the comparison takes the same time whatever the caller sends.
    pub api_key_digests: Arc<Vec<[u8; 32]>>,
    pub metrics: crate::metrics::Metrics,
    /// API requests being served (`gateway.max_in_flight`).
    pub in_flight: crate::shed::Limit,
    /// Open job event streams (`gateway.max_event_streams`).
    pub event_streams: crate::shed::Limit,
    /// Cancelled when the gateway stops: event streams end then, or a graceful shutdown
    /// would wait on them for ever.
    pub shutdown: tokio_util::sync::CancellationToken,
}
