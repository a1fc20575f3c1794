//! Handling one `jobs.completed.<kind>` / `jobs.failed.<kind>` message: admit, attempt,
//! record, report, to a `Step` that says whether `jetcall::consume` acks it or schedules the
//! next attempt through JetStream.
//!
//! Retries are delayed NAKs, so a pending retry lives in JetStream, not in this process: a
//! restart loses nothing, and the attempt count lives in the status document, so it does not
//! reset the schedule either.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::Message;
use time::OffsetDateTime;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use jetcall::Config;
use jetcall::config::CallbackConfig;
use jetcall::consume::Settle;
use jetcall::events::{DeliveryReport, JobFinished};
use jetcall::publish::publish_event_with_headers;
use jetcall::retry::delivery_delay;
use jetcall::sealing::SecretsKey;
use jetcall::signing::Signer;
use jetcall::status::{CIRCUIT_OPEN, DeliveryAttempt, JobStatus, Status};
use jetcall::store::Updated;
use jetcall::subjects::Event;
use jetcall::topology::Topology;
use jetcall::trace::TraceParent;
use jetcall::webhook;

use crate::deliver::{Senders, Verdict};
use crate::hosts::{Breaker, Destination, Destinations};
use crate::metrics::Metrics;

/// The shortest wait in JetStream for a delivery whose destination has no free slot.
const PARKED_DELAY: Duration = Duration::from_secs(1);

/// How long a delivery waits in JetStream (before jitter) when every slot at its destination
/// is taken and none has freed for `stalled`. Its slots are held by attempts that free only
/// when the receiver answers or times out: wait at least half the timeout, longer the longer
/// it has been silent, so a dead receiver's backlog is not cycled through every second.
///
/// A shorter wait for a destination that answered a moment ago (busy, not stuck) was tried
/// and measured worse: beside a dead receiver, healthy deliveries then parked too (p99 16 to
/// 24 ms against 7 to 12 ms).
fn park_delay(stalled: Duration, timeout: Duration) -> Duration {
    let timeout = timeout.max(PARKED_DELAY);
    stalled.clamp((timeout / 2).max(PARKED_DELAY), timeout)
}

/// What became of a delivery this time.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// A request was tried: it spends a step of the schedule.
    Tried(Verdict),
    /// None was, the destination's circuit being open: the delivery waits `retry_after` in
    /// JetStream, its retries untouched.
    CircuitOpen { retry_after: Duration },
}

/// How handling one message ended; [`Step::settle`] says what JetStream is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Delivered,
    /// Another try is scheduled after this delay.
    Retry(Duration),
    Undeliverable(String),
    /// The destination is busy with other deliveries; handed back without an attempt.
    Parked(Duration),
    /// Delivered or given up earlier; acked without another request.
    AlreadyDone(Status),
    Rejected(String),
    /// Shutdown interrupted the attempt; handed back at once for another instance.
    Interrupted,
}

