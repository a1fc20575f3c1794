//! The HTTP routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use jetcall::JobId;
use jetcall::config::Role;

use crate::accept::{Accepted, accept};
use crate::batch::{self, BatchResult, SubmitBatch};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{BatchBody, JsonBody, parse_path_id};
use crate::keys::{Caller, may_see};
use crate::state::AppState;
use crate::submission::{GenerateDescription, SubmitJob};
use crate::trace::IncomingTrace;
use crate::{cancel, redeliver};
use jetcall::view::JobView;

/// Submit a product description job: the article's endpoint and body.
///
/// `202` means the job is stored in JetStream; anything else means it is not, and a retry with
/// the same `job_id` is safe. The result is POSTed to `callback_url` as a signed webhook.
#[utoipa::path(
    post,
    path = "/api/v1/generate-description",
    tag = "jobs",
    request_body = GenerateDescription,
    responses(
        (status = 202, description = "Accepted: the job is stored in JetStream (again, for a retry of a job still waiting)", body = Accepted,
            links(("status" = (operation_id = "job_status", parameters(("job_id" = "$response.body#/job_id")))))),
        (status = 200, description = "The same job was submitted before and has moved on; `status` says where it is", body = Accepted),
        (status = 400, description = "The body is not JSON (`malformed_json`)", body = ErrorBody),
        (status = 402, description = "The API key's budget has no room for the job (`budget_exceeded`); `resets_at` says when it has", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds until the budget resets"))),
        (status = 409, description = "The job id is taken by a different request (`job_conflict`)", body = ErrorBody),
        (status = 413, description = "The body is larger than `gateway.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid (`invalid_field`, `invalid_callback_url`); `field` names it", body = ErrorBody),
        (status = 503, description = "NATS could not confirm the job, so it was not accepted; retry with the same id (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn generate_description(
    State(state): State<AppState>,
    trace: IncomingTrace,
    caller: Option<Extension<Arc<Caller>>>,
    JsonBody(body): JsonBody<GenerateDescription>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let job = SubmitJob::from(body).validate(&state, caller.as_deref().map(Arc::as_ref))?;
    let (status, accepted) = accept(&state, job, trace.span_for_job()).await?;
    Ok((status, Json(accepted)))
}

/// Submit a job of any configured kind.
///
/// The same rules as `POST /api/v1/generate-description`: `202` means the job is stored in
/// JetStream, and a retry with the same `job_id` and content is safe.
#[utoipa::path(
    post,
    path = "/api/v1/jobs",
    tag = "jobs",
    request_body = SubmitJob,
    responses(
        (status = 202, description = "Accepted: the job is stored in JetStream (again, for a retry of a job still waiting)", body = Accepted,
            links(("status" = (operation_id = "job_status", parameters(("job_id" = "$response.body#/job_id")))))),
        (status = 200, description = "The same job was submitted before and has moved on; `status` says where it is", body = Accepted),
        (status = 400, description = "The body is not JSON (`malformed_json`)", body = ErrorBody),
        (status = 402, description = "The API key's budget has no room for the job (`budget_exceeded`); `resets_at` says when it has", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds until the budget resets"))),
        (status = 409, description = "The job id is taken by a different request (`job_conflict`)", body = ErrorBody),
        (status = 413, description = "The body is larger than `gateway.max_body_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid (`invalid_field`, `invalid_callback_url`, `unknown_kind`); `field` names it", body = ErrorBody),
        (status = 503, description = "NATS could not confirm the job, so it was not accepted; retry with the same id (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn submit_job(
    State(state): State<AppState>,
    trace: IncomingTrace,
    caller: Option<Extension<Arc<Caller>>>,
    JsonBody(body): JsonBody<SubmitJob>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let job = body.validate(&state, caller.as_deref().map(Arc::as_ref))?;
    let (status, accepted) = accept(&state, job, trace.span_for_job()).await?;
    Ok((status, Json(accepted)))
}

/// Submit up to 1,000 jobs at once.
///
/// Each job gets the answer a single `POST /api/v1/jobs` of it would get, in its entry of
/// `results`: a job that NATS could not confirm is `rejected` with `unavailable`, and only that
/// job needs a retry.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/batch",
    tag = "jobs",
    request_body = SubmitBatch,
    responses(
        (status = 200, description = "One result per job, in the order of `jobs`", body = BatchResult),
        (status = 400, description = "The body is not JSON (`malformed_json`)", body = ErrorBody),
        (status = 413, description = "The body is larger than `gateway.max_batch_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "No `jobs`, none, or more than 1,000 (`invalid_field`, `batch_empty`, `batch_too_large`)", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn submit_batch(
    State(state): State<AppState>,
    trace: IncomingTrace,
    caller: Option<Extension<Arc<Caller>>>,
    BatchBody(body): BatchBody<SubmitBatch>,
) -> Result<Json<BatchResult>, ApiError> {
    let caller = caller.as_deref().map(Arc::as_ref);
    Ok(Json(
        batch::accept_batch(&state, body, trace, caller).await?,
    ))
}

/// Who the API takes the caller for: what the console asks first, to know whether to ask for
/// a key and which pages to show.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// Whether the gateway has API keys: without them anyone who reaches it is the operator.
    keys_required: bool,
    /// The key's tenant (its `name`); `null` without keys.
    tenant: Option<String>,
    /// `admin` sees every tenant's jobs and the overview; `user` its own jobs.
    role: Role,
}

#[utoipa::path(
    get,
    path = "/api/v1/whoami",
    operation_id = "whoami",
    tag = "operators",
    responses(
        (status = 200, description = "The caller's tenant and role", body = WhoAmI),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn whoami(caller: Option<Extension<Arc<Caller>>>) -> Json<WhoAmI> {
    Json(match caller.as_deref() {
        Some(caller) => WhoAmI {
            keys_required: true,
            tenant: Some(caller.name.clone()),
            role: caller.role(),
        },
        None => WhoAmI {
            keys_required: false,
            tenant: None,
            role: Role::Admin,
        },
    })
}

/// A job's status document: where it is, its result or error, and its delivery attempts.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{job_id}",
    tag = "jobs",
    params(("job_id" = JobId, Path, description = "The job's id", example = "JOB-771")),
    responses(
        (status = 200, description = "The job's status document", body = JobView),
        (status = 404, description = "No job has this id, or it is another API key's (`not_found`)", body = ErrorBody),
        (status = 503, description = "NATS could not be read (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn job_status(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    job_id: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_path_id(job_id)?;
    status_of(&state, &id, caller.as_deref().map(Arc::as_ref)).await
}

/// The status document of the job whose id is `batch`, as `/api/v1/jobs/{job_id}` gives it.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/batch",
    tag = "jobs",
    responses(
        (status = 200, description = "The status document of the job `batch`", body = JobView),
        (status = 404, description = "No job has the id `batch` (`not_found`)", body = ErrorBody),
        (status = 503, description = "NATS could not be read (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn job_named_batch(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
) -> Result<Json<JobView>, ApiError> {
    job_named(&state, "batch", caller).await
}

/// The status document of the job whose id is `cancel`, as `/api/v1/jobs/{job_id}` gives it.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/cancel",
    tag = "jobs",
    responses(
        (status = 200, description = "The status document of the job `cancel`", body = JobView),
        (status = 404, description = "No job has the id `cancel` (`not_found`)", body = ErrorBody),
        (status = 503, description = "NATS could not be read (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn job_named_cancel(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
) -> Result<Json<JobView>, ApiError> {
    job_named(&state, "cancel", caller).await
}

/// A job whose id is also the name of a route under `/api/v1/jobs/`.
async fn job_named(
    state: &AppState,
    name: &str,
    caller: Option<Extension<Arc<Caller>>>,
) -> Result<Json<JobView>, ApiError> {
    let id = JobId::parse(name).map_err(|err| ApiError::NotFound(err.to_string()))?;
    status_of(state, &id, caller.as_deref().map(Arc::as_ref)).await
}

/// Cancel a job that is not generated yet.
///
/// A job waiting never reaches the LLM; a call in flight is abandoned (what it was charged is
/// still recorded if it answers). The caller's webhook gets `job.cancelled`. Cancelling a
/// cancelled job again answers `202` again. A job whose id is `batch` or `cancel` is cancelled
/// through `POST /api/v1/jobs/cancel`.
#[utoipa::path(
    delete,
    path = "/api/v1/jobs/{job_id}",
    operation_id = "cancel_job",
    tag = "jobs",
    params(("job_id" = JobId, Path, description = "The job's id", example = "JOB-771")),
    responses(
        (status = 202, description = "The job is cancelled; its status document", body = JobView),
        (status = 404, description = "No job has this id, or it is another API key's (`not_found`)", body = ErrorBody),
        (status = 409, description = "The job is generated already or expired (`not_cancellable`); `status` says where it is", body = ErrorBody),
        (status = 503, description = "NATS could not confirm the cancellation; retry (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn cancel_job(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    job_id: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = parse_path_id(job_id)?;
    let job = cancel::cancel(&state, &id, caller.as_deref().map(Arc::as_ref)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

/// Cancel up to 1,000 jobs at once, each as `DELETE /api/v1/jobs/{job_id}` would.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/cancel",
    operation_id = "cancel_jobs",
    tag = "jobs",
    request_body = cancel::CancelJobs,
    responses(
        (status = 200, description = "One result per id, in the order of `job_ids`", body = cancel::CancelResults),
        (status = 400, description = "The body is not JSON (`malformed_json`)", body = ErrorBody),
        (status = 413, description = "The body is larger than `gateway.max_batch_bytes` (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "No `job_ids`, none, or more than 1,000 (`invalid_field`)", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn cancel_jobs(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    BatchBody(body): BatchBody<cancel::CancelJobs>,
) -> Result<Json<cancel::CancelResults>, ApiError> {
    let caller = caller.as_deref().map(Arc::as_ref);
    Ok(Json(cancel::cancel_many(&state, body, caller).await?))
}

/// Another tenant's job is answered as if there were none: the same `404`, so a key cannot
/// even learn which ids others use by reading.
async fn status_of(
    state: &AppState,
    id: &JobId,
    caller: Option<&Caller>,
) -> Result<Json<JobView>, ApiError> {
    match state.topology.status.get(id).await {
        Ok(Some((doc, _))) if may_see(caller, &doc) => Ok(Json(job_view(state, doc).await)),
        Ok(_) => Err(ApiError::NotFound(format!("no job with id `{id}`"))),
        Err(err) => Err(ApiError::NatsUnavailable(err.to_string())),
    }
}

/// The job's view, naming the Message Batch it waits in even before its own document does:
/// as `GET /api/v1/jobs/{job_id}` and its events show it.
pub(crate) async fn job_view(state: &AppState, doc: jetcall::status::JobStatus) -> JobView {
    let record = waiting_batch(&doc).map(str::to_owned);
    let mut view = JobView::from(doc);
    if let Some(record) = record {
        view.batch_id = batch_id_of(state, &record).await;
    }
    view
}

/// The batch record a `batched` job waits in, when its document does not name the API's
/// batch id: the generator writes that id into the batch's record alone, not into each of
/// its thousands of jobs, until their results come.
pub(crate) fn waiting_batch(doc: &jetcall::status::JobStatus) -> Option<&str> {
    let batch = doc.batch.as_ref()?;
    (doc.status == jetcall::status::Status::Batched && batch.id.is_none())
        .then_some(batch.record.as_str())
}

/// The API's id of the batch under `record`, once it is created.
pub(crate) async fn batch_id_of(state: &AppState, record: &str) -> Option<String> {
    let records = jetcall::batches::BatchRecords::new(state.topology.status.clone());
    let (found, _) = records.get(record).await.ok()??;
    found.batch_id
}

/// Deliver an `undeliverable` job's webhook again, with a fresh retry schedule.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/redeliver",
    tag = "deliveries",
    params(("job_id" = JobId, Path, description = "The job's id")),
    responses(
        (status = 202, description = "The job is back in the delivery queue", body = redeliver::Requeued),
        (status = 404, description = "No job has this id, or it is another API key's (`not_found`)", body = ErrorBody),
        (status = 409, description = "The job is not `undeliverable` (`not_undeliverable`)", body = ErrorBody),
        (status = 503, description = "NATS could not confirm the redelivery (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn redeliver_job(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    job_id: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<redeliver::Requeued>), ApiError> {
    let id = parse_path_id(job_id)?;
    let caller = caller.as_deref().map(Arc::as_ref);
    let requeued = redeliver::redeliver(&state, &id, caller).await?;
    Ok((StatusCode::ACCEPTED, Json(requeued)))
}

/// Deliver again every job that became `undeliverable` in a time window (at most 10,000): the
/// caller's own jobs, or every tenant's for an operator's key.
#[utoipa::path(
    post,
    path = "/api/v1/deliveries/redeliver",
    tag = "deliveries",
    params(redeliver::Window),
    responses(
        (status = 200, description = "What was put back, and what was already redelivered", body = redeliver::WindowResult),
        (status = 422, description = "`since` is missing, a time is not RFC 3339, or `until` is before `since` (`invalid_field`)", body = ErrorBody),
        (status = 503, description = "NATS could not be read or confirm a redelivery (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn redeliver_window(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
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
    let caller = caller.as_deref().map(Arc::as_ref);
    Ok(Json(
        redeliver::redeliver_window(&state, window, caller).await?,
    ))
}

/// `GET /healthz`: the process serves HTTP.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: HealthStatus,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
}

/// `GET /readyz`: whether a job can be accepted now.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub status: ReadyStatus,
    /// Whether the connection to NATS is up.
    pub nats_connected: bool,
    /// Whether the `JOBS` stream answers.
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadyStatus {
    Ready,
    Unavailable,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health)),
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: HealthStatus::Ok,
    })
}

/// Readiness: NATS is connected and the `JOBS` stream answers, so a job can be accepted.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: jobs can be accepted", body = Readiness),
        (status = 503, description = "Not ready: NATS or the `JOBS` stream is unavailable", body = Readiness),
    ),
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let connected = state.topology.jetstream.client().connection_state()
        == async_nats::connection::State::Connected;
    let stream_ok = connected && state.topology.stream.get_info().await.is_ok();
    let (status, ready) = if stream_ok {
        (StatusCode::OK, ReadyStatus::Ready)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, ReadyStatus::Unavailable)
    };
    let body = Readiness {
        status: ready,
        nats_connected: connected,
        stream: stream_ok,
    };
    (status, Json(body)).into_response()
}

/// The gateway's Prometheus metrics: requests by route, method and status, their latency, and
/// new jobs by kind.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "The OpenMetrics text exposition", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state
        .metrics
        .render(state.in_flight.in_use(), state.event_streams.in_use());
    (
        [(header::CONTENT_TYPE, jetcall::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response()
}
