//! The caller's W3C `traceparent`, read from a submission's headers.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use jetcall::trace::{HEADER, TraceParent};

/// The caller's trace context: `Some` only for exactly one valid `traceparent` header. An
/// invalid one is ignored, as the specification asks, and the job starts a trace of its own.
#[derive(Debug, Clone, Copy)]
pub struct IncomingTrace(pub Option<TraceParent>);

impl IncomingTrace {
    /// The gateway's span for one job: a child of the caller's, or a new trace.
    pub fn span_for_job(&self) -> TraceParent {
        self.0
            .map_or_else(TraceParent::start, |parent| parent.child())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IncomingTrace {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let parent = match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok().and_then(TraceParent::parse),
            _ => None,
        };
        Ok(Self(parent))
    }
}
