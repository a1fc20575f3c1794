//! Webhook delivery, measured against a real nats-server and a build of the callback service.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use futures::StreamExt;
use tokio::time::Instant;

use jetcall::topology::Topology;

use super::{Sizes, percentile, rss_mib, setup};
use crate::poll;

/// A completed job for `callback_url`, as the generator leaves it.
async fn completed_job(
    topology: &Topology,
    job_id: &str,
    callback_url: &str,
) -> anyhow::Result<()> {
    testkit::jobs::completed_job(topology, job_id, callback_url)
        .await
        .map_err(|err| anyhow::anyhow!("seeding job {job_id}: {err}"))
}

/// Arrival times by `webhook-id`, recorded by a receiver that answers 204 at once.
#[derive(Debug, Clone, Default)]
pub(super) struct Arrivals(Arc<Mutex<HashMap<String, Instant>>>);

impl Arrivals {
    pub(super) fn count(&self) -> usize {
        self.0.lock().map(|map| map.len()).unwrap_or(0)
    }

    pub(super) fn snapshot(&self) -> HashMap<String, Instant> {
        self.0.lock().map(|map| map.clone()).unwrap_or_default()
    }
}

async fn receive(State(arrivals): State<Arrivals>, headers: HeaderMap) -> StatusCode {
    let now = Instant::now();
    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok())
        && let Ok(mut map) = arrivals.0.lock()
    {
        map.entry(id.to_owned()).or_insert(now);
    }
    StatusCode::NO_CONTENT
}

/// A fast receiver on a loopback port; returns its callback URL. Not `testkit`'s
/// `WebhookReceiver`, which the demo and the tests share: this one runs on the cores it
/// measures, so it keeps one arrival time per job and no bodies, headers or scripts.
pub(super) async fn start_receiver(arrivals: Arrivals) -> anyhow::Result<String> {
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(arrivals);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

/// A loopback port that accepts connections and never answers: a dead receiver.
async fn start_blackhole() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Ok(url)
}

async fn preload(topology: &Topology, prefix: &str, count: usize, url: &str) -> anyhow::Result<()> {
    futures::stream::iter(0..count)
        .map(|n| async move { completed_job(topology, &format!("{prefix}-{n}"), url).await })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

pub(super) fn callback_env(secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("JETCALL_CONFIG", "/dev/null".into()),
        ("JETCALL_CALLBACK__SIGNING_SECRET", secret.to_owned()),
        // The receivers listen on loopback, which the default allowlist refuses.
        (
            "JETCALL_GATEWAY__CALLBACK_ALLOWLIST",
            r#"["127.0.0.1"]"#.to_owned(),
        ),
        ("JETCALL_CALLBACK__LISTEN", "127.0.0.1:0".into()),
    ]
}

#[derive(Debug)]
struct Throughput {
    jobs: usize,
    seconds: f64,
    peak_rss_mib: f64,
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} deliveries in {:.2} s: {:.0}/s (callback peak RSS {:.1} MiB)",
            self.jobs,
            self.seconds,
            self.jobs as f64 / self.seconds,
            self.peak_rss_mib
        )
    }
}

/// A backlog of completions, then the callback service started: how fast it drains.
async fn deliveries_per_second(
    callback: &Path,
    nats_server: &Path,
    sizes: Sizes,
) -> anyhow::Result<Throughput> {
    let mut setup = setup(nats_server).await?;
    let arrivals = Arrivals::default();
    let url = start_receiver(arrivals.clone()).await?;
    println!("==> loading {} completed jobs", sizes.throughput_jobs);
    preload(&setup.topology, "T", sizes.throughput_jobs, &url).await?;

    let pid = setup
        .stack
        .spawn_service("callback", callback, &callback_env(&setup.secret))?;
    let jobs = sizes.throughput_jobs;
    poll::until("every delivery", Duration::from_secs(600), async || {
        Ok((arrivals.count() >= jobs).then_some(()))
    })
    .await?;
    let times: Vec<Instant> = arrivals.snapshot().into_values().collect();
    let first = times.iter().min().copied().context("no arrivals")?;
    let last = times.iter().max().copied().context("no arrivals")?;
    let peak_rss_mib = rss_mib(pid).map_or(0.0, |(peak, _)| peak);
    setup.stack.shutdown().await?;
    Ok(Throughput {
        jobs,
        seconds: (last - first).as_secs_f64().max(f64::EPSILON),
        peak_rss_mib,
    })
}

#[derive(Debug)]
struct Latency {
    jobs: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} jobs: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.jobs, self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

