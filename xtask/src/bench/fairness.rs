//! Fair share, end to end: one tenant's backlog while another tenant submits a few jobs a
//! second. The few jobs' latency from submission to webhook is measured twice: with the
//! second tenant's own key (its own lane, `jetcall::lanes`), and with the first tenant's key
//! (one lane, first in, first out: what every job waited before lanes).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use super::callback::{Arrivals, start_receiver};
use super::gateway::{client, job_to, start_gateway_with, submit_in_batches};
use super::generator::{Protocol, generator_env, start_fake_llm};
use super::pipeline::wait_ok;
use super::{percentile, setup};
use crate::poll;
use crate::stack::free_addr;

/// One run's sizes.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// The first tenant's jobs, submitted at once.
    pub backlog: usize,
    pub llm_delay: Duration,
    /// LLM calls in flight in the one generator.
    pub concurrency: usize,
    /// The second tenant's jobs a second, and for how long.
    pub per_second: u32,
    pub seconds: u32,
}

const BACKLOG_KEY: &str = "bench-key-of-the-catalogue-import";
const FEW_KEY: &str = "bench-key-of-the-merchant-portal";

/// One tenant's few jobs behind the other's backlog.
#[derive(Debug, Clone, Copy)]
struct Latencies {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The backlog's jobs a second, from its first submission to its last webhook.
    backlog_per_second: f64,
}

/// Both runs.
#[derive(Debug)]
pub struct Figures {
    run: Run,
    own_lane: Latencies,
    one_lane: Latencies,
}

pub async fn measure(
    binaries: super::pipeline::Binaries<'_>,
    nats_server: &Path,
    run: Run,
) -> anyhow::Result<Figures> {
    let own_lane = behind_a_backlog(binaries, nats_server, run, FEW_KEY).await?;
    println!("    with lanes: {own_lane:?}");
    let one_lane = behind_a_backlog(binaries, nats_server, run, BACKLOG_KEY).await?;
    println!("    in one lane: {one_lane:?}");
    Ok(Figures {
        run,
        own_lane,
        one_lane,
    })
}

