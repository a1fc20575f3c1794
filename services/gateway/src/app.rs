//! The gateway's router: which handler serves which route, behind which middleware.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};

use crate::error::ApiError;
use crate::middleware::{limit_in_flight, require_api_key, track};
use crate::routes::{
    cancel_job, cancel_jobs, generate_description, healthz, job_named_batch, job_named_cancel,
    job_status, metrics, readyz, redeliver_job, redeliver_window, submit_batch, submit_job, whoami,
};
use crate::state::AppState;
use crate::{budget, console, events, listing, openapi, overview};

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/generate-description", post(generate_description))
        .route("/api/v1/jobs", post(submit_job).get(listing::list_jobs))
        // The batch's own body limit; this inner layer wins over the router's. A GET here is
        // the status of a job whose id is `batch`, as `/api/v1/jobs/{job_id}` would give it.
        .route(
            "/api/v1/jobs/batch",
            post(submit_batch)
                .layer(DefaultBodyLimit::max(state.config.gateway.max_batch_bytes))
                .get(job_named_batch),
        )
        .route(
            "/api/v1/jobs/cancel",
            post(cancel_jobs)
                .layer(DefaultBodyLimit::max(state.config.gateway.max_batch_bytes))
                .get(job_named_cancel),
        )
        .route("/api/v1/jobs/{job_id}", get(job_status).delete(cancel_job))
        .route("/api/v1/jobs/{job_id}/events", get(events::job_events))
        .route("/api/v1/jobs/{job_id}/redeliver", post(redeliver_job))
        .route("/api/v1/deliveries/redeliver", post(redeliver_window))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/budget", get(budget::budget))
        .route("/api/v1/overview", get(overview::overview))
        .route_layer(from_fn_with_state(state.clone(), require_api_key))
        // Outermost, so a flood is turned away before any other work is done for it.
        .route_layer(from_fn_with_state(state.clone(), limit_in_flight));
    let console = if state.config.gateway.console {
        console::routes()
    } else {
        Router::new()
    };
    Router::new()
        .merge(api)
        .merge(console)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::serve))
        // Outside the API-key check, so refused requests are counted too.
        .route_layer(from_fn_with_state(state.clone(), track))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.config.gateway.max_body_bytes))
        .with_state(state)
}
