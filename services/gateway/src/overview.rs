//! `GET /api/v1/overview`: what the console's first page shows, for an operator. Everything in
//! it is read from JetStream (the stream's recent flow, the two durable consumers, the shared
//! pause in `llm_limits`, the status bucket) and none of it from another service's `/metrics`,
//! so any gateway answers the same.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, State};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::Instant;
use utoipa::ToSchema;

use jetcall::gate::GateReport;
use jetcall::lanes;
use jetcall::status::Status;
use jetcall::subjects::{CALLBACK_CONSUMER, GATE_KEY_PREFIX, GENERATOR_CONSUMER};

use crate::error::{ApiError, ErrorBody};
use crate::feed::{Feed, FlowView, Latency, Series, Totals, lock};
use crate::keys::{Caller, require_operator};
use crate::listing::newest;
use crate::state::AppState;

/// How long a dead-letter count is reused: it costs a pass over the bucket's latest writes.
const DEAD_LETTERS_TTL: Duration = Duration::from_secs(3);
/// A generator instance whose gate report is older than this is taken to be gone.
const GATE_REPORT_FRESH: time::Duration = time::Duration::minutes(2);

/// What the overview keeps between requests.
#[derive(Debug, Default)]
pub struct Overviews {
    feed: Feed,
    dead_letters: Mutex<Option<(Instant, DeadLetters)>>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
struct DeadLetters {
    count: u64,
    complete: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    now: OffsetDateTime,
    /// 900: the 15 minutes the flow covers.
    window_seconds: u64,
    /// 5: each value of `series` is one bucket of this many seconds.
    bucket_seconds: u64,
    /// The start of the first bucket.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    since: OffsetDateTime,
    /// The gateway is still reading the window's history from the stream: the figures grow.
    catching_up: bool,
    series: Series,
    totals: Totals,
    latency_ms: Latency,
    /// The `generator` and `callback` consumers.
    consumers: Vec<ConsumerView>,
    generator: GeneratorView,
    /// Jobs now `undeliverable`, among the bucket's latest writes.
    dead_letters: u64,
    /// Whether that pass saw every job in the bucket.
    dead_letters_complete: bool,
}

/// One durable consumer's work.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerView {
    name: &'static str,
    /// Messages not yet handed to any instance (`num_pending`).
    waiting: u64,
    /// Handed out and not yet acknowledged: being worked on or waiting for a retry.
    in_flight: u64,
    /// The age of the oldest message not yet acknowledged; `null` when there is none.
    oldest_unfinished_seconds: Option<f64>,
    /// Messages handed out more than once.
    redelivered: u64,
}

/// Whether the generators are calling the LLM, and if not, why.
#[derive(Debug, Serialize, ToSchema)]
pub struct GeneratorView {
    paused: bool,
    /// Until when every instance holds back its calls (the provider's 429 or overload).
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    paused_until: Option<OffsetDateTime>,
    reason: Option<String>,
    /// The instances whose consumption is paused by a fault outside any job, such as the
    /// provider refusing the credentials.
    instances: Vec<GateReport>,
}

