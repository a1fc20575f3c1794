//! The whole pipeline, end to end: jobs submitted to the gateway, generated against a fake
//! Messages API, delivered by the callback service to a receiver in this process; and, for
//! comparison, what the same nats-server does with bare JetStream publishes and acks.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use axum::body::Bytes;
use axum::http::StatusCode;
use futures::StreamExt;
use tokio::time::Instant;

use super::callback::{Arrivals, start_receiver};
use super::gateway::{client, job_to, start_gateway};
use super::generator::{Protocol, generator_env, start_fake_llm};
use super::{Setup, Sizes, percentile, rss_mib, setup};
use crate::poll;
use crate::stack::{Stack, free_addr};

/// One end-to-end run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub jobs: usize,
    /// Submissions in flight at once (keep-alive connections to the gateway).
    pub connections: usize,
    pub llm_delay: Duration,
    /// LLM calls in flight in the generator.
    pub llm_concurrency: usize,
    /// Whether an operator has the console's overview open all along (`GET /api/v1/overview`
    /// every 3 s, as the page polls), which makes the gateway read the whole stream.
    pub watch_console: bool,
}

/// How often the console's overview page asks.
const CONSOLE_POLL: Duration = Duration::from_secs(3);

/// What the console's overview did during a run.
#[derive(Debug, Clone, Copy)]
struct ConsoleWatch {
    /// Overview answers during the run, and how many of them were not `200`.
    answers: usize,
    failures: usize,
    /// From the last webhook to the overview counting every delivery.
    caught_up_ms: f64,
}

/// The three service binaries measured.
#[derive(Debug, Clone, Copy)]
pub struct Binaries<'a> {
    pub gateway: &'a Path,
    pub generator: &'a Path,
    pub callback: &'a Path,
}

#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    gateway: f64,
    generator: f64,
    callback: f64,
}

impl Memory {
    /// Current (`peak` false) or peak resident memory of each service, in MiB.
    fn read(pids: [u32; 3], peak: bool) -> Self {
        let of = |pid| rss_mib(pid).map_or(0.0, |(hwm, now)| if peak { hwm } else { now });
        Self {
            gateway: of(pids[0]),
            generator: of(pids[1]),
            callback: of(pids[2]),
        }
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gateway {:.1}, generator {:.1}, callback {:.1} MiB",
            self.gateway, self.generator, self.callback
        )
    }
}

#[derive(Debug)]
struct EndToEnd {
    run: Run,
    /// From the first submission to the last webhook.
    seconds: f64,
    accept_p50_ms: f64,
    accept_p99_ms: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    refused: usize,
    first_refusal: Option<String>,
    /// From spawning the services to the gateway and the generator answering `/readyz`.
    startup_ms: f64,
    idle: Memory,
    peak: Memory,
    /// Messages JetStream stored (events and status writes) per job.
    writes_per_job: f64,
    console: Option<ConsoleWatch>,
}

impl EndToEnd {
    fn per_second(&self) -> f64 {
        self.run.jobs as f64 / self.seconds
    }
}

impl std::fmt::Display for EndToEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} jobs, LLM {:?}: {:.0}/s end to end; accept p50 {:.2} ms p99 {:.2} ms; 202 to \
             webhook p50 {:.1} ms p99 {:.1} ms; {} refused; {:.1} JetStream writes a job; \
             start-up {:.0} ms; idle {}; peak {}",
            self.run.jobs,
            self.run.llm_delay,
            self.per_second(),
            self.accept_p50_ms,
            self.accept_p99_ms,
            self.e2e_p50_ms,
            self.e2e_p99_ms,
            self.refused,
            self.writes_per_job,
            self.startup_ms,
            self.idle,
            self.peak
        )
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Waits for `url` to answer 200, failing early if a service exits.
pub(super) async fn wait_ok(
    stack: &mut Stack,
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<()> {
    poll::until(url, Duration::from_secs(30), async || {
        stack.check_running()?;
        let ok = http
            .get(url)
            .send()
            .await
            .is_ok_and(|response| response.status() == StatusCode::OK);
        Ok(ok.then_some(()))
    })
    .await
}

/// Messages stored so far in the `JOBS` stream and the `job_status` bucket.
async fn jetstream_writes(topology: &jetcall::topology::Topology) -> anyhow::Result<u64> {
    let jobs = topology.stream.get_info().await?.state.last_sequence;
    let mut bucket = topology
        .jetstream
        .get_key_value(jetcall::subjects::STATUS_BUCKET)
        .await?
        .stream;
    let status = bucket.info().await?.state.last_sequence;
    Ok(jobs + status)
}

/// Where the pipeline's NATS runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nats {
    Single,
    /// Three nodes on loopback, the stream and the buckets with 3 replicas.
    Cluster,
}

