//! Requests and tokens per minute shared by every generator instance, and the pause every
//! instance takes when the provider says it is overloaded with us.
//!
//! The budget is one small JSON document per provider in the `llm_limits` KV bucket, changed
//! only by compare-and-set. Each limit is a GCRA (the generic cell rate algorithm, a token
//! bucket kept as one timestamp): a call reserves the earliest moment it may start, moves the
//! timestamp on by its cost, and sleeps locally until its moment. Any 60 s window then holds
//! at most the limit plus one second's worth (the burst). Instances read each other's changes
//! from a KV watch, so an unlimited generator pays no round trip per call and still sees a
//! pause another instance set.
//!
//! Times are the instances' wall clocks; they should agree (NTP) to well under a second.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use jetcall::store::put_at_revision;

use crate::provider::MAX_PROVIDER_WAIT;

const MICROS_PER_MINUTE: f64 = 60_000_000.0;
const MICROS_PER_SECOND: i64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
#[error("shared rate limit budget `{key}`: {message}")]
pub struct LimiterError {
    key: String,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// 0: unlimited.
    pub requests_per_minute: u32,
    /// 0: unlimited.
    pub tokens_per_minute: u64,
}

impl Rates {
    fn limited(self) -> bool {
        self.requests_per_minute > 0 || self.tokens_per_minute > 0
    }
}

/// The shared state. Times are Unix microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// When the request budget is next fully spent (GCRA's theoretical arrival time).
    requests_tat: i64,
    /// The same for tokens.
    tokens_tat: i64,
    /// No instance calls the provider before this.
    not_before: i64,
}

/// One GCRA limit: `per_minute` units, a burst of one second's worth.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Microseconds one unit occupies.
    interval: f64,
    /// How far ahead of now the budget may be spent.
    tolerance: i64,
}

impl Gcra {
    fn new(per_minute: u64) -> Option<Self> {
        (per_minute > 0).then(|| {
            let interval = MICROS_PER_MINUTE / per_minute as f64;
            let burst = (per_minute / 60).max(1);
            Self {
                interval,
                tolerance: ((burst - 1) as f64 * interval) as i64,
            }
        })
    }

    /// The earliest moment from `start` that a call fits.
    fn allowed(self, tat: i64, start: i64) -> i64 {
        start.max(tat.saturating_sub(self.tolerance))
    }

    /// Saturating: the units are a provider's usage report and the times come from any
    /// instance's writes, neither trusted to stay small.
    fn spend(self, tat: i64, at: i64, units: u64) -> i64 {
        tat.max(at)
            .saturating_add((units as f64 * self.interval) as i64)
    }
}

impl Budget {
    /// Reserves a call costing `tokens` at `now`: the moment it may start and the new budget.
    pub fn reserve(self, rates: Rates, now: i64, tokens: u64) -> (i64, Budget) {
        let start = now.max(self.paused_until(now));
        let requests = Gcra::new(rates.requests_per_minute.into());
        let token_limit = Gcra::new(rates.tokens_per_minute).map(|gcra| Gcra {
            // A second's worth of tokens, which may be fewer than one call needs.
            tolerance: MICROS_PER_SECOND,
            ..gcra
        });
        let at = requests
            .map_or(start, |gcra| gcra.allowed(self.requests_tat, start))
            .max(token_limit.map_or(start, |gcra| gcra.allowed(self.tokens_tat, start)));
        let next = Budget {
            requests_tat: requests.map_or(self.requests_tat, |g| g.spend(self.requests_tat, at, 1)),
            tokens_tat: token_limit
                .map_or(self.tokens_tat, |g| g.spend(self.tokens_tat, at, tokens)),
            not_before: self.not_before,
        };
        (at, next)
    }

    /// Charges tokens a call used beyond what it reserved.
    pub fn charge(self, rates: Rates, now: i64, tokens: u64) -> Budget {
        match Gcra::new(rates.tokens_per_minute) {
            Some(gcra) if tokens > 0 => Budget {
                tokens_tat: gcra.spend(self.tokens_tat, now - MICROS_PER_SECOND, tokens),
                ..self
            },
            _ => self,
        }
    }

    /// When the pause ends, seen at `now`: never more than [`MAX_PROVIDER_WAIT`] ahead, even
    /// if an instance (an older version, a clock far ahead) stored a later moment.
    fn paused_until(self, now: i64) -> i64 {
        self.not_before
            .min(now.saturating_add(micros(MAX_PROVIDER_WAIT)))
    }

    pub fn pause_until(self, until: i64) -> Budget {
        Budget {
            not_before: self.not_before.max(until),
            ..self
        }
    }
}

