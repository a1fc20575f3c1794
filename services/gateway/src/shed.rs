//! Load shedding: past `gateway.max_in_flight` API requests at once the gateway answers `429`
//! at once, so a burst costs callers a retry rather than everyone a queue that grows without
//! bound (and the memory to hold it). A request's body is read before it takes its place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::error::ApiError;

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

/// A [`Limit`] of the same size for each API key, made the first time the key needs it: one
/// caller's event streams cannot take every place of `max_event_streams`.
#[derive(Debug)]
pub struct PerKey {
    size: usize,
    limits: Mutex<HashMap<String, Limit>>,
}

impl PerKey {
    pub fn new(size: usize) -> Self {
        Self {
            size,
            limits: Mutex::new(HashMap::new()),
        }
    }

    /// A permit of `key`'s own limit, or `Overloaded` naming `what`. A key is a configured
    /// one, so the map holds at most one entry per `gateway.api_keys`.
    pub fn try_enter(&self, key: &str, what: &'static str) -> Result<Permit, ApiError> {
        let limit = {
            // Poisoning needs a panic while the map is held, which nothing here can do.
            let mut limits = self
                .limits
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            limits
                .entry(key.to_owned())
                .or_insert_with(|| Limit::new(self.size))
                .clone()
        };
        limit.try_enter(what)
    }
}

/// Holds a place in a [`Limit`] for as long as it lives.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);
