//! Handling one `jobs.requested.<kind>` message, from status `generating` to the `Step` that
//! says how it is settled.
//!
//! Order of writes: the status document moves to `generating` under a lease (this call's
//! claim on the attempt, renewed with every progress ack), then to `completed`/`failed`
//! (holding the result, the lease dropped) before the event is published, and the request is
//! acked last, by `jetcall::consume` as the step says. A crash anywhere leaves enough behind
//! for the redelivered request to finish the job without a second LLM call; a copy delivered
//! while the lease lives waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use futures::FutureExt;
use futures::future::FusedFuture;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use jetcall::Config;
use jetcall::budget::Occasion;
use jetcall::consume::Settle;
use jetcall::events::{JobError, JobFinished, JobRequested, Outcome, Usage};
use jetcall::gate::Gate;
use jetcall::kinds::KindSpec;
use jetcall::publish::publish_event_with_headers;
use jetcall::retry::llm_backoff;
use jetcall::status::{AttemptOutcome, Claim, JobStatus, Lease, Status};
use jetcall::store::Updated;
use jetcall::topology::Topology;
use jetcall::trace::TraceParent;

use crate::batch::{Batches, Gathered, Intake};
use crate::cancellations::Cancellations;
use crate::caps::Caps;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::output::to_result;
use crate::provider::{Disposition, Generation, GenerationRequest, LlmError, Paid, Provider};

/// How long every instance holds off after a 429 that named no wait.
const RATE_LIMITED_PAUSE: Duration = Duration::from_secs(1);

/// The shortest lease: a NATS outage of a few seconds, when no renewal gets through, must not
/// let a second delivery start a second call beside a living one.
const MIN_LEASE: Duration = Duration::from_secs(15);

/// How long a job's lease lasts (`Worker::lease_duration`); a call's hold under its key's
/// cap lasts as long, for the same reason.
pub(crate) fn lease_length(config: &Config) -> Duration {
    (config.generator.ack_wait * 2).max(MIN_LEASE)
}

/// The error type of a call that never reached the provider because shutdown came first.
const NOT_SENT: &str = "not_sent";

/// How a held call ended.
enum Held<T> {
    Done(T),
    /// Its lease was taken over or the job finished elsewhere: it must not record.
    LeaseLost,
    /// Shutdown's grace ran out first.
    Abandoned,
}

/// How handling one message ended; [`Step::settle`] says what JetStream is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Generated (or failed for good), recorded, published and acked.
    Finished(Status),
    /// Already generated earlier: its event was republished if needed, and acked.
    AlreadyDone(Status),
    /// Handed back to JetStream to be tried again after this delay.
    Retry(Duration),
    /// Not a job we can ever process; terminated so it is not redelivered.
    Rejected(String),
    /// Shutdown interrupted the call; handed back at once for another instance.
    Interrupted,
    /// Another call holds the job's lease; handed back to look again after this delay.
    Held(Duration),
    /// Gathered for a Message Batch, which now holds the message and settles it.
    Gathered,
}

impl Step {
    /// How `jetcall::consume` settles the message; `None` for one a batch holds, which the
    /// batch settles once it is recorded.
    pub fn settle(&self) -> Option<Settle> {
        Some(match self {
            Step::Finished(_) | Step::AlreadyDone(_) => Settle::Done,
            Step::Retry(delay) => Settle::RetryIn(*delay),
            Step::Held(delay) => Settle::Parked(*delay),
            Step::Rejected(_) => Settle::Reject,
            Step::Interrupted => Settle::Interrupted,
            Step::Gathered => return None,
        })
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
    pub provider: Provider,
    /// Closed while the provider refuses our configuration.
    pub gate: Gate,
    /// `None` for a provider with no rate limits to respect (`offline`).
    pub limiter: Option<Limiter>,
    pub metrics: Metrics,
    /// This process, as the owner of the leases it takes.
    pub instance: String,
    /// The jobs this process works on, for a cancellation to reach their calls.
    pub cancellations: Arc<Cancellations>,
    /// Each key's `max_concurrency`, held across the fleet.
    pub caps: Caps,
    /// The Message Batches API and the fleet's batch records, when bulk jobs go in batches.
    pub batches: Option<Arc<Batches>>,
    /// Where bulk jobs are gathered into batches; set once the gatherer runs.
    pub batch_intake: std::sync::OnceLock<Intake>,
}

impl Worker {
    /// Processes one message to a `Step`, and logs how it ended. On an error nothing is
    /// settled, so the request is redelivered after `ack_wait`.
    ///
    /// The job is a span of the trace its message carries (`traceparent`; a new trace if it
    /// has none), passed on to the event it leads to, and every line logged about it names
    /// the job.
    pub async fn handle(
        &self,
        message: &Message,
        shutdown: &CancellationToken,
    ) -> Result<Step, WorkerError> {
        let request: JobRequested = match serde_json::from_slice(&message.payload) {
            Ok(request) => request,
            Err(err) => {
                let reason = format!("not a job request: {err}");
                tracing::error!(%reason, subject = %message.subject, "request dropped");
                return Ok(Step::Rejected(reason));
            }
        };
        let trace = TraceParent::continue_from(message.headers.as_ref());
        let span = jetcall::job_span!(request.job_id, request.kind, trace);
        async {
            let handled = self.process(message, &request, &trace, shutdown).await;
            match &handled {
                Ok(Step::Rejected(reason)) => {
                    tracing::error!(%reason, subject = %message.subject, "request dropped")
                }
                Ok(step) => tracing::debug!(?step, "request handled"),
                Err(err) => tracing::warn!(error = %err, "request left for redelivery"),
            }
            handled
        }
        .instrument(span)
        .await
    }

