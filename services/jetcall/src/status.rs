//! The job status document kept in the `job_status` bucket, and the rule that it never moves
//! backwards.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::config::Secret;
use crate::events::{JobError, JobFinished, JobRequested, Outcome, Usage};
use crate::job::{JobId, Kind};

/// Where a job is: `accepted` → `generating` → `completed` | `failed` → `delivered` |
/// `undeliverable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Accepted,
    Generating,
    Completed,
    Failed,
    Delivered,
    Undeliverable,
}

impl Status {
    fn rank(self) -> u8 {
        match self {
            Status::Accepted => 0,
            Status::Generating => 1,
            Status::Completed | Status::Failed => 2,
            Status::Delivered | Status::Undeliverable => 3,
        }
    }

    /// Whether a job in this state may be moved to `next`. Staying put is allowed (an attempt
    /// log grows without a change of state); moving back, or sideways between two outcomes of
    /// the same step, is not, so a late or redelivered event can never undo progress.
    pub fn may_become(self, next: Status) -> bool {
        self == next || next.rank() > self.rank()
    }

    /// Whether the job's generation has ended, one way or the other.
    pub fn is_generated(self) -> bool {
        self.rank() >= 2
    }

    /// Whether nothing more will happen to the job.
    pub fn is_final(self) -> bool {
        self.rank() == 3
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Generating => "generating",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Delivered => "delivered",
            Status::Undeliverable => "undeliverable",
        }
    }
}

/// One try at delivering the webhook.
///
/// In the OpenAPI schema, a field that is left out when empty is optional and never `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    pub duration_ms: u64,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub status_code: Option<u16>,
    /// What kind of failure, when the attempt did not succeed: `http_status`, `timeout`,
    /// `connect`, `request` or `refused` (the URL or its address is not allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error_kind: Option<String>,
    /// What went wrong, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
    /// The start of the receiver's answer, on one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub response_excerpt: Option<String>,
    /// Which delivery round the attempt belongs to: 0, then one more per redelivery.
    #[serde(default)]
    #[schema(required = true)]
    pub round: u32,
}

/// What `GET /api/v1/jobs/{id}` returns and `nats kv get job_status <id>` shows.
///
/// In the OpenAPI schema, a field that is left out when empty is optional and never `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStatus {
    /// First, so the start of the value (all that `nats kv history` shows) tells the state.
    pub status: Status,
    pub job_id: JobId,
    pub kind: Kind,
    pub input: Map<String, Value>,
    pub callback_url: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    /// A digest of the submission, to tell an idempotent retry from a conflicting reuse of the id.
    pub request_digest: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// LLM attempts so far, across redeliveries and generator instances.
    #[serde(default)]
    #[schema(required = true)]
    pub generation_attempts: u32,
    /// The kind's output, once `completed`: text or JSON, per the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Value, nullable = false)]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub usage: Option<Usage>,
    /// Why the job `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<JobError>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = String, format = DateTime)]
    pub finished_at: Option<OffsetDateTime>,
    /// Every delivery attempt, of every round, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<DeliveryAttempt>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = String, format = DateTime)]
    pub delivered_at: Option<OffsetDateTime>,
    /// Incremented by each redelivery an operator asks for; each round has a fresh schedule.
    #[serde(default)]
    #[schema(required = true)]
    pub delivery_round: u32,
    /// The W3C trace the job was submitted in (the `traceparent` the gateway got, or the one
    /// it started): every event and the webhook carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        nullable = false,
        min_length = 32,
        max_length = 32,
        pattern = "^[0-9a-f]{32}$"
    )]
    pub trace_id: Option<String>,
    /// The caller's own webhook secret, given at submission. Kept out of every event; the
    /// gateway removes it from what it shows, so the API's schema has no such field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub signing_secret: Option<Secret>,
    /// Where the job's request is stored in the `JOBS` stream, once the gateway has seen it
    /// stored: a resubmission of an `accepted` job with it set publishes nothing, because
    /// past the duplicate window JetStream would store a second request (a second paid call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub request_seq: Option<u64>,
}

