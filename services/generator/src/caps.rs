//! A key's `max_concurrency`: the most of its LLM calls in flight at once, across every
//! generator instance and both of its priorities.
//!
//! A lane's `max_ack_pending` cannot hold that alone. A tenant's interactive and bulk lanes
//! are two consumers, each counting only its own messages, and a message fetched ahead or
//! gathered into a Message Batch counts there without being a call. So a capped tenant's
//! calls are counted in one small document, `calls.<tenant in hex>` in the `llm_limits`
//! bucket, changed only by compare-and-set: every call in flight, by who holds it and until
//! when. A call renews its hold while it runs; a dead instance's holds run out after `hold`
//! (a job lease's length) and the next taker drops them. Times are the instances' wall
//! clocks, as the rate limiter's are.
//!
//! Each instance also counts the calls it has of each tenant, holding or waiting for a hold,
//! so its picker (`fair`) passes over a tenant already at its cap here instead of giving it
//! a call slot to wait in.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::task::JoinHandle;

use jetcall::store::put_at_revision;

/// The first wait before looking at a full count again; it doubles up to [`LONGEST_LOOK`],
/// within which another instance's release is seen.
const FIRST_LOOK: Duration = Duration::from_millis(10);
const LONGEST_LOOK: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
#[error("the call count of tenant `{tenant}`: {message}")]
pub struct CapsError {
    tenant: String,
    message: String,
}

/// A capped tenant's calls in flight across the fleet: each hold's id and when it runs out
/// (Unix milliseconds).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Calls {
    held: BTreeMap<String, i64>,
}

#[derive(Debug)]
struct Inner {
    kv: kv::Store,
    instance: String,
    hold: Duration,
    /// Each capped tenant's cap, as the last listing of the lanes said.
    caps: Mutex<HashMap<String, u32>>,
    /// Each tenant's calls here, holding or waiting for a hold.
    busy: Mutex<HashMap<String, u32>>,
    /// A hold given back here: local waiters look again at once.
    released: Notify,
    /// A tenant's count here went down: the picker may serve it again.
    freed: Notify,
    next_hold: AtomicU64,
}

/// The caps on calls in flight of every tenant, as this instance applies them.
#[derive(Debug, Clone)]
pub struct Caps(Arc<Inner>);

impl Caps {
    /// Caps kept in `kv` (the `llm_limits` bucket) by `instance`, whose holds last `hold`
    /// unless renewed.
    pub fn new(kv: kv::Store, instance: &str, hold: Duration) -> Self {
        Self(Arc::new(Inner {
            kv,
            instance: instance.to_owned(),
            hold,
            caps: Mutex::default(),
            busy: Mutex::default(),
            released: Notify::new(),
            freed: Notify::new(),
            next_hold: AtomicU64::new(0),
        }))
    }

    /// The caps the lanes carry now, by tenant; a tenant not named has none.
    pub fn set(&self, caps: HashMap<String, u32>) {
        *lock(&self.0.caps) = caps;
    }

    fn cap_of(&self, tenant: &str) -> Option<u32> {
        lock(&self.0.caps).get(tenant).copied()
    }

    /// Whether `tenant`'s calls wait for a place under a cap.
    pub fn capped(&self, tenant: &str) -> bool {
        self.cap_of(tenant).is_some()
    }

    /// Whether this instance alone already has as many of `tenant`'s calls as its cap.
    pub fn full_here(&self, tenant: Option<&str>) -> bool {
        let Some(tenant) = tenant else {
            return false;
        };
        self.cap_of(tenant).is_some_and(|cap| {
            lock(&self.0.busy)
                .get(tenant)
                .is_some_and(|busy| *busy >= cap)
        })
    }

