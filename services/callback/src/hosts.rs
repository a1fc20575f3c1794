//! Per-destination state: a bound on deliveries in flight, so one slow receiver cannot take
//! every delivery slot, and a circuit breaker, so a dead one is not sent request after
//! request while it is down.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Idle destinations are forgotten once this many are tracked, so the map stays small.
const MAX_TRACKED: usize = 4096;

/// Consecutive failed attempts that, once they span the breaker's window, open a
/// destination's circuit.
pub const BREAKER_THRESHOLD: u32 = 5;

/// When a destination's circuit opens, and for how long.
///
/// It opens when every attempt there has failed, at least `BREAKER_THRESHOLD` of them, for
/// at least `window`: a failure rate of 100 % over the window, with a minimum of requests.
/// A burst of failures is not enough: a receiver that fails every job's first attempt and
/// takes the retries fails everything until the first retries arrive, and cutting it off
/// then would leave each job to a single probe per cooldown. A destination that answers
/// some deliveries is alive, and its jobs retry on their own schedules. A silent one is cut
/// off by its first timeouts, since each failed attempt counts from when it started.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    pub cooldown: Duration,
    pub window: Duration,
}

/// A receiver answering faster than this frees its slots quickly: a delivery may wait up to
/// `QUICK_WAIT` for one rather than go back to JetStream.
const QUICK_ANSWER: Duration = Duration::from_millis(100);
const QUICK_WAIT: Duration = Duration::from_secs(1);
/// How long a delivery waits for a slot at any other destination: enough to ride out a
/// moment's contention, too little for a slow receiver to hold many workers.
const SHORT_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct Destination {
    slots: Arc<Semaphore>,
    consecutive_failures: AtomicU32,
    /// When the first of the failures in a row started: the circuit opens only once they
    /// span the breaker's window.
    failing_since: Mutex<Option<Instant>>,
    // A std mutex: held only to read or set an instant, never across an await.
    open_until: Mutex<Option<Instant>>,
    /// When a delivery here last succeeded: with every slot taken, a long silence means the
    /// receiver is slow or dead, and waiting for a slot would only hold a worker.
    last_success: Mutex<Instant>,
    /// A moving average of successful attempts' durations, in microseconds; 0 before any.
    typical_answer_us: AtomicU64,
    /// A moving average of every finished attempt's duration, failures included (a receiver
    /// answering 500 at once frees its slots at once; a silent one only at the timeout), in
    /// microseconds; 0 before any.
    typical_attempt_us: AtomicU64,
    per_host: usize,
    /// When each delivery parked here and not yet back is due, earliest first: the next one
    /// is spaced after as many as are still out.
    parked: Mutex<VecDeque<Instant>>,
}

