//! Project automation, run as `cargo xtask <command>` (see `.cargo/config.toml`).

mod bench;
mod demo;
mod poll;
mod procs;
mod stack;
mod test;
mod tools;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::procs::Failed;
use crate::workspace::Workspace;

#[derive(Debug, Parser)]
#[command(bin_name = "cargo xtask", about = "Jetcall project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start nats-server and the three services, submit the article's example job and
    /// show the signed webhook it produces.
    Demo {
        /// Stop everything once the job is delivered instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Build the workspace, run every test against a real nats-server, then run the demo
    /// once as a smoke test.
    Test {
        /// Extra arguments for `cargo test --workspace`, after `--`.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Measure acceptance, generation and webhook delivery against a real nats-server and
    /// the release builds, and write BENCHMARKS.md.
    Bench {
        /// Small sizes, for checking that the benchmark runs; prints instead of writing.
        #[arg(long)]
        quick: bool,
        /// Measure one service only; prints instead of writing.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
    },
}

// One thread on purpose: the harness's children die with the *thread* that spawned them
// (PR_SET_PDEATHSIG; see testkit::procs), and a multi-threaded runtime may retire that
// thread while the child should live on.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { once } => run_demo(once).await,
        Command::Test { cargo_test_args } => run_test(&cargo_test_args).await,
        Command::Bench { quick, only } => run_bench(quick, only).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // A failing child's own exit code is more useful to a caller (and CI) than 1.
            let code = error.downcast_ref::<Failed>().map_or(1, Failed::exit_code);
            ExitCode::from(code)
        }
    }
}

async fn run_demo(once: bool) -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    let nats_server = tools::nats_server(&ws).await?;
    let mode = if once {
        demo::Mode::Once
    } else {
        demo::Mode::UntilCtrlC
    };
    demo::run(&ws, &nats_server, mode).await
}

async fn run_bench(quick: bool, only: Option<bench::Part>) -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    if !quick && cfg!(debug_assertions) {
        return rerun_optimised(&ws).await;
    }
    let nats_server = tools::nats_server(&ws).await?;
    let sizes = if quick {
        bench::Sizes::quick()
    } else {
        bench::Sizes::full()
    };
    bench::run(&ws, &nats_server, sizes, only).await
}

/// The load generator, the fake LLM and the receivers run in this process, on the same two
/// cores as the services they measure: a debug build of them took a fifth of the machine.
/// So the real figures come from a release build of xtask, which `cargo xtask` (a debug
/// build, to keep `cargo xtask test` quick on a clean clone) builds and runs in its place.
async fn rerun_optimised(ws: &Workspace) -> anyhow::Result<()> {
    println!("==> cargo build --release --package xtask");
    procs::run(
        &mut ws.cargo(["build", "--release", "--package", "xtask"]),
        "building xtask with optimisations",
    )
    .await?;
    let xtask = ws.release_bin("xtask");
    procs::run(
        tokio::process::Command::new(&xtask).args(std::env::args_os().skip(1)),
        "the optimised benchmark",
    )
    .await
}

async fn run_test(cargo_test_args: &[String]) -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    test::run(&ws, cargo_test_args).await
}
