//! Reads and compare-and-set writes of job status documents in the `job_status` bucket.

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::job::JobId;
use crate::status::JobStatus;

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

    pub fn kv(&self) -> &kv::Store {
        &self.kv
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
