//! Sending a file's rows to `POST /api/v1/jobs/batch`: in batches of up to 1,000, several in
//! flight, retrying what the gateway says is worth retrying, and counting every row's outcome.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{StreamExt, stream};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backoff;
use crate::client::{ClientError, ErrorBody, Gateway};
use crate::rows::{Place, Row, Rows};

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Jobs per request, 1 to 1,000.
    pub batch_size: usize,
    /// Requests in flight at once.
    pub in_flight: usize,
}

/// A row that did not get into the pipeline, and why.
#[derive(Debug)]
pub struct Rejection {
    pub place: Place,
    pub job_id: Option<String>,
    pub error: ErrorBody,
}

/// Every row's outcome.
#[derive(Debug, Default)]
pub struct Summary {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: Vec<Rejection>,
    /// Rows never sent because the run stopped (see `fatal`).
    pub not_sent: u64,
    /// Rows without a `job_id`: sending the file again would make new jobs of them.
    pub without_id: u64,
    /// What stopped the run: an error every further request would meet too.
    pub fatal: Option<ClientError>,
}

impl Summary {
    /// Whether every row is in the pipeline (accepted now or before).
    pub fn all_in(&self) -> bool {
        self.rejected.is_empty() && self.not_sent == 0 && self.fatal.is_none()
    }

    fn absorb(&mut self, other: Summary) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.rejected.extend(other.rejected);
        self.not_sent += other.not_sent;
        self.without_id += other.without_id;
        if self.fatal.is_none() {
            self.fatal = other.fatal;
        }
    }
}

/// The batch endpoint's answer, as far as the CLI reads it.
#[derive(Debug, Deserialize)]
struct BatchAnswer {
    results: Vec<ItemResult>,
}

#[derive(Debug, Deserialize)]
struct ItemResult {
    index: usize,
    job_id: Option<String>,
    result: Outcome,
    error: Option<ErrorBody>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Accepted,
    Duplicate,
    Rejected,
}

/// A job on its way: where it came from, and its body.
type Job = (Place, Value);

/// Sends every row of `rows`; `progress` is called with the number of rows each finished
/// batch settled.
pub async fn submit_all(
    gateway: &Gateway,
    rows: Rows,
    options: Options,
    progress: impl Fn(u64),
) -> Summary {
    let stop = AtomicBool::new(false);
    let mut rows = rows.iter;
    let batches = std::iter::from_fn(move || {
        let batch: Vec<Row> = rows.by_ref().take(options.batch_size).collect();
        (!batch.is_empty()).then_some(batch)
    });
    let mut settled = stream::iter(batches)
        .map(|batch| {
            let stop = &stop;
            async move {
                let size = batch.len() as u64;
                (size, send_rows(gateway, batch, stop).await)
            }
        })
        .buffer_unordered(options.in_flight);
    let mut summary = Summary::default();
    while let Some((size, outcome)) = settled.next().await {
        summary.absorb(outcome);
        progress(size);
    }
    summary
}

