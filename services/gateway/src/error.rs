//! The one error type at the HTTP edge: each case maps to a status and a stable `type` slug.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("request body must be JSON: send `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error(
        "the request body did not arrive within {} s; send it at once",
        timeout.as_secs_f32()
    )]
    BodyTimeout { timeout: std::time::Duration },
    #[error("the job is larger than the limit of {limit} bytes for one job, encoded")]
    JobTooLarge { limit: usize },
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
    #[error("job {job_id} is {}; only a job not yet generated can be cancelled", status.as_str())]
    NotCancellable {
        job_id: String,
        status: jetcall::status::Status,
    },
    #[error(
        "the {} budget of API key `{tenant}` (${}) has no room for this job; it resets at {}",
        period.as_str(),
        dollars(*limit),
        resets_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    )]
    BudgetExceeded {
        tenant: String,
        period: jetcall::budget::Period,
        limit: u64,
        resets_at: time::OffsetDateTime,
    },
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error(
        "NATS JetStream is unavailable, so the job was not accepted; retry with the same job_id ({0})"
    )]
    Unavailable(String),
    /// The same outage on a route that submits nothing: a read, or a redelivery.
    #[error("NATS JetStream is unavailable; retry ({0})")]
    NatsUnavailable(String),
    #[error("the gateway is serving as many {0} as it can; retry after a second")]
    Overloaded(&'static str),
    #[error("this API key has used its request rate; retry after {} s", retry_after.as_secs())]
    RateLimited { retry_after: std::time::Duration },
}

impl ApiError {
    /// `kind` is not one of `config`'s kinds: the error names the ones that are.
    pub fn unknown_kind(kind: &str, config: &jetcall::Config) -> Self {
        Self::UnknownKind {
            kind: kind.chars().take(64).collect(),
            known: config.kinds.keys().cloned().collect::<Vec<_>>().join(", "),
        }
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } | Self::JobTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::InvalidField { .. }
            | Self::InvalidCallbackUrl(_)
            | Self::UnknownKind { .. }
            | Self::BatchEmpty { .. }
            | Self::BatchTooLarge { .. }
            | Self::DuplicateInBatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict { .. } | Self::NotRedeliverable { .. } | Self::NotCancellable { .. } => {
                StatusCode::CONFLICT
            }
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BudgetExceeded { .. } => StatusCode::PAYMENT_REQUIRED,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) | Self::NatsUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Overloaded(_) | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The stable slug a program can switch on.
    pub fn slug(&self) -> ErrorType {
        match self {
            Self::MalformedJson(_) => ErrorType::MalformedJson,
            Self::UnsupportedMediaType => ErrorType::UnsupportedMediaType,
            Self::PayloadTooLarge { .. } | Self::JobTooLarge { .. } => ErrorType::PayloadTooLarge,
            Self::InvalidField { .. } => ErrorType::InvalidField,
            Self::InvalidCallbackUrl(_) => ErrorType::InvalidCallbackUrl,
            Self::UnknownKind { .. } => ErrorType::UnknownKind,
            Self::Conflict { .. } => ErrorType::JobConflict,
            Self::BatchEmpty { .. } => ErrorType::BatchEmpty,
            Self::BatchTooLarge { .. } => ErrorType::BatchTooLarge,
            Self::DuplicateInBatch { .. } => ErrorType::DuplicateInBatch,
            Self::NotFound(_) => ErrorType::NotFound,
            Self::BodyTimeout { .. } => ErrorType::RequestTimeout,
            Self::NotRedeliverable { .. } => ErrorType::NotUndeliverable,
            Self::NotCancellable { .. } => ErrorType::NotCancellable,
            Self::BudgetExceeded { .. } => ErrorType::BudgetExceeded,
            Self::Unauthorized => ErrorType::Unauthorized,
            Self::Forbidden(_) => ErrorType::Forbidden,
            Self::MethodNotAllowed => ErrorType::MethodNotAllowed,
            Self::Unavailable(_) | Self::NatsUnavailable(_) => ErrorType::Unavailable,
            Self::Overloaded(_) => ErrorType::Overloaded,
            Self::RateLimited { .. } => ErrorType::RateLimited,
        }
    }

    /// The JSON an error is answered with: `{"type", "message", "field"?}`. A batch reports
    /// each rejected job with the same object.
    pub fn body(&self) -> ErrorBody {
        let field = match self {
            Self::InvalidField { field, .. } => Some(field.clone()),
            Self::InvalidCallbackUrl(_) => Some("callback_url".into()),
            Self::UnknownKind { .. } => Some("kind".into()),
            Self::BatchEmpty { .. } | Self::BatchTooLarge { .. } => Some("jobs".into()),
            Self::DuplicateInBatch { .. } => Some("job_id".into()),
            _ => None,
        };
        let status = match self {
            Self::NotCancellable { status, .. } => Some(*status),
            _ => None,
        };
        let resets_at = match self {
            Self::BudgetExceeded { resets_at, .. } => Some(*resets_at),
            _ => None,
        };
        ErrorBody {
            kind: self.slug(),
            message: self.to_string(),
            field,
            status,
            resets_at,
        }
    }
}

