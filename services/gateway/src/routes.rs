//! The HTTP routes.

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use sha2::{Digest, Sha256};

use jetcall::JobId;
use jetcall::status::JobStatus;

use crate::accept::{Accepted, accept};
use crate::batch::{self, BatchResult, SubmitBatch};
use crate::error::ApiError;
use crate::extract::{BatchBody, JsonBody};
use crate::metrics;
use crate::redeliver;
use crate::state::AppState;
use crate::submission::{GenerateDescription, SubmitJob};

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/generate-description", post(generate_description))
        .route("/api/v1/jobs", post(submit_job))
        // The batch's own body limit; this inner layer wins over the router's. A GET here is
        // the status of a job whose id is `batch`, as `/api/v1/jobs/{job_id}` would give it.
        .route(
            "/api/v1/jobs/batch",
            post(submit_batch)
                .layer(DefaultBodyLimit::max(state.config.gateway.max_batch_bytes))
                .get(job_named_batch),
        )
        .route("/api/v1/jobs/{job_id}", get(job_status))
        .route("/api/v1/jobs/{job_id}/redeliver", post(redeliver_job))
        .route("/api/v1/deliveries/redeliver", post(redeliver_window))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::serve))
        // Outside the API-key check, so refused requests are counted too.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.config.gateway.max_body_bytes))
        .with_state(state)
}

async fn generate_description(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<GenerateDescription>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let job = SubmitJob::from(body).validate(&state)?;
    let (status, accepted) = accept(&state, job).await?;
    Ok((status, Json(accepted)))
}

async fn submit_job(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<SubmitJob>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let job = body.validate(&state)?;
    let (status, accepted) = accept(&state, job).await?;
    Ok((status, Json(accepted)))
}

async fn submit_batch(
    State(state): State<AppState>,
    BatchBody(body): BatchBody<SubmitBatch>,
) -> Result<Json<BatchResult>, ApiError> {
    Ok(Json(batch::accept_batch(&state, body).await?))
}

async fn job_status(
    State(state): State<AppState>,
    job_id: Result<Path<String>, PathRejection>,
) -> Result<Json<JobStatus>, ApiError> {
    let id = parse_path_id(job_id)?;
    status_of(&state, &id).await
}

async fn job_named_batch(State(state): State<AppState>) -> Result<Json<JobStatus>, ApiError> {
    let id = JobId::parse("batch").map_err(|err| ApiError::NotFound(err.to_string()))?;
    status_of(&state, &id).await
}

async fn status_of(state: &AppState, id: &JobId) -> Result<Json<JobStatus>, ApiError> {
    match state.topology.status.get(id).await {
        Ok(Some((mut doc, _))) => {
            doc.signing_secret = None;
            Ok(Json(doc))
        }
        Ok(None) => Err(ApiError::NotFound(format!("no job with id `{id}`"))),
        Err(err) => Err(ApiError::Unavailable(err.to_string())),
    }
}

/// A job id from the path; one that cannot be an id cannot name a job either.
fn parse_path_id(job_id: Result<Path<String>, PathRejection>) -> Result<JobId, ApiError> {
    let Path(job_id) = job_id.map_err(|err| ApiError::NotFound(err.body_text()))?;
    JobId::parse(&job_id).map_err(|_| {
        let shown: String = job_id.chars().take(JobId::MAX_LEN).collect();
        ApiError::NotFound(format!("no job with id `{shown}`"))
    })
}

async fn redeliver_job(
    State(state): State<AppState>,
    job_id: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<redeliver::Requeued>), ApiError> {
    let id = parse_path_id(job_id)?;
    let requeued = redeliver::redeliver(&state, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(requeued)))
}

async fn redeliver_window(
    State(state): State<AppState>,
    window: Result<Query<redeliver::Window>, QueryRejection>,
) -> Result<Json<redeliver::WindowResult>, ApiError> {
    let Query(window) = window.map_err(|err| {
        ApiError::invalid_field(
            "since",
            format!(
                "give `since` (and optionally `until`) as RFC 3339 times: {}",
                err.body_text()
            ),
        )
    })?;
    Ok(Json(redeliver::redeliver_window(&state, window).await?))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when NATS is connected and the `JOBS` stream answers: only then can a 202 be given.
async fn readyz(State(state): State<AppState>) -> Response {
    let connected = state.topology.jetstream.client().connection_state()
        == async_nats::connection::State::Connected;
    let stream_ok = connected && state.topology.stream.get_info().await.is_ok();
    let status = if stream_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if stream_ok { "ready" } else { "unavailable" }, "nats_connected": connected, "stream": stream_ok});
    (status, Json(body)).into_response()
}

async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.api_key_digests.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|key| Sha256::digest(key.trim().as_bytes()));
    let authorised = presented.is_some_and(|digest| {
        // Visit every configured key so the time taken does not tell which one matched.
        state.api_key_digests.iter().fold(false, |found, known| {
            found | (known.as_slice() == digest.as_slice())
        })
    });
    if authorised {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

pub fn api_key_digests(keys: &[jetcall::config::Secret]) -> Vec<[u8; 32]> {
    keys.iter()
        .map(|key| Sha256::digest(key.expose().as_bytes()).into())
        .collect()
}
