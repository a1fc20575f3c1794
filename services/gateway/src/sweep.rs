//! The sweep: jobs a gateway recorded as `accepted` but died before publishing. It runs at
//! start-up and then every `gateway.sweep_interval`, by one gateway at a time: the one holding
//! the lease in the `job_status` bucket's `gateway.sweep` key, so a crash is repaired without
//! a restart and a fleet of gateways does not scan the bucket once each.
//!
//! A job still `accepted` past `gateway.sweep_after` is either waiting behind a backlog (its
//! request is in the stream) or was never published (the gateway died between the KV write
//! and the publish, and the caller never retried). Only the second kind is published again:
//! once the stream's duplicate window has passed, a blind republish would make the generator
//! pay for the job twice.
//!
//! 1. Candidates: `StatusStore::accepted_before` the threshold, the jobs whose latest status
//!    is `accepted` with no `request_seq`.
//! 2. Which of them are in the stream: the `Nats-Msg-Id` headers of `jobs.requested.>` since
//!    the oldest candidate was created (less a margin for clock skew), payloads left out.
//! 3. The rest are published again with their usual `Nats-Msg-Id`, so a concurrent sweep or a
//!    caller's retry is stored once, each after reading its status again.

use std::collections::HashSet;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use futures::StreamExt;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use jetcall::JobId;
use jetcall::durations::to_time;
use jetcall::scan::{Scan, Scanned, allowing_for_skew};
use jetcall::status::Status;
use jetcall::subjects::{Event, SWEEP_LEASE_KEY};

use crate::accept;
use crate::state::AppState;

/// Republishes in flight at once.
const CONCURRENCY: usize = 64;

/// What one sweep found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Jobs `accepted` for longer than `gateway.sweep_after`.
    pub candidates: usize,
    /// Candidates whose request is in the stream: waiting for the generator, left alone.
    pub in_stream: usize,
    /// Candidates published again.
    pub republished: usize,
    /// Candidates that moved on (or disappeared) between the scan and their republish.
    pub moved_on: usize,
    /// Candidates whose republish failed; the next round sweeps them again.
    pub failed: usize,
    /// `accepted` documents that could not be decoded, skipped.
    pub unreadable: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("could not read the `job_status` bucket: {0}")]
    Bucket(String),
    #[error("could not read `jobs.requested.>` in the `JOBS` stream: {0}")]
    Stream(String),
}

/// Sweeps at start and then every `gateway.sweep_interval` while this gateway holds the lease,
/// until `shutdown`; then hands the lease back so the next gateway to start sweeps at once.
/// Never fails: a failed sweep is a warning, and the next round tries again.
pub async fn periodically(state: AppState, shutdown: CancellationToken) {
    let interval = state.config.gateway.sweep_interval;
    let holder = format!(
        "{}-{}",
        std::process::id(),
        OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let lease = state
            .topology
            .status
            .take_lease(SWEEP_LEASE_KEY, &holder, interval)
            .await;
        match lease {
            Ok(true) => {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = once(&state) => {}
                }
            }
            Ok(false) => tracing::debug!("another gateway holds the sweep's lease"),
            Err(err) => {
                state.metrics.sweep_failed();
                tracing::warn!(error = %err, "could not take the sweep's lease");
            }
        }
    }
    state
        .topology
        .status
        .release_lease(SWEEP_LEASE_KEY, &holder)
        .await;
}

/// Runs the sweep once and reports it in the log and the metrics.
async fn once(state: &AppState) {
    match sweep(state).await {
        Ok(report) => {
            state.metrics.sweep_completed(report.republished as u64);
            tracing::info!(
                candidates = report.candidates,
                in_stream = report.in_stream,
                republished = report.republished,
                moved_on = report.moved_on,
                failed = report.failed,
                unreadable = report.unreadable,
                "sweep of jobs stuck in `accepted` done"
            );
            if report.failed > 0 {
                tracing::warn!(
                    failed = report.failed,
                    "sweep could not republish some jobs; the next round retries them"
                );
            }
        }
        Err(err) => {
            state.metrics.sweep_failed();
            tracing::warn!(error = %err, "sweep of jobs stuck in `accepted` failed");
        }
    }
}

