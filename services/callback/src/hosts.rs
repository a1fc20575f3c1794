//! Per-destination state: a bound on deliveries in flight, so one slow receiver cannot take
//! every delivery slot, and a circuit breaker, so a dead one is not sent request after
//! request while it is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Idle destinations are forgotten once this many are tracked, so the map stays small.
const MAX_TRACKED: usize = 4096;

/// Consecutive failed attempts that open a destination's circuit.
pub const BREAKER_THRESHOLD: u32 = 5;

#[derive(Debug)]
pub struct Destination {
    slots: Arc<Semaphore>,
    consecutive_failures: AtomicU32,
    // A std mutex: held only to read or set an instant, never across an await.
    open_until: Mutex<Option<Instant>>,
}

impl Destination {
    fn new(per_host: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(per_host)),
            consecutive_failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
        }
    }

    /// Whether a request may go out now: `None` if so, else how much longer the circuit stays
    /// open. Once the cooldown has passed one caller is let through as a probe and the
    /// circuit stays open for everyone else until the probe's outcome is recorded: a success
    /// closes it, a failure keeps it open for another cooldown.
    pub fn admit(&self, now: Instant, cooldown: Duration) -> Option<Duration> {
        let mut open_until = self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        let until = (*open_until)?;
        match until.checked_duration_since(now).filter(|d| !d.is_zero()) {
            Some(remaining) => Some(remaining),
            None => {
                *open_until = Some(now + cooldown);
                None
            }
        }
    }

    /// A delivery slot, waiting at most `wait` for one: a fast receiver frees one within
    /// milliseconds; a slow one is left to JetStream rather than holding a worker.
    pub async fn slot(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(wait, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Records an attempt's outcome; `BREAKER_THRESHOLD` failures in a row open the circuit
    /// for `cooldown`.
    pub fn record(&self, succeeded: bool, now: Instant, cooldown: Duration) {
        if succeeded {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= BREAKER_THRESHOLD {
            *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + cooldown);
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    fn is_idle(&self, per_host: usize) -> bool {
        self.slots.available_permits() == per_host && self.consecutive_failures() == 0
    }
}

#[derive(Debug)]
pub struct Destinations {
    per_host: usize,
    // A std mutex: held only to look up or insert, never across an await.
    known: Mutex<HashMap<String, Arc<Destination>>>,
}

impl Destinations {
    pub fn new(per_host: usize) -> Self {
        Self {
            per_host,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The state of `destination` (`host:port`).
    pub fn get(&self, destination: &str) -> Arc<Destination> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_TRACKED && !known.contains_key(destination) {
            let per_host = self.per_host;
            known.retain(|_, state| !state.is_idle(per_host));
        }
        known
            .entry(destination.to_owned())
            .or_insert_with(|| Arc::new(Destination::new(self.per_host)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_WAIT: Duration = Duration::ZERO;

    #[tokio::test]
    async fn each_destination_gets_its_own_bound() {
        let destinations = Destinations::new(2);
        let a = destinations.get("a:80");
        let (a1, a2) = (a.slot(NO_WAIT).await, a.slot(NO_WAIT).await);
        assert!(a1.is_some() && a2.is_some());
        assert!(
            a.slot(NO_WAIT).await.is_none(),
            "a third slot for one destination"
        );
        assert!(
            destinations.get("b:80").slot(NO_WAIT).await.is_some(),
            "another is unaffected"
        );
        drop(a1);
        assert!(
            destinations.get("a:80").slot(NO_WAIT).await.is_some(),
            "a freed slot is reused"
        );
    }

    #[test]
    fn the_circuit_opens_after_repeated_failures_and_lets_one_probe_through() {
        let destination = Destination::new(1);
        let now = Instant::now();
        let cooldown = Duration::from_secs(30);
        for _ in 0..BREAKER_THRESHOLD - 1 {
            destination.record(false, now, cooldown);
        }
        assert_eq!(destination.admit(now, cooldown), None, "not yet open");
        destination.record(false, now, cooldown);
        assert_eq!(destination.admit(now, cooldown), Some(cooldown));

        let later = now + cooldown;
        assert_eq!(
            destination.admit(later, cooldown),
            None,
            "one probe after the cooldown"
        );
        assert_eq!(
            destination.admit(later, cooldown),
            Some(cooldown),
            "and only one"
        );
        destination.record(false, later, cooldown);
        assert!(
            destination.admit(later, cooldown).is_some(),
            "a failed probe keeps it open"
        );

        destination.record(true, later, cooldown);
        assert_eq!(
            destination.admit(later, cooldown),
            None,
            "a success closes it"
        );
        assert_eq!(destination.consecutive_failures(), 0);
    }
}
