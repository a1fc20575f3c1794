//! Who is calling: the configured API keys, each with its tenant (its name), its role, and
//! its own callback allowlist and request rate when it has them.

use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use jetcall::allowlist::{Allowlist, CallbackUrl};
use jetcall::config::{ApiKey, Role};
use jetcall::status::JobStatus;

use crate::error::ApiError;

/// One configured key. Only its digest is kept: keys are compared as digests so the time
/// taken does not depend on how much of a key a caller guessed.
#[derive(Debug)]
pub struct Caller {
    digest: [u8; 32],
    /// The tenant whose jobs the key submits and sees, and the name logs give it: the key's
    /// `name`, or `key <n>` (its place in `gateway.api_keys`) when it has none.
    pub name: String,
    role: Role,
    allowlist: Option<Allowlist>,
    /// The key's own allowlist again, as the addresses it may reach although they are not
    /// public (`GatewayConfig::address_exemptions`); empty without one.
    exemptions: Allowlist,
    rate: Option<DefaultDirectRateLimiter>,
}

impl Caller {
    /// Whether this caller may name `callback_url`, which the gateway's own allowlist has
    /// already admitted. An address written into the URL that is not public must be one the
    /// key's own policy exempts, as the callback service will check at delivery.
    pub fn admits(&self, callback_url: &CallbackUrl) -> Result<(), ApiError> {
        if let Some(allowlist) = &self.allowlist {
            allowlist.admits(callback_url).map_err(|err| {
                ApiError::InvalidCallbackUrl(format!(
                    "{err} (the allowlist of API key `{}`)",
                    self.name
                ))
            })?;
        }
        self.exemptions
            .check_url_address(callback_url)
            .map_err(|forbidden| {
                ApiError::InvalidCallbackUrl(format!(
                    "{forbidden}, which API key `{}` may not call back to (its own callback_allowlist does not name it)",
                    self.name
                ))
            })?;
        Ok(())
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether the caller may see and act on `doc`: its own tenant's job, or any job for an
    /// operator's key.
    pub fn sees(&self, doc: &JobStatus) -> bool {
        self.role == Role::Admin || doc.tenant.as_deref() == Some(self.name.as_str())
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

/// Operators' routes (the overview) are for an admin key; without keys the one tenant is the
/// operator.
pub fn require_operator(caller: Option<&Caller>) -> Result<(), ApiError> {
    match caller {
        Some(caller) if caller.role != Role::Admin => Err(ApiError::Forbidden(format!(
            "API key `{}` is not an admin key; only an admin key sees the whole pipeline",
            caller.name
        ))),
        _ => Ok(()),
    }
}

/// Whether a request from `caller` may see and act on `doc`. Without keys (`None`) there is
/// one tenant and every job is its own.
pub fn may_see(caller: Option<&Caller>, doc: &JobStatus) -> bool {
    caller.is_none_or(|caller| caller.sees(doc))
}

/// The configured keys; empty when the API is open.
#[derive(Debug, Default)]
pub struct Keys(Vec<Arc<Caller>>);

impl Keys {
    pub fn new(keys: &[ApiKey]) -> Self {
        let callers = keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                let digest = Sha256::digest(key.secret().expose().as_bytes()).into();
                let scoped = match key {
                    ApiKey::Key(_) => None,
                    ApiKey::Scoped(scoped) => Some(scoped),
                };
                let allowlist = key.callback_allowlist().cloned();
                Arc::new(Caller {
                    digest,
                    name: key.tenant(index),
                    role: key.role(),
                    exemptions: allowlist.clone().unwrap_or_default(),
                    allowlist,
                    rate: scoped
                        .and_then(|scoped| scoped.requests_per_second)
                        .map(|rate| RateLimiter::direct(Quota::per_second(rate))),
                })
            })
            .collect();
        Self(callers)
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
