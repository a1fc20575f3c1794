//! The JetStream topology as the configuration wants it, compared with what the server holds:
//! the `JOBS` stream, its two durable consumers and the two KV buckets. Creating and updating
//! is `jetcall::topology::provision`, the same code every service runs at start-up.

use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::context::{
    ConsumerInfoErrorKind, GetStreamError, GetStreamErrorKind, KeyValueErrorKind,
};
use async_nats::jetstream::{self, ErrorCode, consumer, kv, stream};

use jetcall::Config;
use jetcall::budget;
use jetcall::lanes;
use jetcall::subjects::{
    CALLBACK_CONSUMER, GENERATOR_CONSUMER, LIMITS_BUCKET, STATUS_BUCKET, STREAM,
};
use jetcall::topology as wanted;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("configuration file {0} does not exist (--config)")]
    MissingConfig(std::path::PathBuf),
    #[error(transparent)]
    Config(#[from] jetcall::config::ConfigError),
    #[error("could not reach NATS at {url} (nats.url, NATS_URL): {message}")]
    Unreachable { url: String, message: String },
    #[error("could not read {what} `{name}`: {message}")]
    Read {
        what: &'static str,
        name: String,
        message: String,
    },
    #[error(transparent)]
    Provision(#[from] jetcall::topology::TopologyError),
}

/// How one part of the topology compares with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Missing,
    AsConfigured,
    /// Each entry: `field is X, configured Y`.
    Differs(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// `stream`, `consumer` or `bucket`.
    pub what: &'static str,
    pub name: String,
    pub state: State,
}

/// The configuration from `path`, or from where the services find it (JETCALL_CONFIG or
/// ./jetcall.toml); environment variables apply either way.
pub fn load_config(path: Option<&Path>) -> Result<Config, TopologyError> {
    match path {
        Some(path) if !path.exists() => Err(TopologyError::MissingConfig(path.to_owned())),
        Some(path) => Ok(Config::from_figment(Config::figment(path))?),
        None => Ok(Config::load()?),
    }
}

/// Connects once, without the services' patient retrying: a CLI says at once that NATS is
/// not there.
pub async fn connect(config: &Config) -> Result<async_nats::Client, TopologyError> {
    // The services' options (credentials, TLS, request timeout) without their retrying.
    jetcall::connect::options(config)
        .name("jetcall-cli")
        .connection_timeout(Duration::from_secs(5))
        .connect(jetcall::connect::servers(&config.nats.url))
        .await
        .map_err(|err| TopologyError::Unreachable {
            url: config.nats.url.clone(),
            message: err.to_string(),
        })
}

pub fn context(client: async_nats::Client, config: &Config) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.nats.request_timeout)
        .build(client)
}

/// Creates what is missing and updates what differs.
pub async fn provision(client: async_nats::Client, config: &Config) -> Result<(), TopologyError> {
    wanted::provision(client, config, wanted::Provisioner::Operator).await?;
    Ok(())
}

/// Every part of the topology, compared with `config`.
pub async fn inspect(js: &jetstream::Context, config: &Config) -> Result<Vec<Part>, TopologyError> {
    let read = |what: &'static str, name: &str| {
        let name = name.to_owned();
        move |message: String| TopologyError::Read {
            what,
            name,
            message,
        }
    };
    let mut parts = Vec::with_capacity(6);

    let stream = match js.get_stream(STREAM).await {
        Ok(stream) => Some(stream),
        Err(err) if stream_not_found(&err) => None,
        Err(err) => return Err(read("stream", STREAM)(err.to_string())),
    };
    parts.push(Part {
        what: "stream",
        name: STREAM.to_owned(),
        state: match &stream {
            Some(stream) => {
                compare_stream(&stream.cached_info().config, &wanted::stream_config(config))
            }
            None => State::Missing,
        },
    });

    let budgets = match js.get_stream(budget::STREAM).await {
        Ok(budgets) => compare_stream(
            &budgets.cached_info().config,
            &budget::stream_config(config),
        ),
        Err(err) if stream_not_found(&err) => State::Missing,
        Err(err) => return Err(read("stream", budget::STREAM)(err.to_string())),
    };
    parts.push(Part {
        what: "stream",
        name: budget::STREAM.to_owned(),
        state: budgets,
    });

    let consumers = [
        (
            GENERATOR_CONSUMER.to_owned(),
            wanted::generator_consumer_config(config),
        ),
        (
            CALLBACK_CONSUMER.to_owned(),
            wanted::callback_consumer_config(config),
        ),
    ]
    .into_iter()
    .chain(lanes::configured(config).into_iter().map(|(lane, share)| {
        (
            lane.consumer_name(),
            lanes::consumer_config(config, &lane, share),
        )
    }));
    for (name, want) in consumers {
        let state = match &stream {
            None => State::Missing,
            Some(stream) => match stream.consumer_info(&name).await {
                Ok(info) => compare_consumer(&info.config, &want),
                Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => State::Missing,
                Err(err) => return Err(read("consumer", &name)(err.to_string())),
            },
        };
        parts.push(Part {
            what: "consumer",
            name,
            state,
        });
    }

    let buckets = [
        (STATUS_BUCKET, wanted::status_bucket_config(config)),
        (LIMITS_BUCKET, wanted::limits_bucket_config(config)),
    ];
    for (name, want) in buckets {
        let state = match js.get_key_value(name).await {
            Ok(store) => {
                let status = store
                    .status()
                    .await
                    .map_err(|err| read("bucket", name)(err.to_string()))?;
                compare_bucket(&status.info.config, &want)
            }
            Err(err) if err.kind() == KeyValueErrorKind::GetBucket && source_not_found(&err) => {
                State::Missing
            }
            Err(err) => return Err(read("bucket", name)(err.to_string())),
        };
        parts.push(Part {
            what: "bucket",
            name: name.to_owned(),
            state,
        });
    }
    Ok(parts)
}