    /// Resolves when some tenant's count here goes down (created before the look it follows).
    pub fn freed(&self) -> Notified<'_> {
        self.0.freed.notified()
    }

    /// Waits until `tenant` has a call to spare across the fleet and takes it; `None` for a
    /// tenant without a cap. The hold is given back when the returned value is dropped.
    pub async fn acquire(&self, tenant: Option<&str>) -> Result<Option<Held>, CapsError> {
        let Some(tenant) = tenant.filter(|tenant| self.capped(tenant)) else {
            return Ok(None);
        };
        let busy = Busy::new(self.clone(), tenant);
        let key = format!("calls.{}", jetcall::lanes::tenant_token(tenant));
        let id = format!(
            "{}-{}",
            self.0.instance,
            self.0.next_hold.fetch_add(1, Ordering::Relaxed)
        );
        let hold = millis(self.0.hold);
        let mut look = FIRST_LOOK;
        loop {
            let released = self.0.released.notified();
            // Read each time: a listing may have changed the cap meanwhile.
            let cap = self.cap_of(tenant).unwrap_or(u32::MAX) as usize;
            let taken = self
                .modify(&key, |calls, now| {
                    (calls.held.len() < cap).then(|| {
                        calls.held.insert(id.clone(), now.saturating_add(hold));
                    })
                })
                .await
                .map_err(|message| CapsError {
                    tenant: tenant.to_owned(),
                    message,
                })?;
            if taken.is_some() {
                let renewal = tokio::spawn(self.clone().renew(key.clone(), id.clone()));
                return Ok(Some(Held {
                    caps: self.clone(),
                    key,
                    id,
                    renewal,
                    _busy: busy,
                }));
            }
            tokio::select! {
                () = released => {}
                () = tokio::time::sleep(look) => {}
            }
            look = (look * 2).min(LONGEST_LOOK);
        }
    }

    /// Keeps a hold from running out while its call lasts.
    async fn renew(self, key: String, id: String) {
        let hold = millis(self.0.hold);
        loop {
            tokio::time::sleep(self.0.hold / 3).await;
            let renewed = self
                .modify(&key, |calls, now| {
                    calls
                        .held
                        .get_mut(&id)
                        .map(|until| *until = now.saturating_add(hold))
                })
                .await;
            match renewed {
                Ok(Some(())) => {}
                // Run out and dropped by another instance (this one was cut off for longer
                // than a hold): the call goes on, counted no more.
                Ok(None) => {
                    tracing::warn!(%key, "a call's hold ran out before its call ended");
                    return;
                }
                Err(err) => tracing::warn!(%key, error = %err, "could not renew a call's hold"),
            }
        }
    }

    /// Applies `change` to the count at `key` by compare-and-set, holds that ran out dropped
    /// first; `None` from `change` writes nothing, unless a hold had to be shortened.
    async fn modify<T>(
        &self,
        key: &str,
        mut change: impl FnMut(&mut Calls, i64) -> Option<T>,
    ) -> Result<Option<T>, String> {
        loop {
            let entry = self.0.kv.entry(key).await.map_err(|err| err.to_string())?;
            let revision = entry.as_ref().map(|entry| entry.revision);
            let mut calls = match &entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    serde_json::from_slice(&entry.value).unwrap_or_else(|err| {
                        tracing::warn!(%key, error = %err, "unreadable call count replaced");
                        Calls::default()
                    })
                }
                _ => Calls::default(),
            };
            let now = now_millis();
            // No hold lasts longer than one hold from now: one written by a clock far ahead
            // (or by hand) would otherwise block its tenant until someone removed it. It is
            // written back shortened, so it runs out; a live holder renews it meanwhile, as
            // long as the instances' clocks agree within two thirds of a hold.
            let latest = now.saturating_add(millis(self.0.hold));
            let mut shortened = false;
            calls.held.retain(|_, until| {
                if *until > latest {
                    *until = latest;
                    shortened = true;
                }
                *until > now
            });
            let answer = change(&mut calls, now);
            if answer.is_none() && !shortened {
                return Ok(None);
            }
            let value = serde_json::to_vec(&calls).map_err(|err| err.to_string())?;
            // `None`: another instance wrote first; read its count and decide again.
            if put_at_revision(&self.0.kv, key, value.into(), revision)
                .await?
                .is_some()
            {
                return Ok(answer);
            }
        }
    }
}

/// One of a tenant's calls counted here, from the wait for a hold to its release.
#[derive(Debug)]
struct Busy {
    caps: Caps,
    tenant: String,
}

impl Busy {
    fn new(caps: Caps, tenant: &str) -> Self {
        *lock(&caps.0.busy).entry(tenant.to_owned()).or_default() += 1;
        Self {
            caps,
            tenant: tenant.to_owned(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut busy = lock(&self.caps.0.busy);
            if let Some(count) = busy.get_mut(&self.tenant) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    busy.remove(&self.tenant);
                }
            }
        }
        self.caps.0.freed.notify_waiters();
    }
}

/// A call's place under its tenant's cap; given back when dropped.
#[derive(Debug)]
pub struct Held {
    caps: Caps,
    key: String,
    id: String,
    renewal: JoinHandle<()>,
    _busy: Busy,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewal.abort();
        let caps = self.caps.clone();
        let key = std::mem::take(&mut self.key);
        let id = std::mem::take(&mut self.id);
        // Given back in the background: the call's answer need not wait for it. If the
        // process ends first, the hold runs out instead.
        tokio::spawn(async move {
            let released = caps
                .modify(&key, |calls, _| calls.held.remove(&id).map(|_| ()))
                .await;
            if let Err(err) = released {
                tracing::warn!(%key, error = %err, "could not give back a call's hold; it runs out");
            }
            caps.0.released.notify_waiters();
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}
