//! Accepting a job: record it, publish it, and only then answer 202.

use axum::http::StatusCode;
use serde::Serialize;
use tracing::Instrument;
use utoipa::ToSchema;

use time::OffsetDateTime;

use jetcall::JobId;
use jetcall::durations::to_time;
use jetcall::events::JobRequested;
use jetcall::publish::publish_event_acked;
use jetcall::scan::{CLOCK_SKEW_MARGIN, find_msg_id};
use jetcall::status::{JobStatus, Status};
use jetcall::store::Created;
use jetcall::subjects::Event;
use jetcall::trace::TraceParent;

use crate::error::ApiError;
use crate::state::AppState;
use crate::submission::ValidJob;

/// The answer to a submission: `202` when the job is (again) waiting in JetStream, `200` when
/// it was submitted before and has moved on.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub job_id: String,
    /// `accepted` with a `202`; the job's current status with a `200`.
    pub status: Status,
    /// What happens next, for people.
    pub message: String,
}

/// What recording a submission found, and what is left to do for it.
// `New` is every first submission, the hot path: boxing it would cost an allocation a job,
// while a value of this type lives only until its job is published.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Recorded {
    /// A new job: its request is to be published. `trace` goes on the message; `doc` and
    /// `revision` are what was written, for the write of the request's stream sequence.
    New {
        request: JobRequested,
        trace: TraceParent,
    },
    /// A resubmission of a job that is still `accepted`: its request is published again only
    /// if it is not provably in the stream.
    Waiting(Box<JobStatus>),
    /// The job exists with the same content and has moved on; nothing is published.
    MovedOn(Box<JobStatus>),
}

/// Records the job as `accepted` unless its id is taken, and tells what is left to do. The
/// idempotency rule of every submission lives here: the same content under an existing id is
/// a retry, different content is a conflict. `Err` is the job's answer: 409 or 503. `trace`
/// is the gateway's span for the job, kept in the status document.
pub async fn record(
    state: &AppState,
    job: ValidJob,
    trace: TraceParent,
) -> Result<Recorded, ApiError> {
    let budget = match reserve(state, &job).await {
        // A retry of a job accepted when there was room: the same answer as before, which
        // `create` finds below, not a refusal for a job already in the pipeline.
        Err(ApiError::BudgetExceeded { .. }) if recorded_before(state, &job).await => None,
        reserved => reserved?,
    };
    let mut doc = JobStatus::accepted(&job.request, job.digest.clone());
    doc.sealed_signing_secret = job.sealed_signing_secret;
    doc.trace_id = Some(trace.trace_id());
    doc.budget = budget;
    let created = state.topology.status.create(&doc).await;
    let release = async || {
        if let (Some(reservation), Some(tenant)) = (&doc.budget, &doc.tenant) {
            state.topology.budgets.release(tenant, reservation).await;
        }
    };
    let created = match created {
        Ok(Created::New(revision)) => Created::New(revision),
        Ok(exists) => {
            // Reserved already, when it was first accepted.
            release().await;
            exists
        }
        Err(err) => {
            release().await;
            return Err(ApiError::Unavailable(err.to_string()));
        }
    };
    match created {
        Created::New(_) => Ok(Recorded::New {
            request: job.request,
            trace,
        }),
        // Another tenant's id is a conflict whatever the content, and says nothing of its job.
        Created::Exists(existing)
            if existing.request_digest != job.digest || existing.tenant != job.request.tenant =>
        {
            Err(ApiError::Conflict {
                job_id: existing.job_id.to_string(),
            })
        }
        Created::Exists(existing) if existing.status == Status::Accepted => {
            Ok(Recorded::Waiting(existing))
        }
        Created::Exists(existing) => Ok(Recorded::MovedOn(existing)),
    }
}

/// Reserves the most the job can cost in its tenant's budget, when the tenant has one: a
/// job that would pass a limit is refused (`402`), before anything is written.
async fn reserve(
    state: &AppState,
    job: &ValidJob,
) -> Result<Option<jetcall::budget::Reservation>, ApiError> {
    let (Some((limits, estimate)), Some(tenant)) = (&job.budget, &job.request.tenant) else {
        return Ok(None);
    };
    let now = OffsetDateTime::now_utc();
    match state
        .topology
        .budgets
        .reserve(tenant, limits, *estimate, now)
        .await
    {
        Ok(Ok(reservation)) => Ok(Some(reservation)),
        Ok(Err(exceeded)) => Err(ApiError::BudgetExceeded {
            tenant: tenant.clone(),
            period: exceeded.period,
            limit: exceeded.limit,
            resets_at: exceeded.resets_at,
        }),
        Err(err) => Err(ApiError::Unavailable(err.to_string())),
    }
}

async fn recorded_before(state: &AppState, job: &ValidJob) -> bool {
    matches!(
        state.topology.status.get(&job.request.job_id).await,
        Ok(Some(_))
    )
}

/// What a submission's writes came to.
#[derive(Debug)]
pub enum Submitted {
    /// A new job, recorded and in JetStream.
    New,
    /// A resubmission of a job still waiting: its request is in JetStream (again, if its first
    /// publish had been lost).
    Waiting,
    /// A resubmission of a job that has moved on.
    MovedOn(Box<JobStatus>),
}

