//! The pull loop every consuming service shares: take a permit, take a message, spawn its
//! handler, settle the message as the handler's step says; on shutdown stop pulling and wait
//! for the handlers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream;
use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::gate::{Admission, Gate};

#[derive(Debug, thiserror::Error)]
#[error("could not start pulling from consumer: {0}")]
pub struct ConsumeError(String);

impl ConsumeError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// How a consumed message is settled, from the step its handling reached. Handlers say which;
/// only [`consume`] tells JetStream. A handler that fails settles nothing (`None`): the
/// message comes back after `ack_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Finished with, whatever the job's outcome: acked.
    Done,
    /// Tried, to be tried again after this delay: a delayed NAK.
    RetryIn(Duration),
    /// Not tried, waiting for something else (a busy destination, another call's lease): a
    /// delayed NAK.
    Parked(Duration),
    /// Never to be processed: terminated, so it is not redelivered.
    Reject,
    /// Shutdown interrupted it: NAKed at once, for another instance.
    Interrupted,
}

impl Settle {
    /// What JetStream is told.
    pub fn ack_kind(self) -> AckKind {
        match self {
            Settle::Done => AckKind::Ack,
            Settle::RetryIn(delay) | Settle::Parked(delay) => AckKind::Nak(Some(delay)),
            Settle::Reject => AckKind::Term,
            Settle::Interrupted => AckKind::Nak(None),
        }
    }
}

/// Where [`consume`] takes messages from: one durable consumer ([`Pull`]), or the
/// generator's lanes, picked between fairly.
pub trait Source: Send {
    /// The next message while the gate is open. `None` ends the consumption. An error is
    /// logged by the caller, which waits a moment and asks again: the source starts afresh.
    fn next(&mut self) -> impl Future<Output = Pulled> + Send;
    /// One message for a probe of a closed gate, or `None` when there is no work to probe
    /// with yet.
    fn probe(&mut self) -> impl Future<Output = Pulled> + Send;
    /// The gate closed, or consumption ends: stop pulling, and hand back at once what was
    /// fetched but not taken.
    fn pause(&mut self) -> impl Future<Output = ()> + Send;
}

/// Pulls until `shutdown`, running `handle` for each message with at most `concurrency` in
/// flight. A permit is taken before a message, so a message never waits in our memory for a
/// free slot while its ack timer runs. Handlers get the shutdown token: they finish quickly or
/// hand their message back. They hear of shutdown only once the pull has stopped, so a message
/// they hand back is redelivered to another instance, not into this one's closing pull.
///
/// A handler gives its message back with how to settle it, and the message is settled here,
/// before its permit is returned; an ack, NAK or term that cannot be sent is logged and
/// counted in `settle_failures` (the message then comes back after `ack_wait`). Progress acks
/// (`AckKind::Progress`) are the handlers' own: they keep a message, they do not settle it.
///
/// While `gate` is closed nothing is pulled: the source is paused (messages it had fetched
/// are handed back at once; one still on its way returns after `ack_wait`), and each probe the
/// gate admits fetches a single message.
pub async fn consume<S, H, Fut>(
    mut source: S,
    concurrency: usize,
    gate: Option<Gate>,
    settle_failures: Counter,
    shutdown: CancellationToken,
    handle: H,
) -> Result<(), ConsumeError>
where
    S: Source,
    H: Fn(Message, CancellationToken) -> Fut,
    Fut: Future<Output = (Message, Option<Settle>)> + Send + 'static,
{
    let handlers_stop = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut paused = false;
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
                if !gate.is_open() && !paused {
                    source.pause().await;
                    paused = true;
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
                next = source.probe() => next,
                _ = shutdown.cancelled() => break,
            },
            Admission::Open => {
                paused = false;
                tokio::select! {
                    next = source.next() => next,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let mut message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                // Missed heartbeats (a NATS restart, a pull the server no longer knows) land
                // here: the source starts a fresh pull rather than trust this one to recover.
                tracing::warn!(error = %err, "pulling messages");
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
        // `then` and `map`, not an async block awaiting `work`: such a block would hold the
        // future twice (captured, then moved into the await), doubling every task's size.
        let work = handle(message, handlers_stop.clone());
        let failures = settle_failures.clone();
        tasks.spawn(
            work.then(move |(message, step)| settle(message, step, failures))
                .map(move |()| drop(permit)),
        );
    }
    // What was fetched and not started goes back now, for another instance, rather than
    // after its `ack_wait`.
    source.pause().await;
    drop(source);
    handlers_stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// One durable consumer, pulled in batches of up to `concurrency` (at most 256).
pub struct Pull {
    consumer: PullConsumer,
    batch: usize,
    messages: Option<Stream>,
}

impl std::fmt::Debug for Pull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pull")
            .field("batch", &self.batch)
            .field("pulling", &self.messages.is_some())
            .finish_non_exhaustive()
    }
}

