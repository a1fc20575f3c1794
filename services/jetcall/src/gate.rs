//! A consumer's pause switch. When a fault outside any job stops all work (the LLM provider
//! refuses our credentials), pulling more jobs would only fail them or churn them through
//! redeliveries. A closed gate stops the pull; one job a `probe_interval` goes through to find
//! out whether the fault is gone, and the first sign of health opens the gate again.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How often a persisting fault is logged again.
const ALARM_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Work as normal.
    Open,
    /// Paused: this one job probes whether the fault is gone.
    Probe,
}

#[derive(Debug)]
enum State {
    Open,
    Paused {
        next_probe: Instant,
        last_alarm: Instant,
        /// What paused it, and when, for operators (`GateReport`).
        reason: String,
        since: OffsetDateTime,
    },
}

/// A generator instance's gate as it tells operators: written by the instance to
/// `gate.<instance>` in the `llm_limits` bucket while it is paused (and deleted when it opens
/// again), read by the gateway's overview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateReport {
    pub instance: String,
    pub paused: bool,
    /// The fault that paused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = String, format = DateTime)]
    pub since: Option<OffsetDateTime>,
    /// When the instance wrote this: a report that is not renewed is from an instance gone.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub reported_at: OffsetDateTime,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    reopened: Notify,
    probe_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Gate(Arc<Inner>);

impl Gate {
    pub fn new(probe_interval: Duration) -> Self {
        Self(Arc::new(Inner {
            state: Mutex::new(State::Open),
            reopened: Notify::new(),
            probe_interval,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_open(&self) -> bool {
        matches!(*self.state(), State::Open)
    }

    /// The gate as `instance` reports it to operators.
    pub fn report(&self, instance: &str) -> GateReport {
        let (paused, reason, since) = match &*self.state() {
            State::Open => (false, None, None),
            State::Paused { reason, since, .. } => (true, Some(reason.clone()), Some(*since)),
        };
        GateReport {
            instance: instance.to_owned(),
            paused,
            reason,
            since,
            reported_at: OffsetDateTime::now_utc(),
        }
    }

    /// Waits until a job may be taken: at once when open; when paused, until the gate opens
    /// or the next probe is due.
    pub async fn admit(&self) -> Admission {
        loop {
            let reopened = self.0.reopened.notified();
            let wake_at = {
                let mut state = self.state();
                match &mut *state {
                    State::Open => return Admission::Open,
                    State::Paused { next_probe, .. } => {
                        let now = Instant::now();
                        if *next_probe <= now {
                            // Claimed here, so concurrent callers do not all probe at once.
                            *next_probe = now + self.0.probe_interval;
                            return Admission::Probe;
                        }
                        *next_probe
                    }
                }
            };
            tokio::select! {
                _ = reopened => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// A fault outside any job: pause, and log `problem` at most once a minute while it lasts.
    pub fn fault(&self, problem: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut state = self.state();
        let alarm = match &*state {
            State::Open => true,
            State::Paused { last_alarm, .. } => now.duration_since(*last_alarm) >= ALARM_INTERVAL,
        };
        let last_alarm = match &*state {
            State::Paused { last_alarm, .. } if !alarm => *last_alarm,
            _ => now,
        };
        let since = match &*state {
            State::Paused { since, .. } => *since,
            State::Open => OffsetDateTime::now_utc(),
        };
        *state = State::Paused {
            next_probe: now + self.0.probe_interval,
            last_alarm,
            reason: problem.to_string(),
            since,
        };
        drop(state);
        if alarm {
            tracing::error!(
                %problem,
                probe_interval = ?self.0.probe_interval,
                "consumption paused: not a fault of any job; one job will probe periodically"
            );
        }
    }

    /// The fault is gone (the provider answered a probe or any call normally): resume.
    pub fn healthy(&self) {
        let was_paused = {
            let mut state = self.state();
            let was_paused = matches!(*state, State::Paused { .. });
            *state = State::Open;
            was_paused
        };
        if was_paused {
            tracing::info!("consumption resumed: the fault has cleared");
            self.0.reopened.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_paused_gate_admits_one_probe_per_interval_until_healthy() {
        let gate = Gate::new(Duration::from_secs(30));
        assert_eq!(gate.admit().await, Admission::Open);
        gate.fault(&"401");
        assert!(!gate.is_open());
        let report = gate.report("generator-1");
        assert!(report.paused);
        assert_eq!(report.reason.as_deref(), Some("401"));
        let started = Instant::now();
        assert_eq!(gate.admit().await, Admission::Probe);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(gate.admit().await, Admission::Probe);
        assert_eq!(started.elapsed(), Duration::from_secs(60));

        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.admit().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        gate.healthy();
        assert_eq!(waiting.await.expect("admit"), Admission::Open);
        assert_eq!(started.elapsed(), Duration::from_secs(65));
        assert!(gate.is_open());
        assert!(!gate.report("generator-1").paused);
    }
}
