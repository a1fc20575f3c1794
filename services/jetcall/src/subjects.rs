//! Every NATS name the services share: the stream, its subjects, the consumers and the bucket.
//! Only this module spells them, so a rename happens in one place.

use crate::job::{JobId, Kind};

pub const STREAM: &str = "JOBS";
pub const STREAM_SUBJECTS: &str = "jobs.>";
pub const STATUS_BUCKET: &str = "job_status";
/// Shared LLM rate-limit budgets, one key per provider; owned by the generator.
pub const LIMITS_BUCKET: &str = "llm_limits";
/// The `job_status` key whose lease says which gateway sweeps (see `StatusStore::take_lease`).
pub const SWEEP_LEASE_KEY: &str = "gateway.sweep";
/// `gate.<instance>` in the `llm_limits` bucket: a generator instance's paused gate
/// (`jetcall::gate::GateReport`), for the console.
pub const GATE_KEY_PREFIX: &str = "gate.";
pub const GENERATOR_CONSUMER: &str = "generator";
pub const CALLBACK_CONSUMER: &str = "callback";

/// The events of a job's life, each published on `jobs.<event>.<kind>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    Requested,
    Completed,
    Failed,
    Delivered,
    Undeliverable,
    Cancelled,
    Expired,
}

impl Event {
    pub const ALL: [Event; 7] = [
        Event::Requested,
        Event::Completed,
        Event::Failed,
        Event::Delivered,
        Event::Undeliverable,
        Event::Cancelled,
        Event::Expired,
    ];

    /// The events the callback service delivers a webhook for: a job's generation ended.
    pub const FINISHED: [Event; 4] = [
        Event::Completed,
        Event::Failed,
        Event::Cancelled,
        Event::Expired,
    ];

    pub fn token(self) -> &'static str {
        match self {
            Event::Requested => "requested",
            Event::Completed => "completed",
            Event::Failed => "failed",
            Event::Delivered => "delivered",
            Event::Undeliverable => "undeliverable",
            Event::Cancelled => "cancelled",
            Event::Expired => "expired",
        }
    }

    /// `jobs.<event>.<kind>`.
    pub fn subject(self, kind: &Kind) -> String {
        format!("jobs.{}.{}", self.token(), kind)
    }

    /// `jobs.<event>.>`: every kind.
    pub fn filter(self) -> String {
        format!("jobs.{}.>", self.token())
    }

    /// `Nats-Msg-Id` of this event for one job, so a retried publish is stored once.
    pub fn msg_id(self, job_id: &JobId) -> String {
        format!("{job_id}.{}", self.token())
    }

    /// `jobs.<event>.*`: every kind, with no more tokens after it. For requests, those of the
    /// default lane (`jetcall::lanes`).
    pub fn kinds_only(self) -> String {
        format!("jobs.{}.*", self.token())
    }

    /// The event a subject carries, if it is one of ours.
    pub fn of_subject(subject: &str) -> Option<Event> {
        let mut tokens = subject.split('.');
        if tokens.next() != Some("jobs") {
            return None;
        }
        let event = tokens.next()?;
        Event::ALL.into_iter().find(|e| e.token() == event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_msg_ids_follow_the_contract() {
        let kind = Kind::product_description();
        let job = JobId::parse("JOB-771").expect("valid id");
        assert_eq!(
            Event::Requested.subject(&kind),
            "jobs.requested.product-description"
        );
        assert_eq!(Event::Completed.filter(), "jobs.completed.>");
        assert_eq!(Event::Completed.msg_id(&job), "JOB-771.completed");
        assert_eq!(
            Event::of_subject("jobs.failed.return-analysis"),
            Some(Event::Failed)
        );
        assert_eq!(Event::of_subject("other.failed.x"), None);
    }
}