/// Publishes again the jobs that have been `accepted` for longer than `gateway.sweep_after`
/// and whose request is not in the stream.
pub async fn sweep(state: &AppState) -> Result<SweepReport, SweepError> {
    let mut report = SweepReport::default();
    let threshold = OffsetDateTime::now_utc()
        .checked_sub(to_time(state.config.gateway.sweep_after))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let found = state
        .topology
        .status
        .accepted_before(threshold)
        .await
        .map_err(|err| SweepError::Bucket(err.to_string()))?;
    report.unreadable = found.unreadable;
    let (mut candidates, Some(oldest)) = (found.jobs, found.oldest) else {
        return Ok(report);
    };
    report.candidates = candidates.len();

    report.in_stream = remove_published(state, oldest, &mut candidates).await?;

    report = futures::stream::iter(candidates)
        .map(|job_id| republish(state, job_id))
        .buffer_unordered(CONCURRENCY)
        .fold(report, |mut report, outcome| async move {
            match outcome {
                Outcome::Republished => report.republished += 1,
                Outcome::MovedOn => report.moved_on += 1,
                Outcome::Failed => report.failed += 1,
            }
            report
        })
        .await;
    Ok(report)
}

/// Step 2: removes from `candidates` every job whose request is in the stream since `oldest`
/// (the oldest candidate's `created_at`), and returns how many it removed.
async fn remove_published(
    state: &AppState,
    oldest: OffsetDateTime,
    candidates: &mut HashSet<String>,
) -> Result<usize, SweepError> {
    /// The part of a request event the sweep needs, when its message has no usable header.
    #[derive(Deserialize)]
    struct Request {
        job_id: String,
    }

    let stream = &state.topology.stream;
    let mut scan = Scan::open(
        stream,
        OrderedConfig {
            filter_subject: Event::Requested.filter(),
            // The header names the job; the payload, with the job's input, is not needed.
            headers_only: true,
            deliver_policy: DeliverPolicy::ByStartTime {
                start_time: allowing_for_skew(oldest),
            },
            ..Default::default()
        },
    )
    .await
    .map_err(|err| SweepError::Stream(err.to_string()))?;

    let suffix = format!(".{}", Event::Requested.token());
    let mut removed = 0;
    while !candidates.is_empty()
        && let Some(Scanned {
            message,
            stream_sequence,
            ..
        }) = scan
            .next()
            .await
            .map_err(|err| SweepError::Stream(err.to_string()))?
    {
        let from_header = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(NATS_MESSAGE_ID))
            .and_then(|id| id.as_str().strip_suffix(&suffix));
        let job_id = match from_header {
            Some(job_id) => job_id.to_owned(),
            // Published without our header (by hand, say): read the job id from the payload.
            None => {
                let raw = stream
                    .get_raw_message(stream_sequence)
                    .await
                    .map_err(|err| SweepError::Stream(err.to_string()))?;
                match serde_json::from_slice::<Request>(&raw.payload) {
                    Ok(request) => request.job_id,
                    Err(_) => continue,
                }
            }
        };
        if candidates.remove(&job_id) {
            removed += 1;
        }
    }
    Ok(removed)
}

enum Outcome {
    Republished,
    MovedOn,
    Failed,
}

/// Step 3 for one job: publishes its request again if it is still `accepted`.
async fn republish(state: &AppState, job_id: String) -> Outcome {
    let Ok(job_id) = JobId::parse(&job_id) else {
        tracing::warn!(%job_id, "sweep: status document with an invalid job id skipped");
        return Outcome::Failed;
    };
    let (doc, revision) = match state.topology.status.get(&job_id).await {
        Ok(Some((doc, revision))) if doc.status == Status::Accepted => (doc, revision),
        Ok(_) => return Outcome::MovedOn,
        Err(err) => {
            tracing::warn!(%job_id, error = %err, "sweep: could not read the job's status");
            return Outcome::Failed;
        }
    };
    match accept::publish(state, &doc.request(), doc.trace().as_ref()).await {
        Ok(sequence) => {
            tracing::debug!(%job_id, "sweep: request published again");
            accept::note_request_seq(state, Some((doc, revision)), &job_id, sequence).await;
            Outcome::Republished
        }
        Err(err) => {
            tracing::warn!(%job_id, error = %err, "sweep: could not publish the job's request");
            Outcome::Failed
        }
    }
}
