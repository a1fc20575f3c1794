//! `[callback]`: how webhooks are signed, retried and spread over destinations.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, OneOrMany};
use crate::sealing::SecretsKey;
use crate::signing::{Signer, SigningKey};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackConfig {
    /// `whsec_<base64>`; several during key rotation, each producing a signature.
    pub signing_secret: Option<OneOrMany<SigningKey>>,
    /// 32 random bytes in base64 (`openssl rand -base64 32`) that seal a job's own
    /// `signing_secret` in the `job_status` bucket: the gateway seals, the callback opens.
    /// Both need the same key; without one the gateway refuses jobs that bring a secret.
    /// Set but empty (as compose passes an unset variable) means none.
    #[serde(default, deserialize_with = "super::blank_is_none")]
    pub secrets_key: Option<SecretsKey>,
    /// The wait before each retry of a failed delivery; its length is the number of retries.
    #[serde(with = "crate::durations::list")]
    pub retry_schedule: Vec<Duration>,
    /// The limit on one delivery attempt, connect to last byte.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Webhook deliveries in flight per callback instance.
    pub concurrency: usize,
    /// Deliveries in flight to one host per instance, so a slow or dead receiver can hold at
    /// most this many of the `concurrency` slots; the rest of its jobs wait in JetStream.
    pub per_host_concurrency: usize,
    /// How long a destination is left alone once its circuit opens: its deliveries wait in
    /// JetStream, spending none of their retries, and then one probe goes out.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// How long every attempt at a destination must have failed (at least 5 of them) before
    /// its circuit opens: longer than a first retry, so a receiver that fails first attempts
    /// and takes retries is not cut off; shorter than `timeout`, so a silent one is cut off
    /// by its first timeouts.
    #[serde(with = "humantime_serde")]
    pub breaker_window: Duration,
    /// The longest a delivery round may last, from its first request, while its destination's
    /// circuit keeps it from using its retries; then it is `undeliverable`. Unset: twice the
    /// length of `retry_schedule`.
    #[serde(default, with = "humantime_serde")]
    pub max_round_age: Option<Duration>,
    /// The longest wait a receiver's `Retry-After` can impose on the next attempt.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Deliveries the `callback` consumer hands out unacknowledged, including those waiting
    /// for a retry; large, so a backlog of retries never starves fresh completions.
    pub max_ack_pending: i64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: SocketAddr,
}

impl CallbackConfig {
    /// Signs with every configured `signing_secret`, newest first; `None` without one.
    pub fn signer(&self) -> Option<Signer> {
        let keys = self.signing_secret.as_ref()?.to_vec();
        Some(Signer::new(keys.into_iter().cloned().collect()))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "callback.concurrency",
                "must be at least 1",
            ));
        }
        if self.per_host_concurrency == 0 {
            return Err(ConfigError::invalid(
                "callback.per_host_concurrency",
                "must be at least 1",
            ));
        }
        if let Some(longest) = self.max_round_age
            && longest < self.retry_schedule.iter().sum::<Duration>()
        {
            return Err(ConfigError::invalid(
                "callback.max_round_age",
                "must be at least the whole length of `callback.retry_schedule`",
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "callback.timeout",
                "must be above zero",
            ));
        }
        Ok(())
    }

    /// The longest a delivery round may last: `max_round_age`, or twice the schedule.
    pub fn longest_round(&self) -> Duration {
        self.max_round_age
            .unwrap_or_else(|| 2 * self.retry_schedule.iter().sum::<Duration>())
    }
}

impl Default for CallbackConfig {
    fn default() -> Self {
        let schedule = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800];
        Self {
            signing_secret: None,
            secrets_key: None,
            retry_schedule: schedule.into_iter().map(Duration::from_secs).collect(),
            timeout: Duration::from_secs(15),
            concurrency: 256,
            per_host_concurrency: 32,
            breaker_cooldown: Duration::from_secs(30),
            breaker_window: Duration::from_secs(10),
            max_round_age: None,
            max_retry_after: Duration::from_secs(3600),
            max_ack_pending: 20_000,
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
        }
    }
}