fn stream_not_found(err: &GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// A bucket is a stream underneath; `get_key_value` reports its absence as the stream's.
fn source_not_found(err: &(dyn std::error::Error + 'static)) -> bool {
    err.source()
        .and_then(|source| source.downcast_ref::<GetStreamError>())
        .is_some_and(stream_not_found)
}

/// Collects the fields whose values differ, shown as `Debug` of their readable forms.
#[derive(Default)]
struct Differences(Vec<String>);

impl Differences {
    fn field<T: PartialEq + Debug>(&mut self, name: &str, have: T, want: T) {
        if have != want {
            self.0
                .push(format!("{name} is {have:?}, configured {want:?}"));
        }
    }

    fn duration(&mut self, name: &str, have: Duration, want: Duration) {
        if have != want {
            self.0.push(format!(
                "{name} is {}, configured {}",
                humantime::format_duration(have),
                humantime::format_duration(want)
            ));
        }
    }

    fn state(self) -> State {
        if self.0.is_empty() {
            State::AsConfigured
        } else {
            State::Differs(self.0)
        }
    }
}

fn compare_stream(have: &stream::Config, want: &stream::Config) -> State {
    let mut diff = Differences::default();
    diff.field("subjects", &have.subjects, &want.subjects);
    diff.field("storage", have.storage, want.storage);
    diff.field("retention", have.retention, want.retention);
    diff.duration("max_age", have.max_age, want.max_age);
    diff.duration(
        "duplicate_window",
        have.duplicate_window,
        want.duplicate_window,
    );
    diff.field("replicas", have.num_replicas, want.num_replicas);
    diff.field("allow_direct", have.allow_direct, want.allow_direct);
    diff.field(
        "allow_msg_counter",
        have.allow_message_counter,
        want.allow_message_counter,
    );
    diff.state()
}

fn compare_bucket(have: &stream::Config, want: &kv::Config) -> State {
    let mut diff = Differences::default();
    diff.field("history", have.max_messages_per_subject, want.history);
    diff.duration("max_age", have.max_age, want.max_age);
    diff.field("storage", have.storage, want.storage);
    diff.field("replicas", have.num_replicas, want.num_replicas);
    diff.state()
}

/// A consumer's metadata in a stable order, without the keys the server adds of its own
/// (`_nats.*`: the version that created it, and such).
fn sorted(metadata: &std::collections::HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut pairs: Vec<_> = metadata
        .iter()
        .filter(|(key, _)| !key.starts_with("_nats."))
        .collect();
    pairs.sort();
    pairs
}

fn compare_consumer(have: &consumer::Config, want: &consumer::pull::Config) -> State {
    let filters = |one: &str, many: &[String]| {
        let mut all: Vec<String> = many.to_vec();
        if !one.is_empty() {
            all.push(one.to_owned());
        }
        all.sort();
        all
    };
    let mut diff = Differences::default();
    diff.field(
        "filter subjects",
        filters(&have.filter_subject, &have.filter_subjects),
        filters(&want.filter_subject, &want.filter_subjects),
    );
    diff.field("ack_policy", have.ack_policy, want.ack_policy);
    diff.duration("ack_wait", have.ack_wait, want.ack_wait);
    diff.field("max_deliver", have.max_deliver, want.max_deliver);
    diff.field(
        "max_ack_pending",
        have.max_ack_pending,
        want.max_ack_pending,
    );
    diff.field("deliver_policy", have.deliver_policy, want.deliver_policy);
    diff.field("metadata", sorted(&have.metadata), sorted(&want.metadata));
    diff.state()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_figment(Config::builtin()).expect("default configuration")
    }

    #[test]
    fn a_stream_as_configured_has_no_differences() {
        let want = wanted::stream_config(&config());
        assert_eq!(compare_stream(&want, &want), State::AsConfigured);
    }

    #[test]
    fn differences_name_the_field_and_both_values() {
        let want = wanted::stream_config(&config());
        let mut have = want.clone();
        have.max_age = Duration::from_secs(3600);
        have.num_replicas = 3;
        assert_eq!(
            compare_stream(&have, &want),
            State::Differs(vec![
                "max_age is 1h, configured 7days".into(),
                "replicas is 3, configured 1".into(),
            ])
        );
    }

    #[test]
    fn a_consumer_s_filters_compare_as_a_set() {
        let want = wanted::callback_consumer_config(&config());
        let have = consumer::Config {
            durable_name: want.durable_name.clone(),
            filter_subjects: want.filter_subjects.iter().rev().cloned().collect(),
            ack_policy: want.ack_policy,
            ack_wait: want.ack_wait,
            max_deliver: want.max_deliver,
            max_ack_pending: want.max_ack_pending,
            deliver_policy: want.deliver_policy,
            ..Default::default()
        };
        assert_eq!(compare_consumer(&have, &want), State::AsConfigured);
    }
}
