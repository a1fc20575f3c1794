//! `jetcall submit`: one job from flags, and a catalogue from a file in batches.

use std::fmt::Write as _;

use serde_json::json;

use crate::harness::{CALLBACK, Stack, jetcall, run};

const KIND: &str = "product-description";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_from_flags_is_accepted_and_published_once() {
    let stack = Stack::start(&[]).await;
    let submit = [
        "submit",
        "--kind",
        KIND,
        "--callback-url",
        CALLBACK,
        "--job-id",
        "CLI-1",
        "--input",
        r#"{"product_id": "PROD-AC15"}"#,
        "--field",
        "product_name=LG 1.5 Ton 5 Star Inverter Split AC",
        "--field",
        r#"specs:={"capacity": "1.5 Ton"}"#,
        "--metadata",
        r#"{"batch": "cli"}"#,
    ];
    let first = stack.run(&submit).await;
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!(first.stdout.trim(), "CLI-1: accepted");
    assert_eq!(stack.published().await, 1);

    // The same job again, as machine output: the gateway's answer as it is.
    let again = stack.run(&[&["--json"], &submit[..]].concat()).await;
    assert_eq!(again.code, Some(0), "{again:?}");
    assert_eq!(again.json()["job_id"], "CLI-1");
    assert_eq!(again.json()["status"], "accepted");
    assert_eq!(stack.published().await, 1, "JetStream keeps one copy");

    let status = stack.run(&["--json", "status", "CLI-1"]).await;
    let doc = status.json();
    assert_eq!(doc["input"]["specs"], json!({"capacity": "1.5 Ton"}));
    assert_eq!(doc["metadata"], json!({"batch": "cli"}));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_job_prints_the_gateway_s_error_and_fails() {
    let stack = Stack::start(&[]).await;
    let run = stack
        .run(&[
            "submit",
            "--kind",
            KIND,
            "--callback-url",
            "http://evil.example.com/hook",
            "--field",
            "product_id=P-1",
            "--field",
            "product_name=Fan",
            "--field",
            "specs=quiet",
        ])
        .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.starts_with("error: invalid_callback_url: "),
        "{run:?}"
    );
    assert_eq!(stack.published().await, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_gateway_is_named() {
    let closed = testkit::ClosedPort::reserve();
    let url = format!("http://127.0.0.1:{}", closed.port());
    let run = run(jetcall().args(["--gateway", &url, "status", "JOB-1"])).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .starts_with(&format!("error: could not reach the gateway at {url}/")),
        "{run:?}"
    );
}

/// A catalogue of `rows` products with a `job_id` column; row `bad` (1-based) names a
/// callback host the allowlist refuses.
fn catalogue(rows: usize, bad: usize) -> String {
    let mut csv = String::from("job_id,product_id,product_name,specs,callback_url\n");
    for row in 1..=rows {
        let callback = if row == bad {
            "http://evil.example.com/hook"
        } else {
            ""
        };
        let _ = writeln!(
            csv,
            "ROW-{row},PROD-{row},\"Product {row}, quiet\",1.5 Ton,{callback}"
        );
    }
    csv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_catalogue_goes_in_batches_and_a_second_run_adds_nothing() {
    let stack = Stack::start(&[]).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("catalogue.csv");
    std::fs::write(&file, catalogue(2_500, 1_234)).expect("write the catalogue");
    let file = file.to_str().expect("a UTF-8 path");
    let submit = [
        "submit",
        "--file",
        file,
        "--kind",
        KIND,
        "--callback-url",
        CALLBACK,
    ];

    let first = stack.run(&submit).await;
    assert_eq!(first.code, Some(1), "one row was rejected: {first:?}");
    let mut lines = first.stdout.lines();
    assert_eq!(
        lines.next(),
        Some("2500 rows: 2499 accepted, 0 duplicate, 1 rejected")
    );
    // The header is line 1, so row 1,234 is line 1,235.
    let rejection = lines.next().expect("the rejected row");
    assert!(
        rejection.starts_with("  line 1235 (ROW-1234): invalid_callback_url: "),
        "{rejection}"
    );
    assert!(rejection.ends_with("[field callback_url]"), "{rejection}");
    assert_eq!(stack.published().await, 2_499);

    let second = stack.run(&[&["--json"], &submit[..]].concat()).await;
    assert_eq!(second.code, Some(1), "{second:?}");
    let summary = second.json();
    assert_eq!(summary["rows"], 2_500);
    assert_eq!(summary["accepted"], 0);
    assert_eq!(summary["duplicates"], 2_499);
    assert_eq!(summary["rejected"], 1);
    assert_eq!(summary["rejections"][0]["line"], 1_235);
    assert_eq!(
        summary["rejections"][0]["error"]["type"],
        "invalid_callback_url"
    );
    assert_eq!(stack.published().await, 2_499, "nothing new was published");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jsonl_file_reports_unreadable_lines_and_warns_about_rows_without_ids() {
    let stack = Stack::start(&[]).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("jobs.jsonl");
    let job = |id: Option<&str>| {
        let mut job =
            json!({"input": {"product_id": "P", "product_name": "Fan", "specs": "quiet"}});
        if let Some(id) = id {
            job["job_id"] = json!(id);
        }
        job.to_string()
    };
    let lines = [job(Some("L-1")), String::new(), "{oops".into(), job(None)];
    std::fs::write(&file, lines.join("\n")).expect("write the file");
    let run = stack
        .run(&[
            "submit",
            "--file",
            file.to_str().expect("a UTF-8 path"),
            "--kind",
            KIND,
            "--callback-url",
            CALLBACK,
            "--batch-size",
            "1",
        ])
        .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout
            .starts_with("3 rows: 2 accepted, 0 duplicate, 1 rejected\n  line 3: malformed_json: "),
        "{run:?}"
    );
    assert!(run.stderr.contains("note: 1 row had no job_id"), "{run:?}");
    assert_eq!(stack.published().await, 2);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_turned_away_by_a_busy_gateway_are_sent_again() {
    // One request at a time: of eight batches sent at once, seven are answered 429 at first.
    let stack = Stack::start(&[("gateway.max_in_flight", json!(1))]).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("catalogue.csv");
    std::fs::write(&file, catalogue(800, 0)).expect("write the catalogue");
    let run = stack
        .run(&[
            "submit",
            "--file",
            file.to_str().expect("a UTF-8 path"),
            "--kind",
            KIND,
            "--callback-url",
            CALLBACK,
            "--batch-size",
            "100",
            "--in-flight",
            "8",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout.trim(),
        "800 rows: 800 accepted, 0 duplicate, 0 rejected"
    );
    assert_eq!(stack.published().await, 800);
    let turned_away = stack
        .metric(
            "jetcall_gateway_http_requests_total",
            &["route=\"/api/v1/jobs/batch\"", "status=\"429\""],
        )
        .await;
    assert!(
        turned_away.is_some_and(|count| count >= 1.0),
        "the gateway turned batches away: {turned_away:?}"
    );
    stack.stop().await;
}
