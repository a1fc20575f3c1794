//! `jetcall cost`: jobs' usage and cost from the JOBS stream, by API key and kind.

use async_nats::jetstream::message::PublishMessage;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use jetcall::allowlist::CallbackUrl;
use jetcall::cost::{Cost, Currency, Usage};
use jetcall::events::{JobError, JobFinished, Outcome};
use jetcall::topology::Topology;
use jetcall::{JobId, Kind};

use crate::harness::{CALLBACK, jetcall, run};

struct Finished<'a> {
    job_id: &'a str,
    kind: &'a str,
    tenant: Option<&'a str>,
    microdollars: Option<u64>,
    failed: bool,
    /// A `jobs.cancelled` event (its charge, if any, is on the job's document).
    cancelled: bool,
}

/// Publishes a job's finished event as the generator does; `copy` makes the `Nats-Msg-Id` of
/// a second publish of the same job (a republish after a crash, past the duplicate window).
async fn publish(topology: &Topology, job: Finished<'_>, copy: u32) {
    let kind = Kind::parse(job.kind).expect("a kind");
    let job_id = JobId::parse(job.job_id).expect("an id");
    let usage = Usage {
        input_tokens: 100,
        output_tokens: 10,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 2000,
    };
    let cost = job.microdollars.map(|microdollars| Cost {
        microdollars,
        currency: Currency::Usd,
    });
    let outcome = if job.cancelled {
        Outcome::Cancelled { error: None }
    } else if job.failed {
        // Charged (answers that did not fit) when it has a cost; otherwise no answer came.
        Outcome::Failed {
            error: JobError {
                kind: "invalid_output".into(),
                message: "no".into(),
            },
            usage: cost.map(|_| usage),
            cost,
        }
    } else {
        Outcome::Completed {
            result: json!({"description": "ok"}),
            model: "claude-sonnet-4-5".into(),
            usage,
            cost,
        }
    };
    let event = JobFinished {
        job_id: job_id.clone(),
        kind: kind.clone(),
        outcome,
        input: Default::default(),
        callback_url: CallbackUrl::parse(CALLBACK).expect("a URL"),
        metadata: Default::default(),
        finished_at: OffsetDateTime::now_utc(),
        tenant: job.tenant.map(str::to_owned),
    };
    let which = event.event();
    topology
        .jetstream
        .send_publish(
            which.subject(&kind),
            PublishMessage::build()
                .payload(serde_json::to_vec(&event).expect("JSON").into())
                .message_id(format!("{}-{copy}", which.msg_id(&job_id))),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
}

fn completed<'a>(
    job_id: &'a str,
    kind: &'a str,
    tenant: Option<&'a str>,
    microdollars: Option<u64>,
) -> Finished<'a> {
    Finished {
        job_id,
        kind,
        tenant,
        microdollars,
        failed: false,
        cancelled: false,
    }
}

