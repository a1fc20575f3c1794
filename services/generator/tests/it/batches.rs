//! Bulk jobs through the Message Batches API (the fake's): each job in one batch, recorded as
//! the synchronous path records a call, at the batch price; a result worth another attempt
//! sent again; and whatever instance dies wherever, no job lost, none in a second batch, no
//! event twice.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use jetcall::Kind;
use jetcall::batches::{BatchRecords, BatchState};
use jetcall::lanes::Priority;
use jetcall::status::Status;
use testkit::fake_batches::BatchOutcome;
use testkit::wait_until;

use crate::harness::{Harness, request};

const WAIT: Duration = Duration::from_secs(60);

/// A harness whose generators gather bulk jobs for `gather` and poll every 100 ms.
async fn harness(gather: &str, extra: &[(&str, Value)]) -> Harness {
    let settings = [
        ("generator.batch_max_wait", json!(gather)),
        ("generator.batch_poll_interval", json!("100ms")),
        ("generator.ack_wait", json!("2s")),
    ];
    Harness::start(&[&settings[..], extra].concat()).await
}

fn bulk_ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Submits bulk product-description jobs as the gateway would, in parallel.
async fn submit_bulk(harness: &Harness, jobs: &[String]) {
    submit_of(harness, None, Priority::Bulk, jobs).await;
}

/// Submits jobs of `tenant` (an API key's name; `None` without keys) at `priority`.
async fn submit_of(harness: &Harness, tenant: Option<&str>, priority: Priority, jobs: &[String]) {
    futures::future::join_all(jobs.chunks(200).map(|chunk| async move {
        for job_id in chunk {
            let input = json!({"product_id": "P-1", "product_name": job_id, "specs": "3 blades"});
            let mut job = request(job_id, Kind::product_description(), input);
            job.priority = priority;
            job.tenant = tenant.map(str::to_owned);
            harness.submit_request(&job).await;
        }
    }))
    .await;
}

/// The catalogue's key, with `max_concurrency` calls at most.
fn capped_key(max_concurrency: u32) -> Value {
    json!([{
        "key": "key-of-the-catalogue-import",
        "name": "catalogue",
        "max_concurrency": max_concurrency,
        "callback_allowlist": ["127.0.0.1"],
    }])
}

