//! One pass over a stream, or over part of it, by an ordered consumer: the sweep, a
//! resubmission's look for its stored request, a listing, a window's redelivery and the
//! sweep's look at the status bucket all read this way.
//!
//! A pass ends at the end of the stream *as it was when the pass began*: the message after
//! which the server counts nothing pending, or the first one stored after the pass began,
//! whichever comes first. Writes made meanwhile are not waited for, so a busy stream cannot
//! keep a pass going for ever, and an empty stretch ends a pass at once instead of after a
//! timeout. A server that stops sending before that end is an error, never a silent end.

use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;
use time::OffsetDateTime;

use crate::durations::to_time;

/// A pass that receives nothing for this long before reaching its end gives up.
const STALL: Duration = Duration::from_secs(10);

/// How far a service's clock (a `created_at` it wrote) and the server's (a message's
/// `published`) may disagree: a look for what was published after a moment a service wrote
/// down starts this much earlier.
pub const CLOCK_SKEW_MARGIN: Duration = Duration::from_secs(60);

/// `at` (a service's clock) less [`CLOCK_SKEW_MARGIN`]: the earliest the server may have
/// stamped what was published then.
pub fn allowing_for_skew(at: OffsetDateTime) -> OffsetDateTime {
    at.checked_sub(to_time(CLOCK_SKEW_MARGIN))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The stream sequence of the message published with `Nats-Msg-Id: msg_id` on `filter` since
/// `since` (a service's clock), if there is one: proof that an event is stored, for a
/// republish that would otherwise be stored twice once the duplicate window has passed. Reads
/// headers only.
pub async fn find_msg_id(
    stream: &Stream,
    filter: String,
    since: OffsetDateTime,
    msg_id: &str,
) -> Result<Option<u64>, ScanError> {
    let mut scan = Scan::open(
        stream,
        OrderedConfig {
            filter_subject: filter,
            headers_only: true,
            deliver_policy: DeliverPolicy::ByStartTime {
                start_time: allowing_for_skew(since),
            },
            ..Default::default()
        },
    )
    .await?;
    while let Some(scanned) = scan.next().await? {
        let found = scanned
            .message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(NATS_MESSAGE_ID))
            .is_some_and(|id| id.as_str() == msg_id);
        if found {
            return Ok(Some(scanned.stream_sequence));
        }
    }
    Ok(None)
}

#[derive(Debug, thiserror::Error)]
#[error("reading stream `{stream}`: {message}")]
pub struct ScanError {
    stream: String,
    message: String,
}

/// A message of a pass with what the server said of it.
#[derive(Debug)]
pub struct Scanned {
    pub message: jetstream::Message,
    pub stream_sequence: u64,
    pub published: time::OffsetDateTime,
}

pub struct Scan {
    stream_name: String,
    messages: Option<Ordered>,
    last_sequence: u64,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("stream", &self.stream_name)
            .field("last_sequence", &self.last_sequence)
            .field("ended", &self.messages.is_none())
            .finish()
    }
}

impl Scan {
    /// Opens a pass over what `config` selects, up to the stream's current last message.
    pub async fn open(stream: &Stream, config: OrderedConfig) -> Result<Self, ScanError> {
        let stream_name = stream.cached_info().config.name.clone();
        let failed = |err: &dyn std::fmt::Display| ScanError {
            stream: stream_name.clone(),
            message: err.to_string(),
        };
        let last_sequence = stream
            .get_info()
            .await
            .map_err(|err| failed(&err))?
            .state
            .last_sequence;
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|err| failed(&err))?;
        let messages = if consumer.cached_info().num_pending == 0 {
            None
        } else {
            Some(consumer.messages().await.map_err(|err| failed(&err))?)
        };
        Ok(Self {
            stream_name,
            messages,
            last_sequence,
        })
    }

    /// The next message of the pass, or `None` at its end.
    pub async fn next(&mut self) -> Result<Option<Scanned>, ScanError> {
        let Some(messages) = self.messages.as_mut() else {
            return Ok(None);
        };
        let message = match tokio::time::timeout(STALL, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(err))) => return Err(self.failed(err.to_string())),
            Ok(None) => return Err(self.failed("the consumer ended before the end of the stream")),
            Err(_) => {
                return Err(self.failed(format!(
                    "nothing received for {STALL:?} before the end of the stream"
                )));
            }
        };
        let info = message.info().map_err(|err| self.failed(err.to_string()))?;
        let (stream_sequence, published, pending) =
            (info.stream_sequence, info.published, info.pending);
        if pending == 0 || stream_sequence >= self.last_sequence {
            self.messages = None;
        }
        Ok(Some(Scanned {
            message,
            stream_sequence,
            published,
        }))
    }

    fn failed(&self, message: impl Into<String>) -> ScanError {
        ScanError {
            stream: self.stream_name.clone(),
            message: message.into(),
        }
    }
}