    async fn process(
        &self,
        message: &Message,
        request: &JobRequested,
        trace: &TraceParent,
        shutdown: &CancellationToken,
    ) -> Result<Step, WorkerError> {
        let Some(spec) = self.config.kinds.get(request.kind.as_str()) else {
            let outcome = failure(
                "unknown_kind",
                format!("no kind `{}` is configured", request.kind),
            );
            return Box::pin(self.finish(request, trace, outcome, None, None)).await;
        };

        if let Some(step) = self.gather(message, request, trace, spec) {
            return Ok(step);
        }
        let max_attempts = self.config.generator.max_attempts;
        let watched = self.cancellations.watch(&request.job_id);
        let now = OffsetDateTime::now_utc();
        let mut claim = Claim::Generated;
        // Boxed here and below: only the LLM call's state stays in the task while it waits,
        // which keeps 10,000 calls in flight within a small heap.
        let started = Box::pin(self.topology.status.update(&request.job_id, |doc| {
            claim = doc.claim(&self.instance, now, self.lease_duration());
            matches!(claim, Claim::Taken(_) | Claim::Expired)
        }))
        .await?;
        // The document as written, so recording the outcome needs no second read.
        let (current, lease) = match (started, claim) {
            (Updated::Written(doc, revision), Claim::Taken(lease)) => {
                (Some((*doc, revision)), lease)
            }
            (Updated::Missing, _) => return Ok(no_status_document(request)),
            (Updated::Written(doc, _) | Updated::Unchanged(doc), claim) => {
                return Box::pin(self.unclaimed(request, trace, claim, &doc)).await;
            }
        };
        let attempt = lease.attempt;
        if attempt > max_attempts {
            let outcome = failure(
                "attempts_exhausted",
                format!("gave up after {max_attempts} attempts"),
            );
            return Box::pin(self.finish(request, trace, outcome, current, Some(&lease))).await;
        }

        // Rendered once, bounded, before any call: a job whose input makes too long a prompt
        // fails as its own fault, and never reaches the model.
        let prompt = match spec.render(&request.input, self.config.generator.max_prompt_bytes) {
            Ok(prompt) => prompt,
            Err(err) => {
                let outcome = failure("invalid_input", err.to_string());
                return Box::pin(self.finish(request, trace, outcome, current, Some(&lease))).await;
            }
        };
        // Boxed once here: passed by value, it would be held twice (the argument, then the
        // pinned copy polled).
        let call = Box::pin(self.generate(request, spec, &prompt, shutdown));
        let held = self.hold(message, request, &lease, call, &watched.cancelled, shutdown);
        let result = match held.await {
            Held::Done(result) => result,
            Held::LeaseLost => return Box::pin(self.lost_lease(request, trace)).await,
            Held::Abandoned => return Ok(self.hand_back(request, &lease).await),
        };
        let error = match result {
            Ok((result, generation)) => {
                let cost = self.config.prices.cost(
                    &generation.model,
                    &generation.usage,
                    jetcall::cost::Path::Sync,
                );
                let outcome = Outcome::Completed {
                    result,
                    model: generation.model,
                    usage: generation.usage,
                    cost,
                };
                return Box::pin(self.finish(request, trace, outcome, current, Some(&lease))).await;
            }
            Err(err) => err,
        };
        if error.error_type == NOT_SENT {
            // Never sent, so never paid: the attempt is given back with the message.
            Box::pin(self.topology.status.update(&request.job_id, |doc| {
                doc.generation_attempts = doc.generation_attempts.saturating_sub(1);
                doc.release_lease(&lease)
            }))
            .await?;
            return Ok(Step::Interrupted);
        }
        tracing::warn!(attempt, error = %error, "generation failed");
        match error.disposition {
            Disposition::Retry { retry_after } if attempt < max_attempts => {
                let delay = retry_after.unwrap_or_else(|| llm_backoff(attempt, rand::random()));
                let failed = JobError {
                    kind: error.error_type.clone(),
                    message: error.message.clone(),
                };
                let ended_at = OffsetDateTime::now_utc();
                Box::pin(self.topology.status.update(&request.job_id, |doc| {
                    let released = doc.release_lease(&lease);
                    if released {
                        doc.log_generation(
                            &lease,
                            ended_at,
                            AttemptOutcome::Retry,
                            Some(failed.clone()),
                            Some(delay),
                        );
                    }
                    released
                }))
                .await?;
                Ok(Step::Retry(delay))
            }
            Disposition::Configuration => {
                // The gate has paused consumption and raised the alarm. The job is not at
                // fault: give back the attempt it did not really make.
                Box::pin(self.topology.status.update(&request.job_id, |doc| {
                    doc.generation_attempts = doc.generation_attempts.saturating_sub(1);
                    doc.release_lease(&lease);
                    true
                }))
                .await?;
                Ok(Step::Retry(self.config.generator.probe_interval))
            }
            Disposition::Retry { .. } | Disposition::Permanent => {
                let outcome = self.charged_failure(error);
                Box::pin(self.finish(request, trace, outcome, current, Some(&lease))).await
            }
        }
    }

