//! `[nats]`: where the servers are and how the stream and bucket are kept.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, check_file};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated; `NATS_URL` sets it too.
    pub url: String,
    /// Replicas of the `JOBS` stream and the `job_status` bucket: 1 on a single server, 3 in a
    /// cluster.
    pub replicas: usize,
    /// How long a JetStream request (publish ack, KV write) may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long events stay in the `JOBS` stream.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The window in which a republished event with the same `Nats-Msg-Id` is stored once.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// The NATS user this service connects as, when the server requires one (see
    /// `nats/accounts.conf`); `password` goes with it.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A PEM file with the CA that signed the server's certificate, for a `tls://` URL to a
    /// server whose certificate the system's roots do not cover.
    pub tls_ca: Option<PathBuf>,
    /// Create or update the stream, the consumers and the buckets at start. `false` for a
    /// user that may only use them: the service then waits until they exist, and an operator
    /// creates them (`jetcall topology`, as a user that may).
    pub provision: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            replicas: 1,
            request_timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            user: None,
            password: None,
            tls_ca: None,
            provision: true,
        }
    }
}

impl NatsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.replicas == 0 || self.replicas > 5 {
            return Err(ConfigError::invalid("nats.replicas", "must be 1 to 5"));
        }
        if self.duplicate_window < Duration::from_secs(120) {
            return Err(ConfigError::invalid(
                "nats.duplicate_window",
                "must be at least 2m so a retried publish is stored once",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(ConfigError::invalid(
                if self.user.is_some() {
                    "nats.password"
                } else {
                    "nats.user"
                },
                "must be set together with the other of nats.user and nats.password",
            ));
        }
        check_file("nats.tls_ca", self.tls_ca.as_deref())
    }
}
