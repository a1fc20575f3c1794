//! One run of a scenario: submit jobs through the gateway(s) as a careful client does
//! (retrying with the same id until a 202 or 200), inject the fault part-way, wait for every
//! job to reach a final state, and check that nothing was lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use jetcall::JobId;
use jetcall::status::{JobStatus, Status};
use testkit::wait_until;

use crate::stack::Stack;

/// Jobs for the receiver in each scenario: a few hundred.
pub const JOBS: usize = 300;
/// Jobs, among them, whose webhook goes to a dead endpoint: they must end `undeliverable`.
pub const DEAD_JOBS: usize = 10;
/// Submissions are paced over about 3 s, so a fault lands while jobs are still coming in.
const PACE: Duration = Duration::from_millis(10);
/// POSTs in flight at once.
const CLIENT_CONCURRENCY: usize = 8;
/// How long a client keeps retrying one job before the test fails.
const SUBMIT_DEADLINE: Duration = Duration::from_secs(60);
/// How long every job has to reach a final state after the last submission.
const SETTLE: Duration = Duration::from_secs(90);

/// When to inject the fault.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// Once the receiver has had this many deliveries.
    Delivered(usize),
    /// Once this many jobs were accepted, with POSTs awaiting their answers: the gateways are
    /// frozen (SIGSTOP) until one is, so the fault, which must kill them, meets requests in
    /// flight rather than racing them to their answers.
    Accepted(usize),
    /// No single fault: the scenario's faults are there from the start.
    Never,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: &'static str,
    pub jobs: usize,
    pub dead_jobs: usize,
    pub trigger: Trigger,
    /// The most duplicate deliveries (beyond one per job) the scenario may cause.
    pub max_duplicates: usize,
}

impl Plan {
    /// `JOBS` jobs, `DEAD_JOBS` of them dead, the fault at half the deliveries, and at most as
    /// many duplicates as deliveries can be in flight at once.
    pub fn new(name: &'static str, callbacks: usize) -> Self {
        Self {
            name,
            jobs: JOBS,
            dead_jobs: DEAD_JOBS,
            trigger: Trigger::Delivered((JOBS - DEAD_JOBS) / 2),
            max_duplicates: callbacks * crate::stack::PER_HOST_CONCURRENCY,
        }
    }
}

/// When the run started, and how long after it the fault came and every status was final.
#[derive(Debug, Clone, Copy)]
struct Times {
    started: Instant,
    fault_after: Duration,
    final_after: Duration,
}

/// The client's counts, shared by its tasks.
#[derive(Debug, Default)]
struct Progress {
    accepted: AtomicUsize,
    /// POSTs awaiting their answer.
    posting: AtomicUsize,
}

/// How one job's submission went.
#[derive(Debug)]
struct Submission {
    job_id: String,
    dead: bool,
    /// POSTs it took; more than one when a fault cost the client an answer.
    tries: usize,
}

/// What a run found, for the scenario's own checks and its line in the output.
#[derive(Debug)]
pub struct Report {
    pub name: &'static str,
    pub accepted: usize,
    /// Jobs that needed more than one POST to be accepted.
    pub resubmitted: usize,
    /// Requests the receiver got (all answered 204, all signed correctly).
    pub deliveries: usize,
    /// Deliveries beyond the first of their job: at least once, not exactly once.
    pub duplicates: usize,
    pub jobs_delivered_twice: usize,
    pub webhook_ids: usize,
    /// Jobs delivered as `job.failed` (the model never answered within `max_attempts`).
    pub failed_jobs: usize,
    pub in_flight_at_fault: usize,
    pub fault_after: Duration,
    /// When the last job to be delivered was first delivered.
    pub delivered_after: Duration,
    /// When every status document was final.
    pub final_after: Duration,
    pub elapsed: Duration,
    /// Every job's final status document.
    pub docs: BTreeMap<String, JobStatus>,
    pub notes: Vec<String>,
}

