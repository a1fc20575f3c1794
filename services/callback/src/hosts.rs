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

    /// How much longer the circuit stays open, if it is open. Once that time has passed,
    /// attempts resume; the first failure opens it again.
    pub fn open_for(&self, now: Instant) -> Option<Duration> {
        let open_until = *self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        open_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
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
    fn the_circuit_opens_after_repeated_failures_and_closes_on_success() {
        let destination = Destination::new(1);
        let now = Instant::now();
        let cooldown = Duration::from_secs(30);
        for _ in 0..BREAKER_THRESHOLD - 1 {
            destination.record(false, now, cooldown);
        }
        assert_eq!(destination.open_for(now), None, "not yet");
        destination.record(false, now, cooldown);
        assert_eq!(destination.open_for(now), Some(cooldown));
        assert_eq!(
            destination.open_for(now + cooldown),
            None,
            "attempts resume after the cooldown"
        );
        destination.record(false, now + cooldown, cooldown);
        assert!(
            destination.open_for(now + cooldown).is_some(),
            "one more failure reopens it"
        );
        destination.record(true, now + cooldown, cooldown);
        assert_eq!(destination.open_for(now + cooldown), None);
        assert_eq!(destination.consecutive_failures(), 0);
    }
}
