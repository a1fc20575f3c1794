//! The generator fleet's records of its Message Batches, in the `job_status` bucket under
//! dotted keys: `batch.<record>` for each batch, and `batches.open`, the list of records not
//! yet finished with, which every instance reads to find batches to create, poll or recover.
//!
//! A record is written before its jobs are marked `batched` and before the batch is created
//! at the API, so an instance that dies at any moment leaves a record another can finish:
//! adopt the batch the API holds for it, or, if none was created, give its jobs back. Its
//! `holder` and `until` are a lease: one instance at a time creates, polls or recovers it.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::job::JobId;
use crate::store::{StatusStore, StoreError};

/// Writes racing on the open list retry this many times before giving up.
const MAX_CAS_RETRIES: usize = 32;

const OPEN_KEY: &str = "batches.open";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Recorded with its jobs; the API may or may not hold the batch yet.
    Creating,
    /// Created at the API under `batch_id`; its results are awaited.
    Submitted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub record: String,
    pub state: BatchState,
    /// The jobs sent (or about to be sent) in the batch, each under its job id as `custom_id`.
    pub jobs: Vec<JobId>,
    /// The API's id (`msgbatch_…`), once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// Taken just before the batch was asked for: a batch the API created for this record
    /// was created after it.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    /// The instance creating, polling or recovering the batch, until `until`.
    pub holder: String,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    /// When the batch is next asked how it is doing.
    #[serde(with = "time::serde::rfc3339")]
    pub next_poll_at: OffsetDateTime,
    /// Polls so far, for the backoff between them.
    #[serde(default)]
    pub polls: u32,
}

impl BatchRecord {
    pub fn key(record: &str) -> String {
        format!("batch.{record}")
    }

    /// A fresh record id: time-ordered, one token of a KV key.
    pub fn new_id() -> String {
        format!("b{}", uuid::Uuid::now_v7().simple())
    }

    pub fn is_held_by_other(&self, holder: &str, now: OffsetDateTime) -> bool {
        self.holder != holder && self.until > now
    }
}

/// Reads and writes of batch records, through the status store.
#[derive(Debug, Clone)]
pub struct BatchRecords {
    store: StatusStore,
}

impl BatchRecords {
    pub fn new(store: StatusStore) -> Self {
        Self { store }
    }

    pub async fn get(&self, record: &str) -> Result<Option<(BatchRecord, u64)>, StoreError> {
        self.store.side_get(&BatchRecord::key(record)).await
    }

    /// Writes a new record and lists it open; the record first, so a listed record exists
    /// unless it was finished with.
    pub async fn create(&self, record: &BatchRecord) -> Result<u64, StoreError> {
        let revision = self
            .store
            .side_put(&BatchRecord::key(&record.record), record, None)
            .await?
            .ok_or_else(|| {
                StoreError::Unavailable(format!("batch record {} exists", record.record))
            })?;
        self.change_open(|open| {
            if open.iter().any(|listed| listed == &record.record) {
                return false;
            }
            open.push(record.record.clone());
            true
        })
        .await?;
        Ok(revision)
    }

    /// Writes `record` over the revision read; `None` when another instance changed it first.
    pub async fn update(
        &self,
        record: &BatchRecord,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.store
            .side_put(&BatchRecord::key(&record.record), record, Some(revision))
            .await
    }

    /// Removes a finished-with record: off the open list first, then the record itself.
    pub async fn finish(&self, record: &str, revision: u64) -> Result<(), StoreError> {
        self.change_open(|open| {
            let before = open.len();
            open.retain(|listed| listed != record);
            open.len() != before
        })
        .await?;
        self.store
            .side_delete(&BatchRecord::key(record), revision)
            .await?;
        Ok(())
    }

    /// The records listed open.
    pub async fn open(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .store
            .side_get::<Vec<String>>(OPEN_KEY)
            .await?
            .map(|(open, _)| open)
            .unwrap_or_default())
    }

    async fn change_open(
        &self,
        mut change: impl FnMut(&mut Vec<String>) -> bool,
    ) -> Result<(), StoreError> {
        for _ in 0..MAX_CAS_RETRIES {
            let current = self.store.side_get::<Vec<String>>(OPEN_KEY).await?;
            let (mut open, revision) = match current {
                Some((open, revision)) => (open, Some(revision)),
                None => (Vec::new(), None),
            };
            if !change(&mut open) {
                return Ok(());
            }
            if self
                .store
                .side_put(OPEN_KEY, &open, revision)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(StoreError::Contended(OPEN_KEY.into(), MAX_CAS_RETRIES))
    }
}
