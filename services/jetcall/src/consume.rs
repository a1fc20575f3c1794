//! The pull loop every consuming service shares: take a permit, take a message, spawn its
//! handler; on shutdown stop pulling and wait for the handlers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream;
use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::gate::{Admission, Gate};

#[derive(Debug, thiserror::Error)]
#[error("could not start pulling from consumer: {0}")]
pub struct ConsumeError(String);

/// Pulls until `shutdown`, running `handle` for each message with at most `concurrency` in
/// flight. A permit is taken before a message, so a message never waits in our memory for a
/// free slot while its ack timer runs. Handlers get the shutdown token: they finish quickly or
/// hand their message back. They hear of shutdown only once the pull has stopped, so a message
/// they hand back is redelivered to another instance, not into this one's closing pull.
///
/// While `gate` is closed nothing is pulled: the open pull request is dropped (messages it had
/// fetched are handed back at once; one still on its way returns after `ack_wait`), and each
/// probe the gate admits fetches a single message.
pub async fn consume<H, Fut>(
    consumer: PullConsumer,
    concurrency: usize,
    gate: Option<Gate>,
    shutdown: CancellationToken,
    handle: H,
) -> Result<(), ConsumeError>
where
    H: Fn(Message, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handlers_stop = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut messages = Some(pull(&consumer, concurrency).await?);
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let admission = match &gate {
            Some(gate) => {
                if !gate.is_open()
                    && let Some(stream) = messages.take()
                {
                    hand_back_fetched(stream).await;
                }
                tokio::select! {
                    admission = gate.admit() => admission,
                    _ = shutdown.cancelled() => break,
                }
            }
            None => Admission::Open,
        };
        let next: Pulled = match admission {
            Admission::Probe => tokio::select! {
                next = probe(&consumer) => next,
                _ = shutdown.cancelled() => break,
            },
            Admission::Open => {
                if messages.is_none() {
                    match pull(&consumer, concurrency).await {
                        Ok(stream) => messages = Some(stream),
                        Err(err) => {
                            // NATS may be down (a restart): keep trying, never give up.
                            tracing::warn!(error = %err, "starting a pull");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                                _ = shutdown.cancelled() => break,
                            }
                        }
                    }
                }
                let Some(stream) = messages.as_mut() else {
                    continue;
                };
                tokio::select! {
                    next = stream.next() => next.map(|next| next.map_err(Into::into)),
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let mut message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                // Missed heartbeats (a NATS restart, a pull the server no longer knows) land
                // here: start a fresh pull rather than trust this one to recover.
                tracing::warn!(error = %err, "pulling messages");
                messages = None;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
            None if admission == Admission::Probe => continue,
            None => break,
        };
        // The payload is a slice of the connection's 64 KiB read buffer, which stays allocated
        // while any message read into it lives: a job held for a 2 s LLM call pinned all the
        // traffic read meanwhile. Its own copy frees the buffer at once.
        message.message.payload = bytes::Bytes::copy_from_slice(&message.payload);
        // `map`, not an async block awaiting `work`: such a block would hold the future twice
        // (captured, then moved into the await), doubling every task's size.
        let work = handle(message, handlers_stop.clone());
        tasks.spawn(work.map(move |()| drop(permit)));
    }
    drop(messages);
    handlers_stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Stops a pull, first handing back at once the messages it has already fetched, so they
/// do not sit out `ack_wait` unseen.
async fn hand_back_fetched(mut stream: Stream) {
    while let Some(Some(Ok(message))) = stream.next().now_or_never() {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

async fn pull(consumer: &PullConsumer, concurrency: usize) -> Result<Stream, ConsumeError> {
    consumer
        .stream()
        .max_messages_per_batch(concurrency.min(256))
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|err| ConsumeError(err.to_string()))
}

type Pulled = Option<Result<Message, Box<dyn std::error::Error + Send + Sync>>>;

/// One message for a probe, or `None` when there is no work to probe with yet.
async fn probe(consumer: &PullConsumer) -> Pulled {
    let batch = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await;
    match batch {
        Ok(mut batch) => batch.next().await,
        Err(err) => Some(Err(err.into())),
    }
}