/// A stack on a three-node cluster, the topology provisioned with 3 replicas once the cluster
/// has elected its JetStream leader.
async fn cluster_setup(nats_server: &Path) -> anyhow::Result<Setup> {
    let stack = Stack::cluster(nats_server, 3, &[("JETCALL_NATS__REPLICAS", "3")]).await?;
    let url = stack.nats_url().to_owned();
    let config = testkit::config::config(&url, &[("nats.replicas", serde_json::json!(3))]);
    let client = async_nats::connect(jetcall::connect::servers(&url)).await?;
    let topology = poll::until(
        "the cluster to elect its JetStream leader",
        Duration::from_secs(60),
        async || {
            Ok(jetcall::topology::provision(
                client.clone(),
                &config,
                jetcall::topology::Provisioner::Operator,
            )
            .await
            .ok())
        },
    )
    .await?;
    Ok(Setup {
        stack,
        topology,
        secret: jetcall::signing::SigningKey::generate(),
    })
}

async fn end_to_end(
    bins: Binaries<'_>,
    nats_server: &Path,
    nats: Nats,
    run: Run,
) -> anyhow::Result<EndToEnd> {
    let mut setup = match nats {
        Nats::Single => setup(nats_server).await?,
        Nats::Cluster => cluster_setup(nats_server).await?,
    };
    let llm = start_fake_llm(run.llm_delay, Protocol::H2c).await?;
    let arrivals = Arrivals::default();
    let hook = start_receiver(arrivals.clone()).await?;
    let http = client(run.connections)?;

    let spawned = Instant::now();
    let generator_admin = free_addr(None)?;
    let generator_run = super::generator::Run {
        jobs: run.jobs,
        concurrency: run.llm_concurrency,
        llm_delay: run.llm_delay,
        protocol: Protocol::H2c,
    };
    let generator = setup.stack.spawn_service(
        "generator",
        bins.generator,
        &generator_env(&llm, generator_run, &generator_admin.to_string()),
    )?;
    let callback = setup.stack.spawn_service(
        "callback",
        bins.callback,
        &super::callback::callback_env(&setup.secret),
    )?;
    let (base, gateway) = start_gateway(&mut setup.stack, bins.gateway).await?;
    wait_ok(
        &mut setup.stack,
        &http,
        &format!("http://{generator_admin}/readyz"),
    )
    .await?;
    let startup_ms = millis(spawned.elapsed());
    let pids = [gateway, generator, callback];
    let idle = Memory::read(pids, false);
    let writes_before = jetstream_writes(&setup.topology).await?;

    println!(
        "==> {} jobs through the pipeline, {} submissions in flight, LLM {:?}",
        run.jobs, run.connections, run.llm_delay
    );
    let overview_url = format!("{base}/api/v1/overview");
    let overview_answers = Arc::new(OverviewAnswers::default());
    let watching = run.watch_console.then(|| {
        tokio::spawn(watch_overview(
            http.clone(),
            overview_url.clone(),
            overview_answers.clone(),
        ))
    });
    let url = format!("{base}/api/v1/jobs");
    let started = Instant::now();
    let answers: Vec<(usize, Instant, Result<Duration, String>)> =
        futures::stream::iter(0..run.jobs)
            .map(|n| {
                let (http, url, hook) = (&http, &url, &hook);
                async move {
                    let sent = Instant::now();
                    let body = serde_json::to_vec(&job_to(&format!("E-{n}"), n, hook))
                        .map_err(|err| err.to_string());
                    let answer = match body {
                        Ok(body) => match super::gateway::post(http, url, body).await {
                            Ok((StatusCode::ACCEPTED, _)) => Ok(sent.elapsed()),
                            Ok((status, text)) => Err(format!("{status}: {text}")),
                            Err(why) => Err(why),
                        },
                        Err(why) => Err(why),
                    };
                    (n, sent, answer)
                }
            })
            .buffer_unordered(run.connections)
            .collect()
            .await;
    let accepted = answers
        .iter()
        .filter(|(_, _, answer)| answer.is_ok())
        .count();
    let first_refusal = answers
        .iter()
        .find_map(|(_, _, answer)| answer.as_ref().err().cloned());

    poll::until(
        "every accepted job's webhook",
        Duration::from_secs(900),
        async || {
            setup.stack.check_running()?;
            Ok((arrivals.count() >= accepted).then_some(()))
        },
    )
    .await?;
    let last_webhook = Instant::now();
    let console = match watching {
        Some(watching) => {
            poll::until(
                "the console's overview to count every delivery",
                Duration::from_secs(300),
                async || {
                    let delivered = overview_delivered(&http, &overview_url).await?;
                    Ok((delivered >= accepted as u64).then_some(()))
                },
            )
            .await?;
            let caught_up_ms = millis(last_webhook.elapsed());
            watching.abort();
            Some(ConsoleWatch {
                answers: overview_answers.answers.load(Ordering::Relaxed),
                failures: overview_answers.failures.load(Ordering::Relaxed),
                caught_up_ms,
            })
        }
        None => None,
    };
    let peak = Memory::read(pids, true);
    // By `webhook-id`, which is `msg_<job id>`.
    let arrived = arrivals.snapshot();
    let last = arrived.values().max().copied().unwrap_or(started);
    let mut accept_ms = Vec::with_capacity(accepted);
    let mut e2e_ms = Vec::with_capacity(accepted);
    for (n, sent, answer) in &answers {
        if let Ok(took) = answer {
            accept_ms.push(millis(*took));
            if let Some(at) = arrived.get(&format!("msg_E-{n}")) {
                e2e_ms.push(millis(at.duration_since(*sent)));
            }
        }
    }
    accept_ms.sort_by(f64::total_cmp);
    e2e_ms.sort_by(f64::total_cmp);
    let writes = jetstream_writes(&setup.topology).await? - writes_before;
    setup.stack.shutdown().await?;
    Ok(EndToEnd {
        run,
        seconds: last.duration_since(started).as_secs_f64().max(f64::EPSILON),
        accept_p50_ms: percentile(&accept_ms, 0.50),
        accept_p99_ms: percentile(&accept_ms, 0.99),
        e2e_p50_ms: percentile(&e2e_ms, 0.50),
        e2e_p99_ms: percentile(&e2e_ms, 0.99),
        refused: run.jobs - accepted,
        first_refusal,
        startup_ms,
        idle,
        peak,
        writes_per_job: writes as f64 / accepted.max(1) as f64,
        console,
    })
}

