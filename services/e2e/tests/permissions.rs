//! The NATS users of `nats/accounts.conf` on a real nats-server: each service does all of its
//! work with its own user and no permissions violation, and each user is refused what belongs
//! to another service or to the operator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use jetcall::Config;
use jetcall::events::JobRequested;
use jetcall::signing::SigningKey;
use jetcall::status::JobStatus;
use jetcall::topology::Topology;
use jetcall::{JobId, Kind};
use testkit::fake_anthropic::{self, Scripted};
use testkit::{FakeAnthropic, NatsServer, WebhookReceiver};

const WAIT: Duration = Duration::from_secs(30);

/// The users of `nats/accounts.conf`, with the variable their password is read from.
const USERS: [(&str, &str, &str); 5] = [
    (
        "admin",
        "JETCALL_NATS_ADMIN_PASSWORD",
        "admin-test-password",
    ),
    (
        "gateway",
        "JETCALL_NATS_GATEWAY_PASSWORD",
        "gateway-test-password",
    ),
    (
        "generator",
        "JETCALL_NATS_GENERATOR_PASSWORD",
        "generator-test-password",
    ),
    (
        "callback",
        "JETCALL_NATS_CALLBACK_PASSWORD",
        "callback-test-password",
    ),
    ("sys", "JETCALL_NATS_SYS_PASSWORD", "sys-test-password"),
];

