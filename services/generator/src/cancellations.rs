//! Calls in flight whose job is cancelled. Every instance hears `jobs.cancelled.>` and aborts
//! its own call for that job at once, once the job's status document confirms it; one that
//! misses the message (it was reconnecting) finds out at its next lease renewal, which the
//! cancellation made fail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use jetcall::JobId;
use jetcall::status::Status;
use jetcall::store::StatusStore;
use jetcall::subjects::Event;

#[derive(Debug, Default)]
pub struct Cancellations {
    /// Each watched job's token, and how many of its deliveries this process is handling
    /// (a redelivered copy may come while the first is held).
    calls: Mutex<HashMap<JobId, (CancellationToken, usize)>>,
}

/// A job being worked on in this process; dropped when its handling ends.
#[derive(Debug)]
pub struct Watched {
    registry: Arc<Cancellations>,
    job_id: JobId,
    pub cancelled: CancellationToken,
}

impl Drop for Watched {
    fn drop(&mut self) {
        let mut calls = self.registry.lock();
        if let Some((_, watchers)) = calls.get_mut(&self.job_id) {
            *watchers -= 1;
            if *watchers == 0 {
                calls.remove(&self.job_id);
            }
        }
    }
}

impl Cancellations {
    /// Watches `job_id` from before its claim, so a cancellation published between the claim
    /// and the call is not missed.
    pub fn watch(self: &Arc<Self>, job_id: &JobId) -> Watched {
        let cancelled = {
            let mut calls = self.lock();
            let (token, watchers) = calls
                .entry(job_id.clone())
                .or_insert_with(|| (CancellationToken::new(), 0));
            *watchers += 1;
            token.clone()
        };
        Watched {
            registry: self.clone(),
            job_id: job_id.clone(),
            cancelled,
        }
    }

    fn cancel(&self, job_id: &JobId) -> bool {
        self.lock()
            .get(job_id)
            .map(|(token, _)| token.cancel())
            .is_some()
    }

    fn is_watched(&self, job_id: &JobId) -> bool {
        self.lock().contains_key(job_id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, (CancellationToken, usize)>> {
        // A panic while holding it leaves a map that is still consistent.
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Only the id is read from a cancellation event.
#[derive(Deserialize)]
struct Cancelled {
    job_id: JobId,
}

/// Cancels the watched job of every `jobs.cancelled.>` message whose status document says
/// it is cancelled, until `shutdown`. The message alone is not enough: a stray or forged one
/// would abort a call that is then made again once its lease runs out, paid twice. A
/// document that cannot be read aborts nothing; a true cancellation then stops the call at
/// its next lease renewal.
pub async fn listen(
    client: async_nats::Client,
    status: StatusStore,
    registry: Arc<Cancellations>,
    shutdown: CancellationToken,
) {
    let mut messages = match client.subscribe(Event::Cancelled.filter()).await {
        Ok(messages) => messages,
        Err(err) => {
            tracing::warn!(error = %err, "cannot hear cancellations; calls stop at their lease renewal");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            _ = shutdown.cancelled() => return,
        };
        let Some(message) = message else { return };
        let Ok(Cancelled { job_id }) = serde_json::from_slice(&message.payload) else {
            continue;
        };
        if !registry.is_watched(&job_id) {
            continue;
        }
        // Its own task: a bulk cancellation's thousand reads wait on none of the others.
        let (status, registry) = (status.clone(), registry.clone());
        tokio::spawn(async move {
            match status.get(&job_id).await {
                Ok(Some((doc, _))) if doc.ended_as == Some(Status::Cancelled) => {
                    if registry.cancel(&job_id) {
                        tracing::info!(%job_id, "job cancelled; its call is abandoned");
                    }
                }
                Ok(_) => tracing::warn!(
                    %job_id,
                    "a cancellation event for a job whose status document is not cancelled; its call goes on"
                ),
                Err(err) => tracing::warn!(
                    %job_id,
                    error = %err,
                    "cannot confirm a cancellation; the call stops at its lease renewal if it is one"
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancellation_reaches_the_watched_job_and_only_while_it_is_watched() {
        let registry = Arc::new(Cancellations::default());
        let job = JobId::parse("JOB-1").expect("an id");
        let other = JobId::parse("JOB-2").expect("an id");
        let watched = registry.watch(&job);
        assert!(!registry.cancel(&other));
        assert!(registry.cancel(&job));
        assert!(watched.cancelled.is_cancelled());
        let copy = registry.watch(&job);
        drop(watched);
        assert!(
            registry.cancel(&job),
            "still watched by the redelivered copy"
        );
        drop(copy);
        assert!(!registry.cancel(&job), "unwatched once its handling ended");
    }
}
