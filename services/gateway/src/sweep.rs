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
//! 1. Candidates: the latest value of every key in `job_status`, kept when it is `accepted`
//!    (recognised by the start of the JSON, before decoding anything) and older than the
//!    threshold.
//! 2. Which of them are in the stream: the `Nats-Msg-Id` headers of `jobs.requested.>` since
//!    the oldest candidate was created (less a margin for clock skew), payloads left out.
//! 3. The rest are published again with their usual `Nats-Msg-Id`, so a concurrent sweep or a
//!    caller's retry is stored once, each after reading its status again.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::kv;
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use jetcall::JobId;
use jetcall::status::Status;
use jetcall::subjects::Event;

use crate::accept;
use crate::state::AppState;

/// How every `accepted` status document starts: `status` is its first field.
const ACCEPTED_PREFIX: &[u8] = br#"{"status":"accepted""#;

/// How far before the oldest candidate's `created_at` (the gateway's clock) the scan of the
/// stream (the server's clock) starts.
pub(crate) const CLOCK_SKEW_MARGIN: Duration = Duration::from_secs(60);

/// A scan that receives nothing for this long before reaching the end gives up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The key of the sweep's lease in the `job_status` bucket. A job id has no dot, so no job
/// can take this key, and whatever reads the bucket's jobs (the listing, the sweep itself)
/// skips it.
pub(crate) const LEASE_KEY: &str = "gateway.sweep";

/// Who may sweep, until when: the value under [`LEASE_KEY`].
#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    #[serde(with = "time::serde::rfc3339")]
    until: OffsetDateTime,
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
        match take_lease(&state, &holder, interval).await {
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
    release_lease(&state, &holder).await;
}

/// Takes (or renews) the lease for `term` if it is free, expired or already ours. Compare-and-
/// set on the key's revision, so of gateways racing for it one wins.
async fn take_lease(state: &AppState, holder: &str, term: Duration) -> Result<bool, String> {
    let kv = state.topology.status.kv();
    let now = OffsetDateTime::now_utc();
    let lease = serde_json::to_vec(&Lease {
        holder: holder.to_owned(),
        until: now + to_time(term),
    })
    .map_err(|err| err.to_string())?;
    let entry = kv.entry(LEASE_KEY).await.map_err(|err| err.to_string())?;
    let current = entry.filter(|entry| entry.operation == kv::Operation::Put);
    let Some(current) = current else {
        return match kv.create(LEASE_KEY, lease.into()).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(err.to_string()),
        };
    };
    let free = serde_json::from_slice::<Lease>(&current.value)
        .ok()
        // A value that is not a lease holds nothing.
        .is_none_or(|held| held.holder == holder || held.until <= now);
    if !free {
        return Ok(false);
    }
    match kv.update(LEASE_KEY, lease.into(), current.revision).await {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(err) => Err(err.to_string()),
    }
}

