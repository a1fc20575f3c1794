//! A request is never lost when a generator dies, and never paid for twice once generated.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use testkit::fake_anthropic::Scripted;
use testkit::wait_until;

use crate::harness::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_killed_mid_call_loses_nothing() {
    let harness = Harness::start(&[("generator.ack_wait", json!("2s"))]).await;
    // The first call hangs, as a call would when its process is about to die.
    harness
        .claude
        .push(Scripted::Delay(Duration::from_secs(3600)));
    harness.submit("JOB-771").await;

    let mut first = harness.spawn_generator(&[]);
    wait_until(
        "the first generator to call Claude",
        Duration::from_secs(30),
        || async { (harness.claude.calls() == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        harness.status("JOB-771").await.map(|d| d.status.as_str()),
        Some("generating")
    );
    first.kill().expect("kill -9 the generator");
    first.wait().expect("reap");

    let mut second = harness.spawn_generator(&[]);
    let doc = harness.wait_for_status("JOB-771", "completed").await;
    assert_eq!(harness.claude.calls(), 2);
    assert_eq!(doc.generation_attempts, 2);
    assert!(doc.result.is_some());
    assert_eq!(
        harness.count_at_least("jobs.completed.>", 1).await,
        1,
        "exactly one completion is stored"
    );
    harness.wait_until_consumer_idle().await;

    // SIGTERM: a graceful stop exits 0.
    let sent = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = second.wait().expect("wait for the generator");
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_request_for_a_generated_job_makes_no_llm_call() {
    let harness = Harness::start(&[]).await;
    let stop = CancellationToken::new();
    let generator = tokio::spawn(generator::run(
        harness.config.clone(),
        testkit::loopback_listener(),
        stop.clone(),
    ));

    harness.submit("JOB-1").await;
    harness.wait_for_status("JOB-1", "completed").await;
    harness.wait_until_consumer_idle().await;
    assert_eq!(harness.claude.calls(), 1);

    // The same request again, under a new message id so JetStream does not drop it.
    let doc = harness.status("JOB-1").await.expect("document");
    harness
        .publish_request(&doc.request(), "JOB-1.requested.replay")
        .await;
    harness.wait_until_consumer_idle().await;
    assert_eq!(harness.claude.calls(), 1, "the LLM is not called again");
    assert_eq!(
        harness.count("jobs.completed.>").await,
        1,
        "the completion is not stored twice"
    );
    assert_eq!(
        harness.status("JOB-1").await.map(|d| d.generation_attempts),
        Some(1)
    );

    stop.cancel();
    generator
        .await
        .expect("task")
        .expect("generator stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_longer_than_ack_wait_is_kept_alive_by_progress_acks() {
    let harness = Harness::start(&[("generator.ack_wait", json!("1s"))]).await;
    harness.claude.set_delay(Duration::from_millis(3500));
    let stop = CancellationToken::new();
    let generator = tokio::spawn(generator::run(
        harness.config.clone(),
        testkit::loopback_listener(),
        stop.clone(),
    ));

    harness.submit("JOB-SLOW").await;
    harness.wait_for_status("JOB-SLOW", "completed").await;
    harness.wait_until_consumer_idle().await;
    assert_eq!(
        harness.claude.calls(),
        1,
        "the request was not redelivered mid-call"
    );

    stop.cancel();
    generator
        .await
        .expect("task")
        .expect("generator stops cleanly");
}
