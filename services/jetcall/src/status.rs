//! The job status document kept in the `job_status` bucket, and the rule that it never moves
//! backwards.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::allowlist::CallbackUrl;
use crate::cost::{Cost, Usage};
pub use crate::events::{CIRCUIT_OPEN, DeliveryAttempt};
use crate::events::{JobError, JobFinished, JobRequested, Outcome};
use crate::job::{JobId, Kind};

/// Where a job is: `accepted` → `generating` → `completed` | `failed` | `cancelled` |
/// `expired` → `delivered` | `undeliverable`. A cancelled or expired job's webhook says so,
/// and its document keeps `ended_as` once that webhook has moved it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Accepted,
    Generating,
    /// Sent to the LLM in a Message Batch (`batch` names it), waiting for its result.
    Batched,
    Completed,
    Failed,
    /// Withdrawn by its caller (`DELETE /api/v1/jobs/{job_id}`) before it was generated.
    Cancelled,
    /// Not started before its `expires_at`, so never sent to the LLM.
    Expired,
    Delivered,
    Undeliverable,
}

impl Status {
    fn rank(self) -> u8 {
        match self {
            Status::Accepted => 0,
            Status::Generating | Status::Batched => 1,
            Status::Completed | Status::Failed | Status::Cancelled | Status::Expired => 2,
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
            Status::Batched => "batched",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
            Status::Delivered => "delivered",
            Status::Undeliverable => "undeliverable",
        }
    }
}

impl Outcome {
    /// The status a job with this outcome has.
    pub fn status(&self) -> Status {
        match self {
            Outcome::Completed { .. } => Status::Completed,
            Outcome::Failed { .. } => Status::Failed,
            Outcome::Cancelled { .. } => Status::Cancelled,
            Outcome::Expired { .. } => Status::Expired,
        }
    }
}

/// A generator's claim on a job's current attempt: while it lives, no other delivery of the
/// job's request calls the LLM. Renewed with the request's progress acks; a lease left by a
/// generator that died runs out and may be taken over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The generator process holding it.
    pub owner: String,
    /// The attempt it was taken for: a second delivery in the same process is not its holder.
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// When the attempt began, for its entry in `generations`.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub started_at: Option<OffsetDateTime>,
}

/// How many generation attempts a status document keeps: the latest, so a job retried
/// without end stays a bounded document.
pub const MAX_GENERATIONS_KEPT: usize = 20;

/// One LLM attempt that did not complete, in a job's history.
///
/// In the OpenAPI schema, a field that is left out when empty is optional and never `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GenerationAttempt {
    /// 1 for the first; the count behind `generation_attempts`.
    pub attempt: u32,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub ended_at: OffsetDateTime,
    pub outcome: AttemptOutcome,
    /// Why it did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<JobError>,
    /// For a `retry`: how long the job waited before its next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retry_in_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    /// Only in documents written before completed attempts stopped being logged.
    Completed,
    Failed,
    /// Failed in a way worth another attempt, which followed.
    Retry,
}

impl Lease {
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.expires_at > now
    }

    /// Whether both name the same call; renewals move `expires_at` on.
    pub fn same_holder(&self, other: &Lease) -> bool {
        self.owner == other.owner && self.attempt == other.attempt
    }
}

/// What a delivery of a job's request may do, given the job's status document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The job is generated: nothing to call.
    Generated,
    /// Another call holds a live lease: wait this long, then look again.
    Held(std::time::Duration),
    /// The job was never started and its `expires_at` has passed: the document is now
    /// `expired`, and no call is made.
    Expired,
    /// Taken: the document now holds this lease, for a new attempt.
    Taken(Lease),
    /// The job's attempt is a Message Batch's, under this batch record: the batch, not this
    /// delivery of the request, brings its outcome.
    InBatch(String),
}

/// The Message Batch a `batched` job waits in: our record of it (`jetcall::batches`), and the
/// API's id once the batch is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRef {
    pub record: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// What `nats kv get job_status <id>` shows. The API never serves it as it is: it answers with
