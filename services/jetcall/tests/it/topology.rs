//! Provisioning against a real nats-server: complete, idempotent, concurrent, and updating
//! only what the provisioning service's configuration owns.

use std::path::Path;
use std::time::Duration;

use jetcall::Config;
use jetcall::lanes::{Lane, Priority, lane_of};
use jetcall::subjects::{CALLBACK_CONSUMER, GENERATOR_CONSUMER};
use jetcall::topology::{Provisioner, provision};
use serde_json::{Value, json};
use testkit::NatsServer;

fn config(nats: &NatsServer, ack_wait: &str) -> Config {
    testkit::config::config(&nats.url(), &[("generator.ack_wait", ack_wait.into())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_creates_the_documented_topology() {
    let nats = NatsServer::start();
    let config = config(&nats, "30s");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let topology = provision(client, &config, Provisioner::Operator)
        .await
        .expect("provision");

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
    let services = [
        Provisioner::Gateway,
        Provisioner::Generator,
        Provisioner::Callback,
    ];
    for service in services.into_iter().cycle().take(6) {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let config = config.clone();
        starts.push(tokio::spawn(async move {
            provision(client, &config, service).await.map(|_| ())
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
    provision(client.clone(), &config(&nats, "30s"), Provisioner::Operator)
        .await
        .expect("first");
    let topology = provision(client, &config(&nats, "45s"), Provisioner::Generator)
        .await
        .expect("second");
    let generator = generator_consumer(&topology).await;
    assert_eq!(generator.config.ack_wait, Duration::from_secs(45));
}

async fn generator_consumer(
    topology: &jetcall::topology::Topology,
) -> async_nats::jetstream::consumer::Info {
    topology
        .stream
        .consumer_info(GENERATOR_CONSUMER)
        .await
        .expect("generator")
}

/// A service's configuration with `generator` settings and API keys of its own.
fn service_config(nats: &NatsServer, ack_wait: &str, max_ack_pending: i64, keys: Value) -> Config {
    testkit::config::config(
        &nats.url(),
        &[
            ("generator.ack_wait", ack_wait.into()),
            ("generator.max_ack_pending", max_ack_pending.into()),
            ("gateway.api_keys", keys),
        ],
    )
}

fn catalogue_key(weight: u32, max_concurrency: u32) -> Value {
    json!([{
        "key": "key-of-the-catalogue-import",
        "name": "catalogue",
        "weight": weight,
        "max_concurrency": max_concurrency,
        "callback_allowlist": ["127.0.0.1"],
    }])
}

/// What the catalogue's two lanes say: ack wait and limit, and the key's share.
async fn catalogue_lanes(
    topology: &jetcall::topology::Topology,
) -> Vec<(Duration, i64, u32, Option<u32>)> {
    let mut lanes = Vec::new();
    for priority in Priority::ALL {
        let name = Lane::new(Some("catalogue"), priority).consumer_name();
        let info = topology
            .stream
            .consumer_info(&name)
            .await
            .expect("the lane");
        let (_, share) = lane_of(&info).expect("a lane");
        lanes.push((
            info.config.ack_wait,
            info.config.max_ack_pending,
            share.weight,
            share.max_concurrency,
        ));
    }
    lanes
}

/// Services started with different configurations: whichever starts last, the generators'
/// settings stay the generators', the keys' shares the gateways', and the callback's
/// defaults change neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_changes_only_what_its_configuration_owns() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let generators = service_config(&nats, "45s", 20_000, json!([]));
    let gateways = service_config(&nats, "30s", 4_096, catalogue_key(3, 5));
    let callbacks = service_config(&nats, "30s", 4_096, catalogue_key(1, 50));
    for (config, service) in [
        (&generators, Provisioner::Generator),
        (&gateways, Provisioner::Gateway),
        (&callbacks, Provisioner::Callback),
    ] {
        provision(client.clone(), config, service)
            .await
            .expect("provision");
    }
    let topology = provision(client.clone(), &callbacks, Provisioner::Callback)
        .await
        .expect("provision");
    let generator = generator_consumer(&topology).await;
    assert_eq!(generator.config.ack_wait, Duration::from_secs(45));
    assert_eq!(generator.config.max_ack_pending, 20_000);
    // The gateway's key, on the generators' ack settings; the interactive lane's limit is
    // the key's cap.
    let (ack_wait, bulk_limit) = (Duration::from_secs(45), 20_000);
    assert_eq!(
        catalogue_lanes(&topology).await,
        [
            (ack_wait, 5, 3, Some(5)),
            (ack_wait, bulk_limit, 3, Some(5))
        ]
    );

    // A generator restarted with another ack wait brings every lane to it, its key's share
    // kept, though its configuration has no keys.
    let generators = service_config(&nats, "50s", 20_000, json!([]));
    provision(client.clone(), &generators, Provisioner::Generator)
        .await
        .expect("provision");
    let ack_wait = Duration::from_secs(50);
    assert_eq!(
        catalogue_lanes(&topology).await,
        [
            (ack_wait, 5, 3, Some(5)),
            (ack_wait, bulk_limit, 3, Some(5))
        ]
    );

    // A gateway with the key's new share changes it, and leaves the ack settings.
    let gateways = service_config(&nats, "30s", 4_096, catalogue_key(2, 8));
    provision(client.clone(), &gateways, Provisioner::Gateway)
        .await
        .expect("provision");
    assert_eq!(
        catalogue_lanes(&topology).await,
        [
            (ack_wait, 8, 2, Some(8)),
            (ack_wait, bulk_limit, 2, Some(8))
        ]
    );

    // The operator's `jetcall topology` sets everything from its one configuration.
    provision(client, &callbacks, Provisioner::Operator)
        .await
        .expect("provision");
    let ack_wait = Duration::from_secs(30);
    assert_eq!(
        catalogue_lanes(&topology).await,
        [(ack_wait, 50, 1, Some(50)), (ack_wait, 4_096, 1, Some(50))]
    );
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