impl JobStatus {
    pub fn accepted(request: &JobRequested, request_digest: String) -> Self {
        Self {
            job_id: request.job_id.clone(),
            kind: request.kind.clone(),
            status: Status::Accepted,
            input: request.input.clone(),
            callback_url: request.callback_url.clone(),
            metadata: request.metadata.clone(),
            request_digest,
            created_at: request.requested_at,
            updated_at: request.requested_at,
            generation_attempts: 0,
            result: None,
            model: None,
            usage: None,
            error: None,
            finished_at: None,
            deliveries: Vec::new(),
            delivered_at: None,
            delivery_round: 0,
            trace_id: None,
            signing_secret: None,
            request_seq: None,
        }
    }

    /// The finished event of a generated job, rebuilt from its document: for a republish
    /// after a crash, and for a redelivery.
    pub fn finished_event(&self) -> Option<JobFinished> {
        if !self.status.is_generated() {
            return None;
        }
        let outcome = match (&self.result, &self.error) {
            (Some(result), _) => Outcome::Completed {
                result: result.clone(),
                model: self.model.clone().unwrap_or_default(),
                usage: self.usage.unwrap_or_default(),
            },
            (None, Some(error)) => Outcome::Failed {
                error: error.clone(),
            },
            (None, None) => return None,
        };
        Some(JobFinished {
            job_id: self.job_id.clone(),
            kind: self.kind.clone(),
            outcome,
            input: self.input.clone(),
            callback_url: self.callback_url.clone(),
            metadata: self.metadata.clone(),
            finished_at: self.finished_at.unwrap_or(self.updated_at),
        })
    }

    /// Delivery attempts in the current round, which decide the next retry's wait.
    pub fn attempts_this_round(&self) -> usize {
        self.deliveries
            .iter()
            .filter(|attempt| attempt.round == self.delivery_round)
            .count()
    }

    /// Puts an undeliverable job back to be delivered, with a fresh retry schedule: the one
    /// transition that goes backwards, and only at an operator's request.
    pub fn reopen_delivery(&mut self, now: OffsetDateTime) -> bool {
        if self.status != Status::Undeliverable {
            return false;
        }
        self.status = if self.result.is_some() {
            Status::Completed
        } else {
            Status::Failed
        };
        self.delivery_round += 1;
        self.delivered_at = None;
        self.updated_at = now;
        true
    }

    /// A new span in the job's trace, for an event published again (by the start-up sweep, a
    /// redelivery) away from the message that carried the trace.
    pub fn trace(&self) -> Option<crate::trace::TraceParent> {
        crate::trace::TraceParent::in_trace(self.trace_id.as_deref()?)
    }

    /// The request event that this job was accepted with, for a republish.
    pub fn request(&self) -> JobRequested {
        JobRequested {
            job_id: self.job_id.clone(),
            kind: self.kind.clone(),
            input: self.input.clone(),
            callback_url: self.callback_url.clone(),
            metadata: self.metadata.clone(),
            requested_at: self.created_at,
        }
    }

    /// Moves to `next` if that is forward (or the same state), stamping the time. Returns
    /// whether it did; callers skip their write when it did not.
    pub fn advance(&mut self, next: Status, now: OffsetDateTime) -> bool {
        if !self.status.may_become(next) {
            return false;
        }
        self.status = next;
        self.updated_at = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    #[test]
    fn status_only_moves_forward() {
        let order = [Accepted, Generating, Completed, Delivered];
        for (i, from) in order.iter().enumerate() {
            for (j, to) in order.iter().enumerate() {
                assert_eq!(from.may_become(*to), j >= i, "{from:?} -> {to:?}");
            }
        }
        assert!(Generating.may_become(Failed));
        assert!(Failed.may_become(Delivered));
        assert!(Completed.may_become(Undeliverable));
    }

    #[test]
    fn outcomes_of_the_same_step_do_not_replace_each_other() {
        assert!(!Completed.may_become(Failed));
        assert!(!Failed.may_become(Completed));
        assert!(!Delivered.may_become(Undeliverable));
        assert!(!Undeliverable.may_become(Delivered));
    }

    #[test]
    fn status_serialises_as_the_documented_words() {
        assert_eq!(
            serde_json::to_value(Undeliverable).ok(),
            Some("undeliverable".into())
        );
        assert_eq!(Generating.as_str(), "generating");
    }
}
