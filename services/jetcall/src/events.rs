//! The payloads published on `jobs.*.<kind>`: what subscribers outside Jetcall read.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::job::{JobId, Kind};

/// `jobs.requested.<kind>`: a job the gateway accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequested {
    pub job_id: JobId,
    pub kind: Kind,
    pub input: Map<String, Value>,
    pub callback_url: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
}

/// Tokens spent on one job, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
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
    },
    Failed {
        error: JobError,
    },
}

/// `jobs.completed.<kind>` and `jobs.failed.<kind>`: everything needed to tell the caller,
/// so the callback service and other subscribers need nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinished {
    pub job_id: JobId,
    pub kind: Kind,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub input: Map<String, Value>,
    pub callback_url: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
}

impl JobFinished {
    pub fn event(&self) -> crate::subjects::Event {
        match self.outcome {
            Outcome::Completed { .. } => crate::subjects::Event::Completed,
            Outcome::Failed { .. } => crate::subjects::Event::Failed,
        }
    }
}

/// `jobs.delivered.<kind>` and `jobs.undeliverable.<kind>`: how the webhook went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub job_id: JobId,
    pub kind: Kind,
    pub webhook_id: String,
    pub callback_url: String,
    pub attempts: Vec<crate::status::DeliveryAttempt>,
    /// Why the last attempt was the last, for an undeliverable job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The webhook body, so an operator can replay an undeliverable job from the event alone.
    pub payload: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