#[derive(Debug, Default)]
struct OverviewAnswers {
    answers: AtomicUsize,
    failures: AtomicUsize,
}

/// Asks for the overview every `CONSOLE_POLL` as the console page does, until aborted.
async fn watch_overview(http: reqwest::Client, url: String, counts: Arc<OverviewAnswers>) {
    loop {
        let ok = http
            .get(&url)
            .send()
            .await
            .is_ok_and(|response| response.status() == StatusCode::OK);
        counts.answers.fetch_add(1, Ordering::Relaxed);
        if !ok {
            counts.failures.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(CONSOLE_POLL).await;
    }
}

/// The overview's count of deliveries in its 15-minute window.
async fn overview_delivered(http: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let overview: serde_json::Value = http
        .get(url)
        .send()
        .await
        .context("GET /api/v1/overview")?
        .error_for_status()
        .context("GET /api/v1/overview")?
        .json()
        .await
        .context("the overview's JSON")?;
    overview["totals"]["delivered"]
        .as_u64()
        .context("the overview has no totals.delivered")
}

/// Bare JetStream on the same kind of server: stored publishes and consumed acks a second.
#[derive(Debug)]
struct Ceiling {
    messages: usize,
    message_bytes: usize,
    publish_per_second: f64,
    consume_per_second: f64,
}

/// `messages` publishes of `message_bytes` each, 256 awaiting their ack at once (as the
/// services pipeline theirs), then a pull consumer reading and acking them all.
async fn ceiling(
    nats_server: &Path,
    messages: usize,
    message_bytes: usize,
) -> anyhow::Result<Ceiling> {
    let stack = Stack::start(nats_server).await?;
    let client = async_nats::connect(stack.nats_url()).await?;
    let js = jetstream::new(client);
    let bare = js
        .create_stream(stream::Config {
            name: "CEILING".into(),
            subjects: vec!["ceiling.>".into()],
            ..Default::default()
        })
        .await
        .context("creating the CEILING stream")?;
    let payload = Bytes::from(vec![b'x'; message_bytes]);

    let started = Instant::now();
    let stored: Vec<anyhow::Result<()>> = futures::stream::iter(0..messages)
        .map(|n| {
            let (js, payload) = (&js, payload.clone());
            async move {
                js.publish(format!("ceiling.{}", n % 16), payload)
                    .await?
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let publish_seconds = started.elapsed().as_secs_f64();
    stored.into_iter().collect::<anyhow::Result<()>>()?;

    let reader = bare
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ceiling".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 4096,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut incoming = reader.messages().await?;
    let mut acked = 0;
    while acked < messages {
        let message = incoming
            .next()
            .await
            .context("the ceiling consumer ended")?
            .map_err(|err| anyhow::anyhow!("reading the CEILING stream: {err}"))?;
        message
            .ack()
            .await
            .map_err(|err| anyhow::anyhow!("acking: {err}"))?;
        acked += 1;
    }
    let consume_seconds = started.elapsed().as_secs_f64();
    stack.shutdown().await?;
    Ok(Ceiling {
        messages,
        message_bytes,
        publish_per_second: messages as f64 / publish_seconds.max(f64::EPSILON),
        consume_per_second: messages as f64 / consume_seconds.max(f64::EPSILON),
    })
}

/// What the end-to-end benchmark measured.
#[derive(Debug)]
pub struct Figures {
    /// The median of `fast_rates.len()` runs.
    fast: EndToEnd,
    /// Jobs per second of every fast run, in the order they ran.
    fast_rates: Vec<f64>,
    slow: EndToEnd,
    /// `fast` again with the console's overview open throughout.
    watched: EndToEnd,
    /// `fast` again on a three-node cluster with 3 replicas.
    cluster: EndToEnd,
    ceiling: Ceiling,
}

pub async fn measure(
    bins: Binaries<'_>,
    nats_server: &Path,
    sizes: Sizes,
) -> anyhow::Result<Figures> {
    // This machine's speed drifts by a fifth between runs (the bare JetStream ceiling too), so
    // the headline figure is the median of a few runs, with every one of them reported.
    let mut fast_runs = Vec::with_capacity(sizes.pipeline_repeats);
    for _ in 0..sizes.pipeline_repeats.max(1) {
        let run = end_to_end(bins, nats_server, Nats::Single, sizes.pipeline_fast).await?;
        println!("==> {run}");
        fast_runs.push(run);
    }
    let fast_rates: Vec<f64> = fast_runs.iter().map(EndToEnd::per_second).collect();
    fast_runs.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    let fast = fast_runs.swap_remove(fast_runs.len() / 2);
    let slow = end_to_end(bins, nats_server, Nats::Single, sizes.pipeline_slow).await?;
    println!("==> {slow}");
    let watched_run = Run {
        watch_console: true,
        ..sizes.pipeline_fast
    };
    let watched = end_to_end(bins, nats_server, Nats::Single, watched_run).await?;
    println!("==> with the console's overview open: {watched}");
    let cluster = end_to_end(bins, nats_server, Nats::Cluster, sizes.pipeline_fast).await?;
    println!("==> three-node cluster: {cluster}");
    // The size of a `jobs.requested` event for the article's job.
    let message_bytes =
        serde_json::to_vec(&job_to("E-0", 0, "http://127.0.0.1:9/hook"))?.len() + 64;
    let ceiling = ceiling(nats_server, sizes.ceiling_messages, message_bytes).await?;
    println!(
        "==> bare JetStream: {:.0} publishes/s, {:.0} consumed and acked/s",
        ceiling.publish_per_second, ceiling.consume_per_second
    );
    Ok(Figures {
        fast,
        fast_rates,
        slow,
        watched,
        cluster,
        ceiling,
    })
}

impl Figures {
    pub fn section(&self) -> anyhow::Result<String> {
        let Figures {
            fast,
            fast_rates,
            slow,
            watched,
            cluster,
            ceiling,
        } = self;
        let every_run = if fast_rates.len() > 1 {
            let rates: Vec<String> = fast_rates.iter().map(|r| format!("{r:.0}")).collect();
            format!(
                " (median of {} runs: {}/s)",
                fast_rates.len(),
                rates.join(", ")
            )
        } else {
            String::new()
        };
        let mut text = String::new();
        writeln!(text, "## The whole pipeline, end to end\n")?;
        writeln!(text, "| measure | result | target |")?;
        writeln!(text, "|---|---|---|")?;
        writeln!(
            text,
            "| jobs per second, 202 to webhook received, {} jobs, {} submissions in flight, an LLM answering at once | **{:.0}/s**{every_run} | ≥ 3,000/s |",
            fast.run.jobs,
            fast.run.connections,
            fast.per_second()
        )?;
        writeln!(
            text,
            "| accept latency (submission to 202), p50 / p99 | {:.2} ms / {:.2} ms | |",
            fast.accept_p50_ms, fast.accept_p99_ms
        )?;
        writeln!(
            text,
            "| end-to-end latency (submission to webhook received), p50 / p99 | {:.1} ms / {:.1} ms | |",
            fast.e2e_p50_ms, fast.e2e_p99_ms
        )?;
        writeln!(
            text,
            "| jobs per second, {} jobs, an LLM taking {:?} a call, {} calls in flight | **{:.0}/s** | |",
            slow.run.jobs,
            slow.run.llm_delay,
            slow.run.llm_concurrency,
            slow.per_second()
        )?;
        writeln!(
            text,
            "| end-to-end latency in that run, p50 / p99 | {:.0} ms / {:.0} ms | |",
            slow.e2e_p50_ms, slow.e2e_p99_ms
        )?;
        if let Some(console) = watched.console {
            writeln!(
                text,
                "| the first run again with the console's overview open (asked every {} s, {} answers, {} not `200`): jobs per second | **{:.0}/s** | within 10 % of the first |",
                CONSOLE_POLL.as_secs(),
                console.answers,
                console.failures,
                watched.per_second()
            )?;
            writeln!(
                text,
                "| in that run: end-to-end p50 / p99; the overview counting every delivery after the last webhook | {:.1} ms / {:.1} ms; {:.0} ms later | |",
                watched.e2e_p50_ms, watched.e2e_p99_ms, console.caught_up_ms
            )?;
        }
        writeln!(
            text,
            "| the first run on a three-node cluster (3 replicas, all on this machine): jobs per second | **{:.0}/s** | |",
            cluster.per_second()
        )?;
        writeln!(
            text,
            "| on the cluster: accept p50 / p99, end-to-end p50 / p99 | {:.2} ms / {:.2} ms, {:.1} ms / {:.1} ms | |",
            cluster.accept_p50_ms, cluster.accept_p99_ms, cluster.e2e_p50_ms, cluster.e2e_p99_ms
        )?;
        writeln!(
            text,
            "| peak RSS with the fast LLM | {} | |\n| peak RSS with the {:?} LLM | {} | |",
            fast.peak, slow.run.llm_delay, slow.peak
        )?;
        writeln!(
            text,
            "| idle RSS after start-up | **{}** | ≤ 20 MB each |",
            fast.idle
        )?;
        writeln!(
            text,
            "| start-up, spawn to the gateway and the generator ready | {:.0} ms | |",
            fast.startup_ms
        )?;
        writeln!(
            text,
            "| JetStream writes per job (events in `JOBS` and revisions in `job_status`) | {:.1} | |",
            fast.writes_per_job
        )?;
        writeln!(
            text,
            "| bare JetStream on the same server: stored publishes per second ({} messages of {} bytes, 256 awaiting acks) | {:.0}/s | |",
            ceiling.messages, ceiling.message_bytes, ceiling.publish_per_second
        )?;
        writeln!(
            text,
            "| bare JetStream: messages consumed and acked per second (one pull consumer) | {:.0}/s | |",
            ceiling.consume_per_second
        )?;
        let bound = ceiling.publish_per_second / fast.writes_per_job.max(1.0);
        writeln!(
            text,
            "\nEach job costs {:.1} stored JetStream writes, so the server's bare publish rate \
             bounds the pipeline at about {:.0} jobs/s on this machine; the pipeline reached \
             {:.0}/s, {:.0} % of that bound, with every service, the load generator, the fake \
             LLM and the receiver sharing the same two cores.",
            fast.writes_per_job,
            bound,
            fast.per_second(),
            100.0 * fast.per_second() / bound.max(f64::EPSILON)
        )?;
        for run in [fast, slow, watched, cluster] {
            if run.refused > 0 {
                writeln!(
                    text,
                    "\n**{} submissions were refused** in the {:?} run; the first: {}",
                    run.refused,
                    run.run.llm_delay,
                    run.first_refusal.as_deref().unwrap_or("?")
                )?;
            }
        }
        writeln!(
            text,
            "\nThe jobs go in through `POST /api/v1/jobs` from this process (HTTP/1.1, keep-alive), \
             are generated against a fake Messages API in this process (HTTP/2) and delivered, \
             signed, to a receiver in this process that records each job's first arrival (it \
             does not check signatures, to leave the cores to the services; the demo and the \
             tests do). One nats-server with a file store, except for the cluster rows: three \
             nats-servers on loopback, each with its own store, on the same two cores.\n"
        )?;
        Ok(text)
    }
}