impl Step {
    /// How the message is settled (by `jetcall::consume`, the only place that settles).
    pub fn settle(&self) -> Settle {
        match self {
            Step::Delivered | Step::Undeliverable(_) | Step::AlreadyDone(_) => Settle::Done,
            Step::Retry(delay) => Settle::RetryIn(*delay),
            Step::Parked(delay) => Settle::Parked(*delay),
            Step::Rejected(_) => Settle::Reject,
            Step::Interrupted => Settle::Interrupted,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("status store: {0}")]
    Store(#[from] jetcall::store::StoreError),
    #[error(transparent)]
    Publish(#[from] jetcall::publish::PublishError),
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub config: Arc<Config>,
    pub topology: Topology,
    pub senders: Arc<Senders>,
    /// Opens a job's own signing secret (`callback.secrets_key`).
    pub secrets_key: Option<SecretsKey>,
    pub signer: Signer,
    pub destinations: Arc<Destinations>,
    pub metrics: Metrics,
}

/// A delivery that goes on: its status as read, and how it passes its destination.
struct Admitted {
    current: (JobStatus, u64),
    pass: Pass,
}

/// How an admitted delivery passes its destination.
enum Pass {
    /// The webhook goes out, in this slot.
    Send(Slot),
    /// The circuit is open: nothing is sent, and `note` is recorded instead, the delivery
    /// waiting `retry_after` in JetStream.
    CircuitOpen {
        retry_after: Duration,
        note: DeliveryAttempt,
    },
}

/// A webhook request's place at its destination: held until the attempt ends.
struct Slot {
    destination: Arc<Destination>,
    permit: OwnedSemaphorePermit,
}

/// The webhook a completion is delivered as, and its id.
struct Webhook {
    id: String,
    payload: serde_json::Value,
}

/// What follows an attempt: a final state, or a retry after a delay.
#[derive(Debug, Clone, PartialEq)]
struct Decision {
    /// The job's new state; `None` while retries remain (it stays completed or failed).
    status: Option<Status>,
    delay: Option<Duration>,
    /// Why delivery stops, when it stops without success.
    reason: Option<String>,
}

impl Worker {
    /// Processes one message to a `Step`, and logs how it ended. On an error nothing is
    /// settled, so the completion is redelivered after `ack_wait`.
    ///
    /// The job is a span of the trace its message carries (`traceparent`; a new trace if it
    /// has none): the webhook and the delivery report carry it on, and every line logged about
    /// the job names it.
    pub async fn handle(
        &self,
        message: &Message,
        shutdown: &CancellationToken,
    ) -> Result<Step, WorkerError> {
        let job: JobFinished = match serde_json::from_slice(&message.payload) {
            Ok(job) => job,
            Err(err) => {
                let reason = format!("not a finished job: {err}");
                tracing::error!(%reason, subject = %message.subject, "completion dropped");
                return Ok(Step::Rejected(reason));
            }
        };
        let trace = TraceParent::continue_from(message.headers.as_ref());
        let span = jetcall::job_span!(job.job_id, job.kind, trace);
        async {
            let handled = self.process(&job, &trace, shutdown).await;
            match &handled {
                Ok(Step::Rejected(reason)) => {
                    tracing::error!(%reason, subject = %message.subject, "completion dropped")
                }
                Ok(step) => tracing::debug!(?step, "completion handled"),
                Err(err) => tracing::warn!(error = %err, "completion left for redelivery"),
            }
            handled
        }
        .instrument(span)
        .await
    }

    /// A delivery in four steps, any of which may end it: admitted, attempted, recorded,
    /// reported.
    async fn process(
        &self,
        job: &JobFinished,
        trace: &TraceParent,
        shutdown: &CancellationToken,
    ) -> Result<Step, WorkerError> {
        let Admitted { current, pass } = match self.admit(job, trace).await? {
            ControlFlow::Continue(admitted) => admitted,
            ControlFlow::Break(step) => return Ok(step),
        };
        let webhook = Webhook {
            id: webhook::webhook_id(job),
            payload: webhook::payload(job),
        };
        let (outcome, attempt) = match pass {
            Pass::CircuitOpen { retry_after, note } => (Outcome::CircuitOpen { retry_after }, note),
            Pass::Send(slot) => {
                match self
                    .attempt(job, trace, &current.0, slot, &webhook, shutdown)
                    .await
                {
                    Some(tried) => tried,
                    None => return Ok(Step::Interrupted),
                }
            }
        };
        let (decision, attempts) = match self.record(job, current, &outcome, &attempt).await? {
            ControlFlow::Continue(recorded) => recorded,
            ControlFlow::Break(step) => return Ok(step),
        };
        self.report(job, trace, webhook, decision, attempts, &attempt)
            .await
    }

    /// Whether the delivery goes on, and how. A slot first: a delivery that must wait for
    /// its destination goes back to JetStream without costing a status read. Then its status:
    /// a job delivered or given up already is reported again and done with. Then the
    /// destination's circuit: while it is open the job's log gets one line saying it waits,
    /// and its returns go straight back to JetStream, until the circuit lets it through or its
    /// round has lasted the longest a round may.
    async fn admit(
        &self,
        job: &JobFinished,
        trace: &TraceParent,
    ) -> Result<ControlFlow<Step, Admitted>, WorkerError> {
        let destination = self.destinations.get(&job.callback_url.destination());
        let slot = match destination
            .slot(destination.patience(), Instant::now())
            .await
        {
            Ok(slot) => slot,
            Err(stalled) => {
                let earliest = park_delay(stalled, self.config.callback.timeout);
                let delay = self.park(&destination, earliest);
                self.metrics.parked("busy");
                return Ok(ControlFlow::Break(Step::Parked(delay)));
            }
        };
        let (doc, revision) = match self.topology.status.get(&job.job_id).await? {
            Some((doc, _)) if doc.status.is_final() => {
                // Reported again: the attempt that finished the job may have stopped between
                // recording it and reporting it (killed, or its publish refused while the
                // stream elected a leader). The report's Nats-Msg-Id keeps it single.
                self.report_again(job, &doc, trace).await?;
                return Ok(ControlFlow::Break(Step::AlreadyDone(doc.status)));
            }
            Some(read) => read,
            None => return Ok(ControlFlow::Break(no_status_document(job))),
        };
        // Retries are spent only by requests tried.
        let pass = match destination.admit(Instant::now(), self.config.callback.breaker_cooldown) {
            None => Pass::Send(Slot {
                destination,
                permit: slot,
            }),
            Some(remaining) => {
                drop(slot);
                let delay = self.park(&destination, remaining);
                let noted = waits_for_circuit(&doc);
                let longest = self.config.callback.longest_round();
                if noted && round_age(&doc, OffsetDateTime::now_utc()) < longest {
                    self.metrics.parked(CIRCUIT_OPEN);
                    return Ok(ControlFlow::Break(Step::Parked(delay)));
                }
                let failures = destination.consecutive_failures();
                Pass::CircuitOpen {
                    retry_after: delay,
                    note: circuit_open(doc.delivery_round, remaining, failures),
                }
            }
        };
        Ok(ControlFlow::Continue(Admitted {
            current: (doc, revision),
            pass,
        }))
    }

    /// The webhook's HTTP request, in its slot; the destination learns how it went. `None`
    /// when shutdown came first: a dead receiver may take the whole timeout, and a stopping
    /// service does not wait for it. The attempt is then not recorded and the message goes
    /// straight back, so another instance tries again (the receiver may see it twice: at
    /// least once).
    async fn attempt(
        &self,
        job: &JobFinished,
        trace: &TraceParent,
        doc: &JobStatus,
        slot: Slot,
        webhook: &Webhook,
        shutdown: &CancellationToken,
    ) -> Option<(Outcome, DeliveryAttempt)> {
        let Slot {
            destination,
            permit: _permit,
        } = slot;
        let body = serde_json::to_vec(&webhook.payload).unwrap_or_default();
        let signer = self.signer_for(doc);
        let in_flight = self.metrics.attempt_started();
        let started = Instant::now();
        let sender = self.senders.for_tenant(doc.tenant.as_deref());
        let sent = sender.send(
            &job.callback_url,
            &webhook.id,
            &body,
            &signer,
            doc.delivery_round,
            Some(trace),
        );
        let (verdict, attempt) = tokio::select! {
            sent = sent => sent,
            _ = shutdown.cancelled() => return None,
        };
        drop(in_flight);
        self.metrics.attempt_finished(started.elapsed());
        let receiver_failed = matches!(verdict, Verdict::Retry { .. });
        let took = Duration::from_millis(attempt.duration_ms);
        let breaker = Breaker {
            cooldown: self.config.callback.breaker_cooldown,
            window: self.config.callback.breaker_window,
        };
        destination.record(!receiver_failed, took, Instant::now(), breaker);
        Some((Outcome::Tried(verdict), attempt))
    }

    /// Writes the attempt (or the note that it waits) into the job's log, and the job's new
    /// state, by compare-and-set from the status `current` as admitted. What follows is
    /// returned with the log as written, unless the job ended meanwhile: another instance
    /// finished it (its outcome stands), or its document is gone.
    async fn record(
        &self,
        job: &JobFinished,
        current: (JobStatus, u64),
        outcome: &Outcome,
        attempt: &DeliveryAttempt,
    ) -> Result<ControlFlow<Step, (Decision, Vec<DeliveryAttempt>)>, WorkerError> {
        let mut decision = None;
        let mut attempts = Vec::new();
        let now = OffsetDateTime::now_utc();
        let recorded = self
            .topology
            .status
            .update_from(&job.job_id, Some(current), |doc| {
                if doc.status.is_final() {
                    return false;
                }
                // One note per wait for the circuit: a job already waiting is not noted again.
                if matches!(outcome, Outcome::Tried(_)) || !waits_for_circuit(doc) {
                    doc.deliveries.push(attempt.clone());
                }
                let next = decide(
                    &self.config.callback,
                    outcome,
                    doc.attempts_this_round(),
                    round_age(doc, now),
                    attempt,
                );
                match next.status {
                    Some(status) => {
                        doc.advance(status, now);
                        if status == Status::Delivered {
                            doc.delivered_at = Some(now);
                        }
                    }
                    None => doc.updated_at = now,
                }
                attempts = doc.deliveries.clone();
                decision = Some(next);
                true
            })
            .await?;
        Ok(match (recorded, decision) {
            (Updated::Written(..), Some(decision)) => ControlFlow::Continue((decision, attempts)),
            (Updated::Missing, _) => ControlFlow::Break(no_status_document(job)),
            // Another instance finished the job meanwhile; its outcome stands.
            (Updated::Unchanged(doc), _) | (Updated::Written(doc, _), None) => {
                ControlFlow::Break(Step::AlreadyDone(doc.status))
            }
        })
    }

    /// Ends the delivery as recorded: delivered or undeliverable, said in a report carrying
    /// the job's attempts; or another try, after the delay decided.
    async fn report(
        &self,
        job: &JobFinished,
        trace: &TraceParent,
        webhook: Webhook,
        decision: Decision,
        attempts: Vec<DeliveryAttempt>,
        attempt: &DeliveryAttempt,
    ) -> Result<Step, WorkerError> {
        let error_kind = attempt.error_kind.as_deref();
        match (decision.status, decision.delay) {
            (Some(Status::Delivered), _) => {
                self.metrics.attempt_recorded("delivered", error_kind);
                let count = attempts.len();
                let report = delivery_report(job, webhook.id, attempts, None, webhook.payload);
                self.publish_report(Event::Delivered, report, trace).await?;
                self.metrics.delivered(job.kind.as_str(), job.finished_at);
                tracing::info!(attempts = count, "webhook delivered");
                Ok(Step::Delivered)
            }
            (None, Some(delay)) => {
                self.metrics.attempt_recorded("retry", error_kind);
                tracing::info!(retry_in = ?delay, error = ?attempt.error, "webhook attempt failed");
                Ok(Step::Retry(delay))
            }
            _ => {
                self.metrics.attempt_recorded("undeliverable", error_kind);
                let reason = decision
                    .reason
                    .unwrap_or_else(|| "attempts exhausted".into());
                let report = delivery_report(
                    job,
                    webhook.id,
                    attempts,
                    Some(reason.clone()),
                    webhook.payload,
                );
                self.publish_report(Event::Undeliverable, report, trace)
                    .await?;
                self.metrics.undeliverable(job.kind.as_str());
                tracing::warn!(%reason, "webhook undeliverable");
                Ok(Step::Undeliverable(reason))
            }
        }
    }

    /// How long a delivery that cannot go out to `destination` now waits in JetStream: at
    /// least `earliest`, spaced after the others parked there ([`Destination::return_after`]),
    /// at most four timeouts or cooldowns, with a little jitter so that instances that park
    /// at the same moment do not return together.
    fn park(&self, destination: &Destination, earliest: Duration) -> Duration {
        let callback = &self.config.callback;
        let longest = 4 * callback.timeout.max(callback.breaker_cooldown);
        destination
            .return_after(earliest, Instant::now(), longest)
            .mul_f64(1.0 + 0.1 * rand::random::<f64>())
    }

    /// The caller's own secret when it gave one at submission, else the service's. A sealed
    /// secret this instance cannot open (no or another `callback.secrets_key`) is a
    /// configuration fault, said in the log; the webhook goes out with the service's
    /// signature, which the receiver will refuse rather than trust.
    fn signer_for(&self, doc: &JobStatus) -> Signer {
        let Some(sealed) = &doc.sealed_signing_secret else {
            return self.signer.clone();
        };
        let opened = self
            .secrets_key
            .as_ref()
            .ok_or_else(|| "callback.secrets_key is not set".to_owned())
            .and_then(|key| {
                key.open(&doc.job_id, sealed)
                    .map_err(|err| format!("its sealed signing secret {err}"))
            })
            .and_then(|secret| {
                Signer::from_secrets([secret.expose()]).map_err(|err| err.to_string())
            });
        opened.unwrap_or_else(|reason| {
            tracing::error!(%reason, "the job's own signing secret cannot be used");
            self.signer.clone()
        })
    }

    /// The report of a job already `delivered` or `undeliverable`, rebuilt from its document;
    /// an undeliverable job's reason from its last attempt.
    async fn report_again(
        &self,
        job: &JobFinished,
        doc: &JobStatus,
        trace: &TraceParent,
    ) -> Result<(), WorkerError> {
        let (event, reason) = match doc.status {
            Status::Delivered => (Event::Delivered, None),
            _ => {
                let last = doc.deliveries.last().and_then(|a| a.error.as_deref());
                let reason = format!(
                    "gave up after {} attempts; last: {}",
                    doc.attempts_this_round(),
                    last.unwrap_or("unknown error")
                );
                (Event::Undeliverable, Some(reason))
            }
        };
        let attempts = doc.deliveries.clone();
        let report = delivery_report(
            job,
            webhook::webhook_id(job),
            attempts,
            reason,
            webhook::payload(job),
        );
        self.publish_report(event, report, trace).await
    }

    /// Publishes how delivery went, in the job's trace.
    async fn publish_report(
        &self,
        event: Event,
        report: DeliveryReport,
        trace: &TraceParent,
    ) -> Result<(), WorkerError> {
        // A redelivered job reports again: its msg id carries the round so it is not dropped
        // as a duplicate of the first report.
        let round = report.attempts.last().map_or(0, |attempt| attempt.round);
        let msg_id = match round {
            0 => event.msg_id(&report.job_id),
            n => format!("{}.{n}", event.msg_id(&report.job_id)),
        };
        publish_event_with_headers(
            &self.topology.jetstream,
            event.subject(&report.kind),
            &msg_id,
            &report,
            trace.to_headers(),
        )
        .await?;
        Ok(())
    }
}

fn no_status_document(job: &JobFinished) -> Step {
    Step::Rejected(format!("job {} has no status document", job.job_id))
}

fn delivery_report(
    job: &JobFinished,
    webhook_id: String,
    attempts: Vec<DeliveryAttempt>,
    reason: Option<String>,
    payload: serde_json::Value,
) -> DeliveryReport {
    DeliveryReport {
        job_id: job.job_id.clone(),
        kind: job.kind.clone(),
        webhook_id,
        callback_url: job.callback_url.clone(),
        attempts,
        reason,
        payload,
        at: OffsetDateTime::now_utc(),
    }
}

/// Whether the job's log already says that it waits for its destination's circuit: its
/// round's last entry is that note.
fn waits_for_circuit(doc: &JobStatus) -> bool {
    doc.deliveries.last().is_some_and(|last| {
        last.round == doc.delivery_round && last.error_kind.as_deref() == Some(CIRCUIT_OPEN)
    })
}

/// How long the job's current delivery round has lasted at `now` (see
/// [`JobStatus::round_started_at`]); zero before it starts.
fn round_age(doc: &JobStatus, now: OffsetDateTime) -> Duration {
    doc.round_started_at()
        .and_then(|started| Duration::try_from(now - started).ok())
        .unwrap_or_default()
}

/// The note recorded, without a request, for a delivery that waits for its destination's
/// open circuit. It spends none of the job's retries.
fn circuit_open(round: u32, remaining: Duration, failures: u32) -> DeliveryAttempt {
    DeliveryAttempt {
        at: OffsetDateTime::now_utc(),
        duration_ms: 0,
        status_code: None,
        error_kind: Some(CIRCUIT_OPEN.into()),
        error: Some(format!(
            "not sent: the last {failures} attempts at this destination failed; it is left alone for another {} s, and this wait spends none of the job's retries",
            remaining.as_secs().max(1)
        )),
        response_excerpt: None,
        round,
    }
}

/// What follows an attempt, given how many requests this round has tried (this one included)
/// and how long it has lasted.
///
/// Only requests tried spend the schedule. A delivery waiting for an open circuit retries
/// when it is due back, until its round has lasted `callback.max_round_age` (by default
/// twice the schedule): a destination dead for good still ends its jobs `undeliverable`.
fn decide(
    config: &CallbackConfig,
    outcome: &Outcome,
    attempts_made: usize,
    round_age: Duration,
    attempt: &DeliveryAttempt,
) -> Decision {
    let finished = |status, reason| Decision {
        status: Some(status),
        delay: None,
        reason,
    };
    let verdict = match outcome {
        Outcome::Tried(verdict) => verdict,
        Outcome::CircuitOpen { retry_after } => {
            let longest = config.longest_round();
            if round_age < longest {
                return Decision {
                    status: None,
                    delay: Some(*retry_after),
                    reason: None,
                };
            }
            return finished(
                Status::Undeliverable,
                Some(format!(
                    "gave up after {attempts_made} attempts: the destination's circuit was still open {} s into the round, the longest a round may last (callback.max_round_age)",
                    longest.as_secs()
                )),
            );
        }
    };
    match verdict {
        Verdict::Delivered => finished(Status::Delivered, None),
        Verdict::Stop(reason) => finished(Status::Undeliverable, Some(reason.clone())),
        Verdict::Retry { retry_after } => {
            match delivery_delay(&config.retry_schedule, attempts_made, rand::random()) {
                Some(scheduled) => Decision {
                    status: None,
                    // The receiver may ask for more patience than the schedule, not less.
                    delay: Some(retry_after.map_or(scheduled, |asked| {
                        scheduled.max(asked.min(config.max_retry_after))
                    })),
                    reason: None,
                },
                None => finished(
                    Status::Undeliverable,
                    Some(format!(
                        "gave up after {attempts_made} attempts; last: {}",
                        attempt.error.as_deref().unwrap_or("unknown error")
                    )),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_settles_as_it_always_did() {
        let delay = Duration::from_millis(2500);
        let cases = [
            (Step::Delivered, Settle::Done),
            (Step::Undeliverable("410 Gone".into()), Settle::Done),
            (Step::AlreadyDone(Status::Delivered), Settle::Done),
            (Step::Retry(delay), Settle::RetryIn(delay)),
            (Step::Parked(delay), Settle::Parked(delay)),
            (Step::Rejected("not a finished job".into()), Settle::Reject),
            (Step::Interrupted, Settle::Interrupted),
        ];
        for (step, settle) in cases {
            assert_eq!(step.settle(), settle, "{step:?}");
        }
    }

    #[test]
    fn a_parked_delivery_waits_half_the_timeout_or_as_long_as_the_silence() {
        let timeout = Duration::from_secs(15);
        assert_eq!(park_delay(Duration::from_millis(60), timeout), timeout / 2);
        assert_eq!(park_delay(Duration::from_secs(3), timeout), timeout / 2);
        assert_eq!(
            park_delay(Duration::from_secs(12), timeout),
            Duration::from_secs(12)
        );
        assert_eq!(park_delay(Duration::from_secs(600), timeout), timeout);
    }

    fn failed_attempt() -> DeliveryAttempt {
        DeliveryAttempt {
            at: OffsetDateTime::UNIX_EPOCH,
            duration_ms: 1,
            status_code: Some(500),
            error_kind: Some("http_status".into()),
            error: Some("HTTP 500".into()),
            response_excerpt: None,
            round: 0,
        }
    }

    fn decide_with(
        verdict: Verdict,
        attempts_made: usize,
        schedule: &[u64],
        max_retry_after: u64,
    ) -> Decision {
        let config = CallbackConfig {
            retry_schedule: schedule.iter().map(|s| Duration::from_secs(*s)).collect(),
            max_retry_after: Duration::from_secs(max_retry_after),
            ..CallbackConfig::default()
        };
        decide(
            &config,
            &Outcome::Tried(verdict),
            attempts_made,
            Duration::ZERO,
            &failed_attempt(),
        )
    }

    #[test]
    fn waiting_for_an_open_circuit_spends_no_retry_until_the_longest_round() {
        let config = CallbackConfig {
            retry_schedule: [200, 400, 800].map(Duration::from_millis).to_vec(),
            ..CallbackConfig::default()
        };
        let wait = Outcome::CircuitOpen {
            retry_after: Duration::from_secs(1),
        };
        // Every step of the schedule is still to come, however often it waited.
        for attempts_made in [0, 1, 3] {
            let waiting = decide(
                &config,
                &wait,
                attempts_made,
                Duration::from_millis(2799),
                &failed_attempt(),
            );
            assert_eq!(waiting.status, None, "{attempts_made} tried");
            assert_eq!(waiting.delay, Some(Duration::from_secs(1)));
        }
        // Twice the schedule into the round, by default, it stops.
        let expired = decide(
            &config,
            &wait,
            1,
            Duration::from_millis(2800),
            &failed_attempt(),
        );
        assert_eq!(expired.status, Some(Status::Undeliverable));
        assert!(
            expired
                .reason
                .is_some_and(|r| r.contains("callback.max_round_age")),
        );
        // Or at the age configured.
        let config = CallbackConfig {
            max_round_age: Some(Duration::from_secs(60)),
            ..config
        };
        let later = decide(
            &config,
            &wait,
            1,
            Duration::from_secs(59),
            &failed_attempt(),
        );
        assert_eq!(later.status, None);
    }

    #[test]
    fn a_request_tried_after_waiting_spends_the_schedule_as_usual() {
        // Four requests tried and three waits noted: the schedule of three retries is used
        // up by the requests, not by the waits.
        let tried = |attempts_made| {
            decide_with(
                Verdict::Retry { retry_after: None },
                attempts_made,
                &[1, 1, 1],
                3600,
            )
        };
        assert_eq!(tried(3).status, None);
        assert_eq!(tried(4).status, Some(Status::Undeliverable));
    }

    #[test]
    fn failures_retry_along_the_schedule_then_give_up() {
        let first = decide_with(Verdict::Retry { retry_after: None }, 1, &[1, 2], 3600);
        assert_eq!(first.status, None);
        assert!(
            first
                .delay
                .is_some_and(|d| d <= Duration::from_secs(1) && d >= Duration::from_millis(800))
        );
        let last = decide_with(Verdict::Retry { retry_after: None }, 3, &[1, 2], 3600);
        assert_eq!(last.status, Some(Status::Undeliverable));
        assert!(
            last.reason
                .is_some_and(|r| r.contains("gave up after 3 attempts; last: HTTP 500"))
        );
    }

    #[test]
    fn retry_after_lengthens_the_wait_up_to_the_cap() {
        let asked = |secs| Verdict::Retry {
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            decide_with(asked(2), 1, &[1], 3600).delay,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            decide_with(asked(7200), 1, &[1], 60).delay,
            Some(Duration::from_secs(60))
        );
        let shorter = decide_with(asked(0), 1, &[10], 3600)
            .delay
            .expect("a delay");
        assert!(
            shorter >= Duration::from_secs(8),
            "Retry-After never shortens the schedule"
        );
    }

    #[test]
    fn gone_and_refusals_stop_at_once_and_success_is_final() {
        let gone = decide_with(
            Verdict::Stop("the receiver answered 410 Gone".into()),
            1,
            &[1],
            3600,
        );
        assert_eq!(gone.status, Some(Status::Undeliverable));
        assert_eq!(
            decide_with(Verdict::Delivered, 1, &[1], 3600).status,
            Some(Status::Delivered)
        );
    }
}
