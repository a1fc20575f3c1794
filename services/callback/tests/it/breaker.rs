//! The circuit breaker against real receivers: it never spends a job's retries without a
//! request, it stays closed for a receiver that takes retries, and it opens for a dead one
//! whose jobs still end `undeliverable`.

use std::time::{Duration, Instant};

use serde_json::json;

use jetcall::status::{DeliveryAttempt, JobStatus, Status};
use testkit::WebhookReceiver;
use testkit::metrics::sample;

use crate::running::Running;

const SCHEDULE: [&str; 3] = ["200ms", "400ms", "800ms"];
/// The schedule's whole length: the default longest round is twice it.
const SCHEDULE_LENGTH: Duration = Duration::from_millis(1400);
const COOLDOWN: Duration = Duration::from_secs(1);

fn was_sent(attempt: &DeliveryAttempt) -> bool {
    attempt.error_kind.as_deref() != Some("circuit_open")
}

fn sent(doc: &JobStatus) -> Vec<&DeliveryAttempt> {
    doc.deliveries.iter().filter(|a| was_sent(a)).collect()
}

/// Issue 14, finding 3: every job's first two attempts answered 503 used to open the circuit,
/// whose `circuit_open` entries then spent the retries, and all 50 jobs ended undeliverable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_every_jobs_first_attempts_gets_every_job() {
    const JOBS: usize = 50;
    let running = Running::start(&[
        ("callback.retry_schedule", json!(SCHEDULE)),
        ("callback.breaker_cooldown", json!("1s")),
    ])
    .await;
    let receiver = WebhookReceiver::start().await;
    receiver.fail_first_attempts_of_each_job(2, 503);
    for n in 0..JOBS {
        running
            .completed(&format!("JOB-{n}"), &receiver.url("/hook"))
            .await;
    }
    for n in 0..JOBS {
        let doc = running
            .wait_for_final(&format!("JOB-{n}"), Duration::from_secs(60))
            .await;
        let codes: Vec<_> = doc.deliveries.iter().map(|a| a.status_code).collect();
        assert_eq!(
            doc.status,
            Status::Delivered,
            "JOB-{n}: {:?}",
            doc.deliveries
        );
        assert_eq!(
            codes,
            [Some(503), Some(503), Some(204)],
            "JOB-{n}'s log holds its real attempts only: {:?}",
            doc.deliveries
        );
    }
    assert_eq!(receiver.count(), 3 * JOBS, "one request per logged attempt");
    let metrics = running.metrics().await;
    assert_eq!(
        sample(&metrics, "jetcall_callback_open_circuits", &[]),
        Some(0.0)
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receivers_jobs_end_undeliverable_after_real_attempts_or_the_longest_round() {
    const JOBS: usize = 20;
    const PER_HOST: usize = 4;
    let running = Running::start(&[
        ("callback.retry_schedule", json!(SCHEDULE)),
        ("callback.breaker_cooldown", json!("1s")),
        ("callback.breaker_window", json!("100ms")),
        ("callback.per_host_concurrency", json!(PER_HOST)),
    ])
    .await;
    let dead = WebhookReceiver::start().await;
    dead.fail_first_attempts_of_each_job(usize::MAX, 503);
    for n in 0..JOBS {
        running
            .completed(&format!("DEAD-{n}"), &dead.url("/hook"))
            .await;
    }
    running
        .wait_for_metrics("the dead receiver's circuit to open", |metrics| {
            sample(metrics, "jetcall_callback_open_circuits", &[]) == Some(1.0)
        })
        .await;
    let opened = Instant::now();
    let before_open = dead.count();

    for n in 0..JOBS {
        let doc = running
            .wait_for_final(&format!("DEAD-{n}"), Duration::from_secs(30))
            .await;
        assert_eq!(doc.status, Status::Undeliverable, "DEAD-{n}");
        let sent = sent(&doc);
        assert!(
            sent.len() <= SCHEDULE.len() + 1,
            "DEAD-{n}: more requests than its schedule: {:?}",
            doc.deliveries
        );
        // Ended by its schedule's real attempts, or by the longest a round may last (twice
        // the schedule), counted from its first real attempt: never by skipped ones.
        if sent.len() < SCHEDULE.len() + 1 {
            let first = sent.first().map_or(doc.deliveries[0].at, |a| a.at);
            let given_up = doc.updated_at;
            assert!(
                given_up - first >= 2 * SCHEDULE_LENGTH,
                "DEAD-{n} gave up after {} of {} requests, {:?} into its round: {:?}",
                sent.len(),
                SCHEDULE.len() + 1,
                given_up - first,
                doc.deliveries
            );
        }
        let repeated_notes = doc
            .deliveries
            .windows(2)
            .filter(|pair| !was_sent(&pair[0]) && !was_sent(&pair[1]))
            .count();
        assert_eq!(
            repeated_notes, 0,
            "DEAD-{n}: one note per wait for the circuit, no more: {:?}",
            doc.deliveries
        );
    }
    // While open, the destination gets one probe per cooldown, besides what was already in
    // flight when it opened.
    let while_open = dead.count() - before_open;
    let cooldowns = opened.elapsed().as_secs_f64() / COOLDOWN.as_secs_f64();
    assert!(
        while_open as f64 <= PER_HOST as f64 + cooldowns.ceil() + 1.0,
        "{while_open} requests to a dead receiver in {cooldowns:.1} cooldowns with its circuit open"
    );
    assert!(
        dead.count() < JOBS * (SCHEDULE.len() + 1),
        "the circuit saved requests: {}",
        dead.count()
    );
    running.stop().await;
}
