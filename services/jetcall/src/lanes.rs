//! Fair share between tenants: the lanes requests wait in.
//!
//! A tenant's requests are published on `jobs.requested.<kind>.<tenant>.<priority>` (the
//! tenant as hex, one subject token whatever its name), and each (tenant, priority) pair has
//! its own durable consumer, `lane-<tenant>-<priority>`. Its metadata carries the key's
//! `weight` and `max_concurrency`, which is how generators learn them (the generator's `caps`
//! module holds the cap across instances); an interactive lane's `max_ack_pending` is the cap
//! too, so no instance holds more of its messages than could be called. Each generator
//! pulls from every lane and picks the next message among them by weight (the generator's
//! `fair` module), so one tenant's backlog delays another's jobs by a few calls, not by the
//! backlog.
//!
//! Without API keys there is one anonymous tenant: its interactive requests keep the plain
//! `jobs.requested.<kind>` subject and the `generator` consumer (the default lane, which also
//! drains requests published before lanes existed), its bulk ones go to the lane
//! `lane-anonymous-bulk`.

use async_nats::jetstream::consumer;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::job::Kind;
use crate::subjects::{Event, GENERATOR_CONSUMER};

/// How urgent a job is: interactive jobs go before a tenant's bulk ones.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
// Through a string: serde_json calls any other token where an enum belongs a syntax error,
// which would answer a caller's `"priority": 1` as malformed JSON.
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Priority {
    /// Someone is waiting for it (the default).
    #[default]
    Interactive,
    /// Catalogue-sized work nobody waits on: runs when the tenant's interactive work leaves
    /// room, and never starves.
    Bulk,
}

impl Priority {
    pub const ALL: [Priority; 2] = [Priority::Interactive, Priority::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Bulk => "bulk",
        }
    }

    pub fn parse(text: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == text)
    }

    pub fn is_interactive(&self) -> bool {
        *self == Priority::Interactive
    }
}

impl TryFrom<String> for Priority {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Priority::parse(&text)
            .ok_or_else(|| format!("`{text}` is not a priority: use `interactive` or `bulk`"))
    }
}

/// The token that stands for the tenant without keys in lane subjects and names. Never the
/// hex of a name: it has letters past `f`.
const ANONYMOUS: &str = "anonymous";
/// Lane consumers' names start with this; nothing else does.
pub const LANE_PREFIX: &str = "lane-";
const TENANT_METADATA: &str = "jetcall.tenant";
const PRIORITY_METADATA: &str = "jetcall.priority";
const WEIGHT_METADATA: &str = "jetcall.weight";
const MAX_CONCURRENCY_METADATA: &str = "jetcall.max_concurrency";

/// A tenant as one subject token: its name in hex (a name may hold dots, spaces, anything).
/// Lane subjects and budget counters both name tenants so. Written into one string: it is
/// made for every request the gateway publishes.
pub fn tenant_token(tenant: &str) -> String {
    use std::fmt::Write as _;
    let mut token = String::with_capacity(tenant.len() * 2);
    for byte in tenant.bytes() {
        let _ = write!(token, "{byte:02x}");
    }
    token
}

/// What a key's policy says about scheduling its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Its part of the generators' capacity against other tenants with waiting work.
    pub weight: u32,
    /// The most of its LLM calls in flight at once across every generator, interactive and
    /// bulk together.
    pub max_concurrency: Option<u32>,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            weight: 1,
            max_concurrency: None,
        }
    }
}

/// One tenant's queue at one priority.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    /// `None`: the tenant without keys.
    pub tenant: Option<String>,
    pub priority: Priority,
}

impl Lane {
    pub fn new(tenant: Option<&str>, priority: Priority) -> Self {
        Self {
            tenant: tenant.map(str::to_owned),
            priority,
        }
    }

    /// The anonymous tenant's interactive requests: the `generator` consumer's.
    pub fn is_default(&self) -> bool {
        self.tenant.is_none() && self.priority == Priority::Interactive
    }

    fn tenant_token(&self) -> String {
        self.tenant
            .as_deref()
            .map_or_else(|| ANONYMOUS.to_owned(), tenant_token)
    }

    /// The subject a request of `kind` in this lane is published on.
    pub fn subject(&self, kind: &Kind) -> String {
        if self.is_default() {
            Event::Requested.subject(kind)
        } else {
            format!(
                "{}.{}.{}",
                Event::Requested.subject(kind),
                self.tenant_token(),
                self.priority.as_str()
            )
        }
    }

    /// The durable consumer the lane is pulled through.
    pub fn consumer_name(&self) -> String {
        if self.is_default() {
            GENERATOR_CONSUMER.to_owned()
        } else {
            format!(
                "{LANE_PREFIX}{}-{}",
                self.tenant_token(),
                self.priority.as_str()
            )
        }
    }

    /// How the tenant is named in metrics and logs.
    pub fn tenant_label(&self) -> &str {
        self.tenant.as_deref().unwrap_or(ANONYMOUS)
    }
}

/// The lane consumer's configuration: the generator consumer's, narrowed to the lane, with
/// the key's share.
pub fn consumer_config(config: &Config, lane: &Lane, share: Share) -> consumer::pull::Config {
    consumer_config_on(
        crate::topology::generator_consumer_config(config),
        lane,
        share,
    )
}

