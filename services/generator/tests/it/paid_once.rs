//! One paid call per attempt: however long a message waits (for the shared rate limit, behind
//! slow calls, through a NATS restart), a redelivered copy never calls the LLM again; and a
//! graceful stop lets the calls in flight finish and records them.

use std::time::Duration;

use serde_json::json;

use jetcall::JobId;
use testkit::fake_anthropic::Scripted;
use testkit::wait_until;

use crate::harness::Harness;

fn job_ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// Every job's prompt reached the LLM exactly once, and nothing else did.
fn assert_each_prompt_paid_once(harness: &Harness, jobs: &[String]) {
    let calls = harness.claude.calls_per_prompt();
    let paid_twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(
        paid_twice.is_empty(),
        "{} calls for {} prompts; paid more than once (the first five): {paid_twice:?}",
        harness.claude.calls(),
        jobs.len()
    );
    for job in jobs {
        assert!(
            calls
                .keys()
                .any(|prompt| prompt.contains(&format!(" {job} "))),
            "{job} was never sent to the LLM"
        );
    }
    assert_eq!(harness.claude.calls(), jobs.len());
}

/// Waits for `job` to be `completed`, reading through a NATS restart.
async fn wait_for_completion(harness: &Harness, job: &str) {
    let id = JobId::parse(job).expect("valid id");
    wait_until(
        &format!("job {job} to be completed"),
        Duration::from_secs(40),
        || async {
            let (doc, _) = harness.topology.status.get(&id).await.ok().flatten()?;
            (doc.status.as_str() == "completed").then_some(())
        },
    )
    .await;
}

/// Issue 14's reproduction: the backlog waits for the cluster-wide rate limit far longer
/// than `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_backlog_pays_for_each_prompt_once() {
    let harness = Harness::start(&[
        ("generator.requests_per_minute", json!(600)),
        ("generator.ack_wait", json!("2s")),
        ("generator.concurrency", json!(32)),
    ])
    .await;
    let jobs = job_ids("RATED", 200);
    for job in &jobs {
        harness.submit(job).await;
    }
    let (generator, _) = harness.run_generator();
    for job in &jobs {
        wait_for_completion(&harness, job).await;
    }
    harness.wait_until_consumer_idle().await;
    generator.stop().await;
    assert_each_prompt_paid_once(&harness, &jobs);
}

/// Messages fetched while every slot is busy wait behind calls slower than `ack_wait`, and
/// are redelivered while their first copy is still being answered: calls of uneven length
/// (every third one takes 4 s) let the second copy find a free slot meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_behind_calls_slower_than_ack_wait_pays_for_each_prompt_once() {
    let harness = Harness::start(&[
        ("generator.ack_wait", json!("1s")),
        ("generator.concurrency", json!(4)),
    ])
    .await;
    harness.claude.set_delay(Duration::from_millis(1200));
    harness.claude.set_cycle(vec![
        Some(Scripted::Delay(Duration::from_secs(4))),
        None,
        None,
    ]);
    let jobs = job_ids("SLOW", 24);
    for job in &jobs {
        harness.submit(job).await;
    }
    let (generator, _) = harness.run_generator();
    for job in &jobs {
        wait_for_completion(&harness, job).await;
    }
    harness.wait_until_consumer_idle().await;
    generator.stop().await;
    assert_each_prompt_paid_once(&harness, &jobs);
}

/// The server goes away while calls are in flight and their progress acks are lost: the
/// redelivered copies find the calls' leases and wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_during_long_calls_pays_for_each_prompt_once() {
    // Free slots, so a redelivered copy starts at once beside its first.
    let mut harness = Harness::start(&[
        ("generator.ack_wait", json!("2s")),
        ("generator.concurrency", json!(16)),
    ])
    .await;
    harness.claude.set_delay(Duration::from_secs(8));
    let jobs = job_ids("RESTART", 8);
    for job in &jobs {
        harness.submit(job).await;
    }
    let (generator, _) = harness.run_generator();
    wait_until("every call to start", Duration::from_secs(30), || async {
        (harness.claude.calls() == jobs.len()).then_some(())
    })
    .await;
    // The outage is the fault injected: longer than ack_wait, so the calls' progress acks
    // are lost and JetStream redelivers their requests while the calls go on.
    harness.nats.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    harness.nats.restart();
    for job in &jobs {
        wait_for_completion(&harness, job).await;
    }
    harness.wait_until_consumer_idle().await;
    generator.stop().await;
    assert_each_prompt_paid_once(&harness, &jobs);
}

