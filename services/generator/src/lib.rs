//! The generator: consumes `jobs.requested.>` through the lanes' durable consumers (the
//! default lane's is `generator`), taking from them fairly between tenants (`fair`), calls
//! the LLM, records the outcome and publishes `jobs.completed.<kind>` or
//! `jobs.failed.<kind>` (or `jobs.expired.<kind>` for a job not started in time). A call for
//! a job cancelled meanwhile is abandoned.

mod batch;
mod cancellations;
pub mod caps;
mod fair;
mod gate_report;
pub mod limiter;
mod metrics;
mod output;
pub mod provider;
mod worker;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::admin::Admin;
use jetcall::connect::{ConnectError, start};
use jetcall::consume::consume;
use jetcall::gate::Gate;
use jetcall::topology::Provisioner;

use limiter::{Limiter, Rates};

pub use provider::Provider;
pub use worker::{Step, Worker};

#[derive(Debug, thiserror::Error)]
pub enum GeneratorError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Provider(#[from] provider::ProviderSetupError),
    #[error(transparent)]
    Topology(#[from] jetcall::topology::TopologyError),
    #[error(transparent)]
    Consume(#[from] jetcall::consume::ConsumeError),
    #[error(transparent)]
    Limiter(#[from] limiter::LimiterError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Generates until `shutdown` is cancelled, then finishes or hands back in-flight jobs.
/// `/healthz`, `/readyz` and `/metrics` are served on `listener`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GeneratorError> {
    let provider = Provider::from_config(&config)?;
    match (&provider, config.generator.provider) {
        (Provider::Offline(_), jetcall::config::ProviderChoice::Auto) => tracing::info!(
            "no ANTHROPIC_API_KEY: using the offline template writer (generator.provider = auto)"
        ),
        _ => tracing::info!(provider = provider.name(), "LLM provider chosen"),
    }
    let Some((client, topology)) = start(&config, Provisioner::Generator, &shutdown).await? else {
        return Ok(());
    };
    let consumer = topology.generator_consumer().await?;
    let concurrency = config.generator.concurrency;
    let limiter = match provider {
        Provider::Offline(_) => None,
        _ => Some(
            Limiter::start(
                topology.limits.clone(),
                provider.name(),
                Rates {
                    requests_per_minute: config.generator.requests_per_minute,
                    tokens_per_minute: config.generator.tokens_per_minute,
                },
                shutdown.clone(),
            )
            .await?,
        ),
    };
    let gate = Gate::new(config.generator.probe_interval);
    let metrics = metrics::Metrics::new(consumer.clone());
    tracing::info!(address = %listener.local_addr()?, "generator health and metrics listening");
    let server = Admin::new(client.clone(), metrics.lag(), Arc::new(metrics.clone()))
        .with_gate(gate.clone())
        .spawn(listener, shutdown.clone());
    let settle_failures = metrics.settle_failures();
    // Unique per process: a restarted generator must not pass for the one that died.
    let instance = format!("generator-{:016x}", rand::random::<u64>());
    tokio::spawn(gate_report::report(
        gate.clone(),
        topology.limits.clone(),
        instance.clone(),
        shutdown.clone(),
    ));
    let cancellations = Arc::new(cancellations::Cancellations::default());
    tokio::spawn(cancellations::listen(
        client.clone(),
        topology.status.clone(),
        cancellations.clone(),
        shutdown.clone(),
    ));
    // With batches switched off, batches already sent are still polled to the end: their
    // jobs' requests are acked, and only a poller brings their outcomes.
    let batches = match (&provider, &config.anthropic.api_key) {
        (Provider::Anthropic(_), Some(key)) => {
            let api = provider::batches::BatchesApi::new(&config.anthropic, key)?;
            let records = jetcall::batches::BatchRecords::new(topology.status.clone());
            Some(Arc::new(batch::Batches::new(api, records)))
        }
        _ => None,
    };
    let caps = caps::Caps::new(
        topology.limits.clone(),
        &instance,
        worker::lease_length(&config),
    );
    // Shared, not cloned per message: a Topology clone copies cached stream info.
    let worker = Arc::new(Worker {
        config: Arc::new(config),
        topology,
        provider,
        gate: gate.clone(),
        limiter,
        metrics,
        instance,
        cancellations,
        caps: caps.clone(),
        batches,
        batch_intake: std::sync::OnceLock::new(),
    });
    if worker.batches.is_some() {
        batch::start_poller(worker.clone(), shutdown.clone());
        if worker.config.generator.batches {
            let intake = batch::start_gatherer(worker.clone(), shutdown.clone());
            let _ = worker.batch_intake.set(intake);
            tracing::info!("bulk jobs go through the Message Batches API");
        }
    }
    tracing::info!(
        concurrency,
        "generator consuming jobs.requested.>, lane by lane"
    );
    let lanes = fair::Lanes::start(
        worker.topology.stream.clone(),
        concurrency,
        worker.config.generator.lane_refresh,
        caps,
        worker.batch_intake.get().is_some(),
        worker.metrics.clone(),
    )
    .await?;
    consume(
        lanes,
        concurrency,
        Some(gate),
        settle_failures,
        shutdown,
        move |message, shutdown| {
            let worker = worker.clone();
            // The worker logs how each request ended, within the job's span.
            // `consume` settles the message as its step says; an error settles nothing.
            async move {
                let handled = worker.handle(&message, &shutdown).await;
                (message, handled.ok().and_then(|step| step.settle()))
            }
        },
    )
    .await?;
    server.stop().await?;
    tracing::info!("generator stopped");
    Ok(())
}
