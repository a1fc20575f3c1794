//! The one error type at the HTTP edge: each case maps to a status and a stable `type` slug.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("request body must be JSON: send `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    InvalidField { field: String, message: String },
    #[error("`callback_url` {0}")]
    InvalidCallbackUrl(String),
    #[error("unknown job kind `{kind}`; known kinds: {known}")]
    UnknownKind { kind: String, known: String },
    #[error(
        "job {job_id} already exists with a different request; reuse a job id only to retry the same request"
    )]
    Conflict { job_id: String },
    #[error("`jobs` is empty; send 1 to {max} jobs")]
    BatchEmpty { max: usize },
    #[error("`jobs` holds {count} jobs; send at most {max} in one batch")]
    BatchTooLarge { count: usize, max: usize },
    #[error("job {job_id} already appears at index {first} of this batch; send each job once")]
    DuplicateInBatch { job_id: String, first: usize },
    #[error("{0}")]
    NotFound(String),
    #[error("job {job_id} is {status}; only undeliverable jobs can be redelivered")]
    NotRedeliverable {
        job_id: String,
        status: &'static str,
    },
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error(
        "NATS JetStream is unavailable, so the job was not accepted; retry with the same job_id ({0})"
    )]
    Unavailable(String),
}

impl ApiError {
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidField { .. }
            | Self::InvalidCallbackUrl(_)
            | Self::UnknownKind { .. }
            | Self::BatchEmpty { .. }
            | Self::BatchTooLarge { .. }
            | Self::DuplicateInBatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict { .. } | Self::NotRedeliverable { .. } => StatusCode::CONFLICT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable slug a program can switch on.
    pub fn slug(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::InvalidField { .. } => "invalid_field",
            Self::InvalidCallbackUrl(_) => "invalid_callback_url",
            Self::UnknownKind { .. } => "unknown_kind",
            Self::Conflict { .. } => "job_conflict",
            Self::BatchEmpty { .. } => "batch_empty",
            Self::BatchTooLarge { .. } => "batch_too_large",
            Self::DuplicateInBatch { .. } => "duplicate_in_batch",
            Self::NotFound(_) => "not_found",
            Self::NotRedeliverable { .. } => "not_undeliverable",
            Self::Unauthorized => "unauthorized",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable(_) => "unavailable",
        }
    }

    /// The JSON an error is answered with: `{"type", "message", "field"?}`. A batch reports
    /// each rejected job with the same object.
    pub fn body(&self) -> Value {
        let mut body = json!({"type": self.slug(), "message": self.to_string()});
        match self {
            Self::InvalidField { field, .. } => body["field"] = json!(field),
            Self::InvalidCallbackUrl(_) => body["field"] = json!("callback_url"),
            Self::UnknownKind { .. } => body["field"] = json!("kind"),
            Self::BatchEmpty { .. } | Self::BatchTooLarge { .. } => body["field"] = json!("jobs"),
            Self::DuplicateInBatch { .. } => body["field"] = json!("job_id"),
            _ => {}
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
