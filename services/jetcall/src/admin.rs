//! The small HTTP surface every consuming service (generator, callback) serves on its
//! `listen` address: liveness, readiness and metrics.

use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;
use crate::metrics::ConsumerLag;

/// A service's metrics, rendered for `/metrics`.
pub trait Exposition: fmt::Debug + Send + Sync + 'static {
    /// The OpenMetrics text of the service's registry (see [`crate::metrics::render`]).
    fn render(&self) -> String;
}

/// What `/readyz` and `/metrics` read.
#[derive(Debug, Clone)]
pub struct Admin {
    client: async_nats::Client,
    lag: ConsumerLag,
    gate: Option<Gate>,
    metrics: Arc<dyn Exposition>,
}

impl Admin {
    /// `lag` is the service's durable consumer, registered in the registry `metrics` renders.
    pub fn new(client: async_nats::Client, lag: ConsumerLag, metrics: Arc<dyn Exposition>) -> Self {
        Self {
            client,
            lag,
            gate: None,
            metrics,
        }
    }

    /// Not ready while `gate` is closed: a paused service is alive but does no work, which is
    /// what an orchestrator should be told.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn router(self) -> Router {
        Router::new()
            .route(
                "/healthz",
                get(|| async { axum::Json(json!({"status": "ok"})) }),
            )
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self)
    }

    /// Serves the routes on `listener` until `shutdown` is cancelled.
    pub fn spawn(self, listener: TcpListener, shutdown: CancellationToken) -> Running {
        let client = self.client.clone();
        let served = tokio::spawn(
            axum::serve(listener, self.router())
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .into_future(),
        );
        Running { client, served }
    }
}

/// The admin server of a service that is running.
#[derive(Debug)]
pub struct Running {
    client: async_nats::Client,
    served: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// The end of a consuming service's run, once its consume loop has returned: what the
    /// client still buffers is sent (the last acks are fire-and-forget publishes, lost if the
    /// connection goes first), and the admin server, stopped by the same shutdown, is waited
    /// for.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.client.flush().await;
        match self.served.await {
            Ok(served) => served,
            // It panicked or was cancelled; there is nothing more to wait for.
            Err(_) => Ok(()),
        }
    }
}

/// Ready when NATS is connected, the service's consumer answers, and (for a service with a
/// gate) consumption is not paused.
async fn readyz(State(admin): State<Admin>) -> Response {
    let connected = admin.client.connection_state() == async_nats::connection::State::Connected;
    let consumer = if connected {
        admin.lag.refresh().await
    } else {
        Err("NATS is not connected".to_owned())
    };
    let consuming = admin.gate.as_ref().is_none_or(Gate::is_open);
    let ready = connected && consumer.is_ok() && consuming;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "nats_connected": connected,
        "consumer": match &consumer {
            Ok(()) => "ok".to_owned(),
            Err(err) => format!("unreachable: {err}"),
        },
    });
    if admin.gate.is_some() {
        body["consumption"] = json!(if consuming { "running" } else { "paused" });
    }
    (status, axum::Json(body)).into_response()
}

/// The service's metrics, its consumer's lag refreshed first (one request; on failure the
/// last values are shown and the scrape still succeeds).
async fn metrics(State(admin): State<Admin>) -> Response {
    if let Err(err) = admin.lag.refresh().await {
        tracing::debug!(error = %err, "consumer info for /metrics");
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        admin.metrics.render(),
    )
        .into_response()
}