fn password(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(name, _, _)| *name == user)
        .map(|(_, _, password)| *password)
        .unwrap_or_else(|| panic!("no user {user} in the test's table"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A nats-server with the shipped accounts file as its configuration.
fn secured_server() -> NatsServer {
    let accounts = repo_root().join("nats/accounts.conf");
    let text = std::fs::read_to_string(&accounts)
        .unwrap_or_else(|err| panic!("read {}: {err}", accounts.display()));
    let env: Vec<(&str, &str)> = USERS.iter().map(|(_, var, pw)| (*var, *pw)).collect();
    NatsServer::start_with_config(&text, &env)
}

/// A service's configuration as a deployment would give it: its own NATS user, and the
/// topology left to the operator.
fn config_as(nats: &NatsServer, user: &str, settings: &[(&str, Value)]) -> Config {
    let base = [
        ("nats.user", json!(user)),
        ("nats.password", json!(password(user))),
        ("nats.provision", json!(user == "admin")),
    ];
    testkit::config::config(&nats.url(), &[&base[..], settings].concat())
}

/// The operator's step before the services start: `jetcall topology` as `admin`, with the
/// services' settings.
async fn provision_as_admin(nats: &NatsServer, settings: &[(&str, Value)]) -> Topology {
    let admin = config_as(nats, "admin", settings);
    let client = jetcall::connect::connect(&admin, "test-admin")
        .await
        .expect("connect as admin");
    tokio::time::timeout(
        WAIT,
        jetcall::topology::provision(client, &admin, jetcall::topology::Provisioner::Operator),
    )
    .await
    .expect("provisioning as admin timed out")
    .unwrap_or_else(|err| panic!("provision as admin on {}: {err}", nats.url()))
}

type Service = (
    &'static str,
    CancellationToken,
    JoinHandle<Result<(), String>>,
);

fn spawn_service<F>(name: &'static str, run: impl FnOnce(CancellationToken) -> F) -> Service
where
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let token = CancellationToken::new();
    let handle = tokio::spawn(run(token.clone()));
    (name, token, handle)
}

async fn stop(services: Vec<Service>) {
    for (_, token, _) in &services {
        token.cancel();
    }
    for (name, _, handle) in services {
        let result = tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .unwrap_or_else(|_| panic!("{name} did not stop within 20 s"));
        assert_eq!(
            result.expect("service task panicked"),
            Ok(()),
            "{name} failed"
        );
    }
}

/// An accepted job whose request was never published, as a gateway that died between its
/// two writes leaves it: the next gateway's start-up sweep must publish it.
async fn accepted_only(topology: &Topology, job_id: &str, callback_url: &str) {
    let request = JobRequested {
        job_id: JobId::parse(job_id).expect("job id"),
        kind: Kind::product_description(),
        input: json!({"product_id": job_id, "product_name": "Test AC", "specs": "1.5 Ton"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        callback_url: jetcall::allowlist::CallbackUrl::parse(callback_url).expect("a callback URL"),
        metadata: Default::default(),
        requested_at: OffsetDateTime::now_utc(),
        expires_at: None,
        tenant: None,
        priority: Default::default(),
    };
    topology
        .status
        .create(&JobStatus::accepted(&request, "seeded".into()))
        .await
        .expect("record an accepted job");
}

/// The server's refusals so far: each is a right a service needed and did not have.
fn violations(nats: &NatsServer) -> Vec<String> {
    nats.log()
        .lines()
        .filter(|line| line.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

fn assert_no_violation(nats: &NatsServer) {
    let violations = violations(nats);
    assert!(
        violations.is_empty(),
        "a service needed a right nats/accounts.conf does not give it:\n{}",
        violations.join("\n")
    );
}

/// Polls `check` until it answers, failing at once on the first permissions violation the
/// server logs rather than waiting for what it prevents.
async fn wait_clean<T, Fut>(nats: &NatsServer, what: &str, mut check: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert_no_violation(nats);
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Gateway<'a> {
    url: String,
    http: reqwest::Client,
    nats: &'a NatsServer,
}

impl Gateway<'_> {
    async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("GET from the gateway");
        (response.status(), response.text().await.unwrap_or_default())
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("POST to the gateway");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn wait_for_status(&self, job_id: &str, status: &str) -> Value {
        wait_clean(
            self.nats,
            &format!("job {job_id} to be {status}"),
            || async {
                let (_, body) = self.get(&format!("/api/v1/jobs/{job_id}")).await;
                let doc: Value = serde_json::from_str(&body).ok()?;
                (doc["status"] == status).then_some(doc)
            },
        )
        .await
    }

    async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (_, text) = self.get("/metrics").await;
        testkit::metrics::sample(&text, name, labels)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_does_all_its_work_with_its_own_user_and_no_violation() {
    testkit::init_logs();
    let nats = secured_server();
    let receiver = WebhookReceiver::start().await;
    let claude = FakeAnthropic::start().await;
    let secret = SigningKey::generate();
    let started = OffsetDateTime::now_utc();
    let common = [
        ("callback.signing_secret", json!(secret)),
        ("callback.retry_schedule", json!(["100ms"])),
        // Every accepted job is old enough for the start-up sweep.
        ("gateway.sweep_after", json!("0s")),
        // The LLM behind a rate limit, so the generator uses the `llm_limits` bucket.
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!(fake_anthropic::API_KEY)),
        ("anthropic.base_url", json!(claude.base_url())),
        ("generator.requests_per_minute", json!(6000)),
    ];
    let topology = provision_as_admin(&nats, &common).await;
    let callback_url = receiver.url("/webhooks/description");
    // Before the gateway starts: one job recorded and published, one only recorded.
    testkit::jobs::requested_job(&topology, "JOB-PUBLISHED", &callback_url)
        .await
        .expect("seed a published job");
    accepted_only(&topology, "JOB-STRANDED", &callback_url).await;
    // Expired by the generator's claim, published on `jobs.expired.>` as `generator`.
    testkit::jobs::expired_job(&topology, "JOB-EXPIRED", &callback_url)
        .await
        .expect("seed an expired job");

    let mut services = Vec::new();
    let listener = testkit::loopback_listener();
    let gateway = Gateway {
        url: format!("http://{}", listener.local_addr().expect("gateway address")),
        http: reqwest::Client::new(),
        nats: &nats,
    };
    let config = config_as(&nats, "gateway", &common);
    services.push(spawn_service("gateway", |stop| async move {
        gateway::run(config, listener, stop)
            .await
            .map_err(|e| e.to_string())
    }));
    // The sweep scans the bucket and the stream with ordered consumers, and publishes the
    // stranded job's request: all as `gateway`.
    wait_clean(&nats, "the start-up sweep to finish", || async {
        gateway
            .metric("jetcall_gateway_sweeps_total", &["outcome=\"completed\""])
            .await
            .filter(|count| *count >= 1.0)
    })
    .await;
    assert_eq!(
        gateway
            .metric("jetcall_gateway_sweep_republished_total", &[])
            .await,
        Some(1.0),
        "the stranded job is republished, the published one is found in the stream"
    );

    let config = config_as(&nats, "generator", &common);
    let listener = testkit::loopback_listener();
    let generator_admin = format!("http://{}", listener.local_addr().expect("address"));
    services.push(spawn_service("generator", |stop| async move {
        generator::run(config, listener, stop)
            .await
            .map_err(|e| e.to_string())
    }));
    let config = config_as(&nats, "callback", &common);
    let listener = testkit::loopback_listener();
    let callback_admin = format!("http://{}", listener.local_addr().expect("address"));
    services.push(spawn_service("callback", |stop| async move {
        callback::run(config, listener, stop)
            .await
            .map_err(|e| e.to_string())
    }));

    // The article's job, followed live: a KV watch as `gateway`.
    let (status, body) = gateway
        .post(
            "/api/v1/generate-description",
            &json!({
                "job_id": "JOB-771",
                "product_id": "PROD-AC15",
                "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
                "specs": {"capacity": "1.5 Ton"},
                "callback_url": callback_url,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let events = gateway
        .http
        .get(format!("{}/api/v1/jobs/JOB-771/events", gateway.url))
        .send()
        .await
        .expect("open the event stream");
    assert_eq!(events.status(), StatusCode::OK);
    let events = tokio::time::timeout(WAIT, events.text())
        .await
        .unwrap_or_else(|_| {
            assert_no_violation(&nats);
            panic!("the event stream did not end after the final state")
        })
        .expect("read the event stream");
    assert!(events.contains(r#""status":"delivered""#), "{events}");

    for job_id in ["JOB-PUBLISHED", "JOB-STRANDED", "JOB-771", "JOB-EXPIRED"] {
        gateway.wait_for_status(job_id, "delivered").await;
    }
    let delivered = receiver.deliveries().len();

    // A dead letter, then the redelivery of a time window's dead letters: a scan of
    // `jobs.undeliverable.>` and a republished outcome, as `gateway`.
    receiver.fail_next(&[410]);
    let (status, body) = gateway
        .post(
            "/api/v1/jobs",
            &json!({
                "job_id": "JOB-GONE",
                "kind": "product-description",
                "input": {"product_id": "P-1", "product_name": "Fan", "specs": "quiet"},
                "callback_url": callback_url,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    gateway.wait_for_status("JOB-GONE", "undeliverable").await;
    let since = started.format(&Rfc3339).expect("RFC 3339");
    let (status, body) = gateway
        .post(
            &format!("/api/v1/deliveries/redeliver?since={since}"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["requeued"][0]["job_id"], "JOB-GONE", "{body}");
    gateway.wait_for_status("JOB-GONE", "delivered").await;
    assert_eq!(receiver.deliveries().len(), delivered + 2);

    // The operators' listing: a scan of the bucket, as `gateway`.
    let (status, body) = gateway.get("/api/v1/jobs?status=delivered&limit=10").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listing: Value = serde_json::from_str(&body).expect("listing JSON");
    assert_eq!(listing["jobs"].as_array().map(Vec::len), Some(5), "{body}");

    // The console's overview, as `gateway`: the stream read from 15 minutes back, the two
    // consumers' info and their oldest messages, the shared budgets in `llm_limits`.
    let overview = wait_clean(&nats, "the overview to count every delivery", || async {
        let (status, body) = gateway.get("/api/v1/overview").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let overview: Value = serde_json::from_str(&body).expect("overview JSON");
        (overview["totals"]["delivered"] == 5).then_some(overview)
    })
    .await;
    assert_eq!(overview["totals"]["undeliverable"], 1, "{overview}");
    assert_eq!(overview["totals"]["expired"], 1, "{overview}");

    // A cancellation during a call that would take ten minutes: published on
    // `jobs.cancelled.>` as `gateway`, heard by the generator as `generator`, delivered.
    let calls = claude.calls();
    claude.push(Scripted::Delay(Duration::from_secs(600)));
    let (status, body) = gateway
        .post(
            "/api/v1/jobs",
            &json!({
                "job_id": "JOB-SLOW",
                "kind": "product-description",
                "input": {"product_id": "P-2", "product_name": "Heater", "specs": "slow"},
                "callback_url": callback_url,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_clean(&nats, "the slow call to reach the model", || async {
        (claude.calls() > calls).then_some(())
    })
    .await;
    let response = gateway
        .http
        .delete(format!("{}/api/v1/jobs/JOB-SLOW", gateway.url))
        .send()
        .await
        .expect("DELETE a job");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let doc = gateway.wait_for_status("JOB-SLOW", "delivered").await;
    assert_eq!(doc["ended_as"], "cancelled", "{doc}");
    wait_clean(&nats, "the cancelled call to be abandoned", || async {
        let text = gateway
            .http
            .get(format!("{generator_admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (testkit::metrics::sample(&text, "jetcall_generator_llm_in_flight", &[]) == Some(0.0))
            .then_some(())
    })
    .await;
    assert_eq!(overview["consumers"][0]["waiting"], 0, "{overview}");

    // Each /metrics reads its consumer's lag, as its own user.
    for admin in [&generator_admin, &callback_admin] {
        let response = gateway
            .http
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status(), StatusCode::OK, "{admin}/metrics");
    }

    // `GET /api/v1/budget` reads a tenant's counter as `gateway`, adding nothing (this API
    // has no keys, so the read is made here as the gateway makes it).
    let (client, _errors) = client_as(&nats, "gateway").await;
    let budgets = jetcall::budget::Budgets::new(async_nats::jetstream::new(client));
    let day = jetcall::budget::Period::Day.key(OffsetDateTime::now_utc());
    let total = budgets
        .total("shop", jetcall::budget::Period::Day, &day)
        .await;
    assert_eq!(total.expect("a counter read as `gateway`"), 0);

    stop(services).await;
    assert_no_violation(&nats);
}

/// A client of `user` whose server errors (permissions violations) arrive on the receiver.
async fn client_as(
    nats: &NatsServer,
    user: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(
        user.to_owned(),
        password(user).to_owned(),
    )
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(error) = event {
                let _ = tx.send(error.to_string());
            }
        }
    })
    .connect(nats.url())
    .await
    .unwrap_or_else(|err| panic!("connect as {user}: {err}"));
    (client, rx)
}

/// Waits for the server's refusal naming `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, user: &str, what: &str) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(error) = errors.recv().await {
            if error.contains("Permissions Violation") && error.contains(what) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "`{user}` was not refused {what}: nats/accounts.conf allows it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_is_refused_what_belongs_to_another_service_or_the_operator() {
    testkit::init_logs();
    let nats = secured_server();
    let topology = provision_as_admin(&nats, &[]).await;
    let stream_admin = [
        "$JS.API.STREAM.DELETE.JOBS",
        "$JS.API.STREAM.PURGE.JOBS",
        "$JS.API.STREAM.UPDATE.JOBS",
        "$JS.API.STREAM.DELETE.KV_job_status",
        "$JS.API.STREAM.PURGE.KV_job_status",
        "$JS.API.STREAM.MSG.DELETE.JOBS",
        "$JS.API.CONSUMER.DELETE.JOBS.generator",
        "$JS.API.CONSUMER.DELETE.JOBS.callback",
    ];
    // Each user's own subject, published and acked by JetStream, and what it must not do.
    let cases: [(&str, &str, Vec<&str>); 3] = [
        (
            "gateway",
            "jobs.requested.product-description",
            vec![
                "jobs.delivered.product-description",
                "jobs.undeliverable.product-description",
                // It may create ordered consumers and pull from them, but not redefine the
                // durable ones or take their messages.
                "$JS.API.CONSUMER.CREATE.JOBS.generator.jobs.requested.>",
                "$JS.API.CONSUMER.CREATE.JOBS.callback",
                "$JS.API.CONSUMER.MSG.NEXT.JOBS.generator",
                "$JS.API.CONSUMER.MSG.NEXT.JOBS.callback",
                "$KV.llm_limits.anthropic",
            ],
        ),
        (
            "generator",
            "jobs.completed.product-description",
            vec![
                // It sends bulk requests again after a batch result worth another attempt,
                // and nothing else: not the interactive lanes'.
                "jobs.requested.product-description",
                "jobs.requested.product-description.636174616c6f677565.interactive",
                "jobs.delivered.product-description",
                "jobs.undeliverable.product-description",
                "$JS.API.CONSUMER.MSG.NEXT.JOBS.callback",
                "$JS.ACK.JOBS.callback.1.1.1.1.1.1",
                "$JS.API.CONSUMER.CREATE.JOBS",
            ],
        ),
        (
            "callback",
            "jobs.delivered.product-description",
            vec![
                "jobs.requested.product-description",
                "jobs.completed.product-description",
                "jobs.failed.product-description",
                "$JS.API.CONSUMER.MSG.NEXT.JOBS.generator",
                "$JS.ACK.JOBS.generator.1.1.1.1.1.1",
                "$KV.llm_limits.anthropic",
                "$JS.API.CONSUMER.CREATE.JOBS",
            ],
        ),
    ];
    for (user, own, forbidden) in cases {
        let (client, mut errors) = client_as(&nats, user).await;
        let js = jetstream::new(client.clone());
        js.publish(own, "allowed".into())
            .await
            .unwrap_or_else(|err| panic!("`{user}` publishes on {own}: {err}"))
            .await
            .unwrap_or_else(|err| panic!("`{user}` gets JetStream's ack on {own}: {err}"));
        for subject in forbidden.iter().chain(&stream_admin) {
            client
                .publish(*subject, "refused".into())
                .await
                .expect("publish");
            client.flush().await.expect("flush");
            refused(&mut errors, user, &format!("Publish to \"{subject}\"")).await;
        }
        // Nobody listens in on the event subjects outside JetStream.
        let _subscription = client.subscribe("jobs.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        refused(&mut errors, user, "Subscription to \"jobs.>\"").await;
    }
    // The generator's requeue of a batched job: a bulk lane's request, stored.
    let (generator, _) = client_as(&nats, "generator").await;
    jetstream::new(generator)
        .publish(
            "jobs.requested.product-description.anonymous.bulk",
            "again".into(),
        )
        .await
        .expect("the generator publishes a bulk request")
        .await
        .expect("JetStream stores it");

    // The same through the nats CLI, as an operator would see it.
    let cli = |user: &str, args: &[&str]| {
        std::process::Command::new(testkit::nats::nats_cli_binary())
            .args(["--server", &nats.url(), "--user", user, "--password"])
            .arg(password(user))
            .args(["--timeout", "2s"])
            .args(args)
            .output()
            .expect("run the nats CLI")
    };
    let out = cli("callback", &["pub", "jobs.requested.x", "forged"]);
    assert!(!out.status.success(), "callback published a request");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permissions Violation"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for user in ["gateway", "generator", "callback"] {
        let out = cli(user, &["stream", "rm", "JOBS", "--force"]);
        assert!(!out.status.success(), "{user} deleted the stream");
    }
    assert_eq!(
        testkit::nats::count_messages(&topology.stream, "jobs.>").await,
        4,
        "the stream holds the four allowed publishes and nothing refused"
    );
    // What the first test looks for in the log when it finds nothing.
    assert!(
        nats.log().contains(
            r#""JETCALL/user:callback" - Publish Violation - Subject "jobs.requested.x""#
        ),
        "the server logs a refusal with the user and the subject:\n{}",
        nats.log()
    );
    // The operator may: the refusals above were the users', not the server's.
    let out = cli("admin", &["stream", "rm", "JOBS", "--force"]);
    assert!(
        out.status.success(),
        "admin could not delete the stream: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
