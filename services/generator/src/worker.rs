//! Handling one `jobs.requested.<kind>` message, from status `generating` to the ack.
//!
//! Order of writes: the status document moves to `completed`/`failed` (holding the result)
//! before the event is published, and the request is acked last. A crash anywhere leaves
//! enough behind for the redelivered request to finish the job without a second LLM call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use jetcall::Config;
use jetcall::events::{JobError, JobFinished, JobRequested, Outcome, Usage};
use jetcall::gate::Gate;
use jetcall::kinds::KindSpec;
use jetcall::publish::publish_event_with_headers;
use jetcall::retry::llm_backoff;
use jetcall::status::{JobStatus, Status};
use jetcall::store::Updated;
use jetcall::topology::Topology;
use jetcall::trace::TraceParent;

use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::output::to_result;
use crate::provider::{Disposition, Generation, GenerationRequest, LlmError, Provider};

/// How long every instance holds off after a 429 that named no wait.
const RATE_LIMITED_PAUSE: Duration = Duration::from_secs(1);

/// How handling one message ended.
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
}

impl Worker {
    /// Processes one message to a `Step`, and logs how it ended. On an error nothing is
    /// acked, so the request is redelivered after `ack_wait`.
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
                let _ = message.ack_with(AckKind::Term).await;
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
            return Box::pin(self.finish(message, request, trace, outcome, None)).await;
        };

        let max_attempts = self.config.generator.max_attempts;
        let mut attempt = 0;
        let now = OffsetDateTime::now_utc();
        // Boxed here and below: only the LLM call's state stays in the task while it waits,
        // which keeps 10,000 calls in flight within a small heap.
        let started = Box::pin(self.topology.status.update(&request.job_id, |doc| {
            if doc.status.is_generated() || !doc.advance(Status::Generating, now) {
                return false;
            }
            doc.generation_attempts += 1;
            attempt = doc.generation_attempts;
            true
        }))
        .await?;
        // The document as written, so recording the outcome needs no second read.
        let current = match started {
            Updated::Written(doc, revision) => Some((*doc, revision)),
            Updated::Unchanged(doc) => {
                return Box::pin(self.already_generated(message, &doc, trace)).await;
            }
            Updated::Missing => {
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(Step::Rejected(format!(
                    "job {} has no status document",
                    request.job_id
                )));
            }
        };
        if attempt > max_attempts {
            let outcome = failure(
                "attempts_exhausted",
                format!("gave up after {max_attempts} attempts"),
            );
            return Box::pin(self.finish(message, request, trace, outcome, current)).await;
        }

        // Rendered once, bounded, before any call: a job whose input makes too long a prompt
        // fails as its own fault, and never reaches the model.
        let prompt = match spec.render(&request.input, self.config.generator.max_prompt_bytes) {
            Ok(prompt) => prompt,
            Err(err) => {
                let outcome = failure("invalid_input", err.to_string());
                return Box::pin(self.finish(message, request, trace, outcome, current)).await;
            }
        };
        // Boxed once here: passed by value, it would be held twice (the argument, then the
        // pinned copy polled).
        let call = Box::pin(self.generate(request, spec, &prompt));
        let Some(result) = self.with_progress_acks(message, call, shutdown).await else {
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return Ok(Step::Interrupted);
        };
        let error = match result {
            Ok((result, generation)) => {
                let outcome = Outcome::Completed {
                    result,
                    model: generation.model,
                    usage: generation.usage,
                };
                return Box::pin(self.finish(message, request, trace, outcome, current)).await;
            }
            Err(err) => err,
        };
        tracing::warn!(attempt, error = %error, "generation failed");
        match error.disposition {
            Disposition::Retry { retry_after } if attempt < max_attempts => {
                let delay = retry_after.unwrap_or_else(|| llm_backoff(attempt, rand::random()));
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                Ok(Step::Retry(delay))
            }
            Disposition::Configuration => {
                // The gate has paused consumption and raised the alarm. The job is not at
                // fault: give back the attempt it did not really make.
                Box::pin(self.topology.status.update(&request.job_id, |doc| {
                    doc.generation_attempts = doc.generation_attempts.saturating_sub(1);
                    true
                }))
                .await?;
                let delay = self.config.generator.probe_interval;
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                Ok(Step::Retry(delay))
            }
            Disposition::Retry { .. } | Disposition::Permanent => {
                let outcome = failure(&error.error_type, error.message);
                Box::pin(self.finish(message, request, trace, outcome, current)).await
            }
        }
    }

    /// The job's result: one LLM call, and one more if the answer does not fit the kind's
    /// output type (a model asked again usually mends malformed JSON). Usage counts both.
    async fn generate(
        &self,
        request: &JobRequested,
        spec: &KindSpec,
        prompt: &str,
    ) -> Result<(serde_json::Value, Generation), LlmError> {
        let mut used = Usage::default();
        let mut retried = false;
        loop {
            let mut generation = self
                .call_llm(
                    request.kind.as_str(),
                    GenerationRequest {
                        spec,
                        input: &request.input,
                        prompt,
                    },
                )
                .await?;
            // Saturating: the counts are the provider's word.
            used.input_tokens = used
                .input_tokens
                .saturating_add(generation.usage.input_tokens);
            used.output_tokens = used
                .output_tokens
                .saturating_add(generation.usage.output_tokens);
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
                    return Err(LlmError::new(
                        Disposition::Permanent,
                        "invalid_output",
                        format!("{err} (the model was asked twice)"),
                    ));
                }
            }
        }
    }

    /// One LLM call within the shared rate limits; the gate and the limiter learn from its
    /// answer.
    async fn call_llm(
        &self,
        kind: &str,
        request: GenerationRequest<'_>,
    ) -> Result<Generation, LlmError> {
        let estimate = if self.config.generator.tokens_per_minute > 0 {
            ((request.spec.system.len() + request.prompt.len()) / 4) as u64
        } else {
            0
        };
        if let Some(limiter) = &self.limiter {
            Box::pin(limiter.acquire(estimate)).await.map_err(|err| {
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
                    let used = generation
                        .usage
                        .input_tokens
                        .saturating_add(generation.usage.output_tokens);
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

    /// Runs `call`, telling JetStream every half `ack_wait` that the message is still being
    /// worked on. `None` when shutdown came first.
    async fn with_progress_acks<T>(
        &self,
        message: &Message,
        call: impl std::future::Future<Output = T>,
        shutdown: &CancellationToken,
    ) -> Option<T> {
        let period = self.config.generator.ack_wait / 2;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tokio::pin!(call);
        loop {
            tokio::select! {
                result = &mut call => return Some(result),
                _ = ticker.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                _ = shutdown.cancelled() => return None,
            }
        }
    }

    /// Records the outcome, publishes it (in `trace`) and acks the request.
    async fn finish(
        &self,
        message: &Message,
        request: &JobRequested,
        trace: &TraceParent,
        outcome: Outcome,
        current: Option<(JobStatus, u64)>,
    ) -> Result<Step, WorkerError> {
        let finished_at = OffsetDateTime::now_utc();
        let status = match &outcome {
            Outcome::Completed { .. } => Status::Completed,
            Outcome::Failed { .. } => Status::Failed,
        };
        let recorded = self
            .topology
            .status
            .update_from(&request.job_id, current, |doc| {
                if !doc.advance(status, finished_at) || doc.status.is_final() {
                    return false;
                }
                match &outcome {
                    Outcome::Completed {
                        result,
                        model,
                        usage,
                    } => {
                        doc.result = Some(result.clone());
                        doc.model = Some(model.clone());
                        doc.usage = Some(*usage);
                    }
                    Outcome::Failed { error } => doc.error = Some(error.clone()),
                }
                doc.finished_at = Some(finished_at);
                true
            })
            .await?;
        match recorded {
            Updated::Written(doc, _) => {
                if let Some(event) = doc.finished_event() {
                    self.publish(&event, trace).await?;
                }
                tracing::info!(status = status.as_str(), "job generated");
                self.metrics
                    .job_finished(request.kind.as_str(), status.as_str());
                let _ = message.ack().await;
                Ok(Step::Finished(status))
            }
            // Another instance got there first; its outcome stands.
            Updated::Unchanged(doc) => Box::pin(self.already_generated(message, &doc, trace)).await,
            Updated::Missing => {
                let _ = message.ack_with(AckKind::Term).await;
                Ok(Step::Rejected(format!(
                    "job {} has no status document",
                    request.job_id
                )))
            }
        }
    }

    /// A redelivered request for a job that is already generated: never call the LLM again.
    /// Until the job is delivered its event is published again, in case the first attempt
    /// stopped between the status write and the publish; `Nats-Msg-Id` keeps it single.
    async fn already_generated(
        &self,
        message: &Message,
        doc: &JobStatus,
        trace: &TraceParent,
    ) -> Result<Step, WorkerError> {
        let undelivered = matches!(doc.status, Status::Completed | Status::Failed);
        if let Some(event) = doc.finished_event().filter(|_| undelivered) {
            self.publish(&event, trace).await?;
        }
        let _ = message.ack().await;
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

fn failure(error_type: &str, message: String) -> Outcome {
    Outcome::Failed {
        error: JobError {
            kind: error_type.to_owned(),
            message,
        },
    }
}
