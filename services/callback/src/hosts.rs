//! A bound on deliveries in flight per destination host, so one slow or dead receiver cannot
//! occupy every delivery slot and hold up the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Idle hosts are forgotten once this many are tracked, so the map stays small.
const MAX_TRACKED_HOSTS: usize = 4096;

#[derive(Debug)]
pub struct HostLimits {
    per_host: usize,
    // A std mutex: it is held only to look up or insert, never across an await.
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Self {
        Self {
            per_host,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one delivery to `host`, or `None` while `per_host` deliveries to it are
    /// already under way.
    pub fn try_acquire(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut hosts = self
                .hosts
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if hosts.len() >= MAX_TRACKED_HOSTS && !hosts.contains_key(host) {
                let per_host = self.per_host;
                hosts.retain(|_, semaphore| semaphore.available_permits() < per_host);
            }
            hosts
                .entry(host.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
                .clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_gets_its_own_bound() {
        let limits = HostLimits::new(2);
        let a1 = limits.try_acquire("a.example");
        let a2 = limits.try_acquire("a.example");
        assert!(a1.is_some() && a2.is_some());
        assert!(
            limits.try_acquire("a.example").is_none(),
            "a third slot for one host"
        );
        assert!(
            limits.try_acquire("b.example").is_some(),
            "another host is unaffected"
        );
        drop(a1);
        assert!(
            limits.try_acquire("a.example").is_some(),
            "a freed slot is reused"
        );
    }
}
