//! Handling one `jobs.completed.<kind>` / `jobs.failed.<kind>` message: deliver, record,
//! then ack or schedule the next attempt through JetStream.
//!
//! Retries are delayed NAKs, so a pending retry lives in JetStream, not in this process: a
//! restart loses nothing, and the attempt count lives in the status document, so it does not
//! reset the schedule either.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{AckKind, Message};
use time::OffsetDateTime;

use jetcall::Config;
use jetcall::events::{DeliveryReport, JobFinished};
use jetcall::retry::delivery_delay;
use jetcall::status::{DeliveryAttempt, Status};
use jetcall::store::Updated;
use jetcall::subjects::Event;
use jetcall::topology::Topology;
use jetcall::webhook;

use crate::deliver::{Sender, Verdict};

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Delivered,
    /// Another try is scheduled after this delay.
    Retry(Duration),
    Undeliverable(String),
    /// Delivered or given up earlier; acked without another request.
    AlreadyDone(Status),
    Rejected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("status store: {0}")]
    Store(#[from] jetcall::store::StoreError),
    #[error("publishing the delivery report: {0}")]
    Publish(String),
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub config: Arc<Config>,
    pub topology: Topology,
    pub sender: Sender,
}

impl Worker {
    pub async fn handle(&self, message: &Message) -> Result<Step, WorkerError> {
        let job: JobFinished = match serde_json::from_slice(&message.payload) {
            Ok(job) => job,
            Err(err) => {
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(Step::Rejected(format!("not a finished job: {err}")));
            }
        };
        match self.topology.status.get(&job.job_id).await? {
            Some((doc, _)) if doc.status.is_final() => {
                let _ = message.ack().await;
                return Ok(Step::AlreadyDone(doc.status));
            }
            Some(_) => {}
            None => {
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(Step::Rejected(format!(
                    "job {} has no status document",
                    job.job_id
                )));
            }
        }

        let webhook_id = webhook::webhook_id(&job);
        let payload = webhook::payload(&job);
        let body = serde_json::to_vec(&payload).unwrap_or_default();
        let (verdict, attempt) = self
            .sender
            .send(&job.callback_url, &webhook_id, &body)
            .await;

        let schedule = &self.config.callback.retry_schedule;
        let mut decision = Decision::retry_later(Duration::ZERO);
        let mut attempts = Vec::new();
        let now = OffsetDateTime::now_utc();
        let recorded = self
            .topology
            .status
            .update(&job.job_id, |doc| {
                if doc.status.is_final() {
                    return false;
                }
                doc.deliveries.push(attempt.clone());
                decision = decide(verdict, doc.deliveries.len(), schedule, &attempt);
                if let Some(status) = decision.status {
                    doc.advance(status, now);
                    if status == Status::Delivered {
                        doc.delivered_at = Some(now);
                    }
                } else {
                    doc.updated_at = now;
                }
                attempts = doc.deliveries.clone();
                true
            })
            .await?;
        match recorded {
            Updated::Written(_) => {}
            Updated::Unchanged(doc) => {
                let _ = message.ack().await;
                return Ok(Step::AlreadyDone(doc.status));
            }
            Updated::Missing => {
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(Step::Rejected(format!(
                    "job {} has no status document",
                    job.job_id
                )));
            }
        }

        match (decision.status, decision.delay) {
            (Some(Status::Delivered), _) => {
                let attempt_count = attempts.len();
                self.report(Event::Delivered, &job, webhook_id, attempts, None, payload)
                    .await?;
                let _ = message.ack().await;
                tracing::info!(job_id = %job.job_id, attempts = attempt_count, "webhook delivered");
                Ok(Step::Delivered)
            }
            (None, Some(delay)) => {
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                tracing::info!(job_id = %job.job_id, retry_in = ?delay, error = ?attempt.error, "webhook attempt failed");
                Ok(Step::Retry(delay))
            }
            _ => {
                let reason = decision
                    .reason
                    .unwrap_or_else(|| "attempts exhausted".into());
                self.report(
                    Event::Undeliverable,
                    &job,
                    webhook_id,
                    attempts,
                    Some(reason.clone()),
                    payload,
                )
                .await?;
                let _ = message.ack().await;
                tracing::warn!(job_id = %job.job_id, %reason, "webhook undeliverable");
                Ok(Step::Undeliverable(reason))
            }
        }
    }