/// One batch of rows: rows that could not be read are rejected here; the rest are sent, and
/// resent as long as the gateway says a retry may succeed.
async fn send_rows(gateway: &Gateway, rows: Vec<Row>, stop: &AtomicBool) -> Summary {
    let mut summary = Summary::default();
    let mut jobs = Vec::with_capacity(rows.len());
    for row in rows {
        match row.job {
            Ok(job) => {
                if job.get("job_id").is_none_or(Value::is_null) {
                    summary.without_id += 1;
                }
                jobs.push((row.place, job));
            }
            Err(err) => summary.rejected.push(Rejection {
                place: row.place,
                job_id: None,
                error: ErrorBody {
                    kind: err.kind.into(),
                    message: err.message,
                    field: None,
                },
            }),
        }
    }

    // Parts still to send. A part too large for the gateway is split in two.
    let mut parts: VecDeque<Vec<Job>> = VecDeque::from([jobs]);
    let mut retries = 0;
    while let Some(mut part) = parts.pop_front() {
        if part.is_empty() {
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            summary.not_sent += part.len() as u64;
            continue;
        }
        let bodies: Vec<&Value> = part.iter().map(|(_, job)| job).collect();
        match gateway.submit_batch(&bodies).await {
            Ok(answer) => {
                let answer: BatchAnswer = match gateway.read(answer.body, "a batch's results") {
                    Ok(answer) => answer,
                    Err(err) => {
                        // The gateway took the batch, but which jobs it accepted is unknown.
                        stop.store(true, Ordering::Relaxed);
                        summary.not_sent += part.len() as u64;
                        summary.fatal.get_or_insert(err);
                        continue;
                    }
                };
                let again = settle(
                    &mut part,
                    answer,
                    retries < backoff::MAX_TRIES,
                    &mut summary,
                );
                if !again.is_empty() {
                    retries += 1;
                    tokio::time::sleep(backoff::jittered(retries, None)).await;
                    parts.push_back(again);
                }
            }
            Err(ClientError::Api { status, .. })
                if status == StatusCode::PAYLOAD_TOO_LARGE && part.len() > 1 =>
            {
                let second = part.split_off(part.len() / 2);
                parts.push_front(second);
                parts.push_front(part);
            }
            Err(err) if retryable(&err, &part) && retries < backoff::MAX_TRIES => {
                retries += 1;
                tokio::time::sleep(backoff::jittered(retries, err.retry_after())).await;
                parts.push_front(part);
            }
            Err(ClientError::Api { status, body, .. })
                if status == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                // A single job larger than the batch limit: its fault alone.
                let (place, job) = part.remove(0);
                summary.rejected.push(Rejection {
                    place,
                    job_id: job_id(&job),
                    error: body,
                });
            }
            Err(err) => {
                // Whatever failed this request would fail every other one: stop sending.
                stop.store(true, Ordering::Relaxed);
                summary.not_sent += part.len() as u64;
                summary.fatal.get_or_insert(err);
            }
        }
    }
    summary
}

/// Counts each job's outcome; returns the jobs worth sending again (NATS could not confirm
/// them), each with the id the gateway gave it, so the retry cannot make a second job.
fn settle(
    part: &mut [Job],
    answer: BatchAnswer,
    may_retry: bool,
    summary: &mut Summary,
) -> Vec<Job> {
    let mut again = Vec::new();
    let mut answered = vec![false; part.len()];
    for item in answer.results {
        let Some((place, job)) = part.get_mut(item.index) else {
            continue;
        };
        answered[item.index] = true;
        match item.result {
            Outcome::Accepted => summary.accepted += 1,
            Outcome::Duplicate => summary.duplicates += 1,
            Outcome::Rejected => {
                let error = item.error.unwrap_or_else(|| ErrorBody {
                    kind: "rejected".into(),
                    message: "rejected without a reason".into(),
                    field: None,
                });
                if may_retry && error.kind == "unavailable" {
                    if let (Some(id), Value::Object(body)) = (&item.job_id, &mut *job) {
                        body.entry("job_id")
                            .or_insert_with(|| Value::String(id.clone()));
                    }
                    again.push((*place, std::mem::take(job)));
                } else {
                    summary.rejected.push(Rejection {
                        place: *place,
                        job_id: item.job_id.or_else(|| job_id(job)),
                        error,
                    });
                }
            }
        }
    }
    for ((place, job), answered) in part.iter().zip(answered) {
        if !answered {
            summary.rejected.push(Rejection {
                place: *place,
                job_id: job_id(job),
                error: ErrorBody {
                    kind: "no_answer".into(),
                    message: "the gateway's answer did not mention this job".into(),
                    field: None,
                },
            });
        }
    }
    again
}