    /// A bulk job handed to the Message Batch being gathered, if bulk jobs go in batches and
    /// this one can: its id is a `custom_id` and its prompt renders (one that does not fails
    /// on the synchronous path, as its own fault).
    fn gather(
        &self,
        message: &Message,
        request: &JobRequested,
        trace: &TraceParent,
        spec: &KindSpec,
    ) -> Option<Step> {
        if request.priority != jetcall::lanes::Priority::Bulk
            || request.job_id.as_str().len() > crate::batch::MAX_CUSTOM_ID
        {
            return None;
        }
        let intake = self.batch_intake.get()?;
        let Provider::Anthropic(anthropic) = &self.provider else {
            return None;
        };
        let prompt = spec
            .render(&request.input, self.config.generator.max_prompt_bytes)
            .ok()?;
        let generation = GenerationRequest {
            spec,
            input: &request.input,
            prompt: &prompt,
        };
        let body = anthropic
            .batch_request(request.job_id.as_str(), &generation)
            .ok()?;
        let mut message = message.clone();
        // Only its reply subject is needed to settle it: the copy of the payload goes, and
        // with it most of what a job waiting for its batch holds.
        message.message.payload = bytes::Bytes::new();
        let gathered = Gathered {
            job_id: request.job_id.clone(),
            trace: *trace,
            message,
            body,
        };
        Some(match intake.send(gathered) {
            Ok(()) => Step::Gathered,
            // The gatherer has stopped: shutting down.
            Err(_) => Step::Interrupted,
        })
    }

    /// The step for a job the claim did not take: generated, expired by it, held by another
    /// call, or in a Message Batch.
    pub(crate) async fn unclaimed(
        &self,
        request: &JobRequested,
        trace: &TraceParent,
        claim: Claim,
        doc: &JobStatus,
    ) -> Result<Step, WorkerError> {
        match claim {
            Claim::Held(left) => Ok(wait_for_holder(left)),
            Claim::Expired => Box::pin(self.expired(doc, trace)).await,
            Claim::InBatch(record) => Ok(self.in_batch(&request.job_id, &record).await),
            Claim::Generated | Claim::Taken(_) => {
                Box::pin(self.already_generated(doc, trace)).await
            }
        }
    }