/// The stable slug of an error, what a program switches on: the `type` of every error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// 400: the body is not JSON, or not one JSON value.
    MalformedJson,
    /// 415: the body is not declared as JSON.
    UnsupportedMediaType,
    /// 413: the body is larger than the route's limit.
    PayloadTooLarge,
    /// 422: valid JSON, but a field is missing, of the wrong type, unknown or invalid.
    InvalidField,
    /// 422: `callback_url` is not an http(s) URL the allowlist admits.
    InvalidCallbackUrl,
    /// 422: `kind` names no configured job kind.
    UnknownKind,
    /// 409: the job id is taken by a job with a different request.
    JobConflict,
    /// 422: a batch without jobs.
    BatchEmpty,
    /// 422: a batch of more than 1,000 jobs.
    BatchTooLarge,
    /// Only in a batch's results: an earlier job of the same batch has this job's id.
    DuplicateInBatch,
    /// 404: no such job, or no such route.
    NotFound,
    /// 408: the request's body did not arrive within `gateway.body_timeout`.
    RequestTimeout,
    /// 409: only an `undeliverable` job can be redelivered.
    NotUndeliverable,
    /// 409: the job is generated already (or expired); `status` says where it is.
    NotCancellable,
    /// 402: the API key's budget has no room for the job's estimate; `resets_at` says when
    /// it has.
    BudgetExceeded,
    /// 401: a missing or unknown API key.
    Unauthorized,
    /// 403: the API key is valid but its role may not do this (an operator's route).
    Forbidden,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 503: NATS JetStream could not confirm the write; nothing was accepted, retry.
    Unavailable,
    /// 429: the gateway is shedding load; retry after `Retry-After` seconds.
    Overloaded,
    /// 429: the API key's `requests_per_second` is spent; retry after `Retry-After` seconds.
    RateLimited,
}

/// Every error's body, and a rejected job's `error` in a batch's answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The stable slug to switch on.
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// What went wrong, for people; a field at fault is named in it.
    pub message: String,
    /// The field at fault, for a 422: a path within the body such as `input.specs`, or `.`
    /// for the body as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
    /// The job's status, for `not_cancellable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub status: Option<jetcall::status::Status>,
    /// When the budget that refused the job starts again, for `budget_exceeded`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    #[schema(value_type = String, format = DateTime, nullable = false)]
    pub resets_at: Option<time::OffsetDateTime>,
}

/// Micro-dollars as dollars, to the cent when that is exact.
fn dollars(microdollars: u64) -> String {
    let whole = microdollars / 1_000_000;
    let fraction = microdollars % 1_000_000;
    if fraction.is_multiple_of(10_000) {
        format!("{whole}.{:02}", fraction / 10_000)
    } else {
        format!("{whole}.{fraction:06}")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let mut response = (status, Json(self.body())).into_response();
        if let Self::BudgetExceeded { resets_at, .. } = &self {
            let seconds = (*resets_at - time::OffsetDateTime::now_utc())
                .whole_seconds()
                .max(1);
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(seconds));
        } else if let Self::RateLimited { retry_after } = &self {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(seconds));
        } else if status == StatusCode::SERVICE_UNAVAILABLE
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        // These are answered before the request body is read. Without `connection: close` a
        // client would reuse the connection and lose its next request to the unread bytes.
        if matches!(
            self,
            Self::UnsupportedMediaType
                | Self::PayloadTooLarge { .. }
                | Self::Unauthorized
                | Self::Overloaded(_)
                | Self::RateLimited { .. }
        ) {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
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
