//! `cargo xtask bench`: the services measured against a real nats-server on this machine,
//! each from a build of its own binary; the figures go to `BENCHMARKS.md`. It reports; it
//! asserts nothing.

mod batches;
mod callback;
mod fairness;
mod gateway;
mod generator;
mod pipeline;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use time::OffsetDateTime;

use jetcall::signing::SigningKey;
use jetcall::topology::Topology;

use crate::stack::Stack;
use crate::workspace::Workspace;

/// Sizes of one run; `--quick` shrinks them so the benchmark itself can be smoke-tested.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// The smoke test runs the debug build `cargo xtask test` has just made; real figures
    /// come from the release build.
    pub release: bool,
    pub throughput_jobs: usize,
    pub dead_backlog: usize,
    pub rate_per_second: u32,
    pub rate_seconds: u32,
    pub generator_fast: generator::Run,
    pub generator_slow: generator::Run,
    pub gateway: gateway::Run,
    /// End to end with an LLM answering at once, and with a slow one.
    pub pipeline_fast: pipeline::Run,
    pub pipeline_slow: pipeline::Run,
    /// How many times the fast end-to-end run is repeated for its median.
    pub pipeline_repeats: usize,
    /// One tenant's backlog while another submits a few jobs a second.
    pub fairness: fairness::Run,
    pub batches: batches::Run,
    /// Bare JetStream publishes (then consumed and acked) for the ceiling.
    pub ceiling_messages: usize,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            release: true,
            throughput_jobs: 20_000,
            dead_backlog: 10_000,
            rate_per_second: 1_000,
            // Long enough to include the dead receiver's first timeouts (15 s) and the
            // opening of its circuit.
            rate_seconds: 30,
            generator_fast: generator::Run {
                jobs: 20_000,
                concurrency: 256,
                llm_delay: Duration::ZERO,
                protocol: generator::Protocol::H2c,
            },
            generator_slow: generator::Run {
                jobs: 100_000,
                concurrency: 10_000,
                llm_delay: Duration::from_secs(2),
                protocol: generator::Protocol::H2c,
            },
            gateway: gateway::Run {
                jobs: 50_000,
                connections: 256,
                rate_per_second: 1_000,
                rate_seconds: 20,
                batch_jobs: 50_000,
                batch_size: 1_000,
                batches_in_flight: 4,
            },
            pipeline_fast: pipeline::Run {
                jobs: 30_000,
                connections: 256,
                llm_delay: Duration::ZERO,
                llm_concurrency: 256,
                watch_console: false,
            },
            pipeline_slow: pipeline::Run {
                jobs: 20_000,
                connections: 256,
                llm_delay: Duration::from_secs(2),
                llm_concurrency: 4_096,
                watch_console: false,
            },
            pipeline_repeats: 3,
            fairness: fairness::Run {
                backlog: 20_000,
                llm_delay: Duration::from_millis(200),
                concurrency: 256,
                per_second: 10,
                seconds: 10,
            },
            batches: batches::Run {
                jobs: 100_000,
                processing: Duration::from_secs(5),
            },
            ceiling_messages: 200_000,
        }
    }

    pub fn quick() -> Self {
        Self {
            release: false,
            throughput_jobs: 1_000,
            dead_backlog: 500,
            rate_per_second: 200,
            rate_seconds: 2,
            generator_fast: generator::Run {
                jobs: 500,
                concurrency: 256,
                llm_delay: Duration::ZERO,
                protocol: generator::Protocol::H2c,
            },
            generator_slow: generator::Run {
                jobs: 500,
                concurrency: 500,
                llm_delay: Duration::from_millis(200),
                protocol: generator::Protocol::H2c,
            },
            gateway: gateway::Run {
                jobs: 1_000,
                connections: 256,
                rate_per_second: 200,
                rate_seconds: 2,
                batch_jobs: 1_000,
                batch_size: 250,
                batches_in_flight: 2,
            },
            pipeline_fast: pipeline::Run {
                jobs: 300,
                connections: 64,
                llm_delay: Duration::ZERO,
                llm_concurrency: 64,
                watch_console: false,
            },
            pipeline_slow: pipeline::Run {
                jobs: 300,
                connections: 64,
                llm_delay: Duration::from_millis(200),
                llm_concurrency: 256,
                watch_console: false,
            },
            pipeline_repeats: 1,
            fairness: fairness::Run {
                backlog: 500,
                llm_delay: Duration::from_millis(200),
                concurrency: 64,
                per_second: 10,
                seconds: 1,
            },
            batches: batches::Run {
                jobs: 2_000,
                processing: Duration::from_secs(1),
            },
            ceiling_messages: 2_000,
        }
    }
}

