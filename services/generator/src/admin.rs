//! The generator's own small HTTP surface: liveness, readiness and metrics.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use jetcall::gate::Gate;

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct AdminState {
    pub client: async_nats::Client,
    pub gate: Gate,
    pub metrics: Metrics,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Ready when NATS is connected and the provider accepts our configuration: a paused
/// generator is alive but does no work, which is what an orchestrator should be told.
async fn readyz(State(state): State<AdminState>) -> Response {
    let connected = state.client.connection_state() == async_nats::connection::State::Connected;
    let provider_ok = state.gate.is_open();
    let ready = connected && provider_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "nats_connected": connected,
        "provider_configuration": if provider_ok { "ok" } else { "refused: consumption paused" },
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, jetcall::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}
