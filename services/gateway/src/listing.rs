//! `GET /api/v1/jobs?status=&kind=&limit=`: the jobs changed most recently, for operators.
//!
//! The `job_status` bucket has no index, so the listing reads the last `SCAN_REVISIONS` writes
//! to it and keeps each job's newest. A job's newest revision is always later than its older
//! ones, so every job written to in that span is seen in its current state; jobs untouched for
//! longer are not listed, and the answer says whether the span reached back to the start.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use jetcall::JobId;
use jetcall::events::JobError;
use jetcall::status::{JobStatus, Status};

use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::keys::{Caller, may_see};
use crate::state::AppState;

/// How many of the bucket's latest writes one listing reads: a bounded amount of work per
/// call (a job takes about four writes from acceptance to delivery).
pub const SCAN_REVISIONS: u64 = 20_000;
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1_000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Filter {
    /// Only jobs in this state.
    pub status: Option<Status>,
    /// Only jobs of this kind.
    #[param(value_type = Option<jetcall::Kind>)]
    pub kind: Option<String>,
    /// At most this many jobs: 1 to 1,000, 50 when left out.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobSummary {
    pub job_id: JobId,
    pub status: Status,
    pub kind: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    pub generation_attempts: u32,
    pub delivery_attempts: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// The name of the API key the job was submitted with; absent when the API has no keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub tenant: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Newest change first.
    pub jobs: Vec<JobSummary>,
    /// Writes to the bucket read to answer.
    pub scanned: u64,
    /// Whether those writes reach back to the oldest the bucket holds, so every job was seen.
    pub complete: bool,
}

/// Recently changed jobs, newest first: the caller's own, or every tenant's for an operator's
/// key.
#[utoipa::path(
    get,
    path = "/api/v1/jobs",
    operation_id = "list_jobs",
    tag = "jobs",
    params(Filter),
    responses(
        (status = 200, description = "Summaries of the jobs changed most recently, newest first; `complete` says whether every job in the bucket was considered", body = JobList),
        (status = 422, description = "A filter is invalid (`invalid_field`, `unknown_kind`); `field` names it", body = ErrorBody),
        (status = 503, description = "NATS did not answer (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    filter: Result<Query<Filter>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(filter) = filter.map_err(|err| {
        ApiError::invalid_field(
            "query",
            format!(
                "filter with `status` (a job status), `kind` and `limit` (1 to {MAX_LIMIT}): {}",
                err.body_text()
            ),
        )
    })?;
    list(&state, filter, caller.as_deref().map(Arc::as_ref))
        .await
        .map(Json)
}

async fn list(
    state: &AppState,
    filter: Filter,
    caller: Option<&Caller>,
) -> Result<JobList, ApiError> {
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_field(
            "limit",
            format!("`limit` must be 1 to {MAX_LIMIT}"),
        ));
    }
    if let Some(kind) = &filter.kind
        && !state.config.kinds.contains_key(kind)
    {
        return Err(ApiError::unknown_kind(kind, &state.config));
    }
    let mut writes = state
        .topology
        .status
        .recent_writes(SCAN_REVISIONS)
        .await
        .map_err(|err| ApiError::Unavailable(err.to_string()))?;
    // Each key's newest state, as the summary `filter` wants, or `None` (removed, filtered
    // out). Each document is summarised as it arrives, so a listing holds up to
    // `SCAN_REVISIONS` small summaries, never that many documents (each as large as a job's
    // input and result).
    let mut newest = HashMap::new();
    while let Some((job_id, doc)) = writes
        .next()
        .await
        .map_err(|err| ApiError::Unavailable(err.to_string()))?
    {
        let summary = doc.and_then(|doc| summary(&job_id, doc, &filter, caller));
        newest.insert(job_id, summary);
    }

    let mut jobs: Vec<JobSummary> = newest.into_values().flatten().collect();
    jobs.sort_by_key(|job| std::cmp::Reverse(job.updated_at));
    jobs.truncate(limit);
    Ok(JobList {
        jobs,
        scanned: writes.scanned,
        complete: writes.complete,
    })
}

/// The summary of a status document, if it is a job's, `caller` may see it and `filter` wants
/// it.
fn summary(
    job_id: &JobId,
    doc: JobStatus,
    filter: &Filter,
    caller: Option<&Caller>,
) -> Option<JobSummary> {
    let wanted = may_see(caller, &doc)
        && filter.status.is_none_or(|status| status == doc.status)
        && filter
            .kind
            .as_deref()
            .is_none_or(|kind| kind == doc.kind.as_str());
    wanted.then(|| JobSummary {
        status: doc.status,
        kind: doc.kind.to_string(),
        created_at: doc.created_at,
        updated_at: doc.updated_at,
        generation_attempts: doc.generation_attempts,
        delivery_attempts: doc.deliveries.len(),
        error: doc.error,
        tenant: doc.tenant,
        job_id: job_id.clone(),
    })
}