#[derive(Debug)]
struct Inner {
    kv: kv::Store,
    key: String,
    rates: Rates,
    /// The newest budget seen and its revision (0: none stored yet).
    seen: Mutex<(Budget, u64)>,
}

#[derive(Debug, Clone)]
pub struct Limiter(Arc<Inner>);

impl Limiter {
    /// The budget named `key` (the provider), followed by a watch until `shutdown`.
    pub async fn start(
        kv: kv::Store,
        key: &str,
        rates: Rates,
        shutdown: CancellationToken,
    ) -> Result<Self, LimiterError> {
        let limiter = Self(Arc::new(Inner {
            kv,
            key: key.to_owned(),
            rates,
            seen: Mutex::new((Budget::default(), 0)),
        }));
        limiter.refresh().await?;
        tokio::spawn(limiter.clone().follow(shutdown));
        Ok(limiter)
    }

    fn seen(&self) -> MutexGuard<'_, (Budget, u64)> {
        self.0
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn error(&self, err: impl std::fmt::Display) -> LimiterError {
        LimiterError {
            key: self.0.key.clone(),
            message: err.to_string(),
        }
    }

    fn remember(&self, budget: Budget, revision: u64) {
        let mut seen = self.seen();
        if revision > seen.1 {
            *seen = (budget, revision);
        }
    }

    async fn refresh(&self) -> Result<(), LimiterError> {
        if let Some(entry) = self
            .0
            .kv
            .entry(&self.0.key)
            .await
            .map_err(|e| self.error(e))?
        {
            self.observe(&entry);
        }
        Ok(())
    }

    fn observe(&self, entry: &kv::Entry) {
        if entry.operation != kv::Operation::Put {
            return;
        }
        match serde_json::from_slice::<Budget>(&entry.value) {
            Ok(budget) => self.remember(budget, entry.revision),
            Err(err) => {
                tracing::warn!(key = %self.0.key, error = %err, "unreadable rate-limit budget ignored")
            }
        }
    }