impl Pull {
    /// Starts the first pull at once, so a consumer that cannot be pulled fails the start.
    pub async fn start(consumer: PullConsumer, concurrency: usize) -> Result<Self, ConsumeError> {
        let batch = concurrency.min(256);
        let messages = Some(pull(&consumer, batch).await?);
        Ok(Self {
            consumer,
            batch,
            messages,
        })
    }
}

impl Source for Pull {
    async fn next(&mut self) -> Pulled {
        if self.messages.is_none() {
            match pull(&self.consumer, self.batch).await {
                // NATS may be down (a restart): the caller keeps asking, never gives up.
                Err(err) => return Some(Err(Box::new(err))),
                Ok(stream) => self.messages = Some(stream),
            }
        }
        let stream = self.messages.as_mut()?;
        let next = stream.next().await.map(|next| next.map_err(Into::into));
        if matches!(next, Some(Err(_))) {
            self.messages = None;
        }
        next
    }

    async fn probe(&mut self) -> Pulled {
        probe(&self.consumer).await
    }

    async fn pause(&mut self) {
        if let Some(stream) = self.messages.take() {
            hand_back_fetched(stream).await;
        }
    }
}

/// Settles `message` as its handler's step says (nothing for `None`). A failure is counted
/// and logged: the message then comes back after `ack_wait`, to be handled again.
async fn settle(message: Message, step: Option<Settle>, failures: Counter) {
    let Some(step) = step else { return };
    if let Err(err) = message.ack_with(step.ack_kind()).await {
        failures.inc();
        tracing::warn!(
            error = %err,
            settle = ?step,
            subject = %message.subject,
            sequence = ?message.info().ok().map(|info| info.stream_sequence),
            "could not settle a message; it comes back after ack_wait"
        );
    }
}

/// Stops a pull, first handing back at once the messages it has already fetched, so they
/// do not sit out `ack_wait` unseen.
pub async fn hand_back_fetched(mut stream: Stream) {
    while let Some(Some(Ok(message))) = stream.next().now_or_never() {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// A pull of up to `batch` messages at a time, kept open.
pub async fn pull(consumer: &PullConsumer, batch: usize) -> Result<Stream, ConsumeError> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|err| ConsumeError(err.to_string()))
}

/// What a source gives: a message, an error to log, or `None` (see [`Source`]).
pub type Pulled = Option<Result<Message, Box<dyn std::error::Error + Send + Sync>>>;

/// One message for a probe, or `None` when there is no work to probe with yet.
pub async fn probe(consumer: &PullConsumer) -> Pulled {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes JetStream is sent: `AckKind` has no `PartialEq`.
    fn wire(kind: AckKind) -> bytes::Bytes {
        kind.into()
    }

    #[test]
    fn each_settle_sends_its_own_ack_kind() {
        let delay = Duration::from_millis(1500);
        let cases = [
            (Settle::Done, AckKind::Ack),
            (Settle::RetryIn(delay), AckKind::Nak(Some(delay))),
            (Settle::Parked(delay), AckKind::Nak(Some(delay))),
            (Settle::Reject, AckKind::Term),
            (Settle::Interrupted, AckKind::Nak(None)),
        ];
        for (settle, kind) in cases {
            assert_eq!(wire(settle.ack_kind()), wire(kind), "{settle:?}");
        }
    }

    /// A message with no reply subject cannot be acked: the failure is counted, not lost.
    #[tokio::test]
    async fn a_settle_that_cannot_be_sent_is_counted() {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("a client that connects in the background");
        let message = Message {
            message: async_nats::Message {
                subject: "jobs.requested.test".into(),
                reply: None,
                payload: bytes::Bytes::new(),
                headers: None,
                status: None,
                description: None,
                length: 0,
            },
            context: async_nats::jetstream::new(client),
        };
        let failures = Counter::default();
        settle(message.clone(), None, failures.clone()).await;
        assert_eq!(failures.get(), 0, "nothing to send, nothing failed");
        settle(message, Some(Settle::Done), failures.clone()).await;
        assert_eq!(failures.get(), 1);
    }
}
