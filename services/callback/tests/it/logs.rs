//! The callback binary's JSON logs: every line about a job names it in a top-level `job_id`,
//! with its kind and trace.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use jetcall::signing::SigningKey;
use testkit::{NatsServer, WebhookReceiver, wait_until};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_line_about_a_job_carries_its_id() {
    testkit::init_logs();
    let nats = NatsServer::start();
    let config = testkit::config::config(&nats.url(), &[]);
    let topology = testkit::config::provision(&config).await;
    let flaky = WebhookReceiver::start().await;
    flaky.fail_next(&[500]);
    let gone = WebhookReceiver::start().await;
    gone.fail_next(&[410]);

    let mut command = Command::new(env!("CARGO_BIN_EXE_callback"));
    command
        .env("NATS_URL", nats.url())
        .env("JETCALL_CONFIG", "/dev/null")
        .env("JETCALL_CALLBACK__SIGNING_SECRET", SigningKey::generate())
        // Its receivers listen on loopback, which the default allowlist refuses.
        .env("JETCALL_GATEWAY__CALLBACK_ALLOWLIST", r#"["127.0.0.1"]"#)
        .env("JETCALL_CALLBACK__RETRY_SCHEDULE", r#"["50ms"]"#)
        .env("JETCALL_CALLBACK__LISTEN", "127.0.0.1:0")
        .env("JETCALL_LOG__FORMAT", "json")
        .env("RUST_LOG", "info,callback=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    testkit::procs::die_with_parent(&mut command);
    let mut child = command.spawn().expect("start the callback binary");
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = std::thread::spawn({
        let lines = lines.clone();
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        }
    });
    let logged = |text: &str| {
        lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|line| line.contains(text))
            .count()
    };

    testkit::jobs::completed_job(&topology, "JOB-LOG-RETRIED", &flaky.url("/hook"))
        .await
        .expect("a completed job");
    testkit::jobs::completed_job(&topology, "JOB-LOG-GONE", &gone.url("/hook"))
        .await
        .expect("a completed job");
    wait_until("the jobs' outcomes logged", WAIT, || async {
        (logged("webhook delivered") == 1 && logged("webhook undeliverable") == 1).then_some(())
    })
    .await;
    child.kill().expect("kill");
    child.wait().expect("reap");
    reader.join().expect("the reader thread");

    let lines = lines.lock().expect("lines").clone();
    let mut about_jobs = 0;
    for line in &lines {
        let json: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("every line is JSON ({err}): {line}"));
        for job_id in ["JOB-LOG-RETRIED", "JOB-LOG-GONE"] {
            if line.contains(job_id) {
                about_jobs += 1;
                assert_eq!(json["job_id"], job_id, "{line}");
                assert_eq!(json["kind"], "product-description", "{line}");
                let trace_id = json["trace_id"].as_str().unwrap_or_default();
                assert!(
                    trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{line}"
                );
            }
        }
        let message = json["message"].as_str().unwrap_or_default();
        if message.starts_with("webhook") || message == "completion handled" {
            assert!(json["job_id"].is_string(), "a line about a job: {line}");
        }
    }
    // Failed attempt, retry delivered, 410 undeliverable, and a debug line for each handling.
    assert!(
        about_jobs >= 6,
        "{about_jobs} lines about the jobs: {lines:#?}"
    );
}

/// A callback URL's query often carries the receiver's own credential; userinfo would too.
/// Neither belongs in a log line, whatever the attempt's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_line_carries_a_callback_url_s_query() {
    testkit::init_logs();
    let nats = NatsServer::start();
    let config = testkit::config::config(&nats.url(), &[]);
    let topology = testkit::config::provision(&config).await;
    // Nothing listens there: the attempt fails to connect, and reqwest's error names the URL.
    let closed = testkit::ClosedPort::reserve();
    let dead = closed.url("/hook?token=tok-9f8e7d6c");

    let mut command = Command::new(env!("CARGO_BIN_EXE_callback"));
    command
        .env("NATS_URL", nats.url())
        .env("JETCALL_CONFIG", "/dev/null")
        .env("JETCALL_CALLBACK__SIGNING_SECRET", SigningKey::generate())
        .env("JETCALL_CALLBACK__RETRY_SCHEDULE", r#"["50ms"]"#)
        .env("JETCALL_CALLBACK__LISTEN", "127.0.0.1:0")
        .env("JETCALL_GATEWAY__CALLBACK_ALLOWLIST", r#"["127.0.0.1"]"#)
        .env("JETCALL_LOG__FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    testkit::procs::die_with_parent(&mut command);
    let mut child = command.spawn().expect("start the callback binary");
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = std::thread::spawn({
        let lines = lines.clone();
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        }
    });
    testkit::jobs::completed_job(&topology, "JOB-TOKEN", &dead)
        .await
        .expect("a completed job");
    wait_until("the job given up", WAIT, || async {
        lines
            .lock()
            .expect("lines")
            .iter()
            .any(|line| line.contains("webhook undeliverable"))
            .then_some(())
    })
    .await;
    child.kill().expect("kill");
    child.wait().expect("reap");
    reader.join().expect("the reader thread");

    let lines = lines.lock().expect("lines").clone();
    let failed: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("webhook attempt failed"))
        .collect();
    assert!(
        !failed.is_empty(),
        "a failed attempt was logged: {lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains("tok-9f8e7d6c"), "the token logged: {line}");
    }
}
