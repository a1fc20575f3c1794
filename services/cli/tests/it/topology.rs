//! `jetcall topology` against an empty nats-server: check, create, check again.

use std::path::Path;

use crate::harness::{jetcall, run};

fn config_file(dir: &Path, nats_url: &str, extra: &str) -> String {
    let path = dir.join("jetcall.toml");
    std::fs::write(&path, format!("[nats]\nurl = \"{nats_url}\"\n{extra}"))
        .expect("write the configuration");
    path.to_str().expect("a UTF-8 path").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_creates_what_is_missing_and_then_checks_clean() {
    let nats = testkit::NatsServer::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = config_file(dir.path(), &nats.url(), "");
    let topology = |args: &[&str]| {
        let mut command = jetcall();
        command.args(["--config", &config, "topology"]).args(args);
        command
    };

    let empty = run(&mut topology(&["--check"])).await;
    assert_eq!(empty.code, Some(1), "{empty:?}");
    for name in [
        "JOBS",
        "BUDGETS",
        "generator",
        "callback",
        "job_status",
        "llm_limits",
    ] {
        assert!(
            empty
                .stdout
                .lines()
                .any(|line| line.contains(&format!(" {name} ")) && line.ends_with("missing")),
            "{name} is missing: {empty:?}"
        );
    }

    let created = run(&mut topology(&[])).await;
    assert_eq!(created.code, Some(0), "{created:?}");
    assert_eq!(
        created
            .stdout
            .lines()
            .filter(|line| line.ends_with("created"))
            .count(),
        7,
        "{created:?}"
    );

    let checked = run(&mut topology(&["--check"])).await;
    assert_eq!(checked.code, Some(0), "{checked:?}");
    assert_eq!(
        checked
            .stdout
            .lines()
            .filter(|line| line.ends_with("as configured"))
            .count(),
        7,
        "{checked:?}"
    );

    // A configuration that wants events kept for a day: the stream and bucket differ.
    let shorter = config_file(dir.path(), &nats.url(), "max_age = \"1day\"\n");
    let differs =
        run(jetcall().args(["--json", "--config", &shorter, "topology", "--check"])).await;
    assert_eq!(differs.code, Some(1), "{differs:?}");
    let parts: serde_json::Value = serde_json::from_str(&differs.stdout).expect("JSON");
    assert_eq!(parts[0]["name"], "JOBS");
    assert_eq!(parts[0]["state"], "differs");
    assert_eq!(parts[0]["details"][0], "max_age is 7days, configured 1day");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_named() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("nats://127.0.0.1:{}", testkit::free_port());
    let config = config_file(dir.path(), &url, "");
    let run = run(jetcall().args(["--config", &config, "topology", "--check"])).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .starts_with(&format!("error: could not reach NATS at {url} ")),
        "{run:?}"
    );
}
