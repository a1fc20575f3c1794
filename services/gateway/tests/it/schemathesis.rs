//! Schemathesis (property-based API testing, from PyPI) against a real gateway and its own
//! `/openapi.json`: thousands of generated requests, valid and invalid, and not one answer may
//! be a 5xx or differ from the document in status, content type, body or headers. The API keys
//! are on, so it also checks that every API route refuses a request without one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::Gateway;

const API_KEY: &str = "schemathesis-key";

/// What the run checks: `st run --help` of the pinned version (see `xtask/src/tools.rs`).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance,ignored_auth";

/// Test cases per operation in each phase: enough for a few thousand requests, done in seconds.
const MAX_EXAMPLES: &str = "50";

/// The schemathesis `st` binary that `cargo xtask test` installs. Its absence fails the test:
/// a suite that silently skipped the fuzzing would look green and prove nothing.
fn st_binary() -> PathBuf {
    let path = std::env::var_os("JETCALL_SCHEMATHESIS").unwrap_or_else(|| {
        panic!(
            "JETCALL_SCHEMATHESIS is not set: run the suite with `cargo xtask test`, which \
             installs schemathesis into target/tools/venv, or point it at an `st` binary"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "JETCALL_SCHEMATHESIS={} does not exist: run `cargo xtask test` to install it",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_departures_from_the_document() {
    let st = st_binary();
    let gateway = Gateway::start(&[(
        "gateway.api_keys",
        // Its own allowlist: only a key's own list lets its jobs call back to loopback, where
        // the document's examples point.
        json!([{"key": API_KEY, "callback_allowlist": ["127.0.0.1"]}]),
    )])
    .await;
    // Its own directory, so nothing is written into the checkout and no stray
    // schemathesis.toml is picked up.
    let workdir = tempfile::tempdir().expect("temporary directory");
    let started = Instant::now();
    let run = tokio::process::Command::new(&st)
        .current_dir(workdir.path())
        .args(["run", &format!("{}/openapi.json", gateway.url)])
        .args(["--checks", CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--header", &format!("Authorization: Bearer {API_KEY}")])
        .args(["--request-timeout", "10"])
        // A job's event stream stays open until the job is final, which no job here becomes:
        // every request to it would hang until the timeout.
        .args(["--exclude-path-regex", "/events$"])
        .args(["--generation-database", "none"])
        .args(["--no-color"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("schemathesis finishes within 5 minutes")
        .unwrap_or_else(|err| panic!("running {}: {err}", st.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis failed ({}): \n{stdout}\n{stderr}",
        output.status
    );
    // It must have tested something: a document with no operations is not a pass. The
    // summary reads like `1407 generated, 1407 passed, 10 skipped`.
    let summary = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| line.contains(" generated,"))
        .unwrap_or_default();
    let generated: u64 = summary
        .split_whitespace()
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    assert!(
        generated > 0,
        "schemathesis ran no tests:\n{stdout}\n{stderr}"
    );
    eprintln!(
        "schemathesis: {summary} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    gateway.stop().await;
}