/// Healthy completions at a steady rate, each timed from the status write to the webhook's
/// arrival; with `dead_backlog` > 0, that many jobs for a receiver that never answers are
/// already waiting for retries.
async fn healthy_latency(
    callback: &Path,
    nats_server: &Path,
    sizes: Sizes,
    dead_backlog: usize,
) -> anyhow::Result<Latency> {
    let mut setup = setup(nats_server).await?;
    let arrivals = Arrivals::default();
    let url = start_receiver(arrivals.clone()).await?;
    setup
        .stack
        .spawn_service("callback", callback, &callback_env(&setup.secret))?;
    if dead_backlog > 0 {
        let dead = start_blackhole().await?;
        println!("==> loading {dead_backlog} jobs for a dead receiver");
        preload(&setup.topology, "D", dead_backlog, &dead).await?;
        let mut consumer = setup.topology.callback_consumer().await?;
        // Every dead job has been tried once and now waits in JetStream for its retry.
        poll::until(
            "the dead backlog to be pending retries",
            Duration::from_secs(300),
            async || {
                let Ok(info) = consumer.info().await else {
                    return Ok(None);
                };
                Ok((info.num_pending == 0 && info.num_ack_pending >= dead_backlog).then_some(()))
            },
        )
        .await?;
    }

    let total = (sizes.rate_per_second * sizes.rate_seconds) as usize;
    let mut started = HashMap::with_capacity(total);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / sizes.rate_per_second);
    let mut submissions = tokio::task::JoinSet::new();
    for n in 0..total {
        ticker.tick().await;
        let id = format!("H-{n}");
        started.insert(format!("msg_{id}"), Instant::now());
        let (topology, url) = (setup.topology.clone(), url.clone());
        // A task each, so a submission starts on its tick whatever the others are doing.
        submissions.spawn(async move { completed_job(&topology, &id, &url).await });
    }
    while let Some(result) = submissions.join_next().await {
        result??;
    }
    poll::until(
        "every healthy delivery",
        Duration::from_secs(300),
        async || Ok((arrivals.count() >= total).then_some(())),
    )
    .await?;
    let arrived = arrivals.snapshot();
    let mut latencies: Vec<f64> = started
        .iter()
        .filter_map(|(id, start)| Some((*arrived.get(id)? - *start).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    setup.stack.shutdown().await?;
    Ok(Latency {
        jobs: latencies.len(),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
    })
}

/// What the callback benchmark measured.
#[derive(Debug)]
pub struct Figures {
    throughput: Throughput,
    baseline: Latency,
    with_dead: Latency,
}

pub async fn measure(callback: &Path, nats_server: &Path, sizes: Sizes) -> anyhow::Result<Figures> {
    let throughput = deliveries_per_second(callback, nats_server, sizes).await?;
    println!("==> {throughput}");
    let baseline = healthy_latency(callback, nats_server, sizes, 0).await?;
    println!("==> healthy endpoint alone: {baseline}");
    let with_dead = healthy_latency(callback, nats_server, sizes, sizes.dead_backlog).await?;
    println!("==> healthy endpoint beside a dead one: {with_dead}");
    Ok(Figures {
        throughput,
        baseline,
        with_dead,
    })
}

impl Figures {
    pub fn section(&self, sizes: Sizes) -> anyhow::Result<String> {
        let Figures {
            throughput,
            baseline,
            with_dead,
        } = self;
        let ratio = with_dead.p99_ms / baseline.p99_ms.max(f64::EPSILON);
        let mut text = String::new();
        writeln!(text, "## Webhook delivery (callback service)\n")?;
        writeln!(text, "| measure | result | target |")?;
        writeln!(text, "|---|---|---|")?;
        writeln!(
            text,
            "| deliveries per second, a backlog of {} completions to one local receiver | **{:.0}/s** | ≥ 5,000/s |",
            throughput.jobs,
            throughput.jobs as f64 / throughput.seconds
        )?;
        writeln!(
            text,
            "| callback peak RSS during that run | {:.1} MiB | |",
            throughput.peak_rss_mib
        )?;
        writeln!(
            text,
            "| healthy receiver, {}/s for {} s: latency from status write to webhook arrival | p50 {:.1} ms, p99 {:.1} ms | |",
            sizes.rate_per_second, sizes.rate_seconds, baseline.p50_ms, baseline.p99_ms
        )?;
        writeln!(
            text,
            "| the same beside a dead receiver (accepts, never answers) holding {} pending retries | p50 {:.1} ms, p99 {:.1} ms (**{:.2}×** the p99 alone) | ≤ 2× |",
            sizes.dead_backlog, with_dead.p50_ms, with_dead.p99_ms, ratio
        )?;
        writeln!(
            text,
            "\nA destination's deliveries that cannot go out (every slot busy, or its circuit \
         open) wait in JetStream, each due back behind those of the destination still out, \
         spaced by what it can take (its typical attempt over its slots, or a slot's 50 ms \
         patience before any attempt has finished) and never more than four timeouts or \
         cooldowns ahead. The dead receiver's backlog therefore comes back a few dozen a \
         second rather than all of it every few seconds; before this pacing the ratio was 2.4 \
         to 2.5×."
        )?;
        if ratio > 2.0 {
            writeln!(
                text,
                "\n**The 2× target is not met in this run.** The p99 alone varies between runs \
             (2.2 to 5 ms seen on this machine), so read the ratio with that in mind."
            )?;
        }
        writeln!(
            text,
            "\nEach delivery is one signed HTTP POST, one read and one write of the job's status \
         document (the attempt and `delivered` together) and one `jobs.delivered` event. Default \
         configuration: `callback.concurrency` 256, `callback.per_host_concurrency` 32, \
         `callback.timeout` 15 s, the breaker's cooldown 30 s.\n"
        )?;
        Ok(text)
    }
}
