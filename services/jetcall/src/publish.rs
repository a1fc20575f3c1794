//! Publishing an event and waiting for JetStream to store it.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, publish::PublishAck};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
#[error("could not publish to {subject}: {message}")]
pub struct PublishError {
    pub subject: String,
    pub message: String,
}

/// Publishes `event` as JSON with `Nats-Msg-Id: msg_id` and returns once JetStream has
/// acknowledged it (a duplicate within the window is acknowledged too, and stored once).
pub async fn publish_event<T: Serialize>(
    jetstream: &jetstream::Context,
    subject: String,
    msg_id: &str,
    event: &T,
) -> Result<(), PublishError> {
    publish_event_with_headers(jetstream, subject, msg_id, event, HeaderMap::new()).await
}

/// [`publish_event`] with `headers` on the message as well, such as a job's `traceparent`
/// (see [`crate::trace`]).
pub async fn publish_event_with_headers<T: Serialize>(
    jetstream: &jetstream::Context,
    subject: String,
    msg_id: &str,
    event: &T,
    headers: HeaderMap,
) -> Result<(), PublishError> {
    publish_event_acked(jetstream, subject, msg_id, event, headers)
        .await
        .map(drop)
}

/// [`publish_event_with_headers`], returning JetStream's ack: the stream sequence the event is
/// stored at (for a duplicate within the window, the sequence of the copy stored first).
pub async fn publish_event_acked<T: Serialize>(
    jetstream: &jetstream::Context,
    subject: String,
    msg_id: &str,
    event: &T,
    headers: HeaderMap,
) -> Result<PublishAck, PublishError> {
    let failed = |message: String| PublishError {
        subject: subject.clone(),
        message,
    };
    let payload = serde_json::to_vec(event).map_err(|err| failed(err.to_string()))?;
    // Headers first: `message_id` adds to them.
    let message = PublishMessage::build()
        .headers(headers)
        .payload(payload.into())
        .message_id(msg_id);
    jetstream
        .send_publish(subject.clone(), message)
        .await
        .map_err(|err| failed(err.to_string()))?
        .await
        .map_err(|err| failed(err.to_string()))
}
