//! `[gateway]`: the HTTP API's address, limits, API keys and callback allowlist.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret};
use crate::allowlist::Allowlist;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Bearer keys accepted by the API, each alone or with limits of its own; empty means no
    /// authentication (the gateway warns).
    pub api_keys: Vec<ApiKey>,
    /// Hosts callers may name in `callback_url`: exact hosts, `*.domain` patterns, CIDRs, and
    /// `*` for any host at a public address. Loopback, private and other special addresses
    /// are reached only through an address or CIDR entry (with API keys: in the key's own
    /// `callback_allowlist`), never through a name.
    pub callback_allowlist: Allowlist,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The largest body of `POST /api/v1/jobs/batch` accepted, in bytes.
    pub max_batch_bytes: usize,
    /// API requests served at once; past it the gateway answers `429` with `Retry-After`
    /// instead of queueing without bound.
    pub max_in_flight: usize,
    /// `GET /api/v1/jobs/{id}/events` streams open at once; they last, so they are counted
    /// apart from `max_in_flight`.
    pub max_event_streams: usize,
    /// Of those, the most one API key may have open at once (`429` past it), so one caller
    /// cannot take them all.
    pub max_event_streams_per_key: usize,
    /// At start-up, jobs still `accepted` this long after submission whose request is not in
    /// the `JOBS` stream (a gateway died between the two writes) are published again.
    #[serde(with = "humantime_serde")]
    pub sweep_after: Duration,
    /// How often that sweep runs again while the gateway serves (one gateway at a time), so a
    /// gateway's crash is repaired without a restart.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// How long a connection may take to send a request's headers before it is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long an API request's body may take to arrive before the answer is `408`. The
    /// body is read before the request takes one of `max_in_flight`'s places, so a stalled
    /// upload holds none.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Serve the operators' web console at `/console` (its data comes from the same API, under
    /// the same keys).
    pub console: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            callback_allowlist: Allowlist::any_public(),
            max_body_bytes: 256 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_in_flight: 2048,
            max_event_streams: 1024,
            max_event_streams_per_key: 64,
            sweep_after: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(5 * 60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            console: true,
        }
    }
}

impl GatewayConfig {
    /// The allowlist whose address and CIDR entries exempt a job's destination from the
    /// refusal of special-purpose addresses. Without API keys there is one tenant, the
    /// operator's, and it is `gateway.callback_allowlist`. With keys it is the allowlist of the
    /// job's own key: an exemption the gateway's list makes for one tenant's internal receiver
    /// must not let another tenant's DNS names point into that range. A key without a list of
    /// its own, or a tenant no key names any more, has none.
    pub fn address_exemptions(&self, tenant: Option<&str>) -> Option<&Allowlist> {
        if self.api_keys.is_empty() {
            return Some(&self.callback_allowlist);
        }
        self.api_keys
            .iter()
            .enumerate()
            .find(|(index, key)| Some(key.tenant(*index).as_str()) == tenant)
            .and_then(|(_, key)| key.callback_allowlist())
    }

    /// The spending limits of `tenant`'s keys, when they have any.
    pub fn budget_of(&self, tenant: &str) -> Option<&crate::budget::Limits> {
        self.api_keys
            .iter()
            .enumerate()
            .find(|(index, key)| key.tenant(*index) == tenant)
            .and_then(|(_, key)| key.budget())
    }

    /// Every tenant the keys name, once each, in the order of their first key.
    pub fn tenants(&self) -> Vec<String> {
        let mut tenants: Vec<String> = Vec::new();
        for (index, key) in self.api_keys.iter().enumerate() {
            let tenant = key.tenant(index);
            if !tenants.contains(&tenant) {
                tenants.push(tenant);
            }
        }
        tenants
    }

