//! The pull loop every consuming service shares: take a permit, take a message, spawn its
//! handler; on shutdown stop pulling and wait for the handlers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
#[error("could not start pulling from consumer: {0}")]
pub struct ConsumeError(String);

/// Pulls until `shutdown`, running `handle` for each message with at most `concurrency` in
/// flight. A permit is taken before a message, so a message never waits in our memory for a
/// free slot while its ack timer runs. Handlers get the shutdown token: they finish quickly or
/// hand their message back.
pub async fn consume<H, Fut>(
    consumer: PullConsumer,
    concurrency: usize,
    shutdown: CancellationToken,
    handle: H,
) -> Result<(), ConsumeError>
where
    H: Fn(Message, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency.min(256))
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|err| ConsumeError(err.to_string()))?;
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let next = tokio::select! {
            next = messages.next() => next,
            _ = shutdown.cancelled() => break,
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                // Missed heartbeats during a NATS restart land here; the stream recovers.
                tracing::warn!(error = %err, "pulling messages");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
            None => break,
        };
        let work = handle(message, shutdown.clone());
        tasks.spawn(async move {
            let _permit = permit;
            work.await;
        });
    }
    drop(messages);
    while tasks.join_next().await.is_some() {}
    Ok(())
}
