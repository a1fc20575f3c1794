//! An event subscriber written against another client library: `tests/subscriber/completions.py`
//! (plain asyncio and nats-py) creates a durable consumer of its own on `jobs.completed.>` and
//! must see every completion once, while the services' own consumers go on undisturbed. No
//! Jetcall code is involved on its side: the subjects and the event's JSON are the contract.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::AckPolicy;
use futures::TryStreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

use testkit::WebhookReceiver;

use crate::pipeline::Pipeline;

const WAIT: Duration = Duration::from_secs(60);
const JOBS: usize = 20;
/// The consumer the script creates: the name another team would give theirs.
const DURABLE: &str = "analytics";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/subscriber/completions.py")
}

/// Job `n`: the two built-in kinds in turn, so the kind each line reports is checked too.
fn job(n: usize, callback_url: &str) -> (String, &'static str, Value) {
    let job_id = format!("SUB-{n:02}");
    let (kind, input) = if n.is_multiple_of(2) {
        (
            "product-description",
            json!({"product_id": format!("PROD-{n}"), "product_name": "LG 1.5 Ton Split AC",
                   "specs": "1.5 Ton, 5 Star"}),
        )
    } else {
        (
            "return-analysis",
            json!({"order_id": format!("ORD-{n}"), "reason": "damaged",
                   "customer_message": "The box arrived crushed."}),
        )
    };
    let body =
        json!({"job_id": job_id, "kind": kind, "input": input, "callback_url": callback_url});
    (job_id, kind, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_nats_py_subscriber_gets_every_completion_with_its_own_consumer() {
    let python = testkit::python();
    let receiver = WebhookReceiver::start().await;
    let pipeline = Pipeline::start(&[]).await;

    let child = tokio::process::Command::new(&python)
        .arg(script())
        .args(["--server", &pipeline.nats_url()])
        .args(["--durable", DURABLE])
        .args(["--count", &JOBS.to_string()])
        .args(["--timeout", &WAIT.as_secs().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} {}: {e}", python.display(), script().display()));

    // The consumer it made shows up as any other: durable, filtered, explicitly acked.
    let stream = &pipeline.topology.stream;
    let mut child = child;
    let deadline = Instant::now() + WAIT;
    let info = loop {
        if let Ok(info) = stream.consumer_info(DURABLE).await {
            break info;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let output = child.wait_with_output().await.expect("the script's output");
            panic!(
                "the subscriber exited ({status}) before creating its consumer: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for the subscriber's consumer `{DURABLE}`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(info.config.durable_name.as_deref(), Some(DURABLE));
    assert_eq!(info.config.filter_subject, "jobs.completed.>");
    assert_eq!(info.config.ack_policy, AckPolicy::Explicit);
    let mut names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .expect("the stream's consumer names");
    names.sort();
    // Ours, and the anonymous tenant's bulk lane beside the default one (`jetcall::lanes`).
    assert_eq!(
        names,
        [DURABLE, "callback", "generator", "lane-anonymous-bulk"]
    );

    let callback_url = receiver.url("/cb");
    let mut submitted = BTreeMap::new();
    for n in 0..JOBS {
        let (job_id, kind, body) = job(n, &callback_url);
        let (status, answer) = pipeline.post("/api/v1/jobs", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        submitted.insert(job_id, kind);
    }

    let output = tokio::time::timeout(WAIT + Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the subscriber to exit")
        .expect("the script's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the subscriber failed ({}): {}\nit printed: {stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut seen: BTreeMap<String, Value> = BTreeMap::new();
    for line in stdout.lines() {
        let completion: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let job_id = completion["job_id"].as_str().expect("job_id").to_owned();
        if let Some(earlier) = seen.insert(job_id.clone(), completion) {
            panic!("{job_id} printed twice; the first time: {earlier}");
        }
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        submitted.keys().collect::<Vec<_>>(),
        "every job's completion, each once:\n{stdout}"
    );
    for (job_id, kind) in &submitted {
        let completion = &seen[job_id];
        assert_eq!(completion["kind"], *kind, "{completion}");
        assert_eq!(completion["subject"], format!("jobs.completed.{kind}"));
        assert_eq!(completion["status"], "completed", "{completion}");
        assert_eq!(completion["model"], "jetcall-offline", "{completion}");
    }

    // The services' own consumers went on as before: every job delivered once, nothing left.
    let deliveries = receiver.wait_for(JOBS, WAIT).await;
    let mut webhook_ids: Vec<&str> = deliveries.iter().map(|d| d.header("webhook-id")).collect();
    webhook_ids.sort_unstable();
    let expected: Vec<String> = submitted.keys().map(|id| format!("msg_{id}")).collect();
    assert_eq!(webhook_ids, expected, "one webhook per job");
    for job_id in submitted.keys() {
        pipeline.wait_for_status(job_id, "delivered", WAIT).await;
    }
    assert_eq!(
        pipeline.count_at_least("jobs.delivered.>", JOBS).await,
        JOBS
    );
    for name in ["generator", "callback"] {
        let info = stream.consumer_info(name).await.expect("consumer info");
        assert_eq!(info.num_pending, 0, "{name}: nothing left unprocessed");
        assert_eq!(info.num_ack_pending, 0, "{name}: nothing left in flight");
    }
    let info = stream.consumer_info(DURABLE).await.expect("consumer info");
    assert_eq!(info.num_pending, 0, "{DURABLE}: nothing left unprocessed");
    assert_eq!(info.num_ack_pending, 0, "{DURABLE}: every completion acked");
    assert_eq!(
        info.delivered.consumer_sequence, JOBS as u64,
        "no redelivery"
    );
    pipeline.stop().await;
}
