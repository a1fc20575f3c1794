//! Provisioning against a real nats-server: complete, idempotent, concurrent, and updating.

use std::path::Path;
use std::time::Duration;

use jetcall::Config;
use jetcall::subjects::{CALLBACK_CONSUMER, GENERATOR_CONSUMER};
use jetcall::topology::provision;
use testkit::NatsServer;

fn config(nats: &NatsServer, ack_wait: &str) -> Config {
    testkit::config::config(&nats.url(), &[("generator.ack_wait", ack_wait.into())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_creates_the_documented_topology() {
    let nats = NatsServer::start();
    let config = config(&nats, "30s");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let topology = provision(client, &config).await.expect("provision");

    let stream = topology.stream.get_info().await.expect("stream info");
    assert_eq!(stream.config.name, "JOBS");
    assert_eq!(stream.config.subjects, ["jobs.>"]);
    assert_eq!(stream.config.max_age, Duration::from_secs(7 * 24 * 3600));
    assert!(stream.config.duplicate_window >= Duration::from_secs(120));

    let generator = topology
        .stream
        .consumer_info(GENERATOR_CONSUMER)
        .await
        .expect("generator");
    // The default lane: requests of other lanes have more tokens (`jetcall::lanes`).
    assert_eq!(generator.config.filter_subject, "jobs.requested.*");
    assert_eq!(generator.config.ack_wait, Duration::from_secs(30));
    let callback = topology
        .stream
        .consumer_info(CALLBACK_CONSUMER)
        .await
        .expect("callback");
    assert_eq!(
        callback.config.filter_subjects,
        [
            "jobs.completed.>",
            "jobs.failed.>",
            "jobs.cancelled.>",
            "jobs.expired.>"
        ]
    );

    let mut budgets = topology
        .jetstream
        .get_stream(jetcall::budget::STREAM)
        .await
        .expect("the budgets stream");
    let budgets = budgets.info().await.expect("its info");
    assert_eq!(budgets.config.subjects, ["budgets.>"]);
    assert!(budgets.config.allow_message_counter, "a counter stream");

    let bucket = testkit::jobs::status_bucket(&topology)
        .await
        .status()
        .await
        .expect("bucket status");
    assert_eq!(bucket.bucket(), "job_status");
    assert!(bucket.history() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_services_may_provision_at_once() {
    let nats = NatsServer::start();
    let config = config(&nats, "30s");
    let mut starts = Vec::new();
    for _ in 0..6 {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let config = config.clone();
        starts.push(tokio::spawn(async move {
            provision(client, &config).await.map(|_| ())
        }));
    }
    for start in starts {
        start
            .await
            .expect("task")
            .expect("concurrent provisioning succeeds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_setting_updates_the_existing_consumer() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    provision(client.clone(), &config(&nats, "30s"))
        .await
        .expect("first");
    let topology = provision(client, &config(&nats, "45s"))
        .await
        .expect("second");
    let generator = topology
        .stream
        .consumer_info(GENERATOR_CONSUMER)
        .await
        .expect("generator");
    assert_eq!(generator.config.ack_wait, Duration::from_secs(45));
}

#[test]
fn the_shipped_server_config_is_valid() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats/nats-server.conf");
    let output = std::process::Command::new(testkit::nats::nats_server_binary())
        .arg("-t")
        .arg("-c")
        .arg(&config)
        .output()
        .expect("run nats-server -t");
    assert!(
        output.status.success(),
        "{}: {}{}",
        config.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
