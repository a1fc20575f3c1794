//! Publishing an event and waiting for JetStream to store it.

use async_nats::jetstream::{self, message::PublishMessage};
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
    let failed = |message: String| PublishError {
        subject: subject.clone(),
        message,
    };
    let payload = serde_json::to_vec(event).map_err(|err| failed(err.to_string()))?;
    let message = PublishMessage::build()
        .payload(payload.into())
        .message_id(msg_id);
    jetstream
        .send_publish(subject.clone(), message)
        .await
        .map_err(|err| failed(err.to_string()))?
        .await
        .map_err(|err| failed(err.to_string()))?;
    Ok(())
}