/// One service's benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Gateway,
    Generator,
    Callback,
    Pipeline,
    Fairness,
    Batches,
}

/// Runs `only` one part or all; writes `BENCHMARKS.md` after a full-size run of all.
pub async fn run(
    ws: &Workspace,
    nats_server: &Path,
    sizes: Sizes,
    only: Option<Part>,
) -> anyhow::Result<()> {
    let runs = |part: Part| only.is_none_or(|only| only == part);
    let mut build = vec![
        "build",
        "--bin",
        "gateway",
        "--bin",
        "callback",
        "--bin",
        "generator",
    ];
    if sizes.release {
        build.push("--release");
    }
    println!("==> cargo {}", build.join(" "));
    crate::procs::run(&mut ws.cargo(&build), "building the services").await?;
    let binary = |name: &str| {
        if sizes.release {
            ws.release_bin(name)
        } else {
            ws.debug_bin(name)
        }
    };

    let mut report = machine(nats_server).await?;
    if runs(Part::Gateway) {
        let acceptance = gateway::measure(&binary("gateway"), nats_server, sizes).await?;
        report.push_str(&acceptance.section(sizes)?);
    }
    if runs(Part::Generator) {
        let generation = generator::measure(&binary("generator"), nats_server, sizes).await?;
        report.push_str(&generation.section(sizes)?);
    }
    if runs(Part::Callback) {
        let delivery = callback::measure(&binary("callback"), nats_server, sizes).await?;
        report.push_str(&delivery.section(sizes)?);
    }
    let (gateway, generator, callback) =
        (binary("gateway"), binary("generator"), binary("callback"));
    let binaries = pipeline::Binaries {
        gateway: &gateway,
        generator: &generator,
        callback: &callback,
    };
    if runs(Part::Pipeline) {
        let end_to_end = pipeline::measure(binaries, nats_server, sizes).await?;
        report.push_str(&end_to_end.section()?);
    }
    if runs(Part::Fairness) {
        let fair = fairness::measure(binaries, nats_server, sizes.fairness).await?;
        report.push_str(&fair.section()?);
    }
    if runs(Part::Batches) {
        let bulk = batches::measure(binaries, nats_server, sizes.batches).await?;
        report.push_str(&bulk.section()?);
    }
    if sizes.release && only.is_none() {
        let path = ws.root.join("BENCHMARKS.md");
        std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
        println!("==> wrote {}", path.display());
    } else {
        println!("{report}");
    }
    Ok(())
}

struct Setup {
    stack: Stack,
    topology: Topology,
    secret: String,
}

async fn setup(nats_server: &Path) -> anyhow::Result<Setup> {
    let stack = Stack::start(nats_server).await?;
    let config = testkit::config::config(stack.nats_url(), &[]);
    let client = async_nats::connect(stack.nats_url()).await?;
    let topology =
        jetcall::topology::provision(client, &config, jetcall::topology::Provisioner::Operator)
            .await?;
    Ok(Setup {
        stack,
        topology,
        secret: SigningKey::generate(),
    })
}

/// Peak and current resident memory of a process, from /proc, in MiB.
fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(rank).copied().unwrap_or(0.0)
}

async fn command_output(program: &str, args: &[&str]) -> String {
    tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The report's title and the machine it was measured on.
async fn machine(nats_server: &Path) -> anyhow::Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = command_output("sh", &["-c", "free -g | awk '/Mem:/ {print $2}'"]).await;
    let nats_version = command_output(&nats_server.display().to_string(), &["--version"]).await;
    let date = OffsetDateTime::now_utc().date();
    let mut text = String::new();
    writeln!(text, "# Benchmarks\n")?;
    writeln!(
        text,
        "Measured with `cargo xtask bench` on {date}: {cpu}, {cores} cores, {memory} GiB; \
         {nats_version}; everything (nats-server with a file store, the release builds of the \
         services, and the load generator, the fake LLM and the receivers in a release build \
         of xtask) on this one machine, over loopback. The figures report; nothing asserts \
         them. This machine is a shared virtual one: the same run varies by 10 to 20 % from \
         one time to the next.\n"
    )?;
    Ok(text)
}
