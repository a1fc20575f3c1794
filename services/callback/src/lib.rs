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
use jetcall::connect::{ConnectError, connect, provision_with_retry};
use jetcall::consume::consume;
use jetcall::signing::Signer;

pub use hosts::BREAKER_THRESHOLD;
pub use worker::{Step, Worker};

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error(
        "invalid configuration: `callback.signing_secret` is required (a `whsec_<base64>` secret; several while rotating keys)"
    )]
    MissingSigningSecret,
    #[error("invalid configuration: `callback.signing_secret` {0}")]
    BadSigningSecret(#[from] jetcall::signing::SigningKeyError),
    #[error(transparent)]
    Senders(#[from] deliver::SendersError),
    #[error("invalid configuration: `callback.secrets_key` {0}")]
    SecretsKey(#[from] jetcall::sealing::SealingError),
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
    let secrets = config
        .callback
        .signing_secret
        .as_ref()
        .ok_or(CallbackError::MissingSigningSecret)?;
    let signer = Signer::from_secrets(secrets.to_vec().into_iter().map(|secret| secret.expose()))?;
    let senders = Arc::new(deliver::Senders::new(&config.callback, &config.gateway)?);
    let secrets_key = config
        .callback
        .secrets_key
        .as_ref()
        .map(jetcall::sealing::SecretsKey::parse)
        .transpose()?;
    let client = connect(&config, "jetcall-callback").await?;
    let topology = match provision_with_retry(&client, &config, &shutdown).await {
        Ok(topology) => topology,
        Err(ConnectError::Cancelled) => return Ok(()),
        Err(err) => return Err(err.into()),
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
        "callback consuming jobs.completed.> and jobs.failed.>"
    );
    consume(
        consumer,
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
    let _ = client.flush().await;
    if let Ok(served) = server.await {
        served?;
    }
    tracing::info!("callback stopped");
    Ok(())
}
