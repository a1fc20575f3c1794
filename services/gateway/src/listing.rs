//! `GET /api/v1/jobs?status=&kind=&tenant=&since=&until=&limit=&offset=`: the jobs changed
//! most recently, for operators and the console.
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
    /// Only jobs of this tenant (the name of the API key that submitted them). A key that is
    /// not an operator's sees its own jobs whatever this says.
    pub tenant: Option<String>,
    /// Only jobs changed at or after this moment (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<OffsetDateTime>,
    /// Only jobs changed at or before this moment (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub until: Option<OffsetDateTime>,
    /// At most this many jobs: 1 to 1,000, 50 when left out.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Skip this many of the matching jobs first: the next page is at `offset + limit`. At most
    /// 20,000, the most writes one listing reads.
    #[param(minimum = 0, maximum = 20000)]
    pub offset: Option<usize>,
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
    /// Where the webhook goes: the `callback_url`'s `host:port`, by which deliveries are
    /// grouped.
    pub destination: String,
    /// What went wrong at the latest delivery attempt, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub last_delivery_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Newest change first.
    pub jobs: Vec<JobSummary>,
    /// Writes to the bucket read to answer.
    pub scanned: u64,
    /// Whether those writes reach back to the oldest the bucket holds, so every job was seen.
    pub complete: bool,
    /// The `offset` asked for.
    pub offset: usize,
    /// Whether more jobs match past this page.
    pub more: bool,
}

/// Each job's newest state among the bucket's latest writes, summarised by `summarise` as it
/// is read (`None`: not wanted), so a pass holds up to `SCAN_REVISIONS` small summaries, never
/// that many documents (each as large as a job's input and result).
pub(crate) async fn newest<T>(
    state: &AppState,
    summarise: impl Fn(&JobId, JobStatus) -> Option<T>,
) -> Result<(Vec<T>, Scanned), ApiError> {
    let mut writes = state
        .topology
        .status
        .recent_writes(SCAN_REVISIONS)
        .await
        .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?;
    let mut newest = HashMap::new();
    while let Some((job_id, doc)) = writes
        .next()
        .await
        .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?
    {
        let summary = doc.and_then(|doc| summarise(&job_id, doc));
        newest.insert(job_id, summary);
    }
    let scanned = Scanned {
        scanned: writes.scanned,
        complete: writes.complete,
    };
    Ok((newest.into_values().flatten().collect(), scanned))
}

/// How much of the bucket a pass read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scanned {
    pub scanned: u64,
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
                "filter with `status` (a job status), `kind`, `tenant`, `since` and `until` (RFC 3339), `limit` (1 to {MAX_LIMIT}) and `offset`: {}",
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
    if filter
        .offset
        .is_some_and(|offset| offset as u64 > SCAN_REVISIONS)
    {
        return Err(ApiError::invalid_field(
            "offset",
            format!("`offset` must be 0 to {SCAN_REVISIONS}"),
        ));
    }
    if let Some(kind) = &filter.kind
        && !state.config.kinds.contains_key(kind)
    {
        return Err(ApiError::unknown_kind(kind, &state.config));
    }
    let (mut jobs, scanned) =
        newest(state, |job_id, doc| summary(job_id, doc, &filter, caller)).await?;
    jobs.sort_by_key(|job| std::cmp::Reverse(job.updated_at));
    let offset = filter.offset.unwrap_or(0);
    let more = jobs.len() > offset.saturating_add(limit);
    let jobs = jobs.into_iter().skip(offset).take(limit).collect();
    Ok(JobList {
        jobs,
        scanned: scanned.scanned,
        complete: scanned.complete,
        offset,
        more,
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
            .is_none_or(|kind| kind == doc.kind.as_str())
        && filter
            .tenant
            .as_deref()
            .is_none_or(|tenant| Some(tenant) == doc.tenant.as_deref())
        && filter.since.is_none_or(|since| doc.updated_at >= since)
        && filter.until.is_none_or(|until| doc.updated_at <= until);
    wanted.then(|| JobSummary {
        destination: doc.callback_url.destination(),
        last_delivery_error: doc.deliveries.last().and_then(delivery_error),
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

/// A failed delivery attempt in a few words: its error, else its HTTP status.
fn delivery_error(attempt: &jetcall::events::DeliveryAttempt) -> Option<String> {
    match (&attempt.error, attempt.status_code) {
        (Some(error), _) => Some(error.clone()),
        (None, Some(code)) if !(200..300).contains(&code) => Some(format!("HTTP {code}")),
        _ => attempt.error_kind.clone(),
    }
}