/// Whether sending the same part again is both useful and safe. The gateway turned it away
/// (`429`) or NATS could not confirm it (`503`): safe, nothing was accepted. The connection
/// failed before the request went out: safe. It broke later: the gateway may have accepted
/// some jobs, so only jobs that name their ids may be sent again (a duplicate then), never
/// ones the gateway would make new ids for.
fn retryable(err: &ClientError, part: &[Job]) -> bool {
    match err {
        ClientError::Unreachable { before_sending, .. } => {
            *before_sending || part.iter().all(|(_, job)| job_id(job).is_some())
        }
        other => other.is_transient(),
    }
}

fn job_id(job: &Value) -> Option<String> {
    job.get("job_id")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn part(ids: &[Option<&str>]) -> Vec<Job> {
        ids.iter()
            .zip(1..)
            .map(|(id, line)| {
                let job = match id {
                    Some(id) => json!({"job_id": id, "kind": "k"}),
                    None => json!({"kind": "k"}),
                };
                (Place::Line(line), job)
            })
            .collect()
    }

    fn answer(results: Value) -> BatchAnswer {
        serde_json::from_value(json!({"results": results})).expect("batch answer")
    }

    #[test]
    fn unavailable_jobs_come_back_with_the_id_the_gateway_made() {
        let mut jobs = part(&[Some("J-1"), None, None]);
        let results = json!([
            {"index": 0, "job_id": "J-1", "result": "accepted", "status": "accepted"},
            {"index": 1, "job_id": "job_made", "result": "rejected",
             "error": {"type": "unavailable", "message": "NATS"}},
            {"index": 2, "job_id": null, "result": "rejected",
             "error": {"type": "invalid_field", "message": "bad", "field": "input"}}
        ]);
        let mut summary = Summary::default();
        let again = settle(&mut jobs, answer(results), true, &mut summary);
        assert_eq!(summary.accepted, 1);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, Place::Line(2));
        assert_eq!(again[0].1["job_id"], "job_made");
        assert_eq!(summary.rejected.len(), 1);
        assert_eq!(summary.rejected[0].place, Place::Line(3));
        assert_eq!(summary.rejected[0].error.field.as_deref(), Some("input"));
    }

    #[test]
    fn without_retries_left_an_unavailable_job_is_rejected() {
        let mut jobs = part(&[Some("J-1"), Some("J-2")]);
        let results = json!([
            {"index": 0, "job_id": "J-1", "result": "rejected",
             "error": {"type": "unavailable", "message": "NATS"}},
            {"index": 1, "job_id": "J-2", "result": "duplicate", "status": "delivered"}
        ]);
        let mut summary = Summary::default();
        let again = settle(&mut jobs, answer(results), false, &mut summary);
        assert!(again.is_empty());
        assert_eq!(summary.duplicates, 1);
        assert_eq!(summary.rejected[0].error.kind, "unavailable");
    }

    #[test]
    fn a_job_the_answer_leaves_out_is_not_counted_as_accepted() {
        let mut jobs = part(&[Some("J-1"), Some("J-2")]);
        let results = json!([{"index": 0, "job_id": "J-1", "result": "accepted"}]);
        let mut summary = Summary::default();
        settle(&mut jobs, answer(results), true, &mut summary);
        assert_eq!(summary.accepted, 1);
        assert_eq!(summary.rejected[0].job_id.as_deref(), Some("J-2"));
    }

    #[test]
    fn a_broken_connection_is_retried_only_for_jobs_with_their_own_ids() {
        let broken = ClientError::Unreachable {
            url: "http://127.0.0.1:8080/".into(),
            reason: "connection reset".into(),
            before_sending: false,
        };
        assert!(retryable(&broken, &part(&[Some("J-1"), Some("J-2")])));
        assert!(!retryable(&broken, &part(&[Some("J-1"), None])));
        let refused = ClientError::Unreachable {
            url: "http://127.0.0.1:8080/".into(),
            reason: "connection refused".into(),
            before_sending: true,
        };
        assert!(retryable(&refused, &part(&[None])));
    }
}