    /// A job failed by `error`, with the answers it was charged for (if any) and their cost.
    fn charged_failure(&self, error: LlmError) -> Outcome {
        let cost = error.paid.as_ref().and_then(|paid| {
            self.config
                .prices
                .cost(&paid.model, &paid.usage, jetcall::cost::Path::Sync)
        });
        Outcome::Failed {
            error: JobError {
                kind: error.error_type,
                message: error.message,
            },
            usage: error.paid.map(|paid| paid.usage),
            cost,
        }
    }

    /// How long a lease lasts: two `ack_wait`s, so it outlives the missed renewals that let
    /// JetStream redeliver the request, and at least `MIN_LEASE`.
    pub(crate) fn lease_duration(&self) -> Duration {
        lease_length(&self.config)
    }

    /// Gives up this call's lease, so the request handed back is taken up at once.
    async fn release(&self, request: &JobRequested, lease: &Lease) -> Result<(), WorkerError> {
        Box::pin(
            self.topology
                .status
                .update(&request.job_id, |doc| doc.release_lease(lease)),
        )
        .await?;
        Ok(())
    }

    /// Shutdown's grace ran out mid-call: hand the request back at once for another instance.
    async fn hand_back(&self, request: &JobRequested, lease: &Lease) -> Step {
        // Handed back even if the release cannot be written: the lease then runs out.
        if let Err(err) = self.release(request, lease).await {
            tracing::warn!(error = %err, "could not release the job's lease; it runs out");
        }
        Step::Interrupted
    }

    /// The call lost its lease: the job finished elsewhere (settle this copy), or another
    /// call took it over (wait for that one).
    async fn lost_lease(
        &self,
        request: &JobRequested,
        trace: &TraceParent,
    ) -> Result<Step, WorkerError> {
        tracing::warn!("the call lost its lease; its answer is not recorded");
        let now = OffsetDateTime::now_utc();
        match Box::pin(self.topology.status.get(&request.job_id)).await? {
            Some((doc, _)) if doc.status.is_generated() => {
                Box::pin(self.already_generated(&doc, trace)).await
            }
            Some((doc, _)) => {
                let left = doc
                    .lease
                    .filter(|lease| lease.is_live(now))
                    .and_then(|lease| (lease.expires_at - now).try_into().ok())
                    .unwrap_or_default();
                Ok(wait_for_holder(left))
            }
            None => Ok(no_status_document(request)),
        }
    }

    /// The job's result: one LLM call, and one more if the answer does not fit the kind's
    /// output type (a model asked again usually mends malformed JSON). Usage counts both.
    async fn generate(
        &self,
        request: &JobRequested,
        spec: &KindSpec,
        prompt: &str,
        stopping: &CancellationToken,
    ) -> Result<(serde_json::Value, Generation), LlmError> {
        let mut used = Usage::default();
        let mut retried = false;
        // Once an answer is paid for, shutdown no longer stops the call that mends it: a
        // hand-back then would count as unpaid what was paid.
        let paid_for = CancellationToken::new();
        loop {
            let mut generation = self
                .call_llm(
                    request.kind.as_str(),
                    request.tenant.as_deref(),
                    GenerationRequest {
                        spec,
                        input: &request.input,
                        prompt,
                    },
                    if retried { &paid_for } else { stopping },
                )
                .await?;
            used = used.plus(generation.usage);
            match to_result(&spec.output, &generation.text) {
                Ok(result) => {
                    generation.usage = used;
                    return Ok((result, generation));
                }
                Err(err) if !retried => {
                    tracing::warn!(error = %err, "unusable answer; asking once more");
                    retried = true;
                }
                Err(err) => {
                    return Err(LlmError {
                        paid: Some(Box::new(Paid {
                            model: generation.model,
                            usage: used,
                        })),
                        ..LlmError::new(
                            Disposition::Permanent,
                            "invalid_output",
                            format!("{err} (the model was asked twice)"),
                        )
                    });
                }
            }
        }
    }

