//! Load shedding: past `gateway.max_in_flight` API requests at once the gateway answers `429`
//! at once, so a burst costs callers a retry rather than everyone a queue that grows without
//! bound (and the memory to hold it).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::state::AppState;

/// The permits of one bounded resource: requests in flight, or open event streams.
#[derive(Debug, Clone)]
pub struct Limit {
    permits: Arc<Semaphore>,
    size: usize,
}

impl Limit {
    pub fn new(size: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Places taken now.
    pub fn in_use(&self) -> usize {
        self.size - self.permits.available_permits()
    }

    /// A permit held until dropped, or `Overloaded` naming `what` is at its limit.
    pub fn try_enter(&self, what: &'static str) -> Result<Permit, ApiError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map(Permit)
            .map_err(|_| ApiError::Overloaded(what))
    }
}

/// Holds a place in a [`Limit`] for as long as it lives.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

pub async fn limit_in_flight(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match state.in_flight.try_enter("requests") {
        Ok(_permit) => next.run(request).await,
        Err(overloaded) => overloaded.into_response(),
    }
}