/// A graceful stop stops pulling and lets the calls in flight finish: their results are
/// recorded, not thrown away with a NAK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_calls_in_flight_finish_and_records_them() {
    let harness = Harness::start(&[("generator.concurrency", json!(4))]).await;
    harness.claude.set_delay(Duration::from_secs(2));
    let jobs = job_ids("GRACE", 4);
    for job in &jobs {
        harness.submit(job).await;
    }
    let (generator, _) = harness.run_generator();
    wait_until("every call to start", Duration::from_secs(30), || async {
        (harness.claude.calls() == jobs.len()).then_some(())
    })
    .await;
    generator.stop().await;
    for job in &jobs {
        let status = harness.status(job).await.map(|doc| doc.status.as_str());
        assert_eq!(
            status,
            Some("completed"),
            "{job} when the generator stopped"
        );
    }
    assert_eq!(harness.count("jobs.completed.>").await, jobs.len());
    assert_each_prompt_paid_once(&harness, &jobs);
}

/// A call still running when the grace is over is handed back at once, so another instance
/// takes the job up without waiting for `ack_wait` or the call's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_a_call_that_outlives_the_grace() {
    let harness = Harness::start(&[
        ("generator.ack_wait", json!("30s")),
        ("generator.shutdown_grace", json!("1s")),
    ])
    .await;
    harness
        .claude
        .push(Scripted::Delay(Duration::from_secs(3600)));
    let (first, _) = harness.run_generator();
    harness.submit("JOB-2").await;
    wait_until("the call to start", Duration::from_secs(30), || async {
        (harness.claude.calls() == 1).then_some(())
    })
    .await;
    first.stop().await;
    assert_eq!(
        harness.status("JOB-2").await.map(|d| d.status.as_str()),
        Some("generating")
    );

    // Handed back with a NAK and its lease released, the job is taken up long before the
    // 30 s ack_wait would have returned it.
    let (second, _) = harness.run_generator();
    wait_until(
        "the job to be completed by the second generator",
        Duration::from_secs(15),
        || async {
            harness
                .status("JOB-2")
                .await
                .filter(|doc| doc.status.as_str() == "completed")
        },
    )
    .await;
    second.stop().await;
    assert_eq!(harness.claude.calls(), 2);
}

/// Calls still waiting for their turn in the rate limit when shutdown comes are never sent:
/// handed back at once, with their attempt given back, for another instance to make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_the_calls_still_waiting_for_the_rate_limit_unpaid() {
    let harness = Harness::start(&[
        ("generator.requests_per_minute", json!(60)),
        ("generator.concurrency", json!(4)),
    ])
    .await;
    let jobs = job_ids("QUEUED", 4);
    for job in &jobs {
        harness.submit(job).await;
    }
    let (first, _) = harness.run_generator();
    wait_until(
        "the first call to start",
        Duration::from_secs(30),
        || async { (harness.claude.calls() >= 1).then_some(()) },
    )
    .await;
    first.stop().await;
    let called = harness.claude.calls_per_prompt();
    assert!(called.len() < jobs.len(), "one call a second: {called:?}");
    for job in &jobs {
        let doc = harness.status(job).await.expect("document");
        let was_called = called
            .keys()
            .any(|prompt| prompt.contains(&format!(" {job} ")));
        if was_called {
            assert_eq!(
                doc.status.as_str(),
                "completed",
                "{job}: called, so recorded"
            );
        } else {
            assert_eq!(doc.status.as_str(), "generating", "{job}");
            assert_eq!(doc.generation_attempts, 0, "{job}: no call, no attempt");
            assert!(doc.lease.is_none(), "{job}: its lease was released");
        }
    }

    let (second, _) = harness.run_generator();
    for job in &jobs {
        wait_for_completion(&harness, job).await;
    }
    harness.wait_until_consumer_idle().await;
    second.stop().await;
    assert_each_prompt_paid_once(&harness, &jobs);
}
