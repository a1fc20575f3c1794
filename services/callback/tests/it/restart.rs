//! kill -9 of the callback service during a backlog of retries: after a restart every job is
//! delivered, and no retry is lost.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use jetcall::JobId;
use jetcall::signing::SigningKey;
use jetcall::status::Status;
use testkit::{NatsServer, WebhookReceiver, wait_until};

const JOBS: usize = 20;
const SCHEDULE: &str = r#"["300ms","300ms","300ms","300ms","300ms","300ms"]"#;

fn spawn_callback(nats: &NatsServer, secret: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_callback"))
        .env("NATS_URL", nats.url())
        .env("JETCALL_CONFIG", "/dev/null")
        .env("JETCALL_CALLBACK__SIGNING_SECRET", secret)
        // Its receivers listen on loopback, which the default allowlist refuses.
        .env("JETCALL_GATEWAY__CALLBACK_ALLOWLIST", r#"["127.0.0.1"]"#)
        .env("JETCALL_CALLBACK__LISTEN", "127.0.0.1:0")
        .env("JETCALL_CALLBACK__RETRY_SCHEDULE", SCHEDULE)
        // The receiver fails on purpose; its circuit must not hold the retries back here.
        .env("JETCALL_CALLBACK__BREAKER_COOLDOWN", "1ms")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the callback binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_callback_service_loses_no_delivery() {
    testkit::init_logs();
    let nats = NatsServer::start();
    let config = testkit::config::config(&nats.url(), &[]);
    let topology = testkit::config::provision(&config).await;
    let receiver = WebhookReceiver::start().await;
    // Two failures per job on average: a backlog of retries.
    receiver.fail_next(&[500; 2 * JOBS]);
    let secret = SigningKey::generate();

    for n in 0..JOBS {
        testkit::jobs::completed_job(&topology, &format!("JOB-{n}"), &receiver.url("/cb"))
            .await
            .expect("a completed job");
    }
    let mut first = spawn_callback(&nats, &secret);
    receiver
        .wait_for(JOBS + JOBS / 2, Duration::from_secs(30))
        .await;
    first.kill().expect("kill -9");
    first.wait().expect("reap");
    let before = receiver.deliveries().len();

    let mut second = spawn_callback(&nats, &secret);
    for n in 0..JOBS {
        let id = JobId::parse(&format!("JOB-{n}")).expect("id");
        let doc = wait_until(
            &format!("JOB-{n} delivered"),
            Duration::from_secs(60),
            || async {
                let (doc, _) = topology.status.get(&id).await.ok()??;
                (doc.status == Status::Delivered).then_some(doc)
            },
        )
        .await;
        let last = doc
            .deliveries
            .last()
            .and_then(|attempt| attempt.status_code);
        assert_eq!(last, Some(204), "JOB-{n}'s log ends with its delivery");
    }
    let deliveries = receiver.deliveries();
    assert!(
        deliveries.len() > before,
        "the restarted service carried on"
    );
    let mut duplicates = 0;
    for n in 0..JOBS {
        let webhook_id = format!("msg_JOB-{n}");
        let successes = deliveries
            .iter()
            .enumerate()
            .filter(|(_, d)| d.header("webhook-id") == webhook_id)
            // The first 2 × JOBS answers were the scripted failures.
            .filter(|(i, _)| *i >= 2 * JOBS)
            .count();
        assert!(successes >= 1, "JOB-{n} was never answered 204");
        duplicates += successes - 1;
    }
    // At least once: a delivery made just before the kill may be made again.
    eprintln!("duplicate deliveries after kill -9: {duplicates}");
    assert_eq!(
        testkit::nats::count_messages(&topology.stream, "jobs.delivered.>").await,
        JOBS
    );
    let _ = second.kill();
    let _ = second.wait();
}