    /// Keeps `seen` current with every other instance's writes; restarts the watch if NATS
    /// drops it.
    async fn follow(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.0.kv.watch(&self.0.key).await {
                Ok(mut watch) => loop {
                    tokio::select! {
                        next = watch.next() => match next {
                            Some(Ok(entry)) => self.observe(&entry),
                            Some(Err(_)) | None => break,
                        },
                        _ = shutdown.cancelled() => return,
                    }
                },
                Err(err) => tracing::warn!(error = %err, "watching the rate-limit budget"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Applies `change` to the shared budget by compare-and-set; returns what `change` said.
    async fn modify<T>(
        &self,
        mut change: impl FnMut(Budget) -> (T, Budget),
    ) -> Result<T, LimiterError> {
        loop {
            let (budget, revision) = *self.seen();
            let (answer, next) = change(budget);
            let value = serde_json::to_vec(&next).map_err(|e| self.error(e))?;
            let written = put_at_revision(
                &self.0.kv,
                &self.0.key,
                value.into(),
                (revision != 0).then_some(revision),
            )
            .await
            .map_err(|message| self.error(message))?;
            match written {
                Some(new_revision) => {
                    self.remember(next, new_revision);
                    return Ok(answer);
                }
                // Another instance wrote first: start again from its budget.
                None => self.refresh().await?,
            }
        }
    }

    /// Waits until a call costing about `tokens` may go out, having reserved it.
    pub async fn acquire(&self, tokens: u64) -> Result<(), LimiterError> {
        let rates = self.0.rates;
        if !rates.limited() {
            // Only a pause to honour; it may be pushed on while we wait.
            loop {
                let not_before = self.seen().0.paused_until(now_micros());
                let wait = until(not_before);
                if wait.is_zero() {
                    return Ok(());
                }
                tokio::time::sleep(wait).await;
            }
        }
        let at = self
            .modify(|budget| budget.reserve(rates, now_micros(), tokens))
            .await?;
        tokio::time::sleep(until(at)).await;
        Ok(())
    }

    /// Records tokens a call used beyond what it reserved.
    pub async fn charge(&self, tokens: u64) -> Result<(), LimiterError> {
        if tokens == 0 || self.0.rates.tokens_per_minute == 0 {
            return Ok(());
        }
        let rates = self.0.rates;
        self.modify(|budget| ((), budget.charge(rates, now_micros(), tokens)))
            .await
    }

    /// Holds every instance back for `wait` (at most [`MAX_PROVIDER_WAIT`]), after a 429 or a
    /// nearly spent budget.
    pub async fn pause(&self, wait: Duration) -> Result<(), LimiterError> {
        let until = now_micros().saturating_add(micros(wait.min(MAX_PROVIDER_WAIT)));
        if self.seen().0.not_before >= until {
            return Ok(());
        }
        tracing::info!(?wait, key = %self.0.key, "every generator instance pauses LLM calls");
        self.modify(|budget| ((), budget.pause_until(until))).await
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
        })
}

/// How long from now until `moment` (zero when it has passed).
fn until(moment: i64) -> Duration {
    Duration::from_micros(u64::try_from(moment.saturating_sub(now_micros())).unwrap_or(0))
}

fn micros(wait: Duration) -> i64 {
    i64::try_from(wait.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = MICROS_PER_SECOND;

    /// Reserves `calls` calls as fast as the budget allows; their start times.
    fn schedule(rates: Rates, calls: usize, tokens: u64) -> Vec<i64> {
        let mut budget = Budget::default();
        let now = 1_000 * SECOND;
        (0..calls)
            .map(|_| {
                let (at, next) = budget.reserve(rates, now, tokens);
                budget = next;
                at
            })
            .collect()
    }

    fn most_in_any_window(starts: &[i64], window: i64) -> usize {
        starts
            .iter()
            .map(|&from| {
                starts
                    .iter()
                    .filter(|&&t| t >= from && t < from + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn no_minute_holds_more_than_the_limit_and_one_seconds_burst() {
        let rates = Rates {
            requests_per_minute: 600,
            tokens_per_minute: 0,
        };
        let starts = schedule(rates, 2_000, 0);
        let most = most_in_any_window(&starts, 60 * SECOND);
        assert!((600..=600 + 10).contains(&most), "{most}");
        // The first second's burst goes at once, then the calls are evenly spaced.
        assert_eq!(starts[9], starts[0]);
        assert_eq!(starts[11] - starts[10], SECOND / 10);
    }

    #[test]
    fn tokens_are_limited_by_their_cost() {
        let rates = Rates {
            requests_per_minute: 0,
            tokens_per_minute: 60_000,
        };
        // 1,000 tokens a second: 500-token calls go two a second after a one-second burst.
        let starts = schedule(rates, 300, 500);
        assert_eq!(most_in_any_window(&starts, 60 * SECOND), 122);
    }

    #[test]
    fn a_pause_holds_back_every_reservation() {
        let rates = Rates {
            requests_per_minute: 6_000,
            tokens_per_minute: 0,
        };
        let now = 1_000 * SECOND;
        let budget = Budget::default().pause_until(now + 5 * SECOND);
        let (at, _) = budget.reserve(rates, now, 0);
        assert_eq!(at, now + 5 * SECOND);
    }

    #[test]
    fn extreme_budgets_and_costs_saturate_instead_of_overflowing() {
        let rates = Rates {
            requests_per_minute: 600,
            tokens_per_minute: 60_000,
        };
        let now = 1_000 * SECOND;
        let (_, spent) = Budget::default().reserve(rates, now, u64::MAX);
        let (at, _) = spent.reserve(rates, now, u64::MAX);
        assert!(at >= now);
        let hostile = Budget {
            requests_tat: i64::MIN,
            tokens_tat: i64::MAX,
            not_before: i64::MIN,
        };
        let _ = hostile.reserve(rates, now, 1);
        let _ = hostile.charge(rates, now, u64::MAX);
    }

    #[test]
    fn a_pause_beyond_the_documented_bound_holds_back_for_the_bound_only() {
        let rates = Rates {
            requests_per_minute: 6_000,
            tokens_per_minute: 0,
        };
        let now = 1_000 * SECOND;
        let budget = Budget::default().pause_until(now + 86_400 * SECOND);
        let (at, _) = budget.reserve(rates, now, 0);
        assert_eq!(at, now + 60 * SECOND);
        let (at, _) = Budget::default()
            .pause_until(i64::MAX)
            .reserve(rates, now, 0);
        assert_eq!(at, now + 60 * SECOND);
    }

    #[test]
    fn tokens_charged_afterwards_delay_later_calls() {
        let rates = Rates {
            requests_per_minute: 0,
            tokens_per_minute: 60_000,
        };
        let now = 1_000 * SECOND;
        let (_, budget) = Budget::default().reserve(rates, now, 100);
        let budget = budget.charge(rates, now, 5_000);
        let (at, _) = budget.reserve(rates, now, 100);
        assert!(at >= now + 4 * SECOND, "{}", at - now);
    }
}