impl Report {
    /// One line in the test output (written past the test harness's capture, so it shows
    /// when the test passes too), with anything the scenario noted.
    pub fn print(&self) {
        let mut line = format!(
            "fault suite: {}: {} jobs accepted ({} after a retried POST, {} to a dead endpoint \
             undeliverable); {} deliveries, {} duplicate ({} jobs delivered more than once), \
             {} distinct webhook-ids, {} as job.failed; fault after {:.1} s with {} jobs in \
             flight; all delivered after {:.1} s, all final after {:.1} s, every event in the \
             stream after {:.1} s",
            self.name,
            self.accepted,
            self.resubmitted,
            self.docs
                .values()
                .filter(|doc| doc.status == Status::Undeliverable)
                .count(),
            self.deliveries,
            self.duplicates,
            self.jobs_delivered_twice,
            self.webhook_ids,
            self.failed_jobs,
            self.fault_after.as_secs_f64(),
            self.in_flight_at_fault,
            self.delivered_after.as_secs_f64(),
            self.final_after.as_secs_f64(),
            self.elapsed.as_secs_f64(),
        );
        for note in &self.notes {
            line.push_str("; ");
            line.push_str(note);
        }
        line.push('\n');
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

fn job_body(job_id: &str, callback_url: &str) -> Value {
    json!({
        "job_id": job_id,
        "product_id": job_id,
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": {"capacity": "1.5 Ton", "energy_rating": "5 Star"},
        "callback_url": callback_url
    })
}

/// The job a prompt is for: its first line names the catalogue id, which is the job id.
pub fn job_of_prompt(prompt: &str) -> Option<&str> {
    let (_, rest) = prompt.split_once("(catalogue id ")?;
    rest.split(')').next()
}

/// Submits one job until a gateway accepts it (202) or says it has it already (200),
/// retrying with the same id, on the next gateway, after a connection error, a 5xx or a 429.
async fn submit(
    http: reqwest::Client,
    gateways: Arc<Vec<String>>,
    progress: Arc<Progress>,
    n: usize,
    job_id: String,
    callback_url: String,
    dead: bool,
) -> Submission {
    let body = job_body(&job_id, &callback_url);
    let deadline = Instant::now() + SUBMIT_DEADLINE;
    let mut backoff = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        let gateway = &gateways[(n + tries) % gateways.len()];
        tries += 1;
        progress.posting.fetch_add(1, Ordering::SeqCst);
        let answer = http
            .post(format!("{gateway}/api/v1/generate-description"))
            .json(&body)
            .send()
            .await;
        progress.posting.fetch_sub(1, Ordering::SeqCst);
        let retry_because = match answer {
            Ok(response) if matches!(response.status(), StatusCode::ACCEPTED | StatusCode::OK) => {
                progress.accepted.fetch_add(1, Ordering::SeqCst);
                return Submission {
                    job_id,
                    dead,
                    tries,
                };
            }
            Ok(response)
                if response.status().is_server_error()
                    || response.status() == StatusCode::TOO_MANY_REQUESTS =>
            {
                format!("HTTP {}", response.status())
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                panic!("{job_id} was refused with {status}: {text}");
            }
            Err(err) => format!("{err}"),
        };
        assert!(
            Instant::now() < deadline,
            "{job_id} still not accepted after {tries} tries in {SUBMIT_DEADLINE:?}; last: {retry_because}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Runs the plan on `stack`, calling `fault` when its trigger fires, and checks:
/// every accepted job delivered (or, at the dead endpoint, undeliverable with its attempts),
/// each delivery signed, every status final, every job's events in the stream, duplicates
/// within `plan.max_duplicates`. The caller prints the report, with its own notes.
pub async fn run(stack: &mut Stack, plan: &Plan, fault: impl AsyncFnOnce(&mut Stack)) -> Report {
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let gateways = Arc::new(
        stack
            .gateways
            .iter()
            .map(|gateway| gateway.url.clone())
            .collect::<Vec<_>>(),
    );
    let dead_every = plan.jobs / plan.dead_jobs.max(1);
    let submitter = {
        let (http, progress) = (stack.http.clone(), progress.clone());
        let (live_url, dead_url) = (
            stack.receiver().url("/webhooks/jobs"),
            stack.dead_url.clone(),
        );
        let (jobs, dead_jobs) = (plan.jobs, plan.dead_jobs);
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(CLIENT_CONCURRENCY));
            let mut tasks = JoinSet::new();
            let mut pace = tokio::time::interval(PACE);
            for n in 0..jobs {
                pace.tick().await;
                let dead =
                    dead_jobs > 0 && n % dead_every == dead_every - 1 && n / dead_every < dead_jobs;
                let job_id = format!("JOB-{n:04}");
                let url = if dead {
                    dead_url.clone()
                } else {
                    live_url.clone()
                };
                let permit = permits.clone().acquire_owned().await.expect("permits");
                let (http, gateways, progress) = (http.clone(), gateways.clone(), progress.clone());
                tasks.spawn(async move {
                    let submission = submit(http, gateways, progress, n, job_id, url, dead).await;
                    drop(permit);
                    submission
                });
            }
            let mut submissions = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                submissions
                    .push(joined.unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic())));
            }
            submissions
        })
    };

    let trigger = async {
        match plan.trigger {
            Trigger::Delivered(count) => {
                stack.receiver().wait_for_count(count, SETTLE).await;
            }
            Trigger::Accepted(count) => {
                wait_until(&format!("{count} jobs accepted"), SETTLE, || async {
                    (progress.accepted.load(Ordering::SeqCst) >= count).then_some(())
                })
                .await;
                for gateway in &stack.gateways {
                    gateway.process.freeze();
                }
                wait_until("a POST to await a frozen gateway", SETTLE, || async {
                    (progress.posting.load(Ordering::SeqCst) > 0).then_some(())
                })
                .await;
            }
            Trigger::Never => {}
        }
    };
    trigger.await;
    let fault_after = started.elapsed();
    let in_flight_at_fault = progress
        .accepted
        .load(Ordering::SeqCst)
        .saturating_sub(distinct_jobs(stack));
    fault(stack).await;

    let submissions = submitter
        .await
        .unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()));
    assert_eq!(submissions.len(), plan.jobs, "every job was accepted");
    let docs = wait_until_final(stack, &submissions).await;
    let times = Times {
        started,
        fault_after,
        final_after: started.elapsed(),
    };
    check(stack, plan, &submissions, docs, times, in_flight_at_fault).await
}