    /// One LLM call within its key's cap on calls in flight and the shared rate limits; the
    /// gate and the limiter learn from its answer. A call still waiting for its turn when
    /// shutdown comes is never sent (`NOT_SENT`).
    async fn call_llm(
        &self,
        kind: &str,
        tenant: Option<&str>,
        request: GenerationRequest<'_>,
        stopping: &CancellationToken,
    ) -> Result<Generation, LlmError> {
        let estimate = if self.config.generator.tokens_per_minute > 0 {
            ((request.spec.system.len() + request.prompt.len()) / 4) as u64
        } else {
            0
        };
        let not_sent = || {
            LlmError::new(
                Disposition::Retry { retry_after: None },
                NOT_SENT,
                "shutting down before the call was sent",
            )
        };
        if stopping.is_cancelled() {
            return Err(not_sent());
        }
        // Before the rate limiter: a reservation there is spent by the clock while waiting.
        let asked = Instant::now();
        let waiting = tenant
            .filter(|tenant| self.caps.capped(tenant))
            .map(|tenant| self.metrics.cap_waiting(tenant));
        let held = tokio::select! {
            held = self.caps.acquire(tenant) => held,
            _ = stopping.cancelled() => return Err(not_sent()),
        };
        drop(waiting);
        let held = held.map_err(|err| {
            LlmError::new(
                Disposition::Retry { retry_after: None },
                "concurrency_cap_unavailable",
                err.to_string(),
            )
        })?;
        let _holding = held
            .as_ref()
            .and(tenant)
            .map(|tenant| self.metrics.cap_taken(tenant, asked.elapsed()));
        if let Some(limiter) = &self.limiter {
            let acquired = tokio::select! {
                acquired = Box::pin(limiter.acquire(estimate)) => acquired,
                _ = stopping.cancelled() => return Err(not_sent()),
            };
            acquired.map_err(|err| {
                LlmError::new(
                    Disposition::Retry { retry_after: None },
                    "rate_limiter_unavailable",
                    err.to_string(),
                )
            })?;
        }
        let in_flight = self.metrics.call_started();
        let started = Instant::now();
        let result = self.provider.generate(request).await;
        drop(in_flight);
        self.metrics
            .call_finished(self.provider.name(), &result, started.elapsed());
        match &result {
            Err(err) if err.disposition == Disposition::Configuration => self.gate.fault(err),
            _ => self.gate.healthy(),
        }
        self.metrics.set_paused(!self.gate.is_open());
        if let Ok(generation) = &result {
            self.metrics.tokens_used(kind, generation.usage);
        }
        if let Some(limiter) = &self.limiter {
            let learned = match &result {
                Ok(generation) => {
                    let used = generation.usage.rate_limited_tokens();
                    let charged = Box::pin(limiter.charge(used.saturating_sub(estimate))).await;
                    match generation.slow_down {
                        Some(wait) => charged.and(Box::pin(limiter.pause(wait)).await),
                        None => charged,
                    }
                }
                Err(err) if err.rate_limited => {
                    let wait = match err.disposition {
                        Disposition::Retry {
                            retry_after: Some(wait),
                        } => wait,
                        _ => RATE_LIMITED_PAUSE,
                    };
                    Box::pin(limiter.pause(wait)).await
                }
                Err(_) => Ok(()),
            };
            if let Err(err) = learned {
                tracing::warn!(error = %err, "could not update the shared rate-limit budget");
            }
        }
        result
    }

    /// Runs `call` (the rate limiter's wait included) holding the message and the job's
    /// lease: every half `ack_wait` a progress ack tells JetStream the message is still being
    /// worked on, and the lease is renewed by compare-and-set. A renewal that finds the lease
    /// taken over, or the job finished, ends the call unrecorded; one that cannot reach NATS
    /// is tried again at the next tick, the lease being long enough to ride out the outage.
    /// After shutdown (the pull has stopped) the call has `generator.shutdown_grace` to end.
    async fn hold<T>(
        &self,
        message: &Message,
        request: &JobRequested,
        lease: &Lease,
        call: impl std::future::Future<Output = T>,
        cancelled: &CancellationToken,
        stopping: &CancellationToken,
    ) -> Held<T> {
        let period = self.config.generator.ack_wait / 2;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tokio::pin!(call);
        let mut renewal = std::pin::pin!(futures::future::Fuse::terminated());
        // Armed only once shutdown starts; until then it never fires.
        let grace = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(grace);
        let mut grace_started = false;
        loop {
            tokio::select! {
                result = &mut call => return Held::Done(result),
                // The cancellation took the lease: the call is dropped, its answer unwanted.
                _ = cancelled.cancelled() => return Held::LeaseLost,
                _ = ticker.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                    if renewal.is_terminated() {
                        renewal.set(self.renew(request, lease).fuse());
                    }
                }
                renewed = renewal.as_mut() => match renewed {
                    Ok(true) => {}
                    Ok(false) => return Held::LeaseLost,
                    Err(err) => tracing::warn!(error = %err, "could not renew the job's lease"),
                },
                _ = stopping.cancelled(), if !grace_started => {
                    grace_started = true;
                    grace.as_mut().reset(
                        tokio::time::Instant::now() + self.config.generator.shutdown_grace,
                    );
                }
                _ = &mut grace, if grace_started => return Held::Abandoned,
            }
        }
    }