/// The backlog submitted with its key, then `run.per_second` jobs a second with `few_key`.
async fn behind_a_backlog(
    binaries: super::pipeline::Binaries<'_>,
    nats_server: &Path,
    run: Run,
    few_key: &str,
) -> anyhow::Result<Latencies> {
    let mut setup = setup(nats_server).await?;
    let llm = start_fake_llm(run.llm_delay, Protocol::H2c).await?;
    let arrivals = Arrivals::default();
    let hook = start_receiver(arrivals.clone()).await?;
    // Keys with loopback allowed: the receiver listens there. The gateway creates each key's
    // lanes at start, the callback checks each job's destination against its key's list.
    // As the environment writes a list of tables (TOML's inline syntax, not JSON).
    let keys = format!(
        r#"[{{key="{BACKLOG_KEY}", name="catalogue", callback_allowlist=["127.0.0.1"]}}, {{key="{FEW_KEY}", name="portal", callback_allowlist=["127.0.0.1"]}}]"#
    );
    let (base, _) = start_gateway_with(
        &mut setup.stack,
        binaries.gateway,
        &[("JETCALL_GATEWAY__API_KEYS", keys.clone())],
    )
    .await?;
    let generator_admin = free_addr(None)?;
    let generator_run = super::generator::Run {
        jobs: run.backlog,
        concurrency: run.concurrency,
        llm_delay: run.llm_delay,
        protocol: Protocol::H2c,
    };
    setup.stack.spawn_service(
        "generator",
        binaries.generator,
        &generator_env(&llm, generator_run, &generator_admin.to_string()),
    )?;
    let mut callback_env = super::callback::callback_env(&setup.secret);
    callback_env.push(("JETCALL_GATEWAY__API_KEYS", keys));
    setup
        .stack
        .spawn_service("callback", binaries.callback, &callback_env)?;
    let http = client(64)?;
    wait_ok(
        &mut setup.stack,
        &http,
        &format!("http://{generator_admin}/readyz"),
    )
    .await?;

    println!(
        "==> {} jobs of one tenant, then {} a second for {} s {}, LLM {:?}",
        run.backlog,
        run.per_second,
        run.seconds,
        if few_key == BACKLOG_KEY {
            "with the same key"
        } else {
            "with another key"
        },
        run.llm_delay
    );
    let started = Instant::now();
    let batch_url = format!("{base}/api/v1/jobs/batch");
    let jobs: Vec<Value> = (0..run.backlog)
        .map(|n| job_to(&format!("BACKLOG-{n}"), n, &hook))
        .collect();
    submit_in_batches(&http, &batch_url, Some(BACKLOG_KEY), &jobs).await?;

    let url = format!("{base}/api/v1/jobs");
    let few = (run.per_second * run.seconds) as usize;
    let mut sent_at = Vec::with_capacity(few);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / run.per_second.max(1));
    for n in 0..few {
        tick.tick().await;
        let sent = Instant::now();
        let answer = http
            .post(&url)
            .bearer_auth(few_key)
            .json(&job_to(&format!("FEW-{n}"), n, &hook))
            .send()
            .await?;
        anyhow::ensure!(
            answer.status() == StatusCode::ACCEPTED,
            "a job was answered {}",
            answer.status()
        );
        sent_at.push(sent);
    }
    poll::until("every webhook", Duration::from_secs(900), async || {
        setup.stack.check_running()?;
        Ok((arrivals.count() >= run.backlog + few).then_some(()))
    })
    .await?;
    let arrived = arrivals.snapshot();
    let mut latencies: Vec<f64> = sent_at
        .iter()
        .enumerate()
        .filter_map(|(n, sent)| {
            let at = arrived.get(&format!("msg_FEW-{n}"))?;
            Some(at.duration_since(*sent).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let backlog_done = (0..run.backlog)
        .filter_map(|n| arrived.get(&format!("msg_BACKLOG-{n}")))
        .max()
        .copied()
        .unwrap_or(started);
    setup.stack.shutdown().await?;
    Ok(Latencies {
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        backlog_per_second: run.backlog as f64
            / backlog_done
                .duration_since(started)
                .as_secs_f64()
                .max(f64::EPSILON),
    })
}

impl Figures {
    pub fn section(&self) -> anyhow::Result<String> {
        let Figures {
            run,
            own_lane,
            one_lane,
        } = self;
        let mut text = String::new();
        writeln!(text, "## Fair share between tenants\n")?;
        writeln!(
            text,
            "One tenant submits {} jobs at once; another then submits {} a second for {} s. \
             The LLM takes {:?} a call, with {} calls in flight in one generator. The second \
             tenant's latency is from its submission to its webhook received.\n",
            run.backlog, run.per_second, run.seconds, run.llm_delay, run.concurrency
        )?;
        writeln!(
            text,
            "| measure | its own key (its own lane) | the backlog's key (one lane, first in first out) | target |"
        )?;
        writeln!(text, "|---|---|---|---|")?;
        writeln!(
            text,
            "| the second tenant's jobs, p50 / p99 / slowest | **{:.0} ms / {:.0} ms** / {:.0} ms | {:.0} ms / {:.0} ms / {:.0} ms | p99 ≤ 1 s |",
            own_lane.p50_ms,
            own_lane.p99_ms,
            own_lane.max_ms,
            one_lane.p50_ms,
            one_lane.p99_ms,
            one_lane.max_ms
        )?;
        writeln!(
            text,
            "| the backlog's jobs a second, first submission to last webhook | {:.0}/s | {:.0}/s | |",
            own_lane.backlog_per_second, one_lane.backlog_per_second
        )?;
        writeln!(text)?;
        Ok(text)
    }
}
