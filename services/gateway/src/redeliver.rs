//! Operators' second chance for dead letters: put undeliverable jobs back to be delivered.

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use jetcall::JobId;
use jetcall::events::DeliveryReport;
use jetcall::publish::publish_event_with_headers;
use jetcall::scan::{Scan, ScanError, Scanned, find_msg_id};
use jetcall::status::{JobStatus, Status};
use jetcall::store::Updated;
use jetcall::subjects::Event;

use crate::error::ApiError;
use crate::keys::{Caller, may_see};
use crate::state::AppState;

/// The most jobs one window request re-queues, so one call stays a bounded amount of work.
const MAX_WINDOW_JOBS: usize = 10_000;

/// A job put back to be delivered.
#[derive(Debug, Serialize, ToSchema)]
pub struct Requeued {
    pub job_id: String,
    /// `completed`, `failed`, `cancelled` or `expired` again: what is delivered.
    pub status: Status,
    /// The new delivery round: 1 for the first redelivery.
    pub delivery_round: u32,
}

/// Reopens one undeliverable job and publishes its outcome again for the callback service.
/// Another tenant's job is left alone and answered as if there were none.
///
/// Order of writes: the status document moves to `completed` (or `failed`) in a new delivery
/// round, then the outcome is published under a round-specific `Nats-Msg-Id`. A gateway that
/// stops or fails between the two leaves a round opened whose event may not be in the stream:
/// asking again repairs it, publishing the same round's event unless it is found there, so
/// a redelivery can always be retried until it answers 202.
pub async fn redeliver(
    state: &AppState,
    job_id: &JobId,
    caller: Option<&Caller>,
) -> Result<Requeued, ApiError> {
    let now = OffsetDateTime::now_utc();
    let store = &state.topology.status;
    let updated = store
        .update(job_id, |doc| {
            may_see(caller, doc) && doc.reopen_delivery(now)
        })
        .await
        .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?;
    let (doc, reopened) = match updated {
        Updated::Written(doc, _) => (doc, true),
        Updated::Unchanged(doc) if !may_see(caller, &doc) => {
            return Err(ApiError::NotFound(format!("no job with id `{job_id}`")));
        }
        Updated::Unchanged(doc) if round_awaits_its_event(&doc) => (doc, false),
        Updated::Unchanged(doc) => {
            return Err(ApiError::NotRedeliverable {
                job_id: job_id.to_string(),
                status: doc.status.as_str(),
            });
        }
        Updated::Missing => return Err(ApiError::NotFound(format!("no job with id `{job_id}`"))),
    };
    let event = doc.finished_event().ok_or_else(|| {
        ApiError::NatsUnavailable(format!("job {job_id} has no outcome to deliver"))
    })?;
    let kind = event.event();
    // A fresh msg id per round: the first publish of this event is long past, and would
    // otherwise make JetStream drop this one as a duplicate.
    let msg_id = format!("{}.redeliver.{}", kind.msg_id(job_id), doc.delivery_round);
    let stored = if reopened {
        false
    } else {
        // Past the duplicate window a second copy of the round's event would be stored, and
        // the job delivered twice: look for the first.
        find_msg_id(
            &state.topology.stream,
            kind.subject(&event.kind),
            doc.updated_at,
            &msg_id,
        )
        .await
        .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?
        .is_some()
    };
    if !stored {
        // In the job's own trace, so the redelivered webhook carries it as the first did.
        publish_event_with_headers(
            &state.topology.jetstream,
            kind.subject(&event.kind),
            &msg_id,
            &event,
            doc.trace()
                .map(|trace| trace.to_headers())
                .unwrap_or_default(),
        )
        .await
        .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?;
    }
    tracing::info!(%job_id, round = doc.delivery_round, reopened, "job re-queued for delivery");
    Ok(Requeued {
        job_id: job_id.to_string(),
        status: doc.status,
        delivery_round: doc.delivery_round,
    })
}

/// Whether `doc` is in a delivery round an operator opened that has not made an attempt yet:
/// its event may never have reached the stream, so a redelivery is asked for again.
fn round_awaits_its_event(doc: &JobStatus) -> bool {
    doc.awaits_delivery() && doc.delivery_round > 0 && doc.attempts_this_round() == 0
}

/// The query of `POST /api/v1/deliveries/redeliver`: jobs that became undeliverable between
/// `since` and `until`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Window {
    /// RFC 3339, e.g. `2026-11-29T10:00:00Z`.
    #[serde(with = "time::serde::rfc3339")]
    #[param(value_type = String, format = DateTime)]
    pub since: OffsetDateTime,
    /// RFC 3339; now when left out.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime, nullable = false)]
    pub until: Option<OffsetDateTime>,
}

/// What a window's redelivery did.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct WindowResult {
    pub requeued: Vec<Requeued>,
    /// Jobs that became undeliverable in the window but are not any more (already redelivered).
    pub skipped: Vec<String>,
}

/// Re-queues every job that became undeliverable in `[since, until]`, found through the
/// `jobs.undeliverable.>` events in the stream.
pub async fn redeliver_window(
    state: &AppState,
    window: Window,
    caller: Option<&Caller>,
) -> Result<WindowResult, ApiError> {
    let until = window.until.unwrap_or_else(OffsetDateTime::now_utc);
    if until < window.since {
        return Err(ApiError::invalid_field(
            "until",
            "`until` is before `since`",
        ));
    }
    let unavailable = |err: ScanError| ApiError::NatsUnavailable(err.to_string());
    let mut scan = Scan::open(
        &state.topology.stream,
        OrderedConfig {
            filter_subject: Event::Undeliverable.filter(),
            deliver_policy: DeliverPolicy::ByStartTime {
                start_time: window.since,
            },
            ..Default::default()
        },
    )
    .await
    .map_err(unavailable)?;
    let mut result = WindowResult::default();
    let mut seen = std::collections::HashSet::new();
    while let Some(Scanned {
        message, published, ..
    }) = scan.next().await.map_err(unavailable)?
    {
        if published > until {
            break;
        }
        if let Ok(report) = serde_json::from_slice::<DeliveryReport>(&message.payload)
            && seen.insert(report.job_id.clone())
        {
            match redeliver(state, &report.job_id, caller).await {
                Ok(requeued) => result.requeued.push(requeued),
                Err(ApiError::NotRedeliverable { job_id, .. }) => result.skipped.push(job_id),
                // Another tenant's dead letter: not the caller's to see, not even as skipped.
                Err(ApiError::NotFound(_)) => {}
                Err(err) => return Err(err),
            }
        }
        if seen.len() >= MAX_WINDOW_JOBS {
            break;
        }
    }
    Ok(result)
}