/// A job cancelled while its call ran, whose answer came after and was charged `microdollars`
/// on its document (`None`: no answer came); its `jobs.cancelled` event published.
async fn cancelled(topology: &Topology, job_id: &str, tenant: &str, microdollars: Option<u64>) {
    testkit::jobs::requested_job(topology, job_id, CALLBACK)
        .await
        .expect("a job recorded");
    if let Some(microdollars) = microdollars {
        let id = JobId::parse(job_id).expect("an id");
        topology
            .status
            .update(&id, |doc| {
                doc.usage = Some(Usage {
                    input_tokens: 50,
                    output_tokens: 5,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 0,
                });
                doc.cost = Some(Cost {
                    microdollars,
                    currency: Currency::Usd,
                });
                true
            })
            .await
            .expect("the charge recorded");
    }
    let event = Finished {
        cancelled: true,
        ..completed(job_id, "product-description", Some(tenant), None)
    };
    publish(topology, event, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_sums_charged_jobs_once_each_by_key_and_kind_since_a_time() {
    let nats = testkit::NatsServer::start();
    let config = testkit::config::config(&nats.url(), &[]);
    let topology = testkit::config::provision(&config).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let config_file = dir.path().join("jetcall.toml");
    std::fs::write(&config_file, format!("[nats]\nurl = \"{}\"\n", nats.url()))
        .expect("write the configuration");
    let config_file = config_file.to_str().expect("UTF-8").to_owned();

    publish(
        &topology,
        completed("OLD-1", "product-description", Some("shop-a"), Some(9_000)),
        0,
    )
    .await;
    // Just after the last event stored so far, on the server's clock.
    let mut stream = topology.stream.clone();
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_timestamp;
    let since = (last + time::Duration::microseconds(1))
        .format(&Rfc3339)
        .expect("a time");

    for (job, copy) in [
        (
            completed("A-1", "product-description", Some("shop-a"), Some(1_000)),
            0,
        ),
        (
            completed("A-2", "product-description", Some("shop-a"), Some(2_500)),
            0,
        ),
        (
            completed("A-2", "product-description", Some("shop-a"), Some(2_500)),
            1,
        ),
        (
            completed("B-1", "return-analysis", Some("shop-b"), Some(700)),
            0,
        ),
        (completed("N-1", "product-description", None, None), 0),
    ] {
        publish(&topology, job, copy).await;
    }
    let unanswered = Finished {
        failed: true,
        ..completed("F-1", "product-description", Some("shop-b"), None)
    };
    publish(&topology, unanswered, 0).await;
    let charged = Finished {
        failed: true,
        ..completed("F-2", "return-analysis", Some("shop-b"), Some(300))
    };
    publish(&topology, charged, 0).await;
    cancelled(&topology, "C-1", "shop-a", Some(400)).await;
    cancelled(&topology, "C-2", "shop-a", None).await;

    let report = run(jetcall().args([
        "--json",
        "--config",
        &config_file,
        "cost",
        "--since",
        &since,
    ]))
    .await;
    assert_eq!(report.code, Some(0), "{report:?}");
    let report = report.json();
    let row = |key: &str, kind: &str| {
        report["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|row| row["key"] == key && row["kind"] == kind)
            .map(|row| row["totals"].clone())
            .unwrap_or_else(|| panic!("a row for {key:?} {kind}: {report}"))
    };
    let shop_a = row("shop-a", "product-description");
    assert_eq!(
        shop_a["jobs"], 3,
        "A-2 once, C-1 charged after its cancellation, OLD-1 before --since, C-2 never charged"
    );
    assert_eq!(shop_a["microdollars"], 3_900);
    assert_eq!(shop_a["usage"]["cache_read_input_tokens"], 4_000);
    let shop_b = row("shop-b", "return-analysis");
    assert_eq!(
        (shop_b["jobs"].as_u64(), shop_b["microdollars"].as_u64()),
        (Some(2), Some(1_000)),
        "B-1, and F-2, which failed but was charged"
    );
    let anonymous = row("", "product-description");
    assert_eq!(
        (
            anonymous["jobs"].as_u64(),
            anonymous["unpriced_jobs"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(
        report["rows"].as_array().map(Vec::len),
        Some(3),
        "no row for F-1, which failed before any answer"
    );
    assert_eq!(report["total"]["jobs"], 6);
    assert_eq!(report["total"]["microdollars"], 4_900);
    assert_eq!(report["currency"], "USD");

    let table = run(jetcall().args(["--config", &config_file, "cost", "--since", "1h"])).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    let total_line = table
        .stdout
        .lines()
        .find(|line| line.starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("a TOTAL line: {table:?}"));
    let cells: Vec<&str> = total_line.split_whitespace().collect();
    assert_eq!(cells[1], "7", "OLD-1 is within the hour: {total_line}");
    assert_eq!(cells.last(), Some(&"0.013900"), "{total_line}");
    assert!(table.stderr.contains("1 job without a price"), "{table:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_says_when_nats_cannot_be_reached_or_the_time_is_not_one() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config_file = dir.path().join("jetcall.toml");
    let closed = testkit::ClosedPort::reserve();
    std::fs::write(
        &config_file,
        format!("[nats]\nurl = \"nats://127.0.0.1:{}\"\n", closed.port()),
    )
    .expect("write the configuration");
    let config_file = config_file.to_str().expect("UTF-8");
    let unreachable = run(jetcall().args(["--config", config_file, "cost"])).await;
    assert_eq!(unreachable.code, Some(1), "{unreachable:?}");
    assert!(
        unreachable.stderr.contains("could not reach NATS"),
        "{unreachable:?}"
    );
    let nonsense =
        run(jetcall().args(["--config", config_file, "cost", "--since", "yesterday-ish"])).await;
    assert_eq!(nonsense.code, Some(1), "{nonsense:?}");
    assert!(
        nonsense.stderr.contains("neither an RFC 3339 time"),
        "{nonsense:?}"
    );
}
