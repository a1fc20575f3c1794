//! `GET /api/v1/jobs/{id}/events`: a job's status changes as server-sent events, from a watch
//! on its key in the `job_status` bucket, ending once nothing more will happen to the job.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, StreamExt};

use jetcall::JobId;
use jetcall::status::JobStatus;
use jetcall::store::{JobChange, JobWatch};
use jetcall::view::JobView;

use crate::error::{ApiError, ErrorBody};
use crate::keys::{Caller, may_see};
use crate::routes::{batch_id_of, job_view, waiting_batch};
use crate::shed::Permit;
use crate::state::AppState;

type Events = BoxStream<'static, Result<Event, Infallible>>;

/// How often a stream whose job waits in a batch not created yet looks for the batch's id.
const BATCH_LOOK: Duration = Duration::from_secs(1);

/// A stream's places: among all streams, and among its API key's, when keys are configured.
type StreamPermits = (Permit, Option<Permit>);

/// The job's current status first, then each change; the stream ends after a final state
/// (`delivered`, `undeliverable`), when the job's record is removed, or when the gateway stops.
///
/// Each event's `id` is the document's revision in the bucket: a client that reconnects with
/// `Last-Event-ID` resumes after it, and one that has already seen the final state gets
/// `204 No Content`, which tells an `EventSource` to stop reconnecting.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{job_id}/events",
    operation_id = "job_events",
    tag = "jobs",
    params(
        ("job_id" = JobId, Path, description = "The job's id", example = "JOB-771"),
        ("last-event-id" = Option<i64>, Header, minimum = 0, nullable = false, description = "The `id` of the last event seen: only newer states are sent"),
    ),
    responses(
        (status = 200, description = "Server-sent events: `status` (data: the status document as JSON; id: its revision) now and at each change, until `delivered` or `undeliverable`; `removed` (data: a sentence) if the job's record is deleted", content(("text/event-stream", item_schema = ref("#/components/schemas/JobEvent")))),
        (status = 204, description = "`Last-Event-ID` is the job's final state: nothing more will come"),
        (status = 404, description = "No job has this id, or it is another API key's (`not_found`)", body = ErrorBody),
        (status = 422, description = "`Last-Event-ID` is not an event id this stream sends (`invalid_field`)", body = ErrorBody),
        (status = 503, description = "NATS did not answer (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn job_events(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    job_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job_id = &crate::extract::parse_path_id(job_id)?;
    let caller = caller.as_deref().map(Arc::as_ref);
    let own = caller
        .map(|caller| {
            state
                .event_streams_per_key
                .try_enter(&caller.name, "event streams for this API key")
        })
        .transpose()?;
    let permit = (state.event_streams.try_enter("event streams")?, own);
    let last_seen = last_event_id(&headers)?;
    let (doc, revision) = state
        .topology
        .status
        .get(job_id)
        .await
        .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?
        // A job's tenant never changes, so one look before the watch decides for its events.
        .filter(|(doc, _)| may_see(caller, doc))
        .ok_or_else(|| ApiError::NotFound(format!("no job with id `{job_id}`")))?;
    let seen_current = last_seen.is_some_and(|seen| seen >= revision);
    if seen_current && doc.status.is_final() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let is_final = doc.status.is_final();
    let (event, unnamed) = status_event(&state, doc, revision).await;
    let current: Events = if seen_current {
        stream::empty().boxed()
    } else {
        stream::iter([Ok(event)]).boxed()
    };
    let events = if is_final {
        current
    } else {
        let watch = state
            .topology
            .status
            .watch(job_id, revision)
            .await
            .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?;
        let following = Following {
            watch: Some(watch),
            job_id: job_id.clone(),
            _permit: permit,
            state: state.clone(),
            unnamed,
        };
        current.chain(changes(following)).boxed()
    };
    let events = events.take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The revision a reconnecting client saw last. Only ids this stream sent are taken: a value
/// that is not one is refused rather than read as "from the start", which would replay
/// states the client may already have acted on.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .and_then(|revision| u64::try_from(revision).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid_field(
                "last-event-id",
                "`Last-Event-ID` must be the `id` of an event of this stream",
            )
        })
}

/// An open stream's state between events. The permit is held as long as the stream lives,
/// so it counts against `max_event_streams`.
struct Following {
    /// The watch, until the event that ends the stream has been sent.
    watch: Option<JobWatch>,
    job_id: JobId,
    _permit: StreamPermits,
    state: AppState,
    /// The last state sent, while it could not name the batch the job waits in.
    unnamed: Option<Unnamed>,
}

/// A `batched` state sent without its `batch_id`: the generator writes that id into the
/// batch's record alone, so no change of the job's own document would bring it.
struct Unnamed {
    view: JobView,
    /// The batch's record, looked at until it has the id.
    record: String,
    revision: u64,
}

/// The job's changes after the revision already sent, until a final state or removal, and the
/// same state again with its `batch_id` once the job's batch is created.
fn changes(following: Following) -> Events {
    stream::unfold(following, |mut following| async move {
        let mut watch = following.watch.take()?;
        let change = loop {
            let Some(mut unnamed) = following.unnamed.take() else {
                break watch.next().await?;
            };
            tokio::select! {
                change = watch.next() => break change?,
                () = tokio::time::sleep(BATCH_LOOK) => {
                    unnamed.view.batch_id = batch_id_of(&following.state, &unnamed.record).await;
                    if unnamed.view.batch_id.is_none() {
                        following.unnamed = Some(unnamed);
                        continue;
                    }
                    following.watch = Some(watch);
                    let event = event_of(&unnamed.view, unnamed.revision);
                    return Some((Ok(event), following));
                }
            }
        };
        match change {
            Ok(JobChange::Removed(revision)) => {
                let removed = Event::default()
                    .event("removed")
                    .id(revision.to_string())
                    .data(format!("job {} is no longer recorded", following.job_id));
                Some((Ok(removed), following))
            }
            Ok(JobChange::Written(doc, revision)) => {
                if !doc.status.is_final() {
                    following.watch = Some(watch);
                }
                let (event, unnamed) = status_event(&following.state, *doc, revision).await;
                following.unnamed = unnamed;
                Some((Ok(event), following))
            }
            Err(err) => {
                // The client reconnects with Last-Event-ID and resumes.
                let job_id = &following.job_id;
                tracing::warn!(%job_id, error = %err, "job event stream lost its watch");
                None
            }
        }
    })
    .boxed()
}

/// The event of `doc` at `revision`, as `GET /api/v1/jobs/{job_id}` would show it, and what
/// to look at again when it could not name the batch the job waits in.
async fn status_event(state: &AppState, doc: JobStatus, revision: u64) -> (Event, Option<Unnamed>) {
    let record = waiting_batch(&doc).map(str::to_owned);
    let view = job_view(state, doc).await;
    let event = event_of(&view, revision);
    let unnamed = record
        .filter(|_| view.batch_id.is_none())
        .map(|record| Unnamed {
            view,
            record,
            revision,
        });
    (event, unnamed)
}

fn event_of(view: &JobView, revision: u64) -> Event {
    let data = serde_json::to_string(view).unwrap_or_default();
    Event::default()
        .event("status")
        .id(revision.to_string())
        .data(data)
}
