//! Bulk jobs through Anthropic's Message Batches API, at half the price.
//!
//! A bulk job's request is gathered in memory, unacked (progress acks keep it), until the
//! batch is full or its first job has waited `generator.batch_max_wait`. Sealing it writes, in
//! this order: the batch record (`jetcall::batches`, with its jobs), each job's document
//! (`batched`, naming the record: the attempt is counted), the batch at the API (`custom_id`
//! is the job id), the record again (`submitted`, with the API's id), and only then acks the
//! requests. So wherever an instance dies:
//!
//! - before the record: the requests come back and are gathered again;
//! - after it and before the batch is created: a poller finds the record held by no one and no
//!   batch at the API for it, and takes its jobs back out (their requests, redelivered and
//!   parked while the record was open, are gathered again);
//! - after the batch is created and before the record says so: the poller finds the batch in
//!   the API's list (created after the record, with as many requests) and adopts it;
//! - while polling or reading results: the record's hold runs out and another instance
//!   takes it over; a result already recorded is not recorded again, and its event, if it
//!   may not have gone out, is published again under the same `Nats-Msg-Id`.
//!
//! Results are recorded and published as the synchronous path's are (`Worker::finish`); a
//! result worth another attempt (the API overloaded, the request expired or canceled) takes
//! the job out of the batch and publishes its request again, for a later batch.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use jetcall::batches::{BatchRecord, BatchRecords, BatchState};
use jetcall::consume::Settle;
use jetcall::events::{JobError, Outcome};
use jetcall::job::JobId;
use jetcall::publish::publish_event_with_headers;
use jetcall::status::{Claim, JobStatus};
use jetcall::store::Updated;
use jetcall::subjects::Event;
use jetcall::trace::TraceParent;

use crate::output::to_result;
use crate::provider::batches::{BatchResult, BatchesApi, Lines, parse_result_line};
use crate::provider::{Disposition, LlmError};
use crate::worker::{Step, Worker, failure};

/// The longest `custom_id` the API takes; a job with a longer id is called synchronously.
pub const MAX_CUSTOM_ID: usize = 64;

/// Jobs' documents written at once while sealing or recovering a batch.
const DOC_WRITES_AT_ONCE: usize = 64;

/// Results recorded at once while a results file is read.
const RESULTS_AT_ONCE: usize = 256;

/// How far the API's clock may be behind ours when a record's batch is looked for.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

/// One bulk job waiting for its batch.
pub struct Gathered {
    pub job_id: JobId,
    pub trace: TraceParent,
    pub message: Message,
    /// `{"custom_id": …, "params": …}`.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Gathered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gathered")
            .field("job_id", &self.job_id)
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Where the worker hands bulk jobs.
#[derive(Debug, Clone)]
pub struct Intake(mpsc::UnboundedSender<Gathered>);

impl Intake {
    /// False once the gatherer has stopped (shutdown): the job is then handled otherwise.
    pub fn send(&self, job: Gathered) -> Result<(), Box<Gathered>> {
        self.0.send(job).map_err(|err| Box::new(err.0))
    }
}

/// The Message Batches side of a generator instance.
#[derive(Debug)]
pub struct Batches {
    pub api: BatchesApi,
    pub records: BatchRecords,
    /// Records this instance is working on, so its poller leaves them alone.
    busy: Mutex<HashSet<String>>,
}

impl Batches {
    pub fn new(api: BatchesApi, records: BatchRecords) -> Self {
        Self {
            api,
            records,
            busy: Mutex::new(HashSet::new()),
        }
    }

    fn start_work(&self, record: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(record.to_owned())
    }

