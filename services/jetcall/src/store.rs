//! The one door to the `job_status` bucket: reads and compare-and-set writes of job status
//! documents, a watch on one job, passes over the bucket's writes, and the leases of duties
//! that one instance of a fleet does at a time. Nothing else reads or writes the bucket, so
//! how a document is stored (its JSON, which keys are jobs) is known here alone.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::job::JobId;
use crate::scan::{Scan, ScanError};
use crate::status::{JobStatus, Status};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job status bucket unreachable: {0}")]
    Unavailable(String),
    #[error("status document of job {job_id} is not valid JSON: {source}")]
    Corrupt {
        job_id: String,
        source: serde_json::Error,
    },
    #[error("job {0} changed {1} times while being updated; giving up")]
    Contended(String, usize),
}

impl From<ScanError> for StoreError {
    fn from(err: ScanError) -> Self {
        StoreError::Unavailable(err.to_string())
    }
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

/// Writes `value` under `key` in any bucket if `revision` is still the key's (`None`: if the
/// key has no value); `Ok(None)` when another writer got there first, the error's text when
/// the bucket could not be written.
pub async fn put_at_revision(
    kv: &kv::Store,
    key: &str,
    value: Bytes,
    revision: Option<u64>,
) -> Result<Option<u64>, String> {
    match revision {
        None => match kv.create(key, value).await {
            Ok(revision) => Ok(Some(revision)),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(err) => Err(err.to_string()),
        },
        Some(revision) => match kv.update(key, value, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(err) => Err(err.to_string()),
        },
    }
}

/// What `create` found.
#[derive(Debug)]
pub enum Created {
    /// The job is new; the document was written at this revision.
    New(u64),
    /// A job with this id already exists.
    Exists(Box<JobStatus>),
}

/// What `update` did.
#[derive(Debug)]
pub enum Updated {
    /// Written, now at this revision.
    Written(Box<JobStatus>, u64),
    /// The change did not apply (it would have moved the job backwards); the current document.
    Unchanged(Box<JobStatus>),
    Missing,
}

/// Writes racing on one job retry this many times before giving up; each retry means another
/// writer made progress, so this only trips under a pathological storm.
const MAX_CAS_RETRIES: usize = 16;

#[derive(Debug, Clone)]
pub struct StatusStore {
    kv: kv::Store,
}

impl StatusStore {
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    pub async fn get(&self, job_id: &JobId) -> Result<Option<(JobStatus, u64)>, StoreError> {
        let entry = self
            .kv
            .entry(job_id.as_str())
            .await
            .map_err(|err| StoreError::Unavailable(err.to_string()))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let doc = decode(job_id, &entry.value)?;
                Ok(Some((doc, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Writes the document of a new job, or reports the one already there.
    pub async fn create(&self, doc: &JobStatus) -> Result<Created, StoreError> {
        match self.kv.create(doc.job_id.as_str(), encode(doc)).await {
            Ok(revision) => Ok(Created::New(revision)),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.get(&doc.job_id).await? {
                    Some((existing, _)) => Ok(Created::Exists(Box::new(existing))),
                    // Deleted between our create and get: treat as taken; a retry will create it.
                    None => Err(StoreError::Unavailable(format!(
                        "job {} was removed while being created",
                        doc.job_id
                    ))),
                }
            }
            Err(err) => Err(StoreError::Unavailable(err.to_string())),
        }
    }

    /// Applies `change` to the current document and writes it if the revision is still the
    /// one read; on a race it reads again and reapplies. `change` returns false to leave the
    /// document as it is.
    pub async fn update(
        &self,
        job_id: &JobId,
        change: impl FnMut(&mut JobStatus) -> bool,
    ) -> Result<Updated, StoreError> {
        self.update_loop(job_id, None, change).await
    }

    /// `update`, starting from a document and revision the caller has just read or written,
    /// if it has one, which saves a read when nothing has changed since.
    pub async fn update_from(
        &self,
        job_id: &JobId,
        current: Option<(JobStatus, u64)>,
        change: impl FnMut(&mut JobStatus) -> bool,
    ) -> Result<Updated, StoreError> {
        self.update_loop(job_id, current, change).await
    }

    async fn update_loop(
        &self,
        job_id: &JobId,
        mut current: Option<(JobStatus, u64)>,
        mut change: impl FnMut(&mut JobStatus) -> bool,
    ) -> Result<Updated, StoreError> {
        for _ in 0..MAX_CAS_RETRIES {
            let (mut doc, revision) = match current.take() {
                Some(read) => read,
                None => match self.get(job_id).await? {
                    Some(read) => read,
                    None => return Ok(Updated::Missing),
                },
            };
            if !change(&mut doc) {
                return Ok(Updated::Unchanged(Box::new(doc)));
            }
            match self
                .kv
                .update(job_id.as_str(), encode(&doc), revision)
                .await
            {
                Ok(revision) => return Ok(Updated::Written(Box::new(doc), revision)),
                Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(err) => return Err(StoreError::Unavailable(err.to_string())),
            }
        }
        Err(StoreError::Contended(job_id.to_string(), MAX_CAS_RETRIES))
    }

    /// The job's writes after `revision`, as they happen.
    pub async fn watch(&self, job_id: &JobId, revision: u64) -> Result<JobWatch, StoreError> {
        let watch = self
            .kv
            .watch_from_revision(job_id.as_str(), revision + 1)
            .await
            .map_err(unavailable)?;
        Ok(JobWatch {
            job_id: job_id.clone(),
            watch,
        })
    }

    /// A pass over the bucket's last `writes` writes, each job's newest last; see
    /// [`RecentWrites`].
    pub async fn recent_writes(&self, writes: u64) -> Result<RecentWrites, StoreError> {
        let mut bucket = self.kv.stream.clone();
        let state = bucket.info().await.map_err(unavailable)?.state.clone();
        let (first, last) = (state.first_sequence, state.last_sequence);
        if state.messages == 0 {
            return Ok(RecentWrites {
                scanned: 0,
                complete: true,
                scan: None,
            });
        }
        let start = last.saturating_sub(writes.saturating_sub(1)).max(first);
        let scan = Scan::open(
            &bucket,
            OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            },
        )
        .await?;
        Ok(RecentWrites {
            scanned: last - start + 1,
            complete: start == first,
            scan: Some(scan),
        })
    }

    /// The jobs still `accepted`, created before `threshold`, whose request no gateway saw
    /// stored: those a gateway may have died before publishing.
    pub async fn accepted_before(
        &self,
        threshold: OffsetDateTime,
    ) -> Result<AcceptedBefore, StoreError> {
        /// The part of a status document this needs.
        #[derive(Deserialize)]
        struct Head {
            status: Status,
            job_id: String,
            #[serde(with = "time::serde::rfc3339")]
            created_at: OffsetDateTime,
            #[serde(default)]
            request_seq: Option<u64>,
        }

        let mut scan = Scan::open(
            &self.kv.stream,
            OrderedConfig {
                filter_subject: format!("{}>", self.kv.prefix),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            },
        )
        .await?;
        let mut found = AcceptedBefore::default();
        while let Some(scanned) = scan.next().await? {
            let message = scanned.message;
            // Deletes and purges have no value, and most jobs have moved on: neither is decoded.
            if !message.payload.starts_with(ACCEPTED_PREFIX) {
                continue;
            }
            match serde_json::from_slice::<Head>(&message.payload) {
                // Its gateway saw the request stored: in the stream, nothing to look for.
                Ok(head) if head.request_seq.is_some() => {}
                Ok(head) if head.status == Status::Accepted && head.created_at < threshold => {
                    let created = head.created_at;
                    found.oldest = Some(found.oldest.map_or(created, |o| o.min(created)));
                    found.jobs.insert(head.job_id);
                }
                Ok(_) => {}
                Err(err) => {
                    found.unreadable += 1;
                    tracing::warn!(subject = %message.subject, error = %err, "unreadable status document skipped");
                }
            }
        }
        Ok(found)
    }

    /// Takes (or renews) the lease on `duty` for `term` if it is free, expired or already
    /// `holder`'s; of instances racing for it, one wins (compare-and-set on the key's revision).
    pub async fn take_lease(
        &self,
        duty: &str,
        holder: &str,
        term: Duration,
    ) -> Result<bool, StoreError> {
        let now = OffsetDateTime::now_utc();
        let term = crate::durations::to_time(term);
        let lease = serde_json::to_vec(&DutyLease {
            holder: holder.to_owned(),
            until: now.checked_add(term).unwrap_or(now),
        })
        .map_err(unavailable)?;
        let entry = self.kv.entry(duty).await.map_err(unavailable)?;
        let current = entry.filter(|entry| entry.operation == kv::Operation::Put);
        let Some(current) = current else {
            return match self.kv.create(duty, lease.into()).await {
                Ok(_) => Ok(true),
                Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(err) => Err(unavailable(err)),
            };
        };
        let free = serde_json::from_slice::<DutyLease>(&current.value)
            .ok()
            // A value that is not a lease holds nothing.
            .is_none_or(|held| held.holder == holder || held.until <= now);
        if !free {
            return Ok(false);
        }
        match self.kv.update(duty, lease.into(), current.revision).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// The document under `key`, a dotted key (no job id has a dot) of the fleet's own
    /// bookkeeping, such as a Message Batch's record, with its revision.
    pub async fn side_get<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, StoreError> {
        match self.kv.entry(key).await.map_err(unavailable)? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let doc =
                    serde_json::from_slice(&entry.value).map_err(|source| StoreError::Corrupt {
                        job_id: key.to_owned(),
                        source,
                    })?;
                Ok(Some((doc, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Writes `doc` under `key` if `revision` is still the key's (`None`: if there is none);
    /// `None` when another writer got there first.
    pub async fn side_put<T: Serialize>(
        &self,
        key: &str,
        doc: &T,
        revision: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let value: Bytes = serde_json::to_vec(doc).map_err(unavailable)?.into();
        put_at_revision(&self.kv, key, value, revision)
            .await
            .map_err(StoreError::Unavailable)
    }

    /// Removes `key` if `revision` is still its; false when another writer changed it.
    pub async fn side_delete(&self, key: &str, revision: u64) -> Result<bool, StoreError> {
        match self.kv.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(false),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// Ends the lease on `duty` if `holder` holds it, so the next instance takes it at once.
    pub async fn release_lease(&self, duty: &str, holder: &str) {
        let Ok(Some(entry)) = self.kv.entry(duty).await else {
            return;
        };
        let ours = serde_json::from_slice::<DutyLease>(&entry.value)
            .is_ok_and(|held| held.holder == holder);
        if ours
            && let Err(err) = self
                .kv
                .delete_expect_revision(duty, Some(entry.revision))
                .await
        {
            tracing::debug!(duty, error = %err, "could not hand a lease back; it expires");
        }
    }
}

/// How every `accepted` status document starts: `status` is its first field.
const ACCEPTED_PREFIX: &[u8] = br#"{"status":"accepted""#;

/// Who does a duty, until when: the value under a duty's key (a key with a dot, which no job
/// id has, so no job can take it and no pass over the jobs shows it).
#[derive(Debug, Serialize, Deserialize)]
struct DutyLease {
    holder: String,
    #[serde(with = "time::serde::rfc3339")]
    until: OffsetDateTime,
}

/// What [`StatusStore::accepted_before`] found.
#[derive(Debug, Default)]
pub struct AcceptedBefore {
    pub jobs: HashSet<String>,
    /// The oldest one's `created_at`.
    pub oldest: Option<OffsetDateTime>,
    /// `accepted` documents that could not be decoded, skipped.
    pub unreadable: usize,
}

/// A job's change, as a watch sees it.
#[derive(Debug)]
pub enum JobChange {
    Written(Box<JobStatus>, u64),
    Removed(u64),
}

pub struct JobWatch {
    job_id: JobId,
    watch: kv::Watch,
}

impl std::fmt::Debug for JobWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobWatch")
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}

impl JobWatch {
    /// The job's next change; `None` when the watch ends. A document that does not decode is
    /// not a state anyone can use, so it is passed over: the next write will be.
    pub async fn next(&mut self) -> Option<Result<JobChange, StoreError>> {
        loop {
            let entry = match self.watch.next().await? {
                Ok(entry) => entry,
                Err(err) => return Some(Err(unavailable(err))),
            };
            if entry.operation != kv::Operation::Put {
                return Some(Ok(JobChange::Removed(entry.revision)));
            }
            if let Ok(doc) = decode(&self.job_id, &entry.value) {
                return Some(Ok(JobChange::Written(Box::new(doc), entry.revision)));
            }
        }
    }
}

/// A pass over the bucket's latest writes, up to the last one when the pass began. The
/// bucket has no index: a job written to in the span is seen in each state it was written in,
/// its newest last, and the keys that are not jobs' are left out.
#[derive(Debug)]
pub struct RecentWrites {
    /// Writes the pass covers.
    pub scanned: u64,
    /// Whether it reaches back to the bucket's first write still kept.
    pub complete: bool,
    scan: Option<Scan>,
}

impl RecentWrites {
    /// The next write: the job and its document, `None` if it was removed or does not decode.
    pub async fn next(&mut self) -> Result<Option<(JobId, Option<JobStatus>)>, StoreError> {
        let Some(scan) = self.scan.as_mut() else {
            return Ok(None);
        };
        while let Some(scanned) = scan.next().await? {
            let message = scanned.message;
            // `$KV.job_status.<job id>`
            let Some(job_id) = message
                .subject
                .splitn(3, '.')
                .nth(2)
                .and_then(|key| JobId::parse(key).ok())
            else {
                continue;
            };
            let removed = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            let doc = if removed {
                None
            } else {
                decode(&job_id, &message.payload).ok()
            };
            return Ok(Some((job_id, doc)));
        }
        Ok(None)
    }
}

pub fn encode(doc: &JobStatus) -> Bytes {
    // Serialising a document of plain data with string keys cannot fail.
    Bytes::from(serde_json::to_vec(doc).unwrap_or_default())
}

pub fn decode(job_id: &JobId, bytes: &[u8]) -> Result<JobStatus, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        job_id: job_id.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::Kind;
    use crate::events::JobRequested;

    #[test]
    fn an_accepted_document_starts_with_the_prefix_accepted_before_looks_for() {
        let request = JobRequested {
            job_id: JobId::parse("JOB-771").expect("valid id"),
            kind: Kind::product_description(),
            input: serde_json::Map::new(),
            callback_url: crate::allowlist::CallbackUrl::parse("http://127.0.0.1:9/hook")
                .expect("a callback URL"),
            metadata: serde_json::Map::new(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
            expires_at: None,
            tenant: None,
            priority: Default::default(),
        };
        let mut doc = JobStatus::accepted(&request, "digest".into());
        assert!(encode(&doc).starts_with(ACCEPTED_PREFIX));
        doc.status = Status::Generating;
        assert!(!encode(&doc).starts_with(ACCEPTED_PREFIX));
    }
}