/// Records the job and makes sure its request is in JetStream exactly once: the one path of a
/// single submission and of each job of a batch. `Err` is the job's answer: 409 or 503.
///
/// Order of writes: KV `create` (`accepted`), then publish and await the ack. Nothing more on
/// the way to a `202`: a third write per job cost the gateway a third of its throughput
/// (BENCHMARKS.md). Where the request is stored is learnt when it is needed, on a resubmission
/// of a job still `accepted`, and then kept in the status document (`request_seq`): with it
/// nothing is published; without it the request is published again only while JetStream
/// would drop it as a duplicate, or once a scan of the stream shows it is not there.
pub async fn submit(
    state: &AppState,
    job: ValidJob,
    trace: TraceParent,
) -> Result<Submitted, ApiError> {
    match record(state, job, trace).await? {
        Recorded::New { request, trace } => {
            publish(state, &request, Some(&trace)).await?;
            state.metrics.job_accepted(request.kind.as_str());
            Ok(Submitted::New)
        }
        Recorded::Waiting(doc) => {
            if doc.request_seq.is_none() {
                let sequence = match stored_request(state, &doc).await? {
                    Some(sequence) => sequence,
                    None => publish(state, &doc.request(), doc.trace().as_ref()).await?,
                };
                note_request_seq(state, None, &doc.job_id, sequence).await;
            }
            Ok(Submitted::Waiting)
        }
        Recorded::MovedOn(doc) => Ok(Submitted::MovedOn(doc)),
    }
}

/// Where `doc`'s request is in the stream, when JetStream would no longer drop a second copy
/// of it: `None` means publishing it stores it once. While the job is younger than the
/// duplicate window (less a margin for clock skew) a publish is deduplicated, and its ack
/// names the first copy, so nothing is scanned.
///
/// The window is read from the stream now, not from what the gateway saw at start: an
/// operator may have shortened it since, and a window believed longer than it is would store
/// a second copy.
async fn stored_request(state: &AppState, doc: &JobStatus) -> Result<Option<u64>, ApiError> {
    let window = state
        .topology
        .stream
        .clone()
        .info()
        .await
        .map_err(|err| ApiError::Unavailable(err.to_string()))?
        .config
        .duplicate_window
        .min(state.config.nats.duplicate_window);
    let now = OffsetDateTime::now_utc();
    let dedup_until = doc.created_at + to_time(window) - to_time(CLOCK_SKEW_MARGIN);
    if now < dedup_until {
        return Ok(None);
    }
    find_msg_id(
        &state.topology.stream,
        Event::Requested.filter(),
        doc.created_at,
        &Event::Requested.msg_id(&doc.job_id),
    )
    .await
    .map_err(|err| ApiError::Unavailable(err.to_string()))
}

/// Writes where the job's request is stored into its status document, while it is still
/// `accepted`. A failure costs only a scan of the stream at the next resubmission, so it is
/// logged, not answered: the request is in JetStream either way.
pub(crate) async fn note_request_seq(
    state: &AppState,
    current: Option<(JobStatus, u64)>,
    job_id: &JobId,
    sequence: u64,
) {
    let written = state
        .topology
        .status
        .update_from(job_id, current, |doc| {
            let unrecorded = doc.status == Status::Accepted && doc.request_seq.is_none();
            if unrecorded {
                doc.request_seq = Some(sequence);
            }
            unrecorded
        })
        .await;
    if let Err(err) = written {
        tracing::warn!(%job_id, error = %err, "could not record where the job's request is stored");
    }
}

/// Records the job as `accepted` and publishes its request. A 202 means JetStream has stored
/// the request; anything short of that is a 503 and the caller retries with the same id.
///
/// Resubmitting an existing id with the same content is safe: while the job is still
/// `accepted` its request is made sure to be in JetStream once (see [`submit`]) and the answer
/// is 202; once the job has moved on the answer is 200 with its status. Different content
/// under an existing id is a 409.
///
/// `trace` is the gateway's span for the job (a child of the caller's `traceparent`, or a new
/// trace); it goes on the request's message and its id into the status document, and every
/// line logged meanwhile names the job.
pub async fn accept(
    state: &AppState,
    job: ValidJob,
    trace: TraceParent,
) -> Result<(StatusCode, Accepted), ApiError> {
    let span = jetcall::job_span!(job.request.job_id, job.request.kind, trace);
    let job_id = job.request.job_id.to_string();
    match submit(state, job, trace).instrument(span).await? {
        Submitted::New | Submitted::Waiting => Ok((StatusCode::ACCEPTED, accepted(&job_id))),
        Submitted::MovedOn(existing) => Ok((
            StatusCode::OK,
            Accepted {
                job_id: existing.job_id.to_string(),
                status: existing.status,
                message: format!(
                    "job already exists and is {}; GET /api/v1/jobs/{} for its status",
                    existing.status.as_str(),
                    existing.job_id
                ),
            },
        )),
    }
}

fn accepted(job_id: &str) -> Accepted {
    Accepted {
        job_id: job_id.to_owned(),
        status: Status::Accepted,
        message: "Job accepted; the result will be POSTed to callback_url".into(),
    }
}

/// Publishes the job's request, with `trace` as its `traceparent`, and waits for JetStream's
/// ack; anything short of it is a 503. Returns the stream sequence the request is stored at.
pub async fn publish(
    state: &AppState,
    request: &JobRequested,
    trace: Option<&TraceParent>,
) -> Result<u64, ApiError> {
    publish_event_acked(
        &state.topology.jetstream,
        request.subject(),
        &Event::Requested.msg_id(&request.job_id),
        request,
        trace.map(TraceParent::to_headers).unwrap_or_default(),
    )
    .await
    .map(|ack| ack.sequence)
    .map_err(|err| ApiError::Unavailable(err.to_string()))
}