    fn end_work(&self, record: &str) {
        self.busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(record);
    }
}

/// Starts the poller, which finishes the fleet's open batches.
pub fn start_poller(worker: Arc<Worker>, shutdown: CancellationToken) {
    tokio::spawn(poll(worker, shutdown));
}

/// Starts the gatherer; the intake is for `Worker::batch_intake`.
pub fn start_gatherer(worker: Arc<Worker>, shutdown: CancellationToken) -> Intake {
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(gather(worker, receiver, shutdown));
    Intake(sender)
}

/// Gathers bulk jobs into batches and seals each when full or old enough.
async fn gather(
    worker: Arc<Worker>,
    mut intake: mpsc::UnboundedReceiver<Gathered>,
    shutdown: CancellationToken,
) {
    let settings = &worker.config.generator;
    let mut open: Vec<Gathered> = Vec::new();
    let mut bytes = 0usize;
    let mut deadline = tokio::time::Instant::now();
    let mut progress = tokio::time::interval(settings.ack_wait / 2);
    loop {
        tokio::select! {
            job = intake.recv() => {
                let Some(job) = job else { break };
                if open.is_empty() {
                    deadline = tokio::time::Instant::now() + settings.batch_max_wait;
                }
                // +1 for the comma between requests.
                if !open.is_empty() && bytes + job.body.len() + 1 > settings.batch_max_bytes {
                    tokio::spawn(seal(worker.clone(), std::mem::take(&mut open), shutdown.clone()));
                    bytes = 0;
                    deadline = tokio::time::Instant::now() + settings.batch_max_wait;
                }
                bytes += job.body.len() + 1;
                open.push(job);
                if open.len() >= settings.batch_max_requests {
                    tokio::spawn(seal(worker.clone(), std::mem::take(&mut open), shutdown.clone()));
                    bytes = 0;
                }
            }
            _ = tokio::time::sleep_until(deadline), if !open.is_empty() => {
                tokio::spawn(seal(worker.clone(), std::mem::take(&mut open), shutdown.clone()));
                bytes = 0;
            }
            _ = progress.tick() => {
                for job in &open {
                    let _ = job.message.ack_with(AckKind::Progress).await;
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
    // Not sealed: nothing is recorded of these yet, so they go back for another instance.
    intake.close();
    while let Ok(job) = intake.try_recv() {
        open.push(job);
    }
    for job in open {
        let _ = job.message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Records, creates and submits one batch, then acks its requests.
async fn seal(worker: Arc<Worker>, jobs: Vec<Gathered>, shutdown: CancellationToken) {
    let messages: Vec<Message> = jobs.iter().map(|job| job.message.clone()).collect();
    let period = worker.config.generator.ack_wait / 2;
    let sealing = Box::pin(seal_batch(&worker, jobs, &shutdown));
    let mut sealing = std::pin::pin!(sealing);
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let settled = loop {
        tokio::select! {
            settled = &mut sealing => break settled,
            _ = progress.tick() => {
                for message in &messages {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        }
    };
    for (message, settle) in messages.iter().zip(settled) {
        if let Some(settle) = settle
            && let Err(err) = message.ack_with(settle.ack_kind()).await
        {
            tracing::warn!(error = %err, "could not settle a batched request; it comes back");
        }
    }
}

/// What sealing did with each job, in order: how its request is settled (`None`: left to
/// come back after `ack_wait`).
async fn seal_batch(
    worker: &Worker,
    jobs: Vec<Gathered>,
    shutdown: &CancellationToken,
) -> Vec<Option<Settle>> {
    let Some(batches) = &worker.batches else {
        return vec![Some(Settle::Interrupted); jobs.len()];
    };
    let now = OffsetDateTime::now_utc();
    let mut record = BatchRecord {
        record: BatchRecord::new_id(),
        state: BatchState::Creating,
        jobs: jobs.iter().map(|job| job.job_id.clone()).collect(),
        batch_id: None,
        recorded_at: now,
        holder: worker.instance.clone(),
        until: now + worker.hold_for(),
        next_poll_at: now,
        polls: 0,
    };
    let retry_soon = Some(Settle::RetryIn(Duration::from_secs(1)));
    // Before the record exists: this instance's poller must not take it for a dead sealer's.
    let _working = Working::start(batches, &record.record);
    let mut revision = match batches.records.create(&record).await {
        Ok(revision) => revision,
        Err(err) => {
            tracing::warn!(error = %err, "could not record a batch; its jobs come back");
            return vec![retry_soon; jobs.len()];
        }
    };
    // Each job's document names the record before the batch exists.
    let record_id = record.record.clone();
    let entered: Vec<Entered> = futures::stream::iter(0..jobs.len())
        .map(|i| worker.enter_batch(&jobs[i], &record_id))
        .buffered(DOC_WRITES_AT_ONCE)
        .collect()
        .await;
    let mut settles: Vec<Option<Settle>> = Vec::with_capacity(jobs.len());
    let mut sent = Vec::new();
    let mut bodies = Vec::new();
    // Each request moves into the batch's body as it is written: held once, not twice.
    for (job, entered) in jobs.into_iter().zip(entered) {
        match entered {
            Entered::Yes => {
                sent.push(job.job_id);
                bodies.push(job.body);
                settles.push(None);
            }
            Entered::No(settle) => settles.push(settle),
        }
    }
    if sent.is_empty() {
        if let Err(err) = batches.records.finish(&record.record, revision).await {
            tracing::warn!(error = %err, record = %record.record, "could not remove an empty batch record");
        }
        return settles;
    }
    record.jobs = sent;
    match batches.records.update(&record, revision).await {
        Ok(Some(written)) => revision = written,
        // Its jobs' documents name it: a poller gives them back once its hold runs out.
        Ok(None) | Err(_) => {
            tracing::warn!(record = %record.record, "lost the batch record while sealing it");
            return fill(settles, retry_soon);
        }
    }
    let created = if shutdown.is_cancelled() {
        Err(LlmError::new(
            Disposition::Retry { retry_after: None },
            "not_sent",
            "shutting down before the batch was created",
        ))
    } else {
        batches.api.create(bodies).await
    };
    let info = match created {
        Ok(info) => info,
        Err(err) => {
            tracing::warn!(error = %err, jobs = record.jobs.len(), "could not create a batch; its jobs go back");
            if err.disposition == Disposition::Configuration {
                worker.gate.fault(&err);
            }
            give_back(worker, &record).await;
            if let Err(err) = batches.records.finish(&record.record, revision).await {
                tracing::warn!(error = %err, "could not remove a batch record never created");
            }
            let delay = match err.disposition {
                Disposition::Retry {
                    retry_after: Some(wait),
                } => wait,
                Disposition::Configuration => worker.config.generator.probe_interval,
                _ => Duration::from_secs(5),
            };
            return fill(settles, Some(Settle::RetryIn(delay)));
        }
    };
    tracing::info!(
        batch_id = %info.id,
        record = %record.record,
        jobs = record.jobs.len(),
        "batch created"
    );
    worker.metrics.batch_created(record.jobs.len());
    let now = OffsetDateTime::now_utc();
    record.state = BatchState::Submitted;
    record.batch_id = Some(info.id.clone());
    record.next_poll_at = now + worker.config.generator.batch_poll_interval;
    // Any instance may poll it from now on.
    record.until = now;
    if let Err(err) = batches.records.update(&record, revision).await {
        // Still `creating`: the poller that recovers it finds this batch in the API's list.
        tracing::warn!(error = %err, "could not record a created batch; it is recovered");
    }
    fill(settles, Some(Settle::Done))
}

/// `settles`, with every job sent in the batch (`None` so far) settled as `settle`.
fn fill(settles: Vec<Option<Settle>>, settle: Option<Settle>) -> Vec<Option<Settle>> {
    settles.into_iter().map(|each| each.or(settle)).collect()
}

/// Marks a record as this instance's work for as long as it lives.
struct Working {
    batches: Arc<Batches>,
    record: String,
}

impl Working {
    fn start(batches: &Arc<Batches>, record: &str) -> Option<Self> {
        batches.start_work(record).then(|| Self {
            batches: batches.clone(),
            record: record.to_owned(),
        })
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        self.batches.end_work(&self.record);
    }
}

/// How sealing went for one job.
pub enum Entered {
    Yes,
    /// Not in the batch; its request is settled so.
    No(Option<Settle>),
}

impl Worker {
    /// Moves the job's document to `batched` under `record`, as a claim would to
    /// `generating`; a job that may not be claimed is settled as the synchronous path would.
    async fn enter_batch(&self, job: &Gathered, record: &str) -> Entered {
        let job_id = &job.job_id;
        let now = OffsetDateTime::now_utc();
        let mut claim = Claim::Generated;
        let started = self
            .topology
            .status
            .update(job_id, |doc| {
                claim = doc.claim_for_batch(record, now);
                matches!(claim, Claim::Taken(_) | Claim::Expired)
            })
            .await;
        let step = match (started, claim) {
            (Ok(Updated::Written(_, _)), Claim::Taken(lease))
                if lease.attempt <= self.config.generator.max_attempts =>
            {
                return Entered::Yes;
            }
            (Ok(Updated::Written(doc, revision)), Claim::Taken(_)) => {
                let max = self.config.generator.max_attempts;
                let outcome = Outcome::Failed {
                    error: JobError {
                        kind: "attempts_exhausted".into(),
                        message: format!("gave up after {max} attempts"),
                    },
                    usage: None,
                    cost: None,
                };
                let request = doc.request();
                self.finish(&request, &job.trace, outcome, Some((*doc, revision)), None)
                    .await
            }
            (Ok(Updated::Written(doc, _) | Updated::Unchanged(doc)), claim) => {
                self.unclaimed(&doc.request(), &job.trace, claim, &doc)
                    .await
            }
            (Ok(Updated::Missing), _) => Ok(Step::Rejected(format!(
                "job {job_id} has no status document"
            ))),
            (Err(err), _) => Err(err.into()),
        };
        match step {
            Ok(step) => Entered::No(step.settle()),
            Err(err) => {
                tracing::warn!(%job_id, error = %err, "could not batch a job; it comes back");
                Entered::No(Some(Settle::RetryIn(Duration::from_secs(1))))
            }
        }
    }

    /// A redelivered request of a job in the batch under `record`: acked once the batch is
    /// submitted (its results bring the outcome), parked while the record is still being
    /// sealed or recovered, and taken out of a batch that is no more.
    pub(crate) async fn in_batch(&self, job_id: &JobId, record: &str) -> Step {
        let Some(batches) = &self.batches else {
            return Step::Held(Duration::from_secs(5));
        };
        match batches.records.get(record).await {
            Ok(Some((found, _))) if found.state == BatchState::Submitted => {
                Step::AlreadyDone(jetcall::status::Status::Batched)
            }
            Ok(Some((found, _))) => {
                let now = OffsetDateTime::now_utc();
                let left = Duration::try_from(found.until - now).unwrap_or_default();
                Step::Held(left.max(Duration::from_secs(1)))
            }
            Ok(None) => {
                let now = OffsetDateTime::now_utc();
                match self
                    .topology
                    .status
                    .update(job_id, |doc| doc.leave_batch(record, now))
                    .await
                {
                    Ok(_) => Step::Retry(Duration::ZERO),
                    Err(_) => Step::Retry(Duration::from_secs(1)),
                }
            }
            Err(_) => Step::Retry(Duration::from_secs(1)),
        }
    }

    /// How long an instance holds a batch record it works on: as a job's lease.
    pub(crate) fn hold_for(&self) -> time::Duration {
        jetcall::durations::to_time(self.lease_duration())
    }
}

/// Takes every job of `record` still in it back out, giving back the attempt it never made.
async fn give_back(worker: &Worker, record: &BatchRecord) {
    let now = OffsetDateTime::now_utc();
    let record_id = record.record.as_str();
    futures::stream::iter(record.jobs.iter().cloned())
        .for_each_concurrent(DOC_WRITES_AT_ONCE, move |job_id| async move {
            let left = worker
                .topology
                .status
                .update(&job_id, |doc| {
                    let left = doc.leave_batch(record_id, now);
                    if left {
                        doc.generation_attempts = doc.generation_attempts.saturating_sub(1);
                    }
                    left
                })
                .await;
            if let Err(err) = left {
                tracing::warn!(%job_id, error = %err, "could not take a job out of a batch");
            }
        })
        .await;
}

/// Every `batch_poll_interval` (at most a second), looks over the open records for one to
/// poll, finish or recover, and takes each it finds into a task of its own.
async fn poll(worker: Arc<Worker>, shutdown: CancellationToken) {
    let every = worker
        .config
        .generator
        .batch_poll_interval
        .min(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(batches) = &worker.batches else {
            return;
        };
        let open = match batches.records.open().await {
            Ok(open) => open,
            Err(err) => {
                tracing::warn!(error = %err, "could not list the open batches");
                continue;
            }
        };
        for record in open {
            let Some(working) = Working::start(batches, &record) else {
                continue;
            };
            let worker = worker.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(err) = look_after(&worker, &working.record, &shutdown).await {
                    tracing::warn!(record = %working.record, error = %err, "batch left for the next poll");
                }
            });
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error(transparent)]
    Store(#[from] jetcall::store::StoreError),
    #[error(transparent)]
    Api(#[from] LlmError),
    #[error("the results file: {0}")]
    Results(String),
}

/// One open record: polled if its time has come, its results recorded if it has ended, or
/// recovered if the instance sealing it died.
async fn look_after(
    worker: &Worker,
    record_id: &str,
    shutdown: &CancellationToken,
) -> Result<(), PollError> {
    let Some(batches) = &worker.batches else {
        return Ok(());
    };
    let Some((mut record, revision)) = batches.records.get(record_id).await? else {
        return Ok(());
    };
    let now = OffsetDateTime::now_utc();
    if record.is_held_by_other(&worker.instance, now)
        || (record.state == BatchState::Submitted && record.next_poll_at > now)
    {
        return Ok(());
    }
    record.holder = worker.instance.clone();
    record.until = now + worker.hold_for();
    let Some(mut revision) = batches.records.update(&record, revision).await? else {
        return Ok(());
    };
    if record.state == BatchState::Creating {
        return recover(worker, record, revision).await;
    }
    let Some(batch_id) = record.batch_id.clone() else {
        return Ok(());
    };
    let info = batches.api.retrieve(&batch_id).await?;
    if !info.has_ended() {
        record.polls += 1;
        let interval = worker.config.generator.batch_poll_interval;
        let wait = interval * 2u32.saturating_pow(record.polls.min(4)).min(10);
        record.next_poll_at = now + wait;
        record.until = now;
        batches.records.update(&record, revision).await?;
        return Ok(());
    }
    let Some(results_url) = info.results_url else {
        return Err(PollError::Results(
            "an ended batch without a results_url".into(),
        ));
    };
    tracing::info!(%batch_id, record = %record.record, "batch ended; recording its results");
    let mut answer = batches.api.results(&results_url).await?;
    let mut lines = Lines::default();
    let record_id = record.record.clone();
    let mut seen: HashSet<String> = HashSet::with_capacity(record.jobs.len());
    let mut recording = FuturesUnordered::new();
    let mut unrecorded = 0usize;
    let mut renewed_at = tokio::time::Instant::now();
    let renew_every = worker.lease_duration() / 3;
    let mut chunk_done = false;
    while !chunk_done {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let chunk = answer
            .chunk()
            .await
            .map_err(|err| PollError::Results(err.to_string()))?;
        let mut parsed = Vec::new();
        match &chunk {
            Some(chunk) => lines.feed(chunk, |line| parsed.push(parse_result_line(line))),
            None => {
                chunk_done = true;
                if let Some(last) = std::mem::take(&mut lines).finish() {
                    parsed.push(parse_result_line(&last));
                }
            }
        }
        for line in parsed {
            match line {
                Ok((custom_id, result)) => {
                    seen.insert(custom_id.clone());
                    let batch = (record_id.as_str(), batch_id.as_str());
                    recording.push(record_result(worker, batch, custom_id, result));
                }
                Err(err) => {
                    tracing::warn!(error = %err, %batch_id, "unreadable result line skipped")
                }
            }
            while recording.len() >= RESULTS_AT_ONCE {
                if recording.next().await == Some(false) {
                    unrecorded += 1;
                }
            }
        }
        if renewed_at.elapsed() >= renew_every {
            renewed_at = tokio::time::Instant::now();
            record.until = OffsetDateTime::now_utc() + worker.hold_for();
            match batches.records.update(&record, revision).await? {
                Some(written) => revision = written,
                None => return Ok(()),
            }
        }
    }
    while let Some(recorded) = recording.next().await {
        if !recorded {
            unrecorded += 1;
        }
    }
    drop(recording);
    // A job whose line was missing or unreadable is not left waiting for ever.
    let missing: Vec<JobId> = record
        .jobs
        .iter()
        .filter(|job_id| !seen.contains(job_id.as_str()))
        .cloned()
        .collect();
    let record_id = record_id.as_str();
    let sent_again: Vec<bool> = futures::stream::iter(missing)
        .map(|job_id| async move {
            let Some((doc, _)) = worker.topology.status.get(&job_id).await.ok()? else {
                return Some(());
            };
            let sent = if doc.in_batch(record_id) {
                tracing::warn!(%job_id, "no result for the job in its batch; it is tried again");
                worker.requeue(&doc, record_id).await
            } else if doc.left_batch(record_id) {
                worker.republish(&doc).await
            } else {
                Ok(())
            };
            sent.ok()
        })
        .buffer_unordered(DOC_WRITES_AT_ONCE)
        .map(|sent| sent.is_some())
        .collect()
        .await;
    unrecorded += sent_again.iter().filter(|sent| !**sent).count();
    if unrecorded > 0 {
        // Read again at the next poll, which skips what was recorded: a job taken out of the
        // batch and not yet sent again is sent then, and no result is left unread.
        let now = OffsetDateTime::now_utc();
        record.until = now;
        record.next_poll_at = now + worker.config.generator.batch_poll_interval;
        batches.records.update(&record, revision).await?;
        return Err(PollError::Results(format!(
            "{unrecorded} results could not be recorded"
        )));
    }
    batches.records.finish(&record.record, revision).await?;
    tracing::info!(%batch_id, record = %record.record, "batch finished with");
    Ok(())
}

/// A `creating` record whose sealer died: adopt the batch the API created for it, or, if it
/// created none, take the jobs back out for their redelivered requests to gather again.
async fn recover(worker: &Worker, mut record: BatchRecord, revision: u64) -> Result<(), PollError> {
    let Some(batches) = &worker.batches else {
        return Ok(());
    };
    let since = record.recorded_at - CLOCK_SKEW;
    let created = batches.api.created_since(since).await?;
    let mut claimed: HashSet<String> = HashSet::new();
    for other in batches.records.open().await? {
        if other != record.record
            && let Some((other, _)) = batches.records.get(&other).await?
            && let Some(id) = other.batch_id
        {
            claimed.insert(id);
        }
    }
    let wanted = record.jobs.len() as u64;
    let adopted = created
        .into_iter()
        .filter(|batch| batch.request_counts.total() == wanted && !claimed.contains(&batch.id))
        .min_by_key(|batch| batch.created_at);
    match adopted {
        Some(batch) => {
            tracing::warn!(record = %record.record, batch_id = %batch.id, "adopting the batch of a sealer that died");
            let now = OffsetDateTime::now_utc();
            record.state = BatchState::Submitted;
            record.batch_id = Some(batch.id.clone());
            record.next_poll_at = now;
            record.until = now;
            batches.records.update(&record, revision).await?;
        }
        None => {
            tracing::warn!(record = %record.record, "no batch was created for a dead sealer's record; its jobs go back");
            give_back(worker, &record).await;
            batches.records.finish(&record.record, revision).await?;
        }
    }
    Ok(())
}

/// Records one result the way the synchronous path records an answer; false if it could
/// not be, and the results must be read again.
async fn record_result(
    worker: &Worker,
    batch: (&str, &str),
    custom_id: String,
    result: BatchResult,
) -> bool {
    let Ok(job_id) = JobId::parse(&custom_id) else {
        tracing::warn!(%custom_id, "a result for no job of ours");
        return true;
    };
    match worker.batch_result(&job_id, batch, result).await {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(%job_id, error = %err, "could not record a batch result");
            false
        }
    }
}

impl Worker {
    /// Records the result, from the batch `(record, batch_id)`, of one of its jobs.
    async fn batch_result(
        &self,
        job_id: &JobId,
        (record, batch_id): (&str, &str),
        result: BatchResult,
    ) -> Result<(), crate::worker::WorkerError> {
        let Some((mut doc, revision)) = self.topology.status.get(job_id).await? else {
            return Ok(());
        };
        let trace = doc.trace().unwrap_or_else(TraceParent::start);
        let request = doc.request();
        if !doc.in_batch(record) {
            if doc
                .batch
                .as_ref()
                .is_none_or(|batch| batch.record != record)
            {
                return Ok(());
            }
            // Taken out of the batch by a reader that may have died before publishing.
            if doc.left_batch(record) {
                return self.republish(&doc).await;
            }
            // Cancelled while in the batch: what its answer cost still counts.
            if doc.generation_outcome() == jetcall::status::Status::Cancelled
                && let BatchResult::Succeeded(generation) = result
            {
                let cost = self.config.prices.cost(
                    &generation.model,
                    &generation.usage,
                    jetcall::cost::Path::Batch,
                );
                let outcome = Outcome::Completed {
                    result: serde_json::Value::Null,
                    model: generation.model,
                    usage: generation.usage,
                    cost,
                };
                self.charge_cancelled(&request, &outcome).await?;
            }
            // Recorded before (a holder that died halfway through the file): its event goes
            // out again in case it had not, under the same Nats-Msg-Id.
            self.already_generated(&doc, &trace).await?;
            return Ok(());
        }
        let exhausted = doc.generation_attempts >= self.config.generator.max_attempts;
        let spec = self.config.kinds.get(request.kind.as_str());
        let outcome = match (result, spec) {
            (BatchResult::Succeeded(generation), Some(spec)) => {
                let cost = self.config.prices.cost(
                    &generation.model,
                    &generation.usage,
                    jetcall::cost::Path::Batch,
                );
                self.metrics
                    .tokens_used(request.kind.as_str(), generation.usage);
                match to_result(&spec.output, &generation.text) {
                    Ok(result) => Outcome::Completed {
                        result,
                        model: generation.model,
                        usage: generation.usage,
                        cost,
                    },
                    Err(_) if !exhausted => return self.requeue(&doc, record).await,
                    Err(err) => Outcome::Failed {
                        error: JobError {
                            kind: "invalid_output".into(),
                            message: err.to_string(),
                        },
                        usage: Some(generation.usage),
                        cost,
                    },
                }
            }
            (BatchResult::Succeeded(_), None) => failure(
                "unknown_kind",
                format!("no kind `{}` is configured", request.kind),
            ),
            (BatchResult::Errored { error_type, .. }, _)
                if BatchResult::is_retryable_error(&error_type) && !exhausted =>
            {
                return self.requeue(&doc, record).await;
            }
            (
                BatchResult::Errored {
                    error_type,
                    message,
                },
                _,
            ) => failure(&error_type, message),
            (BatchResult::Expired | BatchResult::Canceled, _) if !exhausted => {
                return self.requeue(&doc, record).await;
            }
            (BatchResult::Expired, _) => failure(
                "expired",
                "the batch expired before this request was processed".into(),
            ),
            (BatchResult::Canceled, _) => failure("canceled", "the batch was canceled".into()),
        };
        // Written with the outcome: the finished job names the batch that answered it.
        doc.batch = Some(jetcall::status::BatchRef {
            record: record.to_owned(),
            id: Some(batch_id.to_owned()),
        });
        self.finish(&request, &trace, outcome, Some((doc, revision)), None)
            .await?;
        Ok(())
    }

    /// Takes the job out of the batch under `record` and publishes its request again, for
    /// another attempt in a later batch.
    async fn requeue(
        &self,
        doc: &JobStatus,
        record: &str,
    ) -> Result<(), crate::worker::WorkerError> {
        let now = OffsetDateTime::now_utc();
        let left = self
            .topology
            .status
            .update(&doc.job_id, |doc| doc.leave_batch(record, now))
            .await?;
        match left {
            Updated::Written(doc, _) => self.republish(&doc).await,
            _ => Ok(()),
        }
    }

    /// Publishes the request of a job taken out of its batch. Its id names the attempt, so a
    /// second publish (by a reader of the results after one that died) is stored once; the
    /// first request's id would still be in the duplicate window.
    async fn republish(&self, doc: &JobStatus) -> Result<(), crate::worker::WorkerError> {
        let request = doc.request();
        let trace = doc.trace().unwrap_or_else(TraceParent::start);
        let msg_id = format!(
            "{}.attempt-{}",
            Event::Requested.msg_id(&request.job_id),
            doc.generation_attempts + 1
        );
        publish_event_with_headers(
            &self.topology.jetstream,
            request.subject(),
            &msg_id,
            &request,
            trace.to_headers(),
        )
        .await?;
        tracing::info!(job_id = %request.job_id, "batched job tried again");
        Ok(())
    }
}
