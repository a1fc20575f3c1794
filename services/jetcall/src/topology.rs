//! Creates or updates the JetStream topology every service relies on. Idempotent and safe to
//! run from many processes at once: each service runs it at start-up.
//!
//! Every service creates whatever is missing, from its own configuration, so any start order
//! works. But an existing consumer is changed only by the service whose configuration owns
//! it ([`Provisioner`]): services started with different configurations (a tuned
//! `generator.max_ack_pending` on the generators' hosts only, a key's new weight on the
//! gateways only) then do not undo each other's settings whichever starts last.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::budget::{self, Budgets};
use crate::config::Config;
use crate::lanes;
use crate::store::StatusStore;
use crate::subjects::{
    CALLBACK_CONSUMER, Event, GENERATOR_CONSUMER, LIMITS_BUCKET, STATUS_BUCKET, STREAM,
    STREAM_SUBJECTS,
};

#[derive(Debug, thiserror::Error)]
#[error("could not provision {what}: {message}")]
pub struct TopologyError {
    pub what: &'static str,
    pub message: String,
}

fn failed(what: &'static str) -> impl FnOnce(String) -> TopologyError {
    move |message| TopologyError { what, message }
}

/// Which service provisions, and so which consumer settings its configuration decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioner {
    /// The lanes: which exist, and each key's weight and `max_concurrency`.
    Gateway,
    /// The `generator` consumer, and every lane's `ack_wait` and `max_ack_pending` (a key's
    /// cap aside): the generators are who pull them.
    Generator,
    /// The `callback` consumer.
    Callback,
    /// `jetcall topology` and test set-ups: everything, from one configuration.
    Operator,
}

impl Provisioner {
    /// The NATS client name a service connects as.
    pub fn client_name(self) -> &'static str {
        match self {
            Provisioner::Gateway => "jetcall-gateway",
            Provisioner::Generator => "jetcall-generator",
            Provisioner::Callback => "jetcall-callback",
            Provisioner::Operator => "jetcall",
        }
    }

    fn owns_generator_consumer(self) -> bool {
        matches!(self, Provisioner::Generator | Provisioner::Operator)
    }

    fn owns_callback_consumer(self) -> bool {
        matches!(self, Provisioner::Callback | Provisioner::Operator)
    }

    fn owns_lanes(self) -> bool {
        matches!(self, Provisioner::Gateway | Provisioner::Operator)
    }
}

/// Handles on what `provision` created.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jetstream: jetstream::Context,
    pub stream: stream::Stream,
    pub status: StatusStore,
    /// The generator instances' shared rate-limit budgets.
    pub limits: kv::Store,
    /// The tenants' spending counters.
    pub budgets: Budgets,
}

impl Topology {
    pub async fn generator_consumer(&self) -> Result<consumer::PullConsumer, TopologyError> {
        self.stream
            .get_consumer(GENERATOR_CONSUMER)
            .await
            .map_err(|err| failed("consumer `generator`")(err.to_string()))
    }

    pub async fn callback_consumer(&self) -> Result<consumer::PullConsumer, TopologyError> {
        self.stream
            .get_consumer(CALLBACK_CONSUMER)
            .await
            .map_err(|err| failed("consumer `callback`")(err.to_string()))
    }
}