impl Destination {
    fn new(per_host: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(per_host)),
            consecutive_failures: AtomicU32::new(0),
            failing_since: Mutex::new(None),
            open_until: Mutex::new(None),
            last_success: Mutex::new(Instant::now()),
            typical_answer_us: AtomicU64::new(0),
            typical_attempt_us: AtomicU64::new(0),
            per_host,
            parked: Mutex::new(VecDeque::new()),
        }
    }

    /// How long a delivery that cannot go out now waits in JetStream: at least `earliest`,
    /// and after the deliveries parked here before it, spaced by the time this destination
    /// takes per delivery (its typical attempt, successful or not, or `SHORT_WAIT` before
    /// any has finished, over its slots), but never more than `longest`.
    ///
    /// Without the spacing a dead receiver's backlog came back all at once, every few
    /// seconds, and cycling it through JetStream and the status bucket slowed the healthy
    /// receivers' deliveries (BENCHMARKS.md); spaced, each parked delivery returns about when
    /// a slot can be expected to be free for it.
    ///
    /// The spacing is the count still out times the pace known now, not the last one's due
    /// time plus a step; and before any attempt has finished the pace is taken to be a slot's
    /// patience (`SHORT_WAIT`), not the timeout. A burst to a new destination (the 10,000
    /// results of a Message Batch at once) parked at the timeout's pace came back spread over
    /// `longest`, two minutes, however quick the receiver turned out. A dead receiver costs
    /// one quick return of what was parked before its first timeout; its pace is known after.
    pub fn return_after(&self, earliest: Duration, now: Instant, longest: Duration) -> Duration {
        let per_delivery = match self.typical_attempt_us.load(Ordering::Relaxed) {
            0 => SHORT_WAIT,
            us => Duration::from_micros(us),
        } / u32::try_from(self.per_host).unwrap_or(u32::MAX).max(1);
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        while parked.front().is_some_and(|due| *due <= now) {
            parked.pop_front();
        }
        let ahead = u32::try_from(parked.len()).unwrap_or(u32::MAX);
        let due = (now + earliest + per_delivery.saturating_mul(ahead)).min(now + longest);
        // Kept in order of due time, which a quicker pace may bring before earlier ones.
        let at = parked.partition_point(|other| *other <= due);
        parked.insert(at, due);
        due.saturating_duration_since(now)
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

    /// A delivery slot. When all are taken, waits up to `wait` for one, but only if deliveries
    /// here have been succeeding lately (a fast receiver frees a slot within milliseconds);
    /// `Err` carries how long none has, when there is no slot.
    pub async fn slot(
        &self,
        wait: Duration,
        now: Instant,
    ) -> Result<OwnedSemaphorePermit, Duration> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let last = *self.last_success.lock().unwrap_or_else(|p| p.into_inner());
        let stalled = now.saturating_duration_since(last);
        if stalled >= wait {
            return Err(stalled);
        }
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(stalled + wait),
        }
    }

    /// How long a delivery may wait here for a slot: long at a receiver that answers quickly,
    /// where slots free all the time, short anywhere else, so a slow receiver's backlog waits
    /// in JetStream rather than in the workers every destination shares.
    pub fn patience(&self) -> Duration {
        match self.typical_answer_us.load(Ordering::Relaxed) {
            0 => SHORT_WAIT,
            us if Duration::from_micros(us) < QUICK_ANSWER => QUICK_WAIT,
            _ => SHORT_WAIT,
        }
    }

    /// Records an attempt's outcome and how long it `took`, and opens the circuit for the
    /// breaker's cooldown when the failures in a row are enough and span its window (see
    /// [`Breaker`]); a failed probe opens it again.
    pub fn record(&self, succeeded: bool, took: Duration, now: Instant, breaker: Breaker) {
        let started = now.checked_sub(took).unwrap_or(now);
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        moving_average(&self.typical_attempt_us, took);
        let mut failing_since = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        if succeeded {
            moving_average(&self.typical_answer_us, took);
            *self.last_success.lock().unwrap_or_else(|p| p.into_inner()) = now;
            self.consecutive_failures.store(0, Ordering::Relaxed);
            *failing_since = None;
            *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let since = *failing_since.get_or_insert(started);
        let since = since.min(started);
        *failing_since = Some(since);
        if failures >= BREAKER_THRESHOLD && now.saturating_duration_since(since) >= breaker.window {
            *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(now + breaker.cooldown);
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Whether the circuit is open: not closed since it opened, cooldown over or not (until a
    /// probe succeeds, the destination is still left alone but for that probe).
    pub fn circuit_open(&self) -> bool {
        self.open_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn is_idle(&self) -> bool {
        self.slots.available_permits() == self.per_host && self.consecutive_failures() == 0
    }
}

/// Folds `sample` into the moving average kept in `average` (0: none yet).
fn moving_average(average: &AtomicU64, sample: u64) {
    let _ = average.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |typical| {
        Some(if typical == 0 {
            sample
        } else {
            (typical * 7 + sample) / 8
        })
    });
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

    /// How many destinations have their circuit open.
    pub fn open_circuits(&self) -> usize {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known
            .values()
            .filter(|destination| destination.circuit_open())
            .count()
    }

    /// The state of `destination` (`host:port`).
    pub fn get(&self, destination: &str) -> Arc<Destination> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_TRACKED && !known.contains_key(destination) {
            known.retain(|_, state| !state.is_idle());
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

    /// A breaker that opens on `BREAKER_THRESHOLD` failures in a row, however quick.
    fn at_once(cooldown: Duration) -> Breaker {
        Breaker {
            cooldown,
            window: Duration::ZERO,
        }
    }

    #[test]
    fn parked_deliveries_come_back_spaced_by_what_the_destination_can_take() {
        let (timeout, longest) = (Duration::from_secs(10), Duration::from_secs(60));
        let earliest = Duration::from_secs(5);
        let now = Instant::now();

        // Silent until the timeout: a slot frees at most every timeout / slots (10 s / 4).
        let dead = Destination::new(4);
        dead.record(false, timeout, now, at_once(timeout));
        let returns: Vec<_> = (0..30)
            .map(|_| dead.return_after(earliest, now, longest))
            .collect();
        assert_eq!(returns[0], earliest);
        assert_eq!(returns[1], earliest + Duration::from_millis(2500));
        assert_eq!(returns[2], earliest + Duration::from_secs(5));
        assert_eq!(returns[29], longest, "never later than `longest`");

        // Answering in 40 ms: four slots take a delivery every 10 ms.
        let quick = Destination::new(4);
        quick.record(true, Duration::from_millis(40), now, at_once(timeout));
        let first = quick.return_after(earliest, now, longest);
        let second = quick.return_after(earliest, now, longest);
        assert_eq!(second - first, Duration::from_millis(10));
        // Failing at once (a 500 in no time): its slots still free quickly.
        quick.record(false, Duration::from_millis(40), now, at_once(timeout));
        let third = quick.return_after(earliest, now, longest);
        assert_eq!(third - second, Duration::from_millis(10));
        // Silent until the timeout, attempt after attempt: the pace slows towards the
        // timeout's (the average of 40 ms and four 10 s attempts, over four slots).
        let fourth = (0..4).fold(third, |_, _| {
            quick.record(false, timeout, now, at_once(timeout));
            quick.return_after(earliest, now, longest)
        });
        assert!(
            fourth - third > Duration::from_millis(1000),
            "{:?}",
            fourth - third
        );

        // Later parks start from their own moment once the earlier ones are due.
        let later = now + Duration::from_secs(600);
        assert_eq!(dead.return_after(earliest, later, longest), earliest);
    }

    #[test]
    fn a_burst_parked_before_any_answer_does_not_hold_back_what_is_parked_once_it_is_quick() {
        let (timeout, longest) = (Duration::from_secs(10), Duration::from_secs(120));
        let earliest = Duration::from_secs(1);
        let now = Instant::now();
        let destination = Destination::new(32);
        // A thousand of a batch's results at once, before any attempt has finished: at the
        // timeout's pace (312 ms apart) most would wait `longest`.
        let cold: Vec<_> = (0..1_000)
            .map(|_| destination.return_after(earliest, now, longest))
            .collect();
        assert!(
            cold[999] < earliest + Duration::from_secs(2),
            "{:?}",
            cold[999]
        );
        // The receiver answers in 2 ms: 32 slots take a delivery every 62.5 µs, so one parked
        // now waits behind the thousand still out for about 62 ms, not two minutes.
        destination.record(true, Duration::from_millis(2), now, at_once(timeout));
        let next = destination.return_after(earliest, now, longest);
        assert!(next < earliest + Duration::from_millis(100), "{next:?}");
    }

    #[tokio::test]
    async fn each_destination_gets_its_own_bound() {
        let destinations = Destinations::new(2);
        let now = Instant::now();
        let a = destinations.get("a:80");
        let (a1, a2) = (a.slot(NO_WAIT, now).await, a.slot(NO_WAIT, now).await);
        assert!(a1.is_ok() && a2.is_ok());
        assert!(
            a.slot(NO_WAIT, now).await.is_err(),
            "a third slot for one destination"
        );
        let b = destinations.get("b:80");
        assert!(b.slot(NO_WAIT, now).await.is_ok(), "another is unaffected");
        drop(a1);
        assert!(a.slot(NO_WAIT, now).await.is_ok(), "a freed slot is reused");
    }

    // Paused time: a wait would move tokio's clock by `wait`, so "no wait" is exact.
    #[tokio::test(start_paused = true)]
    async fn a_silent_destination_is_not_waited_for() {
        let destination = Destination::new(1);
        let _busy = destination.slot(NO_WAIT, Instant::now()).await;
        let wait = Duration::from_millis(50);
        // Nothing has finished for a minute: no waiting, and the silence is reported.
        let later = Instant::now() + Duration::from_secs(60);
        let started = tokio::time::Instant::now();
        let stalled = destination.slot(wait, later).await.expect_err("no slot");
        assert!(stalled >= Duration::from_secs(60));
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "returned without waiting"
        );

        // Recently active: it does wait, and reports no slot after `wait`.
        let now = Instant::now();
        destination.record(
            true,
            Duration::from_millis(5),
            now,
            at_once(Duration::from_secs(1)),
        );
        let started = tokio::time::Instant::now();
        assert!(destination.slot(wait, now).await.is_err());
        assert_eq!(started.elapsed(), wait);
    }

    #[test]
    fn only_a_quickly_answering_destination_is_waited_for_long() {
        let now = Instant::now();
        let cooldown = Duration::from_secs(30);
        let new = Destination::new(1);
        assert_eq!(new.patience(), SHORT_WAIT, "nothing known yet");
        let quick = Destination::new(1);
        quick.record(true, Duration::from_millis(3), now, at_once(cooldown));
        assert_eq!(quick.patience(), QUICK_WAIT);
        let slow = Destination::new(1);
        slow.record(true, Duration::from_secs(2), now, at_once(cooldown));
        assert_eq!(slow.patience(), SHORT_WAIT);
        // It slows down: the average follows.
        for _ in 0..20 {
            quick.record(true, Duration::from_millis(900), now, at_once(cooldown));
        }
        assert_eq!(quick.patience(), SHORT_WAIT);
    }

    #[test]
    fn the_circuit_opens_after_repeated_failures_and_lets_one_probe_through() {
        let destination = Destination::new(1);
        let now = Instant::now();
        let cooldown = Duration::from_secs(30);
        for _ in 0..BREAKER_THRESHOLD - 1 {
            destination.record(false, Duration::ZERO, now, at_once(cooldown));
        }
        assert_eq!(destination.admit(now, cooldown), None, "not yet open");
        destination.record(false, Duration::ZERO, now, at_once(cooldown));
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
        destination.record(false, Duration::ZERO, later, at_once(cooldown));
        assert!(
            destination.admit(later, cooldown).is_some(),
            "a failed probe keeps it open"
        );

        destination.record(true, Duration::from_millis(5), later, at_once(cooldown));
        assert_eq!(
            destination.admit(later, cooldown),
            None,
            "a success closes it"
        );
        assert_eq!(destination.consecutive_failures(), 0);
    }

    #[test]
    fn open_circuits_are_counted_until_they_close() {
        let destinations = Destinations::new(1);
        let now = Instant::now();
        let cooldown = Duration::from_secs(30);
        let (dead, alive) = (destinations.get("dead:80"), destinations.get("alive:80"));
        alive.record(false, Duration::ZERO, now, at_once(cooldown));
        assert_eq!(destinations.open_circuits(), 0);
        for _ in 0..BREAKER_THRESHOLD {
            dead.record(false, Duration::ZERO, now, at_once(cooldown));
        }
        assert_eq!(destinations.open_circuits(), 1);
        // The cooldown is over and a probe goes out: still open until it succeeds.
        assert_eq!(dead.admit(now + cooldown, cooldown), None);
        assert_eq!(destinations.open_circuits(), 1);
        dead.record(
            true,
            Duration::from_millis(5),
            now + cooldown,
            at_once(cooldown),
        );
        assert_eq!(destinations.open_circuits(), 0);
    }

    #[test]
    fn a_burst_of_failures_shorter_than_the_window_leaves_the_circuit_closed() {
        let breaker = Breaker {
            cooldown: Duration::from_secs(1),
            window: Duration::from_secs(10),
        };
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        // Fifty jobs' first attempts fail together, then their first retries: no success yet,
        // but no longer than the window either.
        let destination = Destination::new(32);
        for n in 0..100 {
            destination.record(false, Duration::from_millis(5), at(10 + 2 * n), breaker);
        }
        assert_eq!(destination.admit(at(300), breaker.cooldown), None);
        // Their second retries succeed: the run of failures is over.
        destination.record(true, Duration::from_millis(5), at(600), breaker);
        for n in 0..20 {
            destination.record(false, Duration::from_millis(5), at(9_000 + n), breaker);
        }
        assert_eq!(
            destination.admit(at(9_100), breaker.cooldown),
            None,
            "failures counted from the last success"
        );
        assert!(!destination.circuit_open());
    }

    #[test]
    fn a_destination_failing_everything_for_the_window_has_its_circuit_opened() {
        let breaker = Breaker {
            cooldown: Duration::from_secs(1),
            window: Duration::from_secs(10),
        };
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        let dead = Destination::new(32);
        for s in 0..BREAKER_THRESHOLD {
            dead.record(false, Duration::from_millis(1), at(u64::from(s)), breaker);
        }
        assert!(!dead.circuit_open(), "five failures in four seconds");
        dead.record(false, Duration::from_millis(1), at(10), breaker);
        assert_eq!(dead.admit(at(10), breaker.cooldown), Some(breaker.cooldown));

        // A silent receiver: its first attempts fail at the timeout, which they spent failing.
        let silent = Destination::new(32);
        let timeout = Duration::from_secs(15);
        for _ in 0..BREAKER_THRESHOLD {
            silent.record(false, timeout, at(15), breaker);
        }
        assert!(silent.circuit_open(), "cut off by its first timeouts");

        // Too few requests, however long they fail.
        let rare = Destination::new(32);
        for s in 0..BREAKER_THRESHOLD - 1 {
            rare.record(false, Duration::ZERO, at(u64::from(s) * 60), breaker);
        }
        assert!(!rare.circuit_open());
    }

    #[test]
    fn a_destination_that_mostly_succeeds_keeps_its_circuit_closed() {
        let breaker = Breaker {
            cooldown: Duration::from_secs(1),
            window: Duration::from_secs(10),
        };
        let start = Instant::now();
        let destination = Destination::new(32);
        // Four failures in five, for a minute: alive, and its jobs retry on their schedules.
        for n in 0..600u64 {
            let now = start + Duration::from_millis(100 * n);
            destination.record(n % 5 == 0, Duration::from_millis(5), now, breaker);
        }
        assert!(!destination.circuit_open());
    }
}