    /// How `tenant`'s jobs share the generators: its first key's `weight` and
    /// `max_concurrency`.
    pub fn share_of(&self, tenant: &str) -> crate::lanes::Share {
        self.api_keys
            .iter()
            .enumerate()
            .find(|(index, key)| key.tenant(*index) == tenant)
            .map(|(_, key)| key.share())
            .unwrap_or_default()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch_bytes < self.max_body_bytes {
            return Err(ConfigError::invalid(
                "gateway.max_batch_bytes",
                "must be at least gateway.max_body_bytes, so any job a single submission takes fits in a batch",
            ));
        }
        for (key, value) in [
            ("gateway.max_in_flight", self.max_in_flight),
            ("gateway.max_event_streams", self.max_event_streams),
            (
                "gateway.max_event_streams_per_key",
                self.max_event_streams_per_key,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        for (key, timeout) in [
            ("gateway.header_timeout", self.header_timeout),
            ("gateway.body_timeout", self.body_timeout),
        ] {
            if timeout.is_zero() {
                return Err(ConfigError::invalid(key, "must be above zero"));
            }
        }
        if self.sweep_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "gateway.sweep_interval",
                "must be at least 1s",
            ));
        }
        self.validate_key_policies()
    }

    /// Keys that share a tenant (a name) share its policy: what the services apply to a job
    /// is looked up by its tenant.
    fn validate_key_policies(&self) -> Result<(), ConfigError> {
        self.same_for_each_tenant("budget", "budget", |key| key.budget().cloned())?;
        self.same_for_each_tenant("callback_allowlist", "callback allowlist", |key| {
            key.callback_allowlist().cloned()
        })?;
        self.same_for_each_tenant("weight", "weight and max_concurrency", ApiKey::share)
    }

    /// Fails at the first key whose `policy` differs from an earlier key of its tenant's.
    fn same_for_each_tenant<T: PartialEq>(
        &self,
        field: &str,
        what: &str,
        policy: impl Fn(&ApiKey) -> T,
    ) -> Result<(), ConfigError> {
        let keys = &self.api_keys;
        for (index, key) in keys.iter().enumerate() {
            let tenant = key.tenant(index);
            if let Some((first, _)) =
                keys.iter()
                    .enumerate()
                    .take(index)
                    .find(|(other, earlier)| {
                        earlier.tenant(*other) == tenant && policy(earlier) != policy(key)
                    })
            {
                return Err(ConfigError::invalid(
                    format!("gateway.api_keys[{index}].{field}"),
                    format!(
                        "differs from that of gateway.api_keys[{first}], which has the same name `{tenant}`; keys of one tenant share one {what}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// An API key: `"the-key"`, or `{ key = "the-key", name = "catalogue",
/// callback_allowlist = ["hooks.shop.example"], requests_per_second = 50 }` for a caller held
/// to fewer callback hosts than the gateway allows, or to a request rate.
///
/// Read as written (a string or a table) and then checked field by field, so a misspelt role
/// or a bad allowlist entry is named in the error, not lost in "matches no variant".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, try_from = "ApiKeyAsWritten")]
pub enum ApiKey {
    Key(Secret),
    Scoped(ScopedApiKey),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScopedApiKey {
    pub key: Secret,
    /// Names the caller in logs (the key never appears).
    pub name: Option<String>,
    /// Narrows `gateway.callback_allowlist` for this key's jobs: a callback URL must pass both.
    pub callback_allowlist: Option<Allowlist>,
    /// API requests a second this key may make to one gateway instance, with a burst of as
    /// many; past it `429 rate_limited`.
    pub requests_per_second: Option<std::num::NonZeroU32>,
    /// `user` (the default): the key sees and acts on the jobs it submitted. `admin`: an
    /// operator's key, which sees, lists, watches and redelivers every tenant's jobs.
    pub role: Option<Role>,
    /// `{ per_day_usd = 5.0, per_month_usd = 100.0 }`: what the tenant's jobs may cost, held
    /// across every instance (`jetcall::budget`); past it `402 budget_exceeded`.
    pub budget: Option<crate::budget::Limits>,
    /// The tenant's part of the generators' capacity against other tenants with waiting
    /// work (1 when left out; `jetcall::lanes`).
    pub weight: Option<std::num::NonZeroU32>,
    /// The most of the tenant's LLM calls in flight at once across every generator instance,
    /// interactive and bulk together.
    pub max_concurrency: Option<std::num::NonZeroU32>,
}

/// What a key may see: its own jobs, or (an operator's key) everyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    User,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "user" => Some(Self::User),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ApiKeyAsWritten {
    Key(Secret),
    Scoped(ScopedApiKeyAsWritten),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopedApiKeyAsWritten {
    key: Secret,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    callback_allowlist: Option<Vec<String>>,
    #[serde(default)]
    requests_per_second: Option<std::num::NonZeroU32>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    budget: Option<BudgetAsWritten>,
    #[serde(default)]
    weight: Option<std::num::NonZeroU32>,
    #[serde(default)]
    max_concurrency: Option<std::num::NonZeroU32>,
}

/// A budget as written: a table read loosely (inside the untagged `ApiKeyAsWritten`, a
/// strict one's error would be lost in "matches no variant"), then checked by name.
#[derive(Deserialize)]
#[serde(transparent)]
struct BudgetAsWritten(std::collections::BTreeMap<String, serde_json::Value>);

/// The most one budget may be: past it a typo (a million for a thousand) is likelier than a
/// wish.
const MAX_BUDGET_USD: f64 = 1_000_000.0;

impl TryFrom<BudgetAsWritten> for crate::budget::Limits {
    type Error = String;

    fn try_from(written: BudgetAsWritten) -> Result<Self, String> {
        let mut fields = written.0;
        let per_day_usd = fields.remove("per_day_usd");
        let per_month_usd = fields.remove("per_month_usd");
        if let Some(unknown) = fields.keys().next() {
            return Err(format!(
                "`budget.{unknown}` is not a budget field; use `per_day_usd` and `per_month_usd`"
            ));
        }
        let microdollars = |name: &str, usd: Option<serde_json::Value>| {
            usd.map(|usd| {
                let usd = usd
                    .as_f64()
                    .ok_or_else(|| format!("`budget.{name}` is {usd}, not a number of dollars"))?;
                if usd.is_finite() && usd > 0.0 && usd <= MAX_BUDGET_USD {
                    Ok((usd * 1e6).round() as u64)
                } else {
                    Err(format!(
                        "`budget.{name}` is {usd}; it must be above 0 and at most {MAX_BUDGET_USD} dollars"
                    ))
                }
            })
            .transpose()
        };
        let limits = Self {
            per_day: microdollars("per_day_usd", per_day_usd)?,
            per_month: microdollars("per_month_usd", per_month_usd)?,
        };
        if limits.per_day.is_none() && limits.per_month.is_none() {
            return Err("`budget` sets neither `per_day_usd` nor `per_month_usd`".into());
        }
        Ok(limits)
    }
}

/// The largest `weight`: past it one tenant's share is indistinguishable from all of it.
const MAX_WEIGHT: u32 = 1000;

impl TryFrom<ApiKeyAsWritten> for ApiKey {
    type Error = String;

    fn try_from(written: ApiKeyAsWritten) -> Result<Self, String> {
        let scoped = match written {
            ApiKeyAsWritten::Key(key) => return Ok(Self::Key(key)),
            ApiKeyAsWritten::Scoped(scoped) => scoped,
        };
        let role = scoped
            .role
            .map(|role| {
                Role::parse(&role)
                    .ok_or_else(|| format!("`role` is `{role}`; it must be `user` or `admin`"))
            })
            .transpose()?;
        let callback_allowlist = scoped
            .callback_allowlist
            .map(|entries| Allowlist::parse(&entries))
            .transpose()
            .map_err(|err| format!("`callback_allowlist`: {err}"))?;
        Ok(Self::Scoped(ScopedApiKey {
            key: scoped.key,
            name: scoped.name,
            callback_allowlist,
            requests_per_second: scoped.requests_per_second,
            role,
            budget: scoped.budget.map(TryInto::try_into).transpose()?,
            weight: scoped
                .weight
                .map(|weight| {
                    if weight.get() <= MAX_WEIGHT {
                        Ok(weight)
                    } else {
                        Err(format!(
                            "`weight` is {weight}; it must be 1 to {MAX_WEIGHT}"
                        ))
                    }
                })
                .transpose()?,
            max_concurrency: scoped.max_concurrency,
        }))
    }
}

impl ApiKey {
    pub fn secret(&self) -> &Secret {
        match self {
            Self::Key(key) => key,
            Self::Scoped(scoped) => &scoped.key,
        }
    }

    /// The tenant the key's jobs belong to: its `name`, or `key <index>` (its place in
    /// `gateway.api_keys`) without one. Keys sharing a name share their jobs, so a key can be
    /// rotated without its jobs changing hands.
    pub fn tenant(&self, index: usize) -> String {
        match self {
            Self::Scoped(ScopedApiKey {
                name: Some(name), ..
            }) => name.clone(),
            _ => format!("key {index}"),
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Self::Scoped(ScopedApiKey {
                role: Some(role), ..
            }) => *role,
            _ => Role::User,
        }
    }

    /// The key's spending limits, when it has them.
    pub fn budget(&self) -> Option<&crate::budget::Limits> {
        match self {
            Self::Scoped(scoped) => scoped.budget.as_ref(),
            Self::Key(_) => None,
        }
    }

    /// How the key's jobs share the generators with other tenants' (`jetcall::lanes`).
    pub fn share(&self) -> crate::lanes::Share {
        match self {
            Self::Scoped(scoped) => crate::lanes::Share {
                weight: scoped.weight.map_or(1, std::num::NonZeroU32::get),
                max_concurrency: scoped.max_concurrency.map(std::num::NonZeroU32::get),
            },
            Self::Key(_) => crate::lanes::Share::default(),
        }
    }

    /// The key's own callback allowlist, when it has one.
    pub fn callback_allowlist(&self) -> Option<&Allowlist> {
        match self {
            Self::Scoped(scoped) => scoped.callback_allowlist.as_ref(),
            Self::Key(_) => None,
        }
    }
}