async fn wait_for_all(harness: &Harness, jobs: &[String], status: &str) {
    wait_until(
        &format!("{} jobs to be {status}", jobs.len()),
        WAIT,
        || async {
            for job in jobs {
                let doc = harness.status(job).await?;
                if doc.status.as_str() != status {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// Each job went in exactly one batch (or, given `again`, exactly as many as said there).
fn assert_each_in_one_batch(harness: &Harness, jobs: &[String], again: &BTreeMap<&str, usize>) {
    let sent = harness.claude.batch_requests_per_custom_id();
    for job in jobs {
        let want = again.get(job.as_str()).copied().unwrap_or(1);
        assert_eq!(sent.get(job).copied(), Some(want), "batches holding {job}");
    }
    assert_eq!(sent.len(), jobs.len(), "only these jobs were batched");
    assert_eq!(harness.claude.calls(), 0, "no synchronous call was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_jobs_are_generated_in_batches_at_the_batch_price() {
    let harness = harness("300ms", &[("generator.batch_max_requests", json!(800))]).await;
    harness
        .claude
        .set_batch_processing_time(Duration::from_millis(300));
    let jobs = bulk_ids("BULK", 2_000);
    let (generator, _) = harness.run_generator();
    submit_bulk(&harness, &jobs).await;
    wait_for_all(&harness, &jobs, "completed").await;

    assert_each_in_one_batch(&harness, &jobs, &BTreeMap::new());
    // Full batches of 800, then whatever had gathered when the wait ran out.
    let batches = harness.claude.batches();
    assert!(batches.len() >= 3, "{} batches", batches.len());
    assert!(batches.iter().all(|batch| batch.custom_ids.len() <= 800));
    assert_eq!(
        harness.count_at_least("jobs.completed.>", 2_000).await,
        2_000
    );

    let doc = harness.status(&jobs[0]).await.expect("a document");
    let usage = doc.usage.expect("usage");
    let model = doc.model.clone().expect("model");
    let prices = &harness.config.prices;
    let batch = prices.cost(&model, &usage, jetcall::cost::Path::Batch);
    let sync = prices.cost(&model, &usage, jetcall::cost::Path::Sync);
    assert_eq!(doc.cost, batch);
    let (batch, sync) = (batch.expect("priced"), sync.expect("priced"));
    assert!(
        batch.microdollars * 2 <= sync.microdollars + 1
            && batch.microdollars * 2 + 1 >= sync.microdollars,
        "half price: {batch:?} against {sync:?}"
    );
    assert_eq!(doc.generation_attempts, 1);
    let batch_ref = doc.batch.expect("the batch it was in");
    assert!(batch_ref.id.is_some_and(|id| id.starts_with("msgbatch_")));
    generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_batched_in_a_recorded_batch_and_ends_naming_it() {
    let harness = harness("100ms", &[]).await;
    harness
        .claude
        .set_batch_processing_time(Duration::from_secs(3));
    let jobs = bulk_ids("WAITS", 1);
    let (generator, _) = harness.run_generator();
    submit_bulk(&harness, &jobs).await;
    let records = BatchRecords::new(harness.topology.status.clone());
    let batch_id = wait_until("the job's batch to be created", WAIT, || async {
        let doc = harness.status(&jobs[0]).await?;
        let batch = doc.batch.filter(|_| doc.status == Status::Batched)?;
        let (record, _) = records.get(&batch.record).await.ok()??;
        (record.state == BatchState::Submitted).then_some(record.batch_id?)
    })
    .await;
    assert!(batch_id.starts_with("msgbatch_"), "{batch_id}");
    let done = harness.wait_for_status(&jobs[0], "completed").await;
    assert_eq!(done.batch.and_then(|batch| batch.id), Some(batch_id));
    // The record is finished after the results it holds are recorded: just after this job.
    wait_until("the batch to be finished with", WAIT, || async {
        let open = records.open().await.expect("the open batches");
        open.is_empty().then_some(())
    })
    .await;
    generator.stop().await;
}

/// `max_concurrency` caps a key's calls, and a batch is not a call: the key's bulk jobs fill
/// one batch however low its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_cap_on_calls_does_not_cap_its_batches() {
    const JOBS: usize = 40;
    let harness = harness("1s", &[("gateway.api_keys", capped_key(2))]).await;
    let jobs = bulk_ids("CAPPED", JOBS);
    let (generator, _) = harness.run_generator();
    submit_of(&harness, Some("catalogue"), Priority::Bulk, &jobs).await;
    wait_for_all(&harness, &jobs, "completed").await;
    assert_each_in_one_batch(&harness, &jobs, &BTreeMap::new());
    let largest = harness
        .claude
        .batches()
        .iter()
        .map(|batch| batch.custom_ids.len())
        .max();
    // With the cap as the lane's ack limit, a batch could hold two.
    assert!(largest > Some(2), "the largest batch held {largest:?} jobs");
    generator.stop().await;
}

/// A key at its cap with an interactive call still has its bulk jobs gathered meanwhile: a
/// batch is not a call, so it does not wait for the call to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_at_its_cap_still_has_its_bulk_jobs_gathered() {
    const INTERACTIVE: usize = 2;
    const CALL: Duration = Duration::from_secs(3);
    let harness = harness("500ms", &[("gateway.api_keys", capped_key(1))]).await;
    harness.claude.set_delay(CALL);
    harness
        .claude
        .set_batch_processing_time(Duration::from_millis(100));
    let interactive = bulk_ids("CALLED", INTERACTIVE);
    let bulk = bulk_ids("GATHERED", 40);
    let (generator, _) = harness.run_generator();
    submit_of(
        &harness,
        Some("catalogue"),
        Priority::Interactive,
        &interactive,
    )
    .await;
    wait_until("the first call", WAIT, || async {
        (harness.claude.requests().len() == 1).then_some(())
    })
    .await;
    submit_of(&harness, Some("catalogue"), Priority::Bulk, &bulk).await;
    wait_until("the bulk jobs' batch", WAIT, || async {
        (!harness.claude.batches().is_empty()).then_some(())
    })
    .await;
    // Gathered for half a second, sealed: well within the first call's 3 s.
    assert!(
        harness
            .claude
            .requests()
            .iter()
            .all(|call| call.answered_at.is_none()),
        "the batch waited for a call to end"
    );
    wait_for_all(&harness, &bulk, "completed").await;
    wait_for_all(&harness, &interactive, "completed").await;
    assert_eq!(
        harness.claude.calls(),
        INTERACTIVE,
        "the bulk jobs were not called"
    );
    generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_worth_another_attempt_go_in_a_later_batch_and_others_fail() {
    let harness = harness("200ms", &[]).await;
    harness
        .claude
        .set_batch_processing_time(Duration::from_millis(200));
    let jobs = bulk_ids("AGAIN", 5);
    let overloaded = BatchOutcome::Errored {
        error_type: "overloaded_error".into(),
        message: "Overloaded".into(),
    };
    harness.claude.push_batch_outcome(&jobs[0], overloaded);
    harness
        .claude
        .push_batch_outcome(&jobs[1], BatchOutcome::Expired);
    harness
        .claude
        .push_batch_outcome(&jobs[2], BatchOutcome::Canceled);
    let invalid = BatchOutcome::Errored {
        error_type: "invalid_request_error".into(),
        message: "max_tokens: too large".into(),
    };
    harness.claude.push_batch_outcome(&jobs[3], invalid);
    let (generator, _) = harness.run_generator();
    submit_bulk(&harness, &jobs).await;

    for job in [&jobs[0], &jobs[1], &jobs[2], &jobs[4]] {
        let doc = harness.wait_for_status(job, "completed").await;
        let want = if job == &jobs[4] { 1 } else { 2 };
        assert_eq!(doc.generation_attempts, want, "{job}");
    }
    let failed = harness.wait_for_status(&jobs[3], "failed").await;
    assert_eq!(
        failed.error.map(|error| error.kind).as_deref(),
        Some("invalid_request_error")
    );
    let again = BTreeMap::from([
        (jobs[0].as_str(), 2),
        (jobs[1].as_str(), 2),
        (jobs[2].as_str(), 2),
    ]);
    assert_each_in_one_batch(&harness, &jobs, &again);
    assert_eq!(harness.count_at_least("jobs.completed.>", 4).await, 4);
    assert_eq!(harness.count_at_least("jobs.failed.>", 1).await, 1);
    generator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_be_created_is_tried_again_with_the_same_jobs() {
    let harness = harness("100ms", &[]).await;
    harness
        .claude
        .set_batch_processing_time(Duration::from_millis(100));
    harness.claude.fail_next_batch_creations(2, 529);
    let jobs = bulk_ids("REFUSED", 20);
    let (generator, _) = harness.run_generator();
    submit_bulk(&harness, &jobs).await;
    wait_for_all(&harness, &jobs, "completed").await;
    assert_each_in_one_batch(&harness, &jobs, &BTreeMap::new());
    for job in &jobs {
        let doc = harness.status(job).await.expect("a document");
        assert_eq!(doc.generation_attempts, 1, "a refused batch is no attempt");
    }
    generator.stop().await;
}

/// The settings of [`harness`] for a generator child process, which a test can kill -9.
fn child_batch_env(gather: &str) -> Vec<(&'static str, String)> {
    vec![
        ("JETCALL_GENERATOR__BATCH_MAX_WAIT", gather.into()),
        ("JETCALL_GENERATOR__BATCH_POLL_INTERVAL", "100ms".into()),
    ]
}

fn kill(mut child: std::process::Child) {
    child.kill().expect("kill -9 the generator");
    child.wait().expect("the generator is gone");
}

/// After a kill and a second generator: every job completed once, from the batches the
/// fake saw, each job in one of them, with one completion event each.
async fn assert_finished_once(harness: &Harness, jobs: &[String], batches: usize) {
    wait_for_all(harness, jobs, "completed").await;
    assert_each_in_one_batch(harness, jobs, &BTreeMap::new());
    assert_eq!(harness.claude.batches().len(), batches, "no second batch");
    assert_eq!(
        harness.count_at_least("jobs.completed.>", jobs.len()).await,
        jobs.len(),
        "one completion event per job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_creating_a_batch_before_recording_it_the_batch_is_adopted() {
    let harness = harness("100ms", &[]).await;
    let claude = &harness.claude;
    claude.set_batch_processing_time(Duration::from_millis(300));
    // The batch exists at the API while its creator still waits for the answer.
    claude.set_batch_create_answer_delay(Duration::from_secs(60));
    let jobs = bulk_ids("KILLED-CREATING", 50);
    let first = harness.spawn_generator(&child_batch_env("100ms"));
    submit_bulk(&harness, &jobs).await;
    wait_until("a batch of all 50 jobs", WAIT, || async {
        let batches = claude.batches();
        (batches.len() == 1 && batches[0].custom_ids.len() == jobs.len()).then_some(())
    })
    .await;
    kill(first);
    claude.set_batch_create_answer_delay(Duration::ZERO);

    let (second, _) = harness.run_generator();
    assert_finished_once(&harness, &jobs, 1).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_polling_another_instance_takes_the_batch_over() {
    let harness = harness("100ms", &[]).await;
    let claude = &harness.claude;
    claude.set_batch_processing_time(Duration::from_secs(4));
    let jobs = bulk_ids("KILLED-POLLING", 50);
    let first = harness.spawn_generator(&child_batch_env("100ms"));
    submit_bulk(&harness, &jobs).await;
    wait_for_all(&harness, &jobs, "batched").await;
    // It polls only a batch recorded as created.
    wait_until("the first generator to poll", WAIT, || async {
        (claude.batch_reads() > 0).then_some(())
    })
    .await;
    kill(first);

    let (second, _) = harness.run_generator();
    assert_finished_once(&harness, &jobs, 1).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_halfway_through_the_results_the_rest_are_recorded_and_none_twice() {
    let harness = harness("1s", &[]).await;
    let claude = &harness.claude;
    claude.set_batch_processing_time(Duration::from_millis(200));
    // 256 results a chunk, a chunk every 300 ms: a few seconds to read 2,000.
    claude.set_batch_results_chunk_delay(Duration::from_millis(300));
    let jobs = bulk_ids("KILLED-RESULTS", 2_000);
    submit_bulk(&harness, &jobs).await;
    let first = harness.spawn_generator(&child_batch_env("1s"));
    let completed = wait_until("some results recorded", WAIT, || async {
        let completed = harness.count("jobs.completed.>").await;
        (completed >= 300).then_some(completed)
    })
    .await;
    kill(first);
    assert!(
        completed < jobs.len(),
        "killed after every result: {completed}"
    );
    let batches = claude.batches().len();

    let (second, _) = harness.run_generator();
    assert_finished_once(&harness, &jobs, batches).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sent_before_they_were_switched_off_are_still_finished() {
    let harness = harness("100ms", &[]).await;
    let claude = &harness.claude;
    claude.set_batch_processing_time(Duration::from_secs(2));
    let jobs = bulk_ids("SWITCHED-OFF", 20);
    let (first, _) = harness.run_generator();
    submit_bulk(&harness, &jobs).await;
    wait_for_all(&harness, &jobs, "batched").await;
    wait_until("the batch created", WAIT, || async {
        (claude.batches().len() == 1).then_some(())
    })
    .await;
    first.stop().await;

    // Restarted with bulk jobs called one by one: the batch sent is polled to the end.
    let mut config = harness.config.clone();
    config.generator.batches = false;
    let stop = tokio_util::sync::CancellationToken::new();
    let second = tokio::spawn(generator::run(
        config,
        testkit::loopback_listener(),
        stop.clone(),
    ));
    wait_for_all(&harness, &jobs, "completed").await;
    assert_eq!(claude.calls(), 0, "no job was called again");
    assert_each_in_one_batch(&harness, &jobs, &BTreeMap::new());
    stop.cancel();
    second
        .await
        .expect("generator task")
        .expect("generator stops cleanly");
}
