//! The callback service: consumes `jobs.completed.>` and `jobs.failed.>` through the shared
//! durable consumer `callback`, delivers each as a signed webhook, retries on the configured
//! schedule, and reports `jobs.delivered.<kind>` or `jobs.undeliverable.<kind>`.

pub mod deliver;
mod hosts;
mod worker;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::allowlist::Allowlist;
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
    #[error("invalid configuration: `gateway.callback_allowlist`: {0}")]
    Allowlist(#[from] jetcall::allowlist::AllowlistError),
    #[error("could not build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Topology(#[from] jetcall::topology::TopologyError),
    #[error(transparent)]
    Consume(#[from] jetcall::consume::ConsumeError),
}

/// Delivers until `shutdown` is cancelled. Attempts still waiting for an answer then are
/// abandoned and handed back to JetStream, so a dead receiver cannot delay a stop.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), CallbackError> {
    let secrets = config
        .callback
        .signing_secret
        .as_ref()
        .ok_or(CallbackError::MissingSigningSecret)?;
    let signer = Signer::from_secrets(secrets.to_vec().into_iter().map(|secret| secret.expose()))?;
    let allowlist = Allowlist::parse(&config.gateway.callback_allowlist)?;
    let sender = deliver::Sender::new(&config.callback, allowlist)?;
    let client = connect(&config, "jetcall-callback").await?;
    let topology = match provision_with_retry(&client, &config, &shutdown).await {
        Ok(topology) => topology,
        Err(ConnectError::Cancelled) => return Ok(()),
        Err(err) => return Err(err.into()),
    };
    let consumer = topology.callback_consumer().await?;
    let concurrency = config.callback.concurrency;
    let worker = Worker {
        destinations: Arc::new(hosts::Destinations::new(
            config.callback.per_host_concurrency,
        )),
        config: Arc::new(config),
        topology,
        sender,
        signer,
    };
    tracing::info!(
        concurrency,
        "callback consuming jobs.completed.> and jobs.failed.>"
    );
    consume(
        consumer,
        concurrency,
        None,
        shutdown,
        move |message, shutdown| {
            let worker = worker.clone();
            async move {
                match worker.handle(&message, &shutdown).await {
                    Ok(Step::Rejected(reason)) => {
                        tracing::error!(%reason, subject = %message.subject, "completion dropped")
                    }
                    Ok(step) => tracing::debug!(?step, "completion handled"),
                    Err(err) => tracing::warn!(error = %err, "completion left for redelivery"),
                }
            }
        },
    )
    .await?;
    let _ = client.flush().await;
    tracing::info!("callback stopped");
    Ok(())
}