    async fn report(
        &self,
        event: Event,
        job: &JobFinished,
        webhook_id: String,
        attempts: Vec<DeliveryAttempt>,
        reason: Option<String>,
        payload: serde_json::Value,
    ) -> Result<(), WorkerError> {
        let report = DeliveryReport {
            job_id: job.job_id.clone(),
            kind: job.kind.clone(),
            webhook_id,
            callback_url: job.callback_url.clone(),
            attempts,
            reason,
            payload,
            at: OffsetDateTime::now_utc(),
        };
        let bytes =
            serde_json::to_vec(&report).map_err(|err| WorkerError::Publish(err.to_string()))?;
        let publish = PublishMessage::build()
            .payload(bytes.into())
            .message_id(event.msg_id(&job.job_id));
        self.topology
            .jetstream
            .send_publish(event.subject(&job.kind), publish)
            .await
            .map_err(|err| WorkerError::Publish(err.to_string()))?
            .await
            .map_err(|err| WorkerError::Publish(err.to_string()))?;
        Ok(())
    }
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

impl Decision {
    fn finished(status: Status, reason: Option<String>) -> Self {
        Self {
            status: Some(status),
            delay: None,
            reason,
        }
    }

    fn retry_later(delay: Duration) -> Self {
        Self {
            status: None,
            delay: Some(delay),
            reason: None,
        }
    }
}

/// What follows an attempt, given how many have been made so far (this one included).
fn decide(
    verdict: Verdict,
    attempts_made: usize,
    schedule: &[Duration],
    attempt: &DeliveryAttempt,
) -> Decision {
    match verdict {
        Verdict::Delivered => Decision::finished(Status::Delivered, None),
        Verdict::Stop => Decision::finished(
            Status::Undeliverable,
            Some("the receiver answered 410 Gone".into()),
        ),
        Verdict::Retry => match delivery_delay(schedule, attempts_made, rand::random()) {
            Some(delay) => Decision::retry_later(delay),
            None => Decision::finished(
                Status::Undeliverable,
                Some(format!(
                    "gave up after {attempts_made} attempts; last: {}",
                    attempt.error.as_deref().unwrap_or("unknown error")
                )),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_attempt() -> DeliveryAttempt {
        DeliveryAttempt {
            at: OffsetDateTime::UNIX_EPOCH,
            duration_ms: 1,
            status_code: Some(500),
            error: Some("HTTP 500".into()),
        }
    }

    #[test]
    fn failures_retry_along_the_schedule_then_give_up() {
        let schedule = [Duration::from_secs(1), Duration::from_secs(2)];
        let first = decide(Verdict::Retry, 1, &schedule, &failed_attempt());
        assert_eq!(first.status, None);
        assert!(
            first
                .delay
                .is_some_and(|d| d <= Duration::from_secs(1) && d >= Duration::from_millis(800))
        );
        let last = decide(Verdict::Retry, 3, &schedule, &failed_attempt());
        assert_eq!(last.status, Some(Status::Undeliverable));
        assert!(
            last.reason
                .is_some_and(|r| r.contains("gave up after 3 attempts; last: HTTP 500"))
        );
    }

    #[test]
    fn gone_stops_at_once_and_success_is_final() {
        let schedule = [Duration::from_secs(1)];
        assert_eq!(
            decide(Verdict::Stop, 1, &schedule, &failed_attempt()).status,
            Some(Status::Undeliverable)
        );
        assert_eq!(
            decide(Verdict::Delivered, 1, &schedule, &failed_attempt()).status,
            Some(Status::Delivered)
        );
    }
}