/// The lane consumer's configuration on `base`, a `generator` consumer's: its ack settings,
/// narrowed to the lane, with the key's share.
pub fn consumer_config_on(
    base: consumer::pull::Config,
    lane: &Lane,
    share: Share,
) -> consumer::pull::Config {
    let mut wanted = base;
    wanted.durable_name = Some(lane.consumer_name());
    wanted.description = Some(format!(
        "Tenant {} at {} priority, shared by every generator instance",
        lane.tenant_label(),
        lane.priority.as_str()
    ));
    wanted.filter_subject = format!(
        "jobs.{}.*.{}.{}",
        Event::Requested.token(),
        lane.tenant_token(),
        lane.priority.as_str()
    );
    if let Some(cap) = share.max_concurrency {
        // Not the bulk lane's: its messages may wait in a Message Batch, which is no call,
        // and a batch holds as many as the lane lets one instance have unacked.
        if lane.priority.is_interactive() {
            wanted.max_ack_pending = i64::from(cap);
        }
        wanted
            .metadata
            .insert(MAX_CONCURRENCY_METADATA.to_owned(), cap.to_string());
    }
    if let Some(tenant) = &lane.tenant {
        wanted
            .metadata
            .insert(TENANT_METADATA.to_owned(), tenant.clone());
    }
    wanted.metadata.insert(
        PRIORITY_METADATA.to_owned(),
        lane.priority.as_str().to_owned(),
    );
    wanted
        .metadata
        .insert(WEIGHT_METADATA.to_owned(), share.weight.to_string());
    wanted
}

/// The lane a consumer serves and its key's share, read back from its name and metadata;
/// `None` for a consumer that is not a lane.
pub fn lane_of(info: &consumer::Info) -> Option<(Lane, Share)> {
    if info.name == GENERATOR_CONSUMER {
        return Some((Lane::new(None, Priority::Interactive), Share::default()));
    }
    if !info.name.starts_with(LANE_PREFIX) {
        return None;
    }
    let metadata = &info.config.metadata;
    let priority = Priority::parse(metadata.get(PRIORITY_METADATA)?)?;
    let weight = metadata
        .get(WEIGHT_METADATA)
        .and_then(|weight| weight.parse().ok())
        .filter(|weight| *weight > 0)
        .unwrap_or(1);
    let max_concurrency = metadata
        .get(MAX_CONCURRENCY_METADATA)
        .and_then(|cap| cap.parse().ok())
        .filter(|cap| *cap > 0);
    let lane = Lane::new(metadata.get(TENANT_METADATA).map(String::as_str), priority);
    // A consumer whose name and metadata disagree was not made by `consumer_config`.
    (lane.consumer_name() == info.name).then_some((
        lane,
        Share {
            weight,
            max_concurrency,
        },
    ))
}

/// Every lane the configuration's keys need, with their shares, besides the default lane:
/// each tenant's two (`tenants` names each once), and the anonymous tenant's bulk lane. That
/// one always exists, so that every service's configuration names a lane set a generator
/// without the keys can find.
pub fn configured(config: &Config) -> Vec<(Lane, Share)> {
    let mut lanes = vec![(Lane::new(None, Priority::Bulk), Share::default())];
    for tenant in config.gateway.tenants() {
        let share = config.gateway.share_of(&tenant);
        lanes.extend(Priority::ALL.map(|priority| (Lane::new(Some(&tenant), priority), share)));
    }
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_named_by_tenant_and_priority() {
        let kind = Kind::product_description();
        let default = Lane::new(None, Priority::Interactive);
        assert_eq!(default.subject(&kind), "jobs.requested.product-description");
        assert_eq!(default.consumer_name(), "generator");

        let bulk = Lane::new(None, Priority::Bulk);
        assert_eq!(
            bulk.subject(&kind),
            "jobs.requested.product-description.anonymous.bulk"
        );
        assert_eq!(bulk.consumer_name(), "lane-anonymous-bulk");

        // A name with a dot and a space is still one token.
        let shop = Lane::new(Some("shop max.in"), Priority::Interactive);
        assert_eq!(
            shop.subject(&kind),
            "jobs.requested.product-description.73686f70206d61782e696e.interactive"
        );
        assert_eq!(
            shop.consumer_name(),
            "lane-73686f70206d61782e696e-interactive"
        );
    }

    #[test]
    fn a_lane_consumer_reads_back_as_its_lane_and_weight() {
        let config = Config::default();
        let lane = Lane::new(Some("shopmax"), Priority::Bulk);
        let share = Share {
            weight: 3,
            max_concurrency: Some(4),
        };
        let wanted = consumer_config(&config, &lane, share);
        assert_eq!(
            wanted.filter_subject,
            "jobs.requested.*.73686f706d6178.bulk"
        );
        // A bulk lane's messages may wait in a batch: the cap is not its ack limit, only
        // the interactive lane's.
        assert_eq!(wanted.max_ack_pending, config.generator.max_ack_pending);
        let interactive = Lane::new(Some("shopmax"), Priority::Interactive);
        assert_eq!(
            consumer_config(&config, &interactive, share).max_ack_pending,
            4
        );
        let info: consumer::Info = serde_json::from_value(serde_json::json!({
            "stream_name": "JOBS",
            "name": wanted.durable_name.clone().expect("durable"),
            "created": "2026-12-06T00:00:00Z",
            "config": {"metadata": wanted.metadata, "ack_policy": "explicit", "deliver_policy": "all"},
            "delivered": {"consumer_seq": 0, "stream_seq": 0},
            "ack_floor": {"consumer_seq": 0, "stream_seq": 0},
            "num_ack_pending": 0,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": 0,
            "ts": "2026-12-06T00:00:00Z"
        }))
        .expect("a consumer info");
        assert_eq!(lane_of(&info), Some((lane, share)));
    }
}