    /// Moves the lease on; false when it is no longer this call's.
    async fn renew(
        &self,
        request: &JobRequested,
        lease: &Lease,
    ) -> Result<bool, jetcall::store::StoreError> {
        let expires_at = OffsetDateTime::now_utc() + self.lease_duration();
        let renewed = Box::pin(
            self.topology
                .status
                .update(&request.job_id, |doc| doc.renew_lease(lease, expires_at)),
        )
        .await?;
        Ok(matches!(renewed, Updated::Written(..)))
    }

    /// Records the outcome and publishes it (in `trace`); the request is then acked.
    pub(crate) async fn finish(
        &self,
        request: &JobRequested,
        trace: &TraceParent,
        outcome: Outcome,
        current: Option<(JobStatus, u64)>,
        lease: Option<&Lease>,
    ) -> Result<Step, WorkerError> {
        let finished_at = OffsetDateTime::now_utc();
        let status = outcome.status();
        let recorded = self
            .topology
            .status
            .update_from(&request.job_id, current, |doc| {
                if !doc.may_record(lease, finished_at) || !doc.advance(status, finished_at) {
                    return false;
                }
                doc.lease = None;
                // A completed attempt is the job's `finished_at`; only those that did not
                // complete are logged, so the common job's document does not grow.
                if let (Some(lease), Outcome::Failed { error, .. }) = (lease, &outcome) {
                    doc.log_generation(
                        lease,
                        finished_at,
                        AttemptOutcome::Failed,
                        Some(error.clone()),
                        None,
                    );
                }
                match &outcome {
                    Outcome::Completed {
                        result,
                        model,
                        usage,
                        cost,
                    } => {
                        doc.result = Some(result.clone());
                        doc.model = Some(model.clone());
                        doc.usage = Some(*usage);
                        doc.cost = *cost;
                    }
                    Outcome::Failed { error, usage, cost } => {
                        doc.error = Some(error.clone());
                        doc.usage = *usage;
                        doc.cost = *cost;
                    }
                    // Never generated here: the gateway cancels, the claim expires.
                    Outcome::Cancelled { .. } | Outcome::Expired { .. } => return false,
                }
                doc.finished_at = Some(finished_at);
                true
            })
            .await?;
        match recorded {
            Updated::Written(doc, _) => {
                Box::pin(self.topology.budgets.settle_job(&doc, Occasion::Outcome)).await;
                if let Some(event) = doc.finished_event() {
                    self.publish(&event, trace).await?;
                }
                tracing::info!(status = status.as_str(), "job generated");
                self.metrics
                    .job_finished(request.kind.as_str(), status.as_str());
                if let Some(cost) = doc.cost {
                    self.metrics.cost(
                        request.kind.as_str(),
                        doc.tenant.as_deref(),
                        cost_path(&doc),
                        cost,
                    );
                }
                Ok(Step::Finished(status))
            }
            // Cancelled while the call ran: what it was charged still counts.
            Updated::Unchanged(doc) if doc.generation_outcome() == Status::Cancelled => {
                Box::pin(self.charge_cancelled(request, &outcome)).await?;
                Box::pin(self.already_generated(&doc, trace)).await
            }
            // Another call got there first; its outcome stands.
            Updated::Unchanged(doc) if doc.status.is_generated() => {
                Box::pin(self.already_generated(&doc, trace)).await
            }
            // Another call holds the lease now; this answer is not recorded.
            Updated::Unchanged(_) => Box::pin(self.lost_lease(request, trace)).await,
            Updated::Missing => Ok(no_status_document(request)),
        }
    }