/// The pipeline at a glance: the last 15 minutes' flow, the consumers' backlogs, the
/// generators' pauses and the dead letters. For an operator's key (any caller when the API
/// has no keys).
#[utoipa::path(
    get,
    path = "/api/v1/overview",
    operation_id = "overview",
    tag = "operators",
    responses(
        (status = 200, description = "The pipeline's recent flow and present state", body = Overview),
        (status = 403, description = "The key is not an operator's (`forbidden`)", body = ErrorBody),
        (status = 503, description = "NATS did not answer (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn overview(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
) -> Result<Json<Overview>, ApiError> {
    require_operator(caller.as_deref().map(Arc::as_ref))?;
    let flow = state
        .overviews
        .feed
        .snapshot(&state.topology.stream, &state.shutdown);
    let (consumers, generator, dead_letters) = tokio::try_join!(
        consumers(&state),
        generator(&state, flow.now),
        dead_letters(&state),
    )?;
    let FlowView {
        now,
        window_seconds,
        bucket_seconds,
        since,
        catching_up,
        series,
        totals,
        latency_ms,
    } = flow;
    Ok(Json(Overview {
        now,
        window_seconds,
        bucket_seconds,
        since,
        catching_up,
        series,
        totals,
        latency_ms,
        consumers,
        generator,
        dead_letters: dead_letters.count,
        dead_letters_complete: dead_letters.complete,
    }))
}

fn unavailable(err: impl std::fmt::Display) -> ApiError {
    ApiError::NatsUnavailable(err.to_string())
}

/// The generator's queue and the callback's: the generator's is its default lane and every
/// tenant's lane (`jetcall::lanes`) together.
async fn consumers(state: &AppState) -> Result<Vec<ConsumerView>, ApiError> {
    let stream = &state.topology.stream;
    let mut views = [GENERATOR_CONSUMER, CALLBACK_CONSUMER].map(|name| ConsumerView {
        name,
        waiting: 0,
        in_flight: 0,
        oldest_unfinished_seconds: None,
        redelivered: 0,
    });
    let mut listing = stream.consumers();
    while let Some(info) = listing.next().await {
        let info = info.map_err(unavailable)?;
        let view = if info.name == CALLBACK_CONSUMER {
            &mut views[1]
        } else if lanes::lane_of(&info).is_some() {
            &mut views[0]
        } else {
            continue;
        };
        // The first message past the ack floor that the consumer takes is its oldest
        // unfinished one.
        let mut filters = info.config.filter_subjects.clone();
        if !info.config.filter_subject.is_empty() {
            filters.push(info.config.filter_subject.clone());
        }
        let after = info.ack_floor.stream_sequence + 1;
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            for filter in filters {
                if let Ok(message) = stream
                    .direct_get_next_for_subject(filter, Some(after))
                    .await
                {
                    let age = (OffsetDateTime::now_utc() - message.time)
                        .as_seconds_f64()
                        .max(0.0);
                    view.oldest_unfinished_seconds =
                        Some(view.oldest_unfinished_seconds.map_or(age, |a| a.max(age)));
                }
            }
        }
        view.waiting += info.num_pending;
        view.in_flight += info.num_ack_pending as u64;
        view.redelivered += info.num_redelivered as u64;
    }
    Ok(views.into())
}

/// The part of a provider's shared budget (`generator::limiter`) that says it is paused.
#[derive(Deserialize)]
struct SharedPause {
    /// Unix microseconds.
    #[serde(default)]
    not_before: i64,
}

async fn generator(state: &AppState, now: OffsetDateTime) -> Result<GeneratorView, ApiError> {
    let limits = &state.topology.limits;
    let mut keys = limits.keys().await.map_err(unavailable)?;
    let mut paused_until: Option<OffsetDateTime> = None;
    let mut instances = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(unavailable)?;
        let Some(value) = limits.get(&key).await.map_err(unavailable)? else {
            continue;
        };
        if key.starts_with(GATE_KEY_PREFIX) {
            if let Ok(report) = serde_json::from_slice::<GateReport>(&value)
                && report.paused
                && now - report.reported_at < GATE_REPORT_FRESH
            {
                instances.push(report);
            }
        } else if let Ok(pause) = serde_json::from_slice::<SharedPause>(&value) {
            let until =
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(pause.not_before) * 1_000)
                    .ok()
                    .filter(|until| *until > now);
            paused_until = paused_until.max(until);
        }
    }
    let reason = match (&paused_until, instances.first()) {
        (Some(_), _) => Some(
            "the provider answered 429 or overloaded: every instance holds back its calls".into(),
        ),
        (None, Some(report)) => report.reason.clone(),
        (None, None) => None,
    };
    Ok(GeneratorView {
        paused: paused_until.is_some() || !instances.is_empty(),
        paused_until,
        reason,
        instances,
    })
}

async fn dead_letters(state: &AppState) -> Result<DeadLetters, ApiError> {
    if let Some((at, count)) = *lock(&state.overviews.dead_letters)
        && at.elapsed() < DEAD_LETTERS_TTL
    {
        return Ok(count);
    }
    let (undeliverable, scanned) = newest(state, |_, doc| {
        (doc.status == Status::Undeliverable).then_some(())
    })
    .await?;
    let count = DeadLetters {
        count: undeliverable.len() as u64,
        complete: scanned.complete,
    };
    *lock(&state.overviews.dead_letters) = Some((Instant::now(), count));
    Ok(count)
}
