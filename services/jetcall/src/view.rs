//! What the API shows of a job: the public view of its status document, which the gateway
//! answers with and the CLI reads.
//!
//! The document in the `job_status` bucket also holds what only the services use (the request
//! digest, the sealed signing secret). Every answer that shows a job (`GET`, its events, a
//! resubmission) is built through this type, which has no field for them, so nothing has to
//! remember to blank them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::cost::{Cost, Usage};
use crate::events::{DeliveryAttempt, JobError};
use crate::job::{JobId, Kind};
use crate::status::{GenerationAttempt, JobStatus, Status};

/// A job: where it is, its result or error, and its delivery attempts.
///
/// In the OpenAPI schema, a field that is left out when empty is optional and never `null`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = JobStatus)]
pub struct JobView {
    pub status: Status,
    pub job_id: JobId,
    pub kind: Kind,
    pub input: Map<String, Value>,
    pub callback_url: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
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
    /// Each LLM attempt that did not complete (the latest 20), oldest first: its outcome,
    /// its error and the wait before the next. The attempt that completed is attempt
    /// `generation_attempts`, ended at `finished_at`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations: Vec<GenerationAttempt>,
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
    /// What `usage` cost at the configured price of `model`; absent for a model with no price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cost: Option<Cost>,
    /// Why the job `failed`, was `cancelled` or `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<JobError>,
    /// `cancelled` or `expired`, for a job that ended so: kept once its webhook has moved
    /// `status` on to `delivered` or `undeliverable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub ended_as: Option<Status>,
    /// Not started by then, the job expires.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
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
    /// The name of the API key the job was submitted with; absent when the API has no keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub tenant: Option<String>,
    /// `interactive` jobs go before their key's `bulk` ones.
    #[serde(default)]
    #[schema(required = true)]
    pub priority: crate::lanes::Priority,
    /// The Message Batch (the API's `msgbatch_…` id) a bulk job was sent in, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub batch_id: Option<String>,
}

impl JobView {
    /// Delivery attempts in the current round that spent a retry (see `JobStatus`).
    pub fn attempts_this_round(&self) -> usize {
        crate::events::attempts_in_round(&self.deliveries, self.delivery_round)
    }
}

impl From<JobStatus> for JobView {
    fn from(doc: JobStatus) -> Self {
        // Named field by field: a field added to the document stays out of the API until it
        // is added here on purpose.
        let JobStatus {
            status,
            job_id,
            kind,
            input,
            callback_url,
            metadata,
            created_at,
            updated_at,
            generation_attempts,
            generations,
            result,
            model,
            usage,
            cost,
            error,
            ended_as,
            expires_at,
            finished_at,
            deliveries,
            delivered_at,
            delivery_round,
            trace_id,
            tenant,
            priority,
            batch,
            ..
        } = doc;
        Self {
            status,
            job_id,
            kind,
            input,
            callback_url: callback_url.into(),
            metadata,
            created_at,
            updated_at,
            generation_attempts,
            generations,
            result,
            model,
            usage,
            cost,
            error,
            ended_as,
            expires_at,
            finished_at,
            deliveries,
            delivered_at,
            delivery_round,
            trace_id,
            tenant,
            priority,
            batch_id: batch.and_then(|batch| batch.id),
        }
    }
}