/// Expires the lease if this gateway holds it.
async fn release_lease(state: &AppState, holder: &str) {
    let kv = state.topology.status.kv();
    let Ok(Some(entry)) = kv.entry(LEASE_KEY).await else {
        return;
    };
    let ours =
        serde_json::from_slice::<Lease>(&entry.value).is_ok_and(|held| held.holder == holder);
    if ours
        && let Err(err) = kv
            .delete_expect_revision(LEASE_KEY, Some(entry.revision))
            .await
    {
        tracing::debug!(error = %err, "could not hand the sweep's lease back; it expires");
    }
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
    let Some((mut candidates, oldest)) = candidates(state, threshold, &mut report).await? else {
        return Ok(report);
    };
    report.candidates = candidates.len();

    let start_time = oldest
        .checked_sub(to_time(CLOCK_SKEW_MARGIN))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    report.in_stream = remove_published(state, start_time, &mut candidates).await?;

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

/// Step 1: the ids of the jobs `accepted` before `threshold`, and the oldest one's
/// `created_at`; `None` when there are none.
async fn candidates(
    state: &AppState,
    threshold: OffsetDateTime,
    report: &mut SweepReport,
) -> Result<Option<(HashSet<String>, OffsetDateTime)>, SweepError> {
    /// The part of a status document the sweep needs.
    #[derive(Deserialize)]
    struct Head {
        status: Status,
        job_id: String,
        #[serde(with = "time::serde::rfc3339")]
        created_at: OffsetDateTime,
        #[serde(default)]
        request_seq: Option<u64>,
    }

    let kv = state.topology.status.kv();
    let mut scan = Scan::open(
        &kv.stream,
        OrderedConfig {
            filter_subject: format!("{}>", kv.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        },
    )
    .await
    .map_err(SweepError::Bucket)?;

    let mut found = HashSet::new();
    let mut oldest: Option<OffsetDateTime> = None;
    while let Some(message) = scan.next().await.map_err(SweepError::Bucket)? {
        // Deletes and purges have no value, and most jobs have moved on: neither is decoded.
        if !message.payload.starts_with(ACCEPTED_PREFIX) {
            continue;
        }
        match serde_json::from_slice::<Head>(&message.payload) {
            // Its gateway saw the request stored: in the stream, nothing to look for.
            Ok(head) if head.request_seq.is_some() => {}
            Ok(head) if head.status == Status::Accepted && head.created_at < threshold => {
                oldest = Some(oldest.map_or(head.created_at, |o| o.min(head.created_at)));
                found.insert(head.job_id);
            }
            Ok(_) => {}
            Err(err) => {
                report.unreadable += 1;
                tracing::warn!(subject = %message.subject, error = %err, "unreadable status document skipped by the sweep");
            }
        }
    }
    Ok(oldest.map(|oldest| (found, oldest)))
}

/// Step 2: removes from `candidates` every job whose request is in the stream at or after
/// `start_time`, and returns how many it removed.
async fn remove_published(
    state: &AppState,
    start_time: OffsetDateTime,
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
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        },
    )
    .await
    .map_err(SweepError::Stream)?;

    let suffix = format!(".{}", Event::Requested.token());
    let mut removed = 0;
    while !candidates.is_empty()
        && let Some(message) = scan.next().await.map_err(SweepError::Stream)?
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
                let sequence = message
                    .info()
                    .map_err(|err| SweepError::Stream(err.to_string()))?
                    .stream_sequence;
                let raw = stream
                    .get_raw_message(sequence)
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

/// The stream sequence of the message published with `Nats-Msg-Id: msg_id` on `filter` at or
/// after `start_time`, if there is one: proof that an event is stored, for a republish that
/// would otherwise be stored twice once the duplicate window has passed. Reads headers only.
pub(crate) async fn find_msg_id(
    stream: &Stream,
    filter: String,
    start_time: OffsetDateTime,
    msg_id: &str,
) -> Result<Option<u64>, String> {
    let mut scan = Scan::open(
        stream,
        OrderedConfig {
            filter_subject: filter,
            headers_only: true,
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        },
    )
    .await?;
    while let Some(message) = scan.next().await? {
        let found = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(NATS_MESSAGE_ID))
            .is_some_and(|id| id.as_str() == msg_id);
        if found {
            let info = message.info().map_err(|err| err.to_string())?;
            return Ok(Some(info.stream_sequence));
        }
    }
    Ok(None)
}

/// One pass over what an ordered consumer delivers, up to the end of the stream as it was
/// when the pass began: the message after which the server counts nothing pending, or the
/// first one stored after the pass began, whichever comes first.
struct Scan {
    messages: Option<Ordered>,
    last_sequence: u64,
}

impl Scan {
    async fn open(stream: &Stream, config: OrderedConfig) -> Result<Self, String> {
        let last_sequence = stream
            .get_info()
            .await
            .map_err(|err| err.to_string())?
            .state
            .last_sequence;
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|err| err.to_string())?;
        let messages = if consumer.cached_info().num_pending == 0 {
            None
        } else {
            Some(consumer.messages().await.map_err(|err| err.to_string())?)
        };
        Ok(Self {
            messages,
            last_sequence,
        })
    }

    async fn next(&mut self) -> Result<Option<jetstream::Message>, String> {
        let Some(messages) = self.messages.as_mut() else {
            return Ok(None);
        };
        let message = match tokio::time::timeout(IDLE_TIMEOUT, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(err))) => return Err(err.to_string()),
            Ok(None) => return Err("the consumer ended before the end of the stream".into()),
            Err(_) => {
                return Err(format!(
                    "nothing received for {IDLE_TIMEOUT:?} before the end of the stream"
                ));
            }
        };
        let info = message.info().map_err(|err| err.to_string())?;
        if info.pending == 0 || info.stream_sequence >= self.last_sequence {
            self.messages = None;
        }
        Ok(Some(message))
    }
}

pub(crate) fn to_time(duration: Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetcall::Kind;
    use jetcall::events::JobRequested;
    use jetcall::status::JobStatus;

    #[test]
    fn an_accepted_document_starts_with_the_prefix_the_sweep_looks_for() {
        let request = JobRequested {
            job_id: JobId::parse("JOB-771").expect("valid id"),
            kind: Kind::product_description(),
            input: serde_json::Map::new(),
            callback_url: "http://127.0.0.1:9/hook".into(),
            metadata: serde_json::Map::new(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
        };
        let mut doc = JobStatus::accepted(&request, "digest".into());
        let encoded = jetcall::store::encode(&doc);
        assert!(encoded.starts_with(ACCEPTED_PREFIX), "{encoded:?}");
        doc.status = Status::Generating;
        assert!(!jetcall::store::encode(&doc).starts_with(ACCEPTED_PREFIX));
    }
}
