//! `cargo xtask test`: what CI runs (`.ci/run`), so it must work from a fresh clone.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;

use crate::workspace::Workspace;
use crate::{demo, procs, tools};

pub async fn run(ws: &Workspace, cargo_test_args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let nats_server = tools::nats_server(ws).await?;
    let nats_cli = tools::nats_cli(ws).await?;
    let schemathesis = tools::schemathesis(ws).await?;
    let python = tools::python_with_nats_py(ws).await?;
    let (chromium, chromedriver) = tools::chromium_and_chromedriver().await?;
    // The integration tests start their own nats-server and drive the nats CLI (and the
    // gateway's, schemathesis; the end-to-end subscriber's, Python with nats-py; the
    // console's, Chromium through chromedriver); these name the exact binaries, and PATH
    // serves anything that looks the NATS tools up by name.
    let path = path_with(&[&nats_server, &nats_cli])?;
    let with_tools = |mut cmd: tokio::process::Command| {
        cmd.env("JETCALL_NATS_SERVER", &nats_server)
            .env("JETCALL_NATS_CLI", &nats_cli)
            .env("JETCALL_SCHEMATHESIS", &schemathesis)
            .env("JETCALL_PYTHON", &python)
            .env("JETCALL_CHROMIUM", &chromium)
            .env("JETCALL_CHROMEDRIVER", &chromedriver)
            .env("PATH", &path);
        cmd
    };

    let build = ["build", "--workspace", "--bins"];
    println!("==> cargo {}", build.join(" "));
    procs::run(
        &mut with_tools(ws.cargo(build)),
        &format!("cargo {}", build.join(" ")),
    )
    .await?;

    let mut test = with_tools(ws.cargo(["test", "--workspace"]));
    test.args(cargo_test_args);
    let test_line = ["cargo test --workspace"]
        .into_iter()
        .chain(cargo_test_args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    println!("==> {test_line}");
    procs::run(&mut test, &test_line).await?;

    // The README's first command, run the way `demo --once` runs it, so it cannot rot.
    println!("==> smoke test: cargo xtask demo --once");
    demo::run(ws, &nats_server, demo::Mode::Once)
        .await
        .context("the demo smoke test failed")?;

    // The benchmark, tiny and on the debug build: it reports nothing, but it cannot rot.
    println!("==> smoke test: cargo xtask bench --quick");
    crate::bench::run(ws, &nats_server, crate::bench::Sizes::quick(), None)
        .await
        .context("the benchmark smoke test failed")?;

    println!(
        "==> xtask test: the workspace built, `{test_line}` passed and the demo delivered \
         its signed webhook ({} s)",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// `PATH` with the directories of `tools` in front.
fn path_with(tools: &[&Path]) -> anyhow::Result<OsString> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for tool in tools {
        let dir = tool
            .parent()
            .with_context(|| format!("{} has no parent directory", tool.display()))?;
        if !dirs.iter().any(|d| d == dir) {
            dirs.push(dir.to_path_buf());
        }
    }
    let current = std::env::var_os("PATH").unwrap_or_default();
    dirs.extend(std::env::split_paths(&current));
    std::env::join_paths(dirs).context("a tool's directory cannot go in PATH")
}
