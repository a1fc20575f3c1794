//! The payloads published on `jobs.*.<kind>`: what subscribers outside Jetcall read.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::allowlist::CallbackUrl;
pub use crate::cost::{Cost, Usage};
use crate::job::{JobId, Kind};
use crate::lanes::{Lane, Priority};

/// `jobs.requested.<kind>[.<tenant>.<priority>]`: a job the gateway accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequested {
    pub job_id: JobId,
    pub kind: Kind,
    pub input: Map<String, Value>,
    pub callback_url: CallbackUrl,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// Not started by then, the job expires without a call (`jobs.expired.<kind>`).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// The API key (its `name`) the job was submitted with; absent without keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Priority::is_interactive")]
    pub priority: Priority,
}

impl JobRequested {
    /// The lane the request waits in for a generator (`jetcall::lanes`).
    pub fn lane(&self) -> Lane {
        Lane::new(self.tenant.as_deref(), self.priority)
    }

    /// `jobs.requested.<kind>`, with its lane's tenant and priority tokens after the kind
    /// for any lane but the default.
    pub fn subject(&self) -> String {
        self.lane().subject(&self.kind)
    }
}

/// Why a job failed: a stable `type` a program can switch on and a `message` for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Completed {
        result: Value,
        model: String,
        usage: Usage,
        /// What `usage` cost at the configured price of `model`; absent for a model with no
        /// price (`[prices]`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost: Option<Cost>,
    },
    Failed {
        error: JobError,
        /// Tokens the job was charged for although it failed: answers that did not fit its
        /// kind (`invalid_output`). Absent when no answer came.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
        /// What those tokens cost, for a model with a price.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost: Option<Cost>,
    },
    /// Withdrawn by its caller before it was generated (`jobs.cancelled.<kind>`).
    Cancelled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
    },
    /// Not started before its `expires_at` (`jobs.expired.<kind>`); no call was made.
    Expired {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
    },
}

/// `jobs.completed.<kind>`, `jobs.failed.<kind>`, `jobs.cancelled.<kind>` and
/// `jobs.expired.<kind>`: everything needed to tell the caller,
/// so the callback service and other subscribers need nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinished {
    pub job_id: JobId,
    pub kind: Kind,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub input: Map<String, Value>,
    pub callback_url: CallbackUrl,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// The name of the API key the job was submitted with (absent without keys): whose bill
    /// the job's cost is on. Kept out of the webhook, which goes to the tenant itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl JobFinished {
    pub fn event(&self) -> crate::subjects::Event {
        match self.outcome {
            Outcome::Completed { .. } => crate::subjects::Event::Completed,
            Outcome::Failed { .. } => crate::subjects::Event::Failed,
            Outcome::Cancelled { .. } => crate::subjects::Event::Cancelled,
            Outcome::Expired { .. } => crate::subjects::Event::Expired,
        }
    }
}

/// `jobs.delivered.<kind>` and `jobs.undeliverable.<kind>`: how the webhook went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub job_id: JobId,
    pub kind: Kind,
    pub webhook_id: String,
    pub callback_url: CallbackUrl,
    pub attempts: Vec<DeliveryAttempt>,
    /// Why the last attempt was the last, for an undeliverable job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The webhook body, so an operator can replay an undeliverable job from the event alone.
    pub payload: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
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
    /// `connect`, `request` or `refused` (the URL or its address is not allowed); or
    /// `circuit_open`, a note that the delivery waits for its destination, which was no
    /// request and spends no retry.
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

/// The `error_kind` of a note that a delivery waited for its destination's open circuit.
pub const CIRCUIT_OPEN: &str = "circuit_open";

impl DeliveryAttempt {
    /// Whether this entry is a try at the URL, which spends one step of the retry schedule:
    /// everything but a `circuit_open` note, which records a wait with no request. (A
    /// `refused` URL was tried and ends the round at once.)
    pub fn spends_a_retry(&self) -> bool {
        self.error_kind.as_deref() != Some(CIRCUIT_OPEN)
    }
}

/// Of `deliveries`, the attempts in `round` that spent a retry: requests tried, not waits
/// noted for an open circuit. They decide the next retry's wait.
pub fn attempts_in_round(deliveries: &[DeliveryAttempt], round: u32) -> usize {
    deliveries
        .iter()
        .filter(|attempt| attempt.round == round && attempt.spends_a_retry())
        .count()
}
