//! Withdrawing jobs before they are generated: one (`DELETE /api/v1/jobs/{job_id}`) or up to
//! 1,000 at once (`POST /api/v1/jobs/cancel`).
//!
//! Order of writes: the status document moves to `cancelled` by compare-and-set, which a
//! generator's claim or lease renewal can no longer win, then `jobs.cancelled.<kind>` is
//! published (`Nats-Msg-Id` `<job>.cancelled`) for the webhook and for every generator to
//! abandon a call it has in flight. A gateway that stops between the two leaves the event to
//! whichever comes first: the generator, which publishes a generated job's event again
//! whenever it meets the job's request, or the caller's retry of the cancellation.

use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use jetcall::JobId;
use jetcall::budget::Occasion;
use jetcall::publish::publish_event_with_headers;
use jetcall::status::{JobStatus, Status};
use jetcall::store::Updated;
use jetcall::view::JobView;

use crate::error::{ApiError, ErrorBody};
use crate::keys::{Caller, may_see};
use crate::state::AppState;

/// The most jobs one `POST /api/v1/jobs/cancel` may name.
pub const MAX_JOBS: usize = 1_000;

/// Cancellations of one request written at once, sharing round trips to NATS.
const IN_FLIGHT: usize = 64;

/// Cancels one job, if `caller` may see it and it is not generated. Cancelling a cancelled
/// job again answers as the first time did (and publishes its event again, in case the first
/// answer was lost before it was).
pub async fn cancel(
    state: &AppState,
    job_id: &JobId,
    caller: Option<&Caller>,
) -> Result<JobView, ApiError> {
    let now = OffsetDateTime::now_utc();
    let by = match caller {
        Some(caller) => format!("API key `{}`", caller.name),
        None => "its caller".to_owned(),
    };
    let updated = state
        .topology
        .status
        .update(job_id, |doc| may_see(caller, doc) && doc.cancel(now, &by))
        .await
        .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?;
    let doc = match updated {
        Updated::Written(doc, _) => {
            state.metrics.job_cancelled(doc.kind.as_str());
            tracing::info!(%job_id, %by, "job cancelled");
            // A cancelled job spends nothing more: its reservation goes back whole (a call
            // that answers meanwhile is charged by the generator).
            state
                .topology
                .budgets
                .settle_job(&doc, Occasion::Outcome)
                .await;
            *doc
        }
        Updated::Unchanged(doc) if !may_see(caller, &doc) => return Err(not_found(job_id)),
        Updated::Unchanged(doc) if doc.generation_outcome() == Status::Cancelled => *doc,
        Updated::Unchanged(doc) => {
            return Err(ApiError::NotCancellable {
                job_id: job_id.to_string(),
                status: doc.status,
            });
        }
        Updated::Missing => return Err(not_found(job_id)),
    };
    if doc.awaits_delivery() {
        publish_cancelled(state, &doc).await?;
    }
    Ok(doc.into())
}

async fn publish_cancelled(state: &AppState, doc: &JobStatus) -> Result<(), ApiError> {
    let Some(event) = doc.finished_event() else {
        return Ok(());
    };
    let kind = event.event();
    publish_event_with_headers(
        &state.topology.jetstream,
        kind.subject(&event.kind),
        &kind.msg_id(&event.job_id),
        &event,
        doc.trace()
            .map(|trace| trace.to_headers())
            .unwrap_or_default(),
    )
    .await
    .map_err(|err| ApiError::NatsUnavailable(err.to_string()))
}

fn not_found(job_id: &JobId) -> ApiError {
    ApiError::NotFound(format!("no job with id `{job_id}`"))
}

/// `POST /api/v1/jobs/cancel`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"job_ids": ["JOB-771", "JOB-772"]})))]
pub struct CancelJobs {
    /// 1 to 1,000 job ids.
    #[schema(min_items = 1, max_items = 1000)]
    pub job_ids: Vec<String>,
}

/// What became of one job of a bulk cancellation.
#[derive(Debug, Serialize, ToSchema)]
pub struct CancelItem {
    pub job_id: String,
    /// `202` when the job is cancelled (now or before), else the error's status: `404`,
    /// `409`, `422` for an invalid id, `503`.
    pub status_code: u16,
    /// The job's status document, for a cancelled job.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub job: Option<JobView>,
    /// The error body a single `DELETE` of the job would get.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<ErrorBody>,
}

/// One result per id, in the order of `job_ids`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CancelResults {
    pub results: Vec<CancelItem>,
    /// How many are cancelled now.
    pub cancelled: usize,
    /// How many are not: each has its `error`.
    pub rejected: usize,
}

/// Cancels each named job on its own terms, as a `DELETE` of it would.
pub async fn cancel_many(
    state: &AppState,
    body: CancelJobs,
    caller: Option<&Caller>,
) -> Result<CancelResults, ApiError> {
    let count = body.job_ids.len();
    if count == 0 || count > MAX_JOBS {
        return Err(ApiError::invalid_field(
            "job_ids",
            format!("`job_ids` holds {count} ids; send 1 to {MAX_JOBS}"),
        ));
    }
    let results: Vec<CancelItem> = stream::iter(body.job_ids)
        .map(|raw| async move {
            let answer = match JobId::parse(&raw) {
                Ok(job_id) => cancel(state, &job_id, caller).await,
                Err(err) => Err(ApiError::invalid_field("job_ids", format!("`{raw}` {err}"))),
            };
            match answer {
                Ok(job) => CancelItem {
                    job_id: raw,
                    status_code: 202,
                    job: Some(job),
                    error: None,
                },
                Err(err) => CancelItem {
                    job_id: raw,
                    status_code: err.status().as_u16(),
                    job: None,
                    error: Some(err.body()),
                },
            }
        })
        .buffered(IN_FLIGHT)
        .collect()
        .await;
    let cancelled = results.iter().filter(|item| item.job.is_some()).count();
    Ok(CancelResults {
        rejected: results.len() - cancelled,
        cancelled,
        results,
    })
}
