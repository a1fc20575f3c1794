//! Accepting a job: record it, publish it, and only then answer 202.

use axum::http::StatusCode;
use serde::Serialize;
use tracing::Instrument;
use utoipa::ToSchema;

use jetcall::events::JobRequested;
use jetcall::publish::publish_event_with_headers;
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
#[derive(Debug)]
pub enum Recorded {
    /// The request is to be published: a new job (`new`), or a resubmission of one that is
    /// still `accepted`, whose first publish may have been lost. `trace` goes on the message:
    /// the job's own trace, for a resubmission the one it was first submitted in.
    Publish {
        request: JobRequested,
        new: bool,
        trace: TraceParent,
    },
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
    let mut doc = JobStatus::accepted(&job.request, job.digest.clone());
    doc.sealed_signing_secret = job.sealed_signing_secret;
    doc.tenant = job.tenant.clone();
    doc.trace_id = Some(trace.trace_id());
    let created = state
        .topology
        .status
        .create(&doc)
        .await
        .map_err(|err| ApiError::Unavailable(err.to_string()))?;
    match created {
        Created::New(_) => Ok(Recorded::Publish {
            request: job.request,
            new: true,
            trace,
        }),
        // Another tenant's id is a conflict whatever the content, and says nothing of its job.
        Created::Exists(existing)
            if existing.request_digest != job.digest || existing.tenant != job.tenant =>
        {
            Err(ApiError::Conflict {
                job_id: existing.job_id.to_string(),
            })
        }
        Created::Exists(existing) if existing.status == Status::Accepted => Ok(Recorded::Publish {
            request: existing.request(),
            new: false,
            trace: existing.trace().unwrap_or(trace),
        }),
        Created::Exists(existing) => Ok(Recorded::MovedOn(existing)),
    }
}

/// Records the job as `accepted` and publishes its request. A 202 means JetStream has stored
/// the request; anything short of that is a 503 and the caller retries with the same id.
///
/// Resubmitting an existing id with the same content is safe: while the job is still
/// `accepted` the request is published again (JetStream drops the duplicate by `Nats-Msg-Id`,
/// and a request lost by a gateway that died between the two writes is repaired) and the answer
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
    accept_traced(state, job, trace).instrument(span).await
}

async fn accept_traced(
    state: &AppState,
    job: ValidJob,
    trace: TraceParent,
) -> Result<(StatusCode, Accepted), ApiError> {
    match record(state, job, trace).await? {
        Recorded::Publish {
            request,
            new,
            trace,
        } => {
            publish(state, &request, Some(&trace)).await?;
            if new {
                state.metrics.job_accepted(request.kind.as_str());
            }
            Ok((StatusCode::ACCEPTED, accepted(&request.job_id.to_string())))
        }
        Recorded::MovedOn(existing) => Ok((
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
/// ack; anything short of it is a 503.
pub async fn publish(
    state: &AppState,
    request: &JobRequested,
    trace: Option<&TraceParent>,
) -> Result<(), ApiError> {
    publish_event_with_headers(
        &state.topology.jetstream,
        Event::Requested.subject(&request.kind),
        &Event::Requested.msg_id(&request.job_id),
        request,
        trace.map(TraceParent::to_headers).unwrap_or_default(),
    )
    .await
    .map_err(|err| ApiError::Unavailable(err.to_string()))
}