/// Polls `check` every 100 ms until it returns `Some`, or `None` after `timeout`.
async fn wait_until_or<T>(timeout: Duration, check: impl AsyncFn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Jobs the receiver has seen at least once.
fn distinct_jobs(stack: &Stack) -> usize {
    stack
        .receiver()
        .deliveries()
        .iter()
        .map(|delivery| delivery.header("webhook-id").to_owned())
        .collect::<BTreeSet<_>>()
        .len()
}

/// Polls the status documents of the jobs not yet final until all are; fails naming the
/// stragglers, with the services' logs, after `SETTLE`.
async fn wait_until_final(
    stack: &Stack,
    submissions: &[Submission],
) -> BTreeMap<String, JobStatus> {
    let deadline = Instant::now() + SETTLE;
    let mut pending: BTreeSet<String> = submissions.iter().map(|s| s.job_id.clone()).collect();
    let mut finals = BTreeMap::new();
    let mut last_seen: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let reads: Vec<(String, Option<JobStatus>)> =
            futures::stream::iter(pending.iter().cloned())
                .map(|job_id| async move {
                    let id = JobId::parse(&job_id).expect("a valid id");
                    let doc = stack
                        .topology
                        .status
                        .get(&id)
                        .await
                        .ok()
                        .flatten()
                        .map(|(doc, _)| doc);
                    (job_id, doc)
                })
                .buffer_unordered(32)
                .collect()
                .await;
        for (job_id, doc) in reads {
            match doc {
                Some(doc) if doc.status.is_final() => {
                    pending.remove(&job_id);
                    finals.insert(job_id, doc);
                }
                Some(doc) => {
                    last_seen.insert(job_id, doc.status.as_str().to_owned());
                }
                None => {
                    last_seen.insert(job_id, "(no document)".into());
                }
            }
        }
        if pending.is_empty() {
            return finals;
        }
        if Instant::now() > deadline {
            let stuck: Vec<String> = pending
                .iter()
                .take(20)
                .map(|id| format!("{id}: {}", last_seen.get(id).map_or("?", String::as_str)))
                .collect();
            panic!(
                "{} jobs not final after {SETTLE:?}, e.g. {stuck:?}\n{}",
                pending.len(),
                stack.log_tails(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn check(
    stack: &Stack,
    plan: &Plan,
    submissions: &[Submission],
    docs: BTreeMap<String, JobStatus>,
    times: Times,
    in_flight_at_fault: usize,
) -> Report {
    let verifier = standardwebhooks::Webhook::new(&stack.secret).expect("a valid secret");
    let deliveries = stack.receiver().deliveries();
    let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_seen: BTreeMap<String, Instant> = BTreeMap::new();
    let mut webhook_ids = BTreeSet::new();
    let mut failed_jobs = BTreeSet::new();
    for delivery in &deliveries {
        verifier
            .verify(&delivery.body, &delivery.headers)
            .expect("every delivery is signed with the service's secret");
        let payload = delivery.json();
        let job_id = payload["job_id"].as_str().expect("a job_id").to_owned();
        assert_eq!(delivery.header("webhook-id"), format!("msg_{job_id}"));
        if payload["type"] == "job.failed" {
            failed_jobs.insert(job_id.clone());
        }
        webhook_ids.insert(delivery.header("webhook-id").to_owned());
        first_seen.entry(job_id.clone()).or_insert(delivery.at);
        *per_job.entry(job_id).or_default() += 1;
    }

    let live: BTreeSet<&str> = submissions
        .iter()
        .filter(|s| !s.dead)
        .map(|s| s.job_id.as_str())
        .collect();
    let delivered: BTreeSet<&str> = per_job.keys().map(String::as_str).collect();
    let lost: Vec<&&str> = live.difference(&delivered).take(20).collect();
    assert!(lost.is_empty(), "accepted but never delivered: {lost:?}");
    let strays: Vec<&&str> = delivered.difference(&live).collect();
    assert!(
        strays.is_empty(),
        "delivered but not submitted to the receiver: {strays:?}"
    );

    for submission in submissions {
        let doc = &docs[&submission.job_id];
        if submission.dead {
            assert_eq!(doc.status, Status::Undeliverable, "{}", submission.job_id);
            assert!(
                !doc.deliveries.is_empty()
                    && doc
                        .deliveries
                        .iter()
                        .all(|attempt| attempt.status_code.is_none()),
                "{}'s attempt log shows its failed attempts: {:?}",
                submission.job_id,
                doc.deliveries
            );
        } else {
            assert_eq!(doc.status, Status::Delivered, "{}", submission.job_id);
            let last = doc
                .deliveries
                .last()
                .and_then(|attempt| attempt.status_code);
            assert_eq!(
                last,
                Some(204),
                "{}'s log ends with its delivery",
                submission.job_id
            );
        }
    }

    // Nothing lost on the way either: each job's events are in the stream, once each. A
    // delivery recorded whose report was not yet published (its service killed, or its
    // publish refused during an election) is reported when its message comes back, up to
    // the callback consumer's `ack_wait` (30 s) later: wait for that, then compare.
    let total = plan.jobs;
    let dead = submissions.iter().filter(|s| s.dead).count();
    let expected = [total, total, total - dead, dead];
    let counts = async || {
        let count =
            |filter: &'static str| testkit::nats::count_messages(&stack.topology.stream, filter);
        [
            count("jobs.requested.>").await,
            count("jobs.completed.>").await + count("jobs.failed.>").await,
            count("jobs.delivered.>").await,
            count("jobs.undeliverable.>").await,
        ]
    };
    let reported = wait_until_or(SETTLE, async || {
        let counts = counts().await;
        (counts == expected).then_some(counts)
    })
    .await;
    if reported.is_none() {
        let counts = counts().await;
        panic!(
            "events in the stream (requested, completed + failed, delivered, undeliverable): \
             {counts:?}, expected {expected:?}\n{}",
            stack.log_tails(60)
        );
    }

    let duplicates = deliveries.len() - per_job.len();
    let report = Report {
        name: plan.name,
        accepted: submissions.len(),
        resubmitted: submissions.iter().filter(|s| s.tries > 1).count(),
        deliveries: deliveries.len(),
        duplicates,
        jobs_delivered_twice: per_job.values().filter(|n| **n > 1).count(),
        webhook_ids: webhook_ids.len(),
        failed_jobs: failed_jobs.len(),
        in_flight_at_fault,
        fault_after: times.fault_after,
        delivered_after: first_seen
            .values()
            .max()
            .map_or(Duration::ZERO, |last| last.duration_since(times.started)),
        final_after: times.final_after,
        elapsed: times.started.elapsed(),
        docs,
        notes: Vec::new(),
    };
    assert_eq!(
        report.webhook_ids,
        live.len(),
        "one webhook-id per job, on every retry"
    );
    assert!(
        duplicates <= plan.max_duplicates,
        "{duplicates} duplicate deliveries, more than the {} deliveries that can be in flight",
        plan.max_duplicates
    );
    report
}