    /// A call that answered after its job was cancelled was paid for all the same: its usage
    /// and cost go on the cancelled job's document and into the cost metric; its result is
    /// dropped.
    pub(crate) async fn charge_cancelled(
        &self,
        request: &JobRequested,
        outcome: &Outcome,
    ) -> Result<(), WorkerError> {
        let (usage, cost) = match outcome {
            Outcome::Completed { usage, cost, .. } => (Some(*usage), *cost),
            Outcome::Failed { usage, cost, .. } => (*usage, *cost),
            Outcome::Cancelled { .. } | Outcome::Expired { .. } => (None, None),
        };
        let Some(usage) = usage else {
            return Ok(());
        };
        // One call at a time holds a job, so the first charge is the only one.
        let charged = Box::pin(self.topology.status.update(&request.job_id, |doc| {
            if doc.usage.is_some() {
                return false;
            }
            doc.usage = Some(usage);
            doc.cost = cost;
            true
        }))
        .await?;
        if let Updated::Written(doc, _) = &charged {
            let late = Occasion::ChargedAfterCancel;
            Box::pin(self.topology.budgets.settle_job(doc, late)).await;
        }
        if let (Updated::Written(doc, _), Some(cost)) = (charged, cost) {
            self.metrics.cost(
                request.kind.as_str(),
                doc.tenant.as_deref(),
                cost_path(&doc),
                cost,
            );
        }
        Ok(())
    }

    /// The job was not started before its `expires_at`: the claim recorded it `expired`
    /// instead, and its event goes out for the webhook.
    async fn expired(&self, doc: &JobStatus, trace: &TraceParent) -> Result<Step, WorkerError> {
        Box::pin(self.topology.budgets.settle_job(doc, Occasion::Outcome)).await;
        if let Some(event) = doc.finished_event() {
            self.publish(&event, trace).await?;
        }
        tracing::info!("job expired before it was started");
        self.metrics
            .job_finished(doc.kind.as_str(), Status::Expired.as_str());
        Ok(Step::Finished(Status::Expired))
    }

    /// A redelivered request for a job that is already generated: never call the LLM again.
    /// Until the job is delivered its event is published again, in case the first attempt
    /// stopped between the status write and the publish; `Nats-Msg-Id` keeps it single.
    pub(crate) async fn already_generated(
        &self,
        doc: &JobStatus,
        trace: &TraceParent,
    ) -> Result<Step, WorkerError> {
        if let Some(event) = doc.finished_event().filter(|_| doc.awaits_delivery()) {
            self.publish(&event, trace).await?;
        }
        Ok(Step::AlreadyDone(doc.status))
    }

    /// Publishes `event` with this service's span of the job's trace as its `traceparent`.
    async fn publish(&self, event: &JobFinished, trace: &TraceParent) -> Result<(), WorkerError> {
        let kind = event.event();
        publish_event_with_headers(
            &self.topology.jetstream,
            kind.subject(&event.kind),
            &kind.msg_id(&event.job_id),
            event,
            trace.to_headers(),
        )
        .await?;
        Ok(())
    }
}

/// Another call holds the job: hand this copy back until that call's lease would have run
/// out. If the holder finishes first, its ack settles the message and this copy never comes
/// back.
fn wait_for_holder(left: Duration) -> Step {
    let delay = left.max(Duration::from_secs(1));
    tracing::info!(?delay, "another call holds the job's lease; waiting");
    Step::Held(delay)
}

/// Which price a job's answer was paid at: its batch's, if a batch answered it.
fn cost_path(doc: &JobStatus) -> jetcall::cost::Path {
    if doc.batch.is_some() {
        jetcall::cost::Path::Batch
    } else {
        jetcall::cost::Path::Sync
    }
}

pub(crate) fn no_status_document(request: &JobRequested) -> Step {
    Step::Rejected(format!("job {} has no status document", request.job_id))
}

/// A job failed before any answer was paid for.
pub(crate) fn failure(error_type: &str, message: String) -> Outcome {
    Outcome::Failed {
        error: JobError {
            kind: error_type.to_owned(),
            message,
        },
        usage: None,
        cost: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_settles_as_it_always_did() {
        let delay = Duration::from_millis(2500);
        let cases = [
            (Step::Finished(Status::Completed), Settle::Done),
            (Step::Finished(Status::Failed), Settle::Done),
            (Step::AlreadyDone(Status::Delivered), Settle::Done),
            (Step::Retry(delay), Settle::RetryIn(delay)),
            (Step::Held(delay), Settle::Parked(delay)),
            (Step::Rejected("not a job request".into()), Settle::Reject),
            (Step::Interrupted, Settle::Interrupted),
        ];
        for (step, settle) in cases {
            assert_eq!(step.settle(), Some(settle), "{step:?}");
        }
        assert_eq!(Step::Gathered.settle(), None);
    }
}
