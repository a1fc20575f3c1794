//! The callback service: consumes `jobs.completed.>` and `jobs.failed.>` through the shared
//! durable consumer `callback`, delivers each as a signed webhook, retries on the configured
//! schedule, and reports `jobs.delivered.<kind>` or `jobs.undeliverable.<kind>`.

pub mod deliver;
mod hosts;
mod metrics;
mod worker;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::admin::Admin;
use jetcall::connect::{ConnectError, start};
use jetcall::consume::{Pull, consume};
use jetcall::topology::Provisioner;

pub use hosts::BREAKER_THRESHOLD;
pub use worker::{Step, Worker};

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error(
        "invalid configuration: `callback.signing_secret` is required (a `whsec_<base64>` secret; several while rotating keys)"
    )]
    MissingSigningSecret,
    #[error("could not build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Topology(#[from] jetcall::topology::TopologyError),
    #[error(transparent)]
    Consume(#[from] jetcall::consume::ConsumeError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Delivers until `shutdown` is cancelled. Attempts still waiting for an answer then are
/// abandoned and handed back to JetStream, so a dead receiver cannot delay a stop.
/// `/healthz`, `/readyz` and `/metrics` are served on `listener`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CallbackError> {
    let signer = config
        .callback
        .signer()
        .ok_or(CallbackError::MissingSigningSecret)?;
    let senders = Arc::new(deliver::Senders::new(&config.callback, &config.gateway)?);
    let secrets_key = config.callback.secrets_key.clone();
    let Some((client, topology)) = start(&config, Provisioner::Callback, &shutdown).await? else {
        return Ok(());
    };
    let consumer = topology.callback_consumer().await?;
    let concurrency = config.callback.concurrency;
    let destinations = Arc::new(hosts::Destinations::new(
        config.callback.per_host_concurrency,
    ));
    let metrics = metrics::Metrics::new(consumer.clone(), destinations.clone());
    tracing::info!(address = %listener.local_addr()?, "callback health and metrics listening");
    let server = Admin::new(client.clone(), metrics.lag(), Arc::new(metrics.clone()))
        .spawn(listener, shutdown.clone());
    let settle_failures = metrics.settle_failures();
    // Shared, not cloned per message: a `Topology` clone copies NATS handles that each carry
    // their stream's whole info.
    let worker = Arc::new(Worker {
        destinations,
        config: Arc::new(config),
        topology,
        senders,
        secrets_key,
        signer,
        metrics,
    });
    tracing::info!(
        concurrency,
        "callback consuming jobs.completed.>, jobs.failed.>, jobs.cancelled.> and jobs.expired.>"
    );
    consume(
        Pull::start(consumer, concurrency).await?,
        concurrency,
        None,
        settle_failures,
        shutdown,
        move |message, shutdown| {
            let worker = worker.clone();
            // The worker logs how each completion ended, within the job's span.
            // `consume` settles the message as its step says; an error settles nothing.
            async move {
                let handled = worker.handle(&message, &shutdown).await;
                (message, handled.ok().map(|step| step.settle()))
            }
        },
    )
    .await?;
    server.stop().await?;
    tracing::info!("callback stopped");
    Ok(())
}