/// the gateway's public view of it, which has no field for what is kept here for the services
/// alone (the request digest, the sealed secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// First, so the start of the value (all that `nats kv history` shows) tells the state.
    pub status: Status,
    pub job_id: JobId,
    pub kind: Kind,
    pub input: Map<String, Value>,
    pub callback_url: CallbackUrl,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    /// A digest of the submission, to tell an idempotent retry from a conflicting reuse of the id.
    /// Every stored document has one; the API's view of a job does not, and the `jetcall` CLI
    /// reads that view into this type.
    #[serde(default)]
    pub request_digest: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// LLM attempts so far, across redeliveries and generator instances.
    #[serde(default)]
    pub generation_attempts: u32,
    /// The latest `MAX_GENERATIONS_KEPT` attempts that did not complete (retried, or the
    /// failure that ended the job), oldest first. The attempt that completed is not logged:
    /// it is attempt `generation_attempts`, ended at `finished_at`, and every job's
    /// document would otherwise carry it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations: Vec<GenerationAttempt>,
    /// While `generating`: the call that holds the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The kind's output, once `completed`: text or JSON, per the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What `usage` cost, for a model that has a price: a completed job's, or a failed one's
    /// that was charged for answers it could not use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// Why the job `failed`, was `cancelled` or `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// `cancelled` or `expired`: how a job ended that was never generated, kept when its
    /// webhook moves `status` on to `delivered` or `undeliverable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_as: Option<Status>,
    /// A job not started by then expires instead (`ttl` or `expires_at` at submission, or
    /// the kind's `ttl`).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// Every delivery attempt, of every round, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<DeliveryAttempt>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub delivered_at: Option<OffsetDateTime>,
    /// Incremented by each redelivery an operator asks for; each round has a fresh schedule.
    #[serde(default)]
    pub delivery_round: u32,
    /// The W3C trace the job was submitted in (the `traceparent` the gateway got, or the one
    /// it started): every event and the webhook carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The API key (its `name`) the job was submitted with: the tenant it belongs to. `None`
    /// when the gateway has no keys (one anonymous tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Interactive jobs go before their tenant's bulk ones.
    #[serde(
        default,
        skip_serializing_if = "crate::lanes::Priority::is_interactive"
    )]
    pub priority: crate::lanes::Priority,
    /// The caller's own webhook secret, given at submission, sealed under
    /// `callback.secrets_key` for this job (`jetcall::sealing`): the gateway seals it, only
    /// the callback service opens it. Kept out of every event and every API answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_signing_secret: Option<String>,
    /// What the job holds of its tenant's budget until its outcome settles it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::Reservation>,
    /// Where the job's request is stored in the `JOBS` stream, once the gateway has seen it
    /// stored: a resubmission of an `accepted` job with it set publishes nothing, because
    /// past the duplicate window JetStream would store a second request (a second paid call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_seq: Option<u64>,
    /// The Message Batch the job's current attempt went into; kept once it is generated, to
    /// say which batch answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchRef>,
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
            generations: Vec::new(),
            lease: None,
            result: None,
            model: None,
            usage: None,
            cost: None,
            error: None,
            ended_as: None,
            expires_at: request.expires_at,
            finished_at: None,
            deliveries: Vec::new(),
            delivered_at: None,
            delivery_round: 0,
            trace_id: None,
            tenant: request.tenant.clone(),
            priority: request.priority,
            sealed_signing_secret: None,
            budget: None,
            request_seq: None,
            batch: None,
        }
    }

    /// The finished event of a generated job, rebuilt from its document: for a republish
    /// after a crash, and for a redelivery.
    pub fn finished_event(&self) -> Option<JobFinished> {
        if !self.status.is_generated() {
            return None;
        }
        let outcome = match (self.ended_as, &self.result, &self.error) {
            (Some(Status::Cancelled), ..) => Outcome::Cancelled {
                error: self.error.clone(),
            },
            (Some(Status::Expired), ..) => Outcome::Expired {
                error: self.error.clone(),
            },
            (_, Some(result), _) => Outcome::Completed {
                result: result.clone(),
                model: self.model.clone().unwrap_or_default(),
                usage: self.usage.unwrap_or_default(),
                cost: self.cost,
            },
            (_, None, Some(error)) => Outcome::Failed {
                error: error.clone(),
                usage: self.usage,
                cost: self.cost,
            },
            (_, None, None) => return None,
        };
        Some(JobFinished {
            job_id: self.job_id.clone(),
            kind: self.kind.clone(),
            outcome,
            input: self.input.clone(),
            callback_url: self.callback_url.clone(),
            metadata: self.metadata.clone(),
            finished_at: self.finished_at.unwrap_or(self.updated_at),
            tenant: self.tenant.clone(),
        })
    }

    /// Delivery attempts in the current round, which decide the next retry's wait: requests
    /// tried, not waits noted for an open circuit.
    pub fn attempts_this_round(&self) -> usize {
        crate::events::attempts_in_round(&self.deliveries, self.delivery_round)
    }

    /// When the current delivery round started: its first request, or, before any, its first
    /// note of a wait for an open circuit.
    pub fn round_started_at(&self) -> Option<OffsetDateTime> {
        let first_tried = self.this_round().find(|attempt| attempt.spends_a_retry());
        first_tried
            .or_else(|| self.this_round().next())
            .map(|attempt| attempt.at)
    }

    fn this_round(&self) -> impl Iterator<Item = &DeliveryAttempt> {
        self.deliveries
            .iter()
            .filter(|attempt| attempt.round == self.delivery_round)
    }

    /// Puts an undeliverable job back to be delivered, with a fresh retry schedule: the one
    /// transition that goes backwards, and only at an operator's request.
    pub fn reopen_delivery(&mut self, now: OffsetDateTime) -> bool {
        if self.status != Status::Undeliverable {
            return false;
        }
        self.status = self.generation_outcome();
        self.delivery_round += 1;
        self.delivered_at = None;
        self.updated_at = now;
        true
    }

    /// How the job's generation ended, whatever became of its webhook since.
    pub fn generation_outcome(&self) -> Status {
        match (self.ended_as, &self.result) {
            (Some(ended_as), _) => ended_as,
            (None, Some(_)) => Status::Completed,
            (None, None) => Status::Failed,
        }
    }

    /// Whether the job's outcome is recorded and its webhook not yet settled: the state in
    /// which its finished event is published (again, after a crash) for the callback service.
    pub fn awaits_delivery(&self) -> bool {
        self.status.is_generated() && !self.status.is_final()
    }

    /// Withdraws a job that has not been generated: `cancelled`, with no call made from now
    /// on (a call in flight loses its lease and is not recorded). False for a job that is
    /// generated already, or withdrawn before.
    pub fn cancel(&mut self, now: OffsetDateTime, by: &str) -> bool {
        self.withdraw(
            Status::Cancelled,
            now,
            JobError {
                kind: "cancelled".into(),
                message: format!("cancelled by {by} before it was generated"),
            },
        )
    }

    fn withdraw(&mut self, as_status: Status, now: OffsetDateTime, error: JobError) -> bool {
        if self.status.is_generated() || !self.advance(as_status, now) {
            return false;
        }
        self.ended_as = Some(as_status);
        self.error = Some(error);
        self.lease = None;
        self.finished_at = Some(now);
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
            expires_at: self.expires_at,
            tenant: self.tenant.clone(),
            priority: self.priority,
        }
    }

    /// Starts a new generation attempt under a lease for `owner` lasting `lease_for`, unless
    /// the job is generated or another call's lease is still live. One paid call per
    /// attempt rests on this: a redelivered request never starts a second call beside a
    /// living one.
    pub fn claim(
        &mut self,
        owner: &str,
        now: OffsetDateTime,
        lease_for: std::time::Duration,
    ) -> Claim {
        if self.status.is_generated() {
            return Claim::Generated;
        }
        // Only a job never started expires: one that has had an attempt is the provider's
        // to finish, and was paid for.
        if self.generation_attempts == 0 && self.expires_at.is_some_and(|at| at <= now) {
            let expired = JobError {
                kind: "expired".into(),
                message: "not started before its expires_at".into(),
            };
            if self.withdraw(Status::Expired, now, expired) {
                return Claim::Expired;
            }
        }
        if self.status == Status::Batched
            && let Some(batch) = &self.batch
        {
            return Claim::InBatch(batch.record.clone());
        }
        if let Some(lease) = self.lease.as_ref().filter(|lease| lease.is_live(now)) {
            let left = (lease.expires_at - now).try_into().unwrap_or_default();
            return Claim::Held(left);
        }
        // Not generated, so `generating` is forward or the same state.
        self.advance(Status::Generating, now);
        self.generation_attempts += 1;
        let lease = Lease {
            owner: owner.to_owned(),
            attempt: self.generation_attempts,
            expires_at: now + lease_for,
            started_at: Some(now),
        };
        self.lease = Some(lease.clone());
        // A batch it left is behind it: this attempt is a call's (or a new batch's).
        self.batch = None;
        Claim::Taken(lease)
    }

    /// As [`Self::claim`], for an attempt made through the Message Batch under `record`: the
    /// job becomes `batched`, holding no lease (the batch record's holder answers for it).
    pub fn claim_for_batch(&mut self, record: &str, now: OffsetDateTime) -> Claim {
        let claim = self.claim(record, now, std::time::Duration::ZERO);
        if let Claim::Taken(_) = &claim {
            self.status = Status::Batched;
            self.lease = None;
            self.batch = Some(BatchRef {
                record: record.to_owned(),
                id: None,
            });
        }
        claim
    }

    /// Takes a `batched` job out of the batch under `record`, back to waiting for its request
    /// (published again by the caller); false if the job is not in that batch. `batch` still
    /// names the record, so a caller that died before publishing is found out by the next
    /// reader of the batch's results ([`Self::left_batch`]).
    pub fn leave_batch(&mut self, record: &str, now: OffsetDateTime) -> bool {
        if !self.in_batch(record) {
            return false;
        }
        // Back to the same rank: `advance` refuses a sideways move, which this is not.
        self.status = Status::Generating;
        self.updated_at = now;
        true
    }

    /// Whether the job was taken out of the batch under `record` and has not been claimed
    /// since: its request must be (or have been) published again.
    pub fn left_batch(&self, record: &str) -> bool {
        self.status == Status::Generating
            && self.lease.is_none()
            && self
                .batch
                .as_ref()
                .is_some_and(|batch| batch.record == record)
    }

    /// Whether this job's attempt is the batch under `record`'s to record.
    pub fn in_batch(&self, record: &str) -> bool {
        self.status == Status::Batched
            && self
                .batch
                .as_ref()
                .is_some_and(|batch| batch.record == record)
    }

    /// Whether a call holding `mine` (or no lease, `None`) may record an outcome: the job is
    /// not generated yet, and no other call holds a live lease. An outcome never replaces
    /// another: `completed → completed` would overwrite the result that was delivered.
    pub fn may_record(&self, mine: Option<&Lease>, now: OffsetDateTime) -> bool {
        if self.status.is_generated() {
            return false;
        }
        match &self.lease {
            Some(lease) if lease.is_live(now) => mine.is_some_and(|mine| lease.same_holder(mine)),
            _ => true,
        }
    }

    /// Moves the lease on to `expires_at` if it is still `mine` and the job still waits for
    /// it; false when the call has lost it.
    pub fn renew_lease(&mut self, mine: &Lease, expires_at: OffsetDateTime) -> bool {
        match &mut self.lease {
            Some(lease) if lease.same_holder(mine) && self.status == Status::Generating => {
                lease.expires_at = expires_at;
                true
            }
            _ => false,
        }
    }

    /// Adds the attempt held by `lease` to `generations`, ended at `now`.
    pub fn log_generation(
        &mut self,
        lease: &Lease,
        now: OffsetDateTime,
        outcome: AttemptOutcome,
        error: Option<JobError>,
        retry_in: Option<std::time::Duration>,
    ) {
        if self.generations.len() >= MAX_GENERATIONS_KEPT {
            self.generations.remove(0);
        }
        self.generations.push(GenerationAttempt {
            attempt: lease.attempt,
            started_at: lease.started_at,
            ended_at: now,
            outcome,
            error,
            retry_in_ms: retry_in.map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        });
    }

    /// Gives up the lease if it is still `mine`, so the request handed back is taken up at
    /// once rather than after the lease runs out; false when there was nothing to release.
    pub fn release_lease(&mut self, mine: &Lease) -> bool {
        if self
            .lease
            .as_ref()
            .is_some_and(|lease| lease.same_holder(mine))
        {
            self.lease = None;
            return true;
        }
        false
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

    fn accepted_job() -> JobStatus {
        let request = JobRequested {
            job_id: JobId::parse("JOB-1").expect("id"),
            kind: Kind::product_description(),
            input: Map::new(),
            callback_url: crate::allowlist::CallbackUrl::parse("http://127.0.0.1:9/cb")
                .expect("a callback URL"),
            metadata: Map::new(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
            expires_at: None,
            tenant: None,
            priority: Default::default(),
        };
        JobStatus::accepted(&request, "digest".into())
    }

    const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);

    #[test]
    fn a_second_delivery_waits_out_a_live_lease_and_counts_no_attempt() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut doc = accepted_job();
        let Claim::Taken(first) = doc.claim("a", now, MINUTE) else {
            panic!("the first delivery takes the job");
        };
        assert_eq!(first.attempt, 1);
        let later = now + time::Duration::seconds(20);
        for owner in ["a", "b"] {
            assert_eq!(
                doc.claim(owner, later, MINUTE),
                Claim::Held(std::time::Duration::from_secs(40))
            );
        }
        assert_eq!(doc.generation_attempts, 1);
    }

    #[test]
    fn an_expired_lease_is_taken_over_as_a_new_attempt() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut doc = accepted_job();
        assert!(matches!(doc.claim("a", now, MINUTE), Claim::Taken(_)));
        let Claim::Taken(second) = doc.claim("b", now + MINUTE, MINUTE) else {
            panic!("an expired lease is taken over");
        };
        assert_eq!((second.owner.as_str(), second.attempt), ("b", 2));
    }

    #[test]
    fn a_generated_job_is_never_claimed_nor_recorded_again() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut doc = accepted_job();
        let Claim::Taken(lease) = doc.claim("a", now, MINUTE) else {
            panic!("taken");
        };
        assert!(doc.may_record(Some(&lease), now));
        doc.advance(Completed, now);
        doc.lease = None;
        assert_eq!(doc.claim("a", now, MINUTE), Claim::Generated);
        assert!(!doc.may_record(Some(&lease), now), "completed → completed");
        assert!(!doc.may_record(None, now));
    }

    #[test]
    fn a_call_that_lost_its_lease_neither_renews_nor_records() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut doc = accepted_job();
        let Claim::Taken(lost) = doc.claim("a", now, MINUTE) else {
            panic!("taken");
        };
        assert!(doc.renew_lease(&lost, now + MINUTE));
        let Claim::Taken(_) = doc.claim("b", now + MINUTE * 2, MINUTE) else {
            panic!("taken over");
        };
        assert!(!doc.renew_lease(&lost, now + MINUTE * 3));
        assert!(!doc.may_record(Some(&lost), now + MINUTE * 2));
    }

    #[test]
    fn a_job_not_generated_is_cancelled_once_and_its_claim_and_lease_end() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut waiting = accepted_job();
        assert!(waiting.cancel(now, "API key `a`"));
        assert_eq!(waiting.claim("g", now, MINUTE), Claim::Generated);
        assert!(!waiting.cancel(now, "API key `a`"), "cancelled once");

        let mut generating = accepted_job();
        let Claim::Taken(lease) = generating.claim("g", now, MINUTE) else {
            panic!("taken");
        };
        assert!(generating.cancel(now, "API key `a`"));
        assert!(
            !generating.renew_lease(&lease, now + MINUTE),
            "the call loses its lease"
        );
        assert!(
            !generating.may_record(Some(&lease), now),
            "and records nothing"
        );
        let event = generating
            .finished_event()
            .expect("a cancelled job has an event");
        assert_eq!(event.event(), crate::subjects::Event::Cancelled);

        generating.advance(Completed, now);
        assert!(
            !generating.cancel(now, "API key `a`"),
            "generated is past taking back"
        );
    }

    #[test]
    fn only_a_job_never_started_expires_and_its_redelivery_says_so_again() {
        let deadline = OffsetDateTime::UNIX_EPOCH + MINUTE;
        let mut late = accepted_job();
        late.expires_at = Some(deadline);
        assert_eq!(late.claim("g", deadline, MINUTE), Claim::Expired);
        assert_eq!((late.status, late.generation_attempts), (Expired, 0));
        assert_eq!(late.claim("g", deadline, MINUTE), Claim::Generated);

        // Started in time, then retried past the deadline: the provider's to finish.
        let mut started = accepted_job();
        started.expires_at = Some(deadline);
        let Claim::Taken(first) = started.claim("g", deadline - MINUTE, MINUTE) else {
            panic!("taken before its deadline");
        };
        assert!(started.release_lease(&first));
        assert!(matches!(
            started.claim("g", deadline + MINUTE, MINUTE),
            Claim::Taken(_)
        ));

        late.advance(Undeliverable, deadline);
        assert!(late.reopen_delivery(deadline));
        assert_eq!(
            late.status, Expired,
            "a redelivery sends `job.expired` again"
        );
        let event = late.finished_event().expect("an expired job has an event");
        assert_eq!(event.event(), crate::subjects::Event::Expired);
    }

    fn attempt(at: i64, error_kind: Option<&str>, round: u32) -> DeliveryAttempt {
        DeliveryAttempt {
            at: OffsetDateTime::from_unix_timestamp(at).expect("a time"),
            duration_ms: 0,
            status_code: None,
            error_kind: error_kind.map(str::to_owned),
            error: None,
            response_excerpt: None,
            round,
        }
    }

    #[test]
    fn only_requests_tried_count_as_attempts_and_start_a_round() {
        let request = JobRequested {
            job_id: JobId::parse("JOB-1").expect("id"),
            kind: Kind::parse("product-description").expect("kind"),
            input: Map::new(),
            callback_url: crate::allowlist::CallbackUrl::parse("http://127.0.0.1:1/cb")
                .expect("a callback URL"),
            metadata: Map::new(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
            expires_at: None,
            tenant: None,
            priority: Default::default(),
        };
        let mut doc = JobStatus::accepted(&request, "digest".into());
        assert_eq!(doc.round_started_at(), None);
        doc.deliveries = vec![
            attempt(10, Some("http_status"), 0),
            attempt(20, Some(CIRCUIT_OPEN), 1),
            attempt(30, Some("connect"), 1),
            attempt(40, Some(CIRCUIT_OPEN), 1),
            attempt(50, None, 1),
        ];
        doc.delivery_round = 1;
        assert_eq!(
            doc.attempts_this_round(),
            2,
            "notes of waits are not attempts"
        );
        assert_eq!(
            doc.round_started_at(),
            OffsetDateTime::from_unix_timestamp(30).ok(),
            "a round is timed from its first request"
        );
        doc.deliveries.truncate(2);
        assert_eq!(doc.attempts_this_round(), 0);
        assert_eq!(
            doc.round_started_at(),
            OffsetDateTime::from_unix_timestamp(20).ok(),
            "or from its first wait, before any request"
        );
    }

    #[test]
    fn status_serialises_as_the_documented_words() {
        assert_eq!(
            serde_json::to_value(Undeliverable).ok(),
            Some("undeliverable".into())
        );
        assert_eq!(Generating.as_str(), "generating");
    }

    #[test]
    fn a_batched_job_belongs_to_its_batch_until_it_leaves_it() {
        let now = OffsetDateTime::from_unix_timestamp(1_000).expect("time");
        let lease_for = std::time::Duration::from_secs(30);
        let mut doc = accepted_job();
        assert!(matches!(doc.claim_for_batch("b1", now), Claim::Taken(_)));
        assert_eq!((doc.status, doc.generation_attempts), (Batched, 1));
        assert!(doc.lease.is_none() && doc.in_batch("b1") && !doc.in_batch("b2"));
        // A redelivered request neither calls nor gathers it again.
        assert_eq!(
            doc.claim("generator-2", now, lease_for),
            Claim::InBatch("b1".into())
        );
        assert_eq!(doc.claim_for_batch("b2", now), Claim::InBatch("b1".into()));
        assert!(
            !doc.leave_batch("b2", now),
            "only its own batch takes it out"
        );
        assert!(doc.leave_batch("b1", now));
        assert!(
            doc.left_batch("b1"),
            "sent again by whoever reads the results next"
        );
        // Its next attempt claims it as any job.
        assert!(matches!(doc.claim_for_batch("b2", now), Claim::Taken(_)));
        assert_eq!(doc.generation_attempts, 2);
        assert!(!doc.left_batch("b1") && doc.in_batch("b2"));
        // Or a synchronous call's, which no batch answers for.
        assert!(doc.leave_batch("b2", now));
        assert!(matches!(
            doc.claim("generator-2", now, lease_for),
            Claim::Taken(_)
        ));
        assert_eq!(doc.batch, None);
        assert!(Batched.may_become(Completed) && !Batched.may_become(Accepted));
    }
}
