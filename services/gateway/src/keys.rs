//! Who is calling: the configured API keys, each with its own callback allowlist and request
//! rate when it has them.

use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use jetcall::allowlist::{Allowlist, AllowlistError};
use jetcall::config::ApiKey;

use crate::error::ApiError;

/// One configured key. Only its digest is kept: keys are compared as digests so the time
/// taken does not depend on how much of a key a caller guessed.
#[derive(Debug)]
pub struct Caller {
    digest: [u8; 32],
    /// For logs; `key <n>` (its place in `gateway.api_keys`) when the key has no name.
    pub name: String,
    allowlist: Option<Allowlist>,
    rate: Option<DefaultDirectRateLimiter>,
}

impl Caller {
    /// Whether this caller may name `callback_url`, which the gateway's own allowlist has
    /// already admitted.
    pub fn admits(&self, callback_url: &str) -> Result<(), ApiError> {
        match &self.allowlist {
            Some(allowlist) => allowlist.check(callback_url).map(drop).map_err(|err| {
                ApiError::InvalidCallbackUrl(format!(
                    "{err} (the allowlist of API key `{}`)",
                    self.name
                ))
            }),
            None => Ok(()),
        }
    }

    /// Counts one request against the key's rate; `Err` is the 429 to answer.
    pub fn spend(&self) -> Result<(), ApiError> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited {
                retry_after: wait.max(Duration::from_secs(1)),
            }
        })
    }
}

/// The configured keys; empty when the API is open.
#[derive(Debug, Default)]
pub struct Keys(Vec<Arc<Caller>>);

impl Keys {
    pub fn new(keys: &[ApiKey]) -> Result<Self, AllowlistError> {
        let callers = keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                let digest = Sha256::digest(key.secret().expose().as_bytes()).into();
                let scoped = match key {
                    ApiKey::Key(_) => None,
                    ApiKey::Scoped(scoped) => Some(scoped),
                };
                let allowlist = scoped
                    .and_then(|scoped| scoped.callback_allowlist.as_deref())
                    .map(Allowlist::parse)
                    .transpose()?;
                Ok(Arc::new(Caller {
                    digest,
                    name: scoped
                        .and_then(|scoped| scoped.name.clone())
                        .unwrap_or_else(|| format!("key {index}")),
                    allowlist,
                    rate: scoped
                        .and_then(|scoped| scoped.requests_per_second)
                        .map(|rate| RateLimiter::direct(Quota::per_second(rate))),
                }))
            })
            .collect::<Result<_, AllowlistError>>()?;
        Ok(Self(callers))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The caller whose key `presented` is, if any. Every configured key is compared, so the
    /// time taken does not tell which one matched.
    pub fn identify(&self, presented: &str) -> Option<Arc<Caller>> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.iter().fold(None, |found, caller| {
            if caller.digest == digest {
                Some(caller.clone())
            } else {
                found
            }
        })
    }
}
