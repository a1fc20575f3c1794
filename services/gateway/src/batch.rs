//! `POST /api/v1/jobs/batch`: up to 1,000 jobs in one request. Each is validated, recorded and
//! published on its own terms, with the answer a single submission of it would get; the writes
//! of all of them are pipelined, so a batch costs a few round trips to NATS, not two per job.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use utoipa::ToSchema;

use jetcall::status::Status;

use crate::accept::{self, Submitted};
use crate::error::{ApiError, ErrorBody};
use crate::extract::parse_job;
use crate::keys::Caller;
use crate::state::AppState;
use crate::submission::{SubmitJob, ValidJob};
use crate::trace::IncomingTrace;

/// The most jobs one batch may hold.
pub const MAX_JOBS: usize = 1_000;

/// Jobs of one batch being written at once. Each is recorded and published in turn, but none
/// waits for another, so their writes share round trips to NATS: 1,000 jobs cost about
/// 2 × 1,000 / 256 round trips rather than 2,000.
const JOBS_IN_FLIGHT: usize = 256;

/// The body: `{"jobs": [...]}`, each job what `POST /api/v1/jobs` takes. The jobs are kept as
/// JSON here so that one that does not fit is rejected alone.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBatch {
    /// 1 to 1,000 jobs, each what `POST /api/v1/jobs` takes (`SubmitJob`). Any JSON value is
    /// taken as an item: one that is not a valid job is rejected alone, in its entry of
    /// `results`, so the schema of an item is `SubmitJob` by contract but any value by what
    /// the request accepts.
    #[schema(value_type = Vec<Value>, min_items = 1, max_items = 1000)]
    pub jobs: Vec<Value>,
}

/// What became of one job of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// New, recorded and in JetStream: the single endpoint's first `202`.
    Accepted,
    /// The same job was submitted before: the single endpoint's idempotent `202` or `200`.
    Duplicate,
    /// Not accepted; `error` says why, as the single endpoint's error body would.
    Rejected,
}

/// One job's answer in a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemResult {
    /// The job's position in `jobs`.
    pub index: usize,
    /// `null` when the job names no valid id and none was made for it.
    #[schema(required = true)]
    pub job_id: Option<String>,
    pub result: Outcome,
    /// The job's status, for accepted and duplicate jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub status: Option<Status>,
    /// For rejected jobs: the error body a single submission of the job would get.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<ErrorBody>,
}

/// The answer to a batch: one result per job, and how many of each outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    /// One per job, in the order of `jobs`.
    pub results: Vec<ItemResult>,
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
}

/// A job's answer once its writes are done.
type Answer = Result<(Outcome, Status), ApiError>;

/// Validates, records and publishes every job of `batch`. `Err` is for the batch as a whole
/// (empty or too long), before anything is written.
///
/// With the caller's `traceparent`, each job is a span of the caller's trace; without one,
/// each job starts a trace of its own.
pub async fn accept_batch(
    state: &AppState,
    batch: SubmitBatch,
    incoming: IncomingTrace,
    caller: Option<&Caller>,
) -> Result<BatchResult, ApiError> {
    let count = batch.jobs.len();
    if count == 0 {
        return Err(ApiError::BatchEmpty { max: MAX_JOBS });
    }
    if count > MAX_JOBS {
        return Err(ApiError::BatchTooLarge {
            count,
            max: MAX_JOBS,
        });
    }

    // (index, job id, answer): every index once, sorted at the end.
    let mut answers: Vec<(usize, Option<String>, Answer)> = Vec::with_capacity(count);
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    let mut valid: Vec<(usize, ValidJob)> = Vec::with_capacity(count);
    for (index, job) in batch.jobs.into_iter().enumerate() {
        let named = named_id(&job);
        match parse_job::<SubmitJob>(job).and_then(|job| job.validate(state, caller)) {
            Err(err) => answers.push((index, named, Err(err))),
            Ok(job) => {
                let id = job.request.job_id.to_string();
                match first_seen.entry(id.clone()) {
                    Entry::Occupied(first) => {
                        let err = ApiError::DuplicateInBatch {
                            job_id: id.clone(),
                            first: *first.get(),
                        };
                        answers.push((index, Some(id), Err(err)));
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(index);
                        valid.push((index, job));
                    }
                }
            }
        }
    }

    // Each job is recorded and then published exactly as a single submission is; up to
    // JOBS_IN_FLIGHT jobs at once, so the writes of many jobs share each round trip. Every
    // job in flight waits for its own acks: a publish ack left unawaited would hold one of the
    // JetStream context's ack permits, and concurrent batches holding all of them would leave
    // every writer of this process waiting.
    let settled: Vec<(usize, Option<String>, Answer)> = stream::iter(valid)
        .map(|(index, job)| async move {
            let id = job.request.job_id.to_string();
            let trace = incoming.span_for_job();
            let span = jetcall::job_span!(id, job.request.kind, trace);
            (
                index,
                Some(id),
                submit(state, job, trace).instrument(span).await,
            )
        })
        .buffer_unordered(JOBS_IN_FLIGHT)
        .collect()
        .await;
    answers.extend(settled);
    answers.sort_unstable_by_key(|(index, ..)| *index);

    let mut result = BatchResult {
        results: Vec::with_capacity(count),
        accepted: 0,
        duplicates: 0,
        rejected: 0,
    };
    let mut unavailable = 0;
    for (index, job_id, answer) in answers {
        let item = match answer {
            Ok((outcome, status)) => {
                match outcome {
                    Outcome::Accepted => result.accepted += 1,
                    _ => result.duplicates += 1,
                }
                ItemResult {
                    index,
                    job_id,
                    result: outcome,
                    status: Some(status),
                    error: None,
                }
            }
            Err(err) => {
                result.rejected += 1;
                if matches!(err, ApiError::Unavailable(_)) {
                    unavailable += 1;
                }
                ItemResult {
                    index,
                    job_id,
                    result: Outcome::Rejected,
                    status: None,
                    error: Some(err.body()),
                }
            }
        };
        result.results.push(item);
    }
    if unavailable > 0 {
        tracing::warn!(
            jobs = count,
            unavailable,
            "NATS could not confirm some jobs of a batch"
        );
    }
    Ok(result)
}

/// One job, as `accept` takes it.
async fn submit(state: &AppState, job: ValidJob, trace: jetcall::trace::TraceParent) -> Answer {
    match accept::submit(state, job, trace).await? {
        Submitted::New => Ok((Outcome::Accepted, Status::Accepted)),
        Submitted::Waiting => Ok((Outcome::Duplicate, Status::Accepted)),
        Submitted::MovedOn(existing) => Ok((Outcome::Duplicate, existing.status)),
    }
}

/// The id a job names, if it is a valid one: to tell the caller which job a rejection is
/// about even when the job could not be read.
fn named_id(job: &Value) -> Option<String> {
    let id = job.get("job_id")?.as_str()?;
    jetcall::JobId::parse(id).ok().map(|id| id.to_string())
}
