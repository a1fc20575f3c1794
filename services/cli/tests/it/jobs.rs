//! `jetcall status`, `list`, `watch` and `redeliver` against jobs moved on as the pipeline
//! would move them.

use serde_json::json;

use jetcall::status::Status;

use crate::harness::{CALLBACK, Running, Stack};

async fn submit(stack: &Stack, id: &str) {
    let run = submit_with(stack, id, &[]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
}

/// `jetcall submit` of the article's job under `id`, with `flags` added.
async fn submit_with(stack: &Stack, id: &str, flags: &[&str]) -> crate::harness::Run {
    let mut args = vec![
        "submit",
        "--kind",
        "product-description",
        "--callback-url",
        CALLBACK,
        "--job-id",
        id,
        "--field",
        "product_id=PROD-AC15",
        "--field",
        "product_name=LG 1.5 Ton 5 Star Inverter Split AC",
        "--field",
        "specs=1.5 Ton",
    ];
    args.extend_from_slice(flags);
    stack.run(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_summarises_a_job_and_names_a_missing_one() {
    let stack = Stack::start(&[]).await;
    submit(&stack, "STATUS-1").await;
    stack.advance("STATUS-1", Status::Generating).await;

    let run = stack.run(&["status", "STATUS-1"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "job         STATUS-1");
    assert_eq!(lines[1], "status      generating");
    assert_eq!(lines[2], "kind        product-description");
    assert!(
        run.stdout.contains(&format!("callback    {CALLBACK}")),
        "{run:?}"
    );

    let missing = stack.run(&["status", "NO-SUCH-JOB"]).await;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert_eq!(
        missing.stderr.trim(),
        "error: not_found: no job with id `NO-SUCH-JOB`"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_status() {
    let stack = Stack::start(&[]).await;
    for id in ["LIST-1", "LIST-2", "LIST-3"] {
        submit(&stack, id).await;
    }
    stack.advance("LIST-2", Status::Undeliverable).await;

    let run = stack.run(&["list", "--status", "undeliverable"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one job: {run:?}");
    assert!(
        lines[0].starts_with("JOB ID  STATUS         KIND"),
        "{run:?}"
    );
    assert!(
        lines[1].starts_with("LIST-2  undeliverable  product-description  "),
        "{run:?}"
    );

    let json = stack
        .run(&["--json", "list", "--status", "accepted"])
        .await
        .json();
    let mut ids: Vec<&str> = json["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|job| job["job_id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["LIST-1", "LIST-3"]);
    assert_eq!(json["complete"], true);

    let bad = stack.run(&["list", "--status", "lost"]).await;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(bad.stderr.starts_with("error: invalid_field: "), "{bad:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_each_change_and_exits_once_the_job_is_delivered() {
    let stack = Stack::start(&[]).await;
    submit(&stack, "WATCH-1").await;

    let mut watch = Running::spawn(stack.jetcall(&["watch", "WATCH-1"]));
    // `time  id  status  what happened`
    let words =
        |line: &str| -> Vec<String> { line.split_whitespace().map(str::to_owned).collect() };
    let first = watch.line().await;
    assert_eq!(words(&first)[1..3], ["WATCH-1", "accepted"], "{first}");
    for (next, word) in [
        (Status::Generating, "generating"),
        (Status::Completed, "completed"),
        (Status::Delivered, "delivered"),
    ] {
        stack.advance("WATCH-1", next).await;
        let line = watch.line().await;
        assert_eq!(words(&line)[1..3], ["WATCH-1", word], "{line}");
    }
    assert_eq!(watch.exit_code().await, Some(0));

    // Already at its end, and not delivered: one line, and a distinct exit code.
    submit(&stack, "WATCH-2").await;
    stack.advance("WATCH-2", Status::Undeliverable).await;
    let run = stack.run(&["--json", "watch", "WATCH-2"]).await;
    assert_eq!(run.code, Some(3), "{run:?}");
    assert_eq!(run.json()["status"], "undeliverable");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_the_gateway_restarts_without_missing_a_change() {
    let mut stack = Stack::start(&[]).await;
    submit(&stack, "RESUME-1").await;
    let mut watch = Running::spawn(stack.jetcall(&["watch", "RESUME-1"]));
    assert!(watch.line().await.contains(" accepted "));

    // The stream ends with the gateway; the job moves on while no gateway serves.
    stack.stop_gateway().await;
    stack.advance("RESUME-1", Status::Generating).await;
    stack.start_gateway().await;
    let line = watch.line().await;
    assert!(line.contains(" generating "), "{line}");

    stack.advance("RESUME-1", Status::Delivered).await;
    let line = watch.line().await;
    assert!(line.contains(" delivered "), "{line}");
    assert_eq!(watch.exit_code().await, Some(0));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_without_an_id_prints_changes_among_recent_jobs() {
    let stack = Stack::start(&[]).await;
    submit(&stack, "POLL-1").await;
    let mut watch = Running::spawn(stack.jetcall(&["watch", "--interval", "50ms"]));
    let words =
        |line: &str| -> Vec<String> { line.split_whitespace().map(str::to_owned).collect() };
    let line = watch.line().await;
    assert_eq!(words(&line)[1..3], ["POLL-1", "accepted"], "{line}");

    submit(&stack, "POLL-2").await;
    let line = watch.line().await;
    assert_eq!(words(&line)[1..3], ["POLL-2", "accepted"], "{line}");
    stack.advance("POLL-1", Status::Generating).await;
    let line = watch.line().await;
    assert_eq!(words(&line)[1..3], ["POLL-1", "generating"], "{line}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_refuses_a_job_that_is_not_undeliverable_and_requeues_one_that_is() {
    let stack = Stack::start(&[]).await;
    submit(&stack, "REDO-1").await;
    let refused = stack.run(&["redeliver", "REDO-1"]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused
            .stderr
            .starts_with("error: not_undeliverable: job REDO-1 is accepted"),
        "{refused:?}"
    );

    testkit::jobs::completed_job(&stack.topology, "REDO-2", CALLBACK)
        .await
        .expect("a completed job");
    stack.advance("REDO-2", Status::Undeliverable).await;
    let requeued = stack.run(&["redeliver", "REDO-2"]).await;
    assert_eq!(requeued.code, Some(0), "{requeued:?}");
    assert_eq!(
        requeued.stdout.trim(),
        "REDO-2: requeued as completed, delivery round 1"
    );

    // No dead letters in the last two hours: nothing to do, and the window is understood.
    let window = stack.run(&["--json", "redeliver", "--since", "2h"]).await;
    assert_eq!(window.code, Some(0), "{window:?}");
    assert_eq!(window.json(), json!({"requeued": [], "skipped": []}));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_comes_from_the_flag_or_the_environment() {
    let stack = Stack::start(&[("gateway.api_keys", json!(["s3cret-key"]))]).await;
    let without = stack.run(&["status", "JOB-1"]).await;
    assert_eq!(without.code, Some(1), "{without:?}");
    assert!(
        without.stderr.starts_with("error: unauthorized: "),
        "{without:?}"
    );

    let flag = stack
        .run(&["--api-key", "s3cret-key", "status", "JOB-1"])
        .await;
    assert!(flag.stderr.starts_with("error: not_found: "), "{flag:?}");

    let mut command = stack.jetcall(&["status", "JOB-1"]);
    command.env("JETCALL_API_KEY", "s3cret-key");
    let env = crate::harness::run(&mut command).await;
    assert!(env.stderr.starts_with("error: not_found: "), "{env:?}");
    assert!(!env.stderr.contains("s3cret"), "the key is never printed");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_takes_back_waiting_jobs_and_says_which_it_could_not() {
    let stack = Stack::start(&[]).await;
    submit(&stack, "CANCEL-1").await;
    submit(&stack, "CANCEL-2").await;
    stack.advance("CANCEL-2", Status::Completed).await;
    let ids = tempfile::NamedTempFile::new().expect("a file");
    std::fs::write(
        ids.path(),
        "# from the catalogue import\nCANCEL-2\n\nNO-SUCH-JOB\n",
    )
    .expect("write the ids");

    let path = ids.path().to_str().expect("a UTF-8 path");
    let run = stack.run(&["cancel", "CANCEL-1", "--file", path]).await;
    assert_eq!(run.code, Some(1), "not every job was cancelled: {run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "CANCEL-1: cancelled (cancelled)", "{run:?}");
    assert!(
        lines[1].starts_with("CANCEL-2: not cancelled: job CANCEL-2 is completed"),
        "{run:?}"
    );
    assert!(lines[1].ends_with("(not_cancellable)"), "{run:?}");
    assert!(
        lines[2].starts_with("NO-SUCH-JOB: not cancelled:"),
        "{run:?}"
    );
    assert!(run.stderr.contains("1 cancelled, 2 not"), "{run:?}");

    let run = stack.run(&["cancel", "CANCEL-1"]).await;
    assert_eq!(run.code, Some(0), "cancelling again is no error: {run:?}");
    let run = stack.run(&["status", "CANCEL-1"]).await;
    assert!(run.stdout.contains("status      cancelled"), "{run:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_gives_a_job_a_time_to_live() {
    let stack = Stack::start(&[]).await;
    let run = submit_with(&stack, "TTL-1", &["--ttl", "2h"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = stack.run(&["--json", "status", "TTL-1"]).await;
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("the job as JSON");
    assert!(doc["expires_at"].is_string(), "{doc}");
    let refused = submit_with(&stack, "TTL-2", &["--ttl", "soon"]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("error: invalid_field: `ttl`"),
        "{refused:?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_gives_a_job_its_priority() {
    let stack = Stack::start(&[]).await;
    let run = submit_with(&stack, "BULK-1", &["--priority", "bulk"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = stack.run(&["--json", "status", "BULK-1"]).await;
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("the job as JSON");
    assert_eq!(doc["priority"], "bulk", "{doc}");
    submit(&stack, "INTERACTIVE-1").await;
    let run = stack.run(&["--json", "status", "INTERACTIVE-1"]).await;
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("the job as JSON");
    assert_eq!(doc["priority"], "interactive", "{doc}");
    let refused = submit_with(&stack, "BULK-2", &["--priority", "urgent"]).await;
    assert_eq!(refused.code, Some(2), "clap refuses it: {refused:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_says_what_a_key_has_left() {
    let stack = Stack::start(&[
        ("generator.provider", json!("anthropic")),
        ("anthropic.api_key", json!("not-a-real-key")),
        ("anthropic.model", json!("priced-model")),
        ("prices.priced-model", json!({"input": 3.0, "output": 15.0})),
        (
            "gateway.api_keys",
            json!([
                {
                    "key": "shop-key", "name": "shop", "callback_allowlist": ["127.0.0.1"],
                    "budget": {"per_day_usd": 5.0},
                },
                {"key": "other-key", "name": "other"},
            ]),
        ),
    ])
    .await;
    let today = time::OffsetDateTime::now_utc();
    let day = jetcall::budget::Period::Day.key(today);

    let fresh = stack.run(&["--api-key", "shop-key", "budget"]).await;
    assert_eq!(fresh.code, Some(0), "{fresh:?}");
    let line = format!("shop day {day}: $0.000000 of $5.000000 used, $5.000000 left; resets ");
    assert!(fresh.stdout.starts_with(&line), "{fresh:?}");

    // A job waiting holds its reservation.
    let run = submit_with(&stack, "BUDGET-1", &["--api-key", "shop-key"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let held = stack
        .run(&["--api-key", "shop-key", "--json", "budget"])
        .await
        .json();
    let used = held["periods"][0]["used"]["microdollars"]
        .as_u64()
        .expect("micro-dollars");
    assert!(used > 0, "{held}");
    assert_eq!(
        held["periods"][0]["remaining"]["microdollars"],
        json!(5_000_000 - used),
        "{held}"
    );

    let other = stack.run(&["--api-key", "other-key", "budget"]).await;
    assert_eq!(other.stdout.trim(), "other: no budget", "{other:?}");
    let forbidden = stack
        .run(&["--api-key", "other-key", "budget", "--tenant", "shop"])
        .await;
    assert_eq!(forbidden.code, Some(1), "{forbidden:?}");
    assert!(
        forbidden.stderr.starts_with("error: forbidden: "),
        "{forbidden:?}"
    );
    stack.stop().await;
}