pub fn stream_config(config: &Config) -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        description: Some(
            "Jetcall job events: requested, completed, failed, delivered, undeliverable".into(),
        ),
        subjects: vec![STREAM_SUBJECTS.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: config.nats.max_age,
        duplicate_window: config.nats.duplicate_window,
        num_replicas: config.nats.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

pub fn status_bucket_config(config: &Config) -> kv::Config {
    kv::Config {
        bucket: STATUS_BUCKET.into(),
        description: "Jetcall job status documents, keyed by job id".into(),
        // Enough revisions for `nats kv history` to show every transition of a normal job.
        history: 10,
        max_age: config.nats.max_age,
        storage: stream::StorageType::File,
        num_replicas: config.nats.replicas,
        ..Default::default()
    }
}

pub fn limits_bucket_config(config: &Config) -> kv::Config {
    kv::Config {
        bucket: LIMITS_BUCKET.into(),
        description: "Jetcall LLM rate-limit budgets shared by every generator instance".into(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: config.nats.replicas,
        ..Default::default()
    }
}

pub fn generator_consumer_config(config: &Config) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(GENERATOR_CONSUMER.into()),
        description: Some(
            "The default lane (requests without a tenant or priority), shared by every generator instance"
                .into(),
        ),
        // Not `jobs.requested.>`: the other lanes' requests are their own consumers'.
        filter_subject: Event::Requested.kinds_only(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.generator.ack_wait,
        // Attempts are counted and capped by the generator itself, which fails the job cleanly;
        // a server-side cap would drop it silently.
        max_deliver: -1,
        max_ack_pending: config.generator.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

pub fn callback_consumer_config(config: &Config) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CALLBACK_CONSUMER.into()),
        description: Some("Shared by every callback instance".into()),
        filter_subjects: Event::FINISHED.map(Event::filter).to_vec(),
        ack_policy: consumer::AckPolicy::Explicit,
        // One attempt's timeout plus room for the status writes around it; long attempts also
        // send progress acks.
        ack_wait: (config.callback.timeout * 2).max(Duration::from_secs(30)),
        max_deliver: -1,
        max_ack_pending: config.callback.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// Creates the streams, the buckets, both consumers and the lanes of the configuration's
/// keys (`jetcall::lanes`), and brings to this configuration what `by` owns of those that
/// exist. A lane of a key no longer configured is left as it is: jobs may still wait in it.
pub async fn provision(
    client: async_nats::Client,
    config: &Config,
    by: Provisioner,
) -> Result<Topology, TopologyError> {
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(config.nats.request_timeout)
        .build(client);

    jetstream
        .create_or_update_stream(stream_config(config))
        .await
        .map_err(|err| failed("stream `JOBS`")(err.to_string()))?;
    let stream = jetstream
        .get_stream(STREAM)
        .await
        .map_err(|err| failed("stream `JOBS`")(err.to_string()))?;
    jetstream
        .create_or_update_stream(budget::stream_config(config))
        .await
        .map_err(|err| failed("stream `BUDGETS`")(err.to_string()))?;
    let kv = jetstream
        .create_or_update_key_value(status_bucket_config(config))
        .await
        .map_err(|err| failed("bucket `job_status`")(err.to_string()))?;
    let limits = jetstream
        .create_or_update_key_value(limits_bucket_config(config))
        .await
        .map_err(|err| failed("bucket `llm_limits`")(err.to_string()))?;

    let generator = put_consumer(
        &stream,
        generator_consumer_config(config),
        by.owns_generator_consumer(),
    )
    .await
    .map_err(failed("consumer `generator`"))?;
    put_consumer(
        &stream,
        callback_consumer_config(config),
        by.owns_callback_consumer(),
    )
    .await
    .map_err(failed("consumer `callback`"))?;
    // A lane's ack settings are the `generator` consumer's as it is, whoever set them.
    let mut lane_base = generator_consumer_config(config);
    lane_base.ack_wait = generator.ack_wait;
    lane_base.max_ack_pending = generator.max_ack_pending;
    for (lane, share) in lanes::configured(config) {
        put_consumer(
            &stream,
            lanes::consumer_config_on(lane_base.clone(), &lane, share),
            by.owns_lanes(),
        )
        .await
        .map_err(|err| failed("a lane consumer")(format!("{}: {err}", lane.consumer_name())))?;
    }
    if by.owns_generator_consumer() {
        align_lane_acks(&stream, &lane_base).await?;
    }

    Ok(Topology {
        budgets: Budgets::new(jetstream.clone()),
        jetstream,
        stream,
        status: StatusStore::new(kv),
        limits,
    })
}

/// Creates the consumer `wanted` names, or, when `owned`, brings an existing one to `wanted`
/// (the server's create is create-or-update); an existing one not `owned` is left as it is.
/// Returns the consumer's configuration as it then is.
async fn put_consumer(
    stream: &stream::Stream,
    wanted: consumer::pull::Config,
    owned: bool,
) -> Result<consumer::Config, String> {
    if owned {
        let created = stream
            .create_consumer(wanted)
            .await
            .map_err(|err| err.to_string())?;
        return Ok(created.cached_info().config.clone());
    }
    let name = wanted.durable_name.clone().unwrap_or_default();
    match stream.create_consumer_strict(wanted).await {
        Ok(created) => Ok(created.cached_info().config.clone()),
        Err(err) if err.kind() == consumer_exists() => stream
            .consumer_info(&name)
            .await
            .map(|info| info.config)
            .map_err(|err| err.to_string()),
        Err(err) => Err(err.to_string()),
    }
}

fn consumer_exists() -> stream::ConsumerCreateStrictErrorKind {
    stream::ConsumerCreateStrictErrorKind::AlreadyExists
}

/// Gives every lane on the stream, configured here or not, the ack settings of `base` (the
/// `generator` consumer's), keeping what its key decides (`lanes::lane_of`).
async fn align_lane_acks(
    stream: &stream::Stream,
    base: &consumer::pull::Config,
) -> Result<(), TopologyError> {
    use futures::StreamExt as _;
    let mut listing = stream.consumers();
    let mut misaligned = Vec::new();
    while let Some(info) = listing.next().await {
        let info = info.map_err(|err| failed("the lanes")(err.to_string()))?;
        let Some((lane, share)) = lanes::lane_of(&info).filter(|(lane, _)| !lane.is_default())
        else {
            continue;
        };
        let wanted = lanes::consumer_config_on(base.clone(), &lane, share);
        if info.config.ack_wait != wanted.ack_wait
            || info.config.max_ack_pending != wanted.max_ack_pending
        {
            misaligned.push(wanted);
        }
    }
    for wanted in misaligned {
        stream
            .create_consumer(wanted)
            .await
            .map_err(|err| failed("a lane consumer")(err.to_string()))?;
    }
    Ok(())
}

/// Finds the stream, the buckets and both consumers as an operator created them, creating and
/// changing nothing: for a service whose NATS user may use the topology but not define it
/// (`nats.provision = false`). Fails while any part is missing.
pub async fn attach(
    client: async_nats::Client,
    config: &Config,
) -> Result<Topology, TopologyError> {
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(config.nats.request_timeout)
        .build(client);
    let stream = jetstream
        .get_stream(STREAM)
        .await
        .map_err(|err| failed("stream `JOBS`")(err.to_string()))?;
    let kv = jetstream
        .get_key_value(STATUS_BUCKET)
        .await
        .map_err(|err| failed("bucket `job_status`")(err.to_string()))?;
    let limits = jetstream
        .get_key_value(LIMITS_BUCKET)
        .await
        .map_err(|err| failed("bucket `llm_limits`")(err.to_string()))?;
    jetstream
        .get_stream(budget::STREAM)
        .await
        .map_err(|err| failed("stream `BUDGETS`")(err.to_string()))?;
    let topology = Topology {
        budgets: Budgets::new(jetstream.clone()),
        jetstream,
        stream,
        status: StatusStore::new(kv),
        limits,
    };
    // Both consumers, whichever service this is: a service that starts while the operator is
    // still creating the topology waits for all of it.
    topology.generator_consumer().await?;
    topology.callback_consumer().await?;
    for (lane, _) in lanes::configured(config) {
        topology
            .stream
            .get_consumer::<consumer::pull::Config>(&lane.consumer_name())
            .await
            .map_err(|err| {
                failed("a lane consumer")(format!(
                    "{} (run `jetcall topology` with the gateway's keys): {err}",
                    lane.consumer_name()
                ))
            })?;
    }
    Ok(topology)
}
