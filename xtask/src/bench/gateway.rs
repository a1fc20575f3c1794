//! Accepting jobs, measured against a real nats-server and a build of the gateway in its own
//! process: single submissions as fast as they are answered, the same at a fixed rate, and
//! batches. Nothing consumes the jobs. The load generator is this process (one thread), so it
//! shares the machine's cores with the gateway and nats-server.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tokio::time::Instant;

use jetcall::topology::Topology;

use super::{Sizes, percentile, rss_mib, setup};
use crate::poll;
use crate::stack::{Stack, free_addr};

/// The gateway part's sizes.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Single submissions in the throughput run.
    pub jobs: usize,
    /// Keep-alive connections (and requests in flight) in the throughput run.
    pub connections: usize,
    /// The open-loop run: submissions started on a timer, whatever the answers do.
    pub rate_per_second: u32,
    pub rate_seconds: u32,
    /// Jobs submitted through `POST /api/v1/jobs/batch`, `batch_size` a request,
    /// `batches_in_flight` requests at once.
    pub batch_jobs: usize,
    pub batch_size: usize,
    pub batches_in_flight: usize,
}

/// Where the webhooks would go: an allowlisted host. Nothing consumes the jobs, so nothing is
/// ever sent there.
const CALLBACK_URL: &str = "http://127.0.0.1:9/hook";

/// The article's product-description job under `job_id`, in the `POST /api/v1/jobs` form.
fn job(job_id: &str, n: usize) -> Value {
    job_to(job_id, n, CALLBACK_URL)
}

/// The same, with its webhook going to `callback_url`.
/// Posts `jobs` to `batch_url` (`POST /api/v1/jobs/batch`) 1,000 a request, four requests
/// at once, with `key` as the bearer token if given; fails unless every request is answered
/// 200.
pub(super) async fn submit_in_batches(
    http: &reqwest::Client,
    batch_url: &str,
    key: Option<&str>,
    jobs: &[Value],
) -> anyhow::Result<()> {
    let answers: Vec<anyhow::Result<()>> = futures::stream::iter(jobs.chunks(1000))
        .map(|chunk| async move {
            let request = http.post(batch_url).json(&json!({ "jobs": chunk }));
            let request = match key {
                Some(key) => request.bearer_auth(key),
                None => request,
            };
            let answer = request.send().await?;
            anyhow::ensure!(
                answer.status() == StatusCode::OK,
                "a batch of jobs was answered {}",
                answer.status()
            );
            Ok(())
        })
        .buffer_unordered(4)
        .collect()
        .await;
    answers.into_iter().collect()
}

pub(super) fn job_to(job_id: &str, n: usize, callback_url: &str) -> Value {
    json!({
        "job_id": job_id,
        "kind": "product-description",
        "input": {
            "product_id": format!("PROD-AC{n}"),
            "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
            "specs": {
                "capacity": "1.5 Ton",
                "energy_rating": "5 Star",
                "compressor": "Dual Inverter",
                "condenser": "100% Copper",
                "features": "4-way swing, Wi-Fi control"
            }
        },
        "callback_url": callback_url
    })
}

/// What the gateway answered: 202s counted, anything else counted and the first one kept.
#[derive(Debug, Default)]
struct Answers {
    accepted: usize,
    refused: usize,
    first_refusal: Option<String>,
}

impl Answers {
    fn record(&mut self, answer: Result<(), String>) {
        match answer {
            Ok(()) => self.accepted += 1,
            Err(why) => self.refuse(1, why),
        }
    }

    fn refuse(&mut self, count: usize, why: String) {
        self.refused += count;
        self.first_refusal.get_or_insert(why);
    }

    fn add(&mut self, other: &Answers) {
        self.accepted += other.accepted;
        if let Some(why) = &other.first_refusal {
            self.refuse(other.refused, why.clone());
        }
    }
}

/// A client for one run: plain HTTP/1.1 with keep-alive, as most callers would send.
pub(super) fn client(connections: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// `POST`s `body` to `url` and reads the whole answer (so the connection can be reused).
pub(super) async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, String), String> {
    let response = client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|err| format!("no answer: {}", error_chain(&err)))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|err| format!("{status} with an unreadable body: {}", error_chain(&err)))?;
    Ok((status, text))
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        write!(text, ": {cause}").ok();
        source = cause.source();
    }
    text
}

/// One job through `POST /api/v1/jobs`; `Err` describes any answer but a 202.
async fn submit(client: &reqwest::Client, url: &str, job_id: &str, n: usize) -> Result<(), String> {
    let body = serde_json::to_vec(&job(job_id, n)).map_err(|err| err.to_string())?;
    match post(client, url, body).await? {
        (StatusCode::ACCEPTED, _) => Ok(()),
        (status, text) => Err(format!("{status}: {text}")),
    }
}

/// CPU time a process has used so far, user and system, all threads, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it may not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime, fields 14 and 15, in clock ticks: USER_HZ, 100 on every Linux ABI.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The pid of our child process named `name` (the stack does not hand out nats-server's).
pub(super) fn child_pid(name: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (head, tail) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1;
            let ppid = tail.split_whitespace().nth(1)?;
            (comm == name && ppid == me).then_some(pid)
        })
}

/// CPU used by the gateway, nats-server and this process (the load generator) over a span.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSplit {
    gateway: f64,
    nats: f64,
    load: f64,
}

impl CpuSplit {
    fn sample(gateway: u32, nats: Option<u32>) -> Self {
        Self {
            gateway: cpu_seconds(gateway).unwrap_or(0.0),
            nats: nats.and_then(cpu_seconds).unwrap_or(0.0),
            load: cpu_seconds(std::process::id()).unwrap_or(0.0),
        }
    }

    /// Cores busy on average between `self` and `later`, `seconds` apart.
    fn cores_until(self, later: Self, seconds: f64) -> Self {
        Self {
            gateway: (later.gateway - self.gateway) / seconds,
            nats: (later.nats - self.nats) / seconds,
            load: (later.load - self.load) / seconds,
        }
    }
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gateway {:.2}, nats-server {:.2}, load generator {:.2} cores",
            self.gateway, self.nats, self.load
        )
    }
}

#[derive(Debug)]
struct Throughput {
    answers: Answers,
    seconds: f64,
    cpu: CpuSplit,
}

impl Throughput {
    fn per_second(&self) -> f64 {
        self.answers.accepted as f64 / self.seconds
    }
}

/// `run.jobs` single submissions, `run.connections` at a time, each answered before that
/// connection sends the next.
async fn singles(
    url: &str,
    run: Run,
    gateway: u32,
    nats: Option<u32>,
) -> anyhow::Result<Throughput> {
    let client = client(run.connections)?;
    let before = CpuSplit::sample(gateway, nats);
    let started = Instant::now();
    let answers = futures::stream::iter(0..run.jobs)
        .map(|n| {
            let client = &client;
            async move { submit(client, url, &format!("T-{n}"), n).await }
        })
        .buffer_unordered(run.connections)
        .fold(Answers::default(), async |mut answers, answer| {
            answers.record(answer);
            answers
        })
        .await;
    let seconds = started.elapsed().as_secs_f64().max(f64::EPSILON);
    let cpu = before.cores_until(CpuSplit::sample(gateway, nats), seconds);
    Ok(Throughput {
        answers,
        seconds,
        cpu,
    })
}

#[derive(Debug)]
struct Latency {
    answers: Answers,
    /// From the moment the timer scheduled the request to its whole answer.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// From the moment the request was actually started to its whole answer.
    p99_sent_ms: f64,
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accepted: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms (p99 from the actual send {:.2} ms)",
            self.answers.accepted, self.p50_ms, self.p99_ms, self.max_ms, self.p99_sent_ms
        )
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Submissions started on a timer at `run.rate_per_second`, whatever the answers do (open
/// loop), each timed from its scheduled moment, so a stall counts against every request it
/// delays.
async fn fixed_rate(url: &str, run: Run) -> anyhow::Result<Latency> {
    let client = client(run.connections)?;
    let total = (run.rate_per_second * run.rate_seconds) as usize;
    let period = Duration::from_secs(1) / run.rate_per_second;
    let start = Instant::now();
    // A late tick fires at once (the default `Burst`), so the schedule is kept on average.
    let mut ticker = tokio::time::interval_at(start, period);
    let mut requests = tokio::task::JoinSet::new();
    for n in 0..total {
        ticker.tick().await;
        let scheduled = start + period * u32::try_from(n)?;
        let (client, url) = (client.clone(), url.to_owned());
        // A task each, so a request starts on its tick whatever the others are doing.
        requests.spawn(async move {
            let sent = Instant::now();
            let answer = submit(&client, &url, &format!("L-{n}"), n).await;
            let done = Instant::now();
            (answer, done - scheduled, done - sent)
        });
    }
    let mut answers = Answers::default();
    let mut from_schedule = Vec::with_capacity(total);
    let mut from_send = Vec::with_capacity(total);
    while let Some(result) = requests.join_next().await {
        let (answer, scheduled, sent) = result?;
        if answer.is_ok() {
            from_schedule.push(millis(scheduled));
            from_send.push(millis(sent));
        }
        answers.record(answer);
    }
    from_schedule.sort_by(f64::total_cmp);
    from_send.sort_by(f64::total_cmp);
    Ok(Latency {
        answers,
        p50_ms: percentile(&from_schedule, 0.50),
        p99_ms: percentile(&from_schedule, 0.99),
        max_ms: from_schedule.last().copied().unwrap_or(0.0),
        p99_sent_ms: percentile(&from_send, 0.99),
    })
}

/// One batch: `Answers` for its jobs, from the per-job results of a 200, or all refused.
async fn submit_batch(client: &reqwest::Client, url: &str, first: usize, count: usize) -> Answers {
    let jobs: Vec<Value> = (first..first + count)
        .map(|n| job(&format!("B-{n}"), n))
        .collect();
    let mut answers = Answers::default();
    let body = match serde_json::to_vec(&json!({ "jobs": jobs })) {
        Ok(body) => body,
        Err(err) => {
            answers.refuse(count, err.to_string());
            return answers;
        }
    };
    let text = match post(client, url, body).await {
        Ok((StatusCode::OK, text)) => text,
        Ok((status, text)) => {
            answers.refuse(count, format!("batch answered {status}: {text}"));
            return answers;
        }
        Err(why) => {
            answers.refuse(count, format!("batch: {why}"));
            return answers;
        }
    };
    let result: Value = match serde_json::from_str(&text) {
        Ok(result) => result,
        Err(err) => {
            answers.refuse(count, format!("batch answer is not JSON ({err}): {text}"));
            return answers;
        }
    };
    let items = result["results"].as_array().map_or(&[][..], Vec::as_slice);
    for item in items {
        if item["result"] == "accepted" {
            answers.accepted += 1;
        } else {
            answers.refuse(1, format!("batch item: {item}"));
        }
    }
    if items.len() != count {
        let missing = count.saturating_sub(items.len());
        answers.refuse(
            missing,
            format!("batch of {count} answered for {} jobs", items.len()),
        );
    }
    answers
}

/// `run.batch_jobs` jobs in batches of `run.batch_size`, `run.batches_in_flight` at once.
async fn batches(
    url: &str,
    run: Run,
    gateway: u32,
    nats: Option<u32>,
) -> anyhow::Result<Throughput> {
    let client = client(run.batches_in_flight)?;
    let before = CpuSplit::sample(gateway, nats);
    let started = Instant::now();
    let answers = futures::stream::iter((0..run.batch_jobs).step_by(run.batch_size.max(1)))
        .map(|first| {
            let count = run.batch_size.min(run.batch_jobs - first);
            submit_batch(&client, url, first, count)
        })
        .buffer_unordered(run.batches_in_flight)
        .fold(Answers::default(), async |mut all, answers| {
            all.add(&answers);
            all
        })
        .await;
    let seconds = started.elapsed().as_secs_f64().max(f64::EPSILON);
    let cpu = before.cores_until(CpuSplit::sample(gateway, nats), seconds);
    Ok(Throughput {
        answers,
        seconds,
        cpu,
    })
}

/// Messages in the `JOBS` stream: with nothing consuming, one `jobs.requested` per new job.
async fn stored(topology: &Topology) -> anyhow::Result<u64> {
    let info = topology
        .stream
        .get_info()
        .await
        .context("reading the JOBS stream's info")?;
    Ok(info.state.messages)
}

/// Starts the gateway on a free loopback port and waits for its `/readyz`; returns its base
/// URL and pid.
pub(super) async fn start_gateway(
    stack: &mut Stack,
    gateway: &Path,
) -> anyhow::Result<(String, u32)> {
    start_gateway_with(stack, gateway, &[]).await
}

/// As [`start_gateway`], with `extra` settings in its environment.
pub(super) async fn start_gateway_with(
    stack: &mut Stack,
    gateway: &Path,
    extra: &[(&'static str, String)],
) -> anyhow::Result<(String, u32)> {
    let addr = free_addr(None)?;
    let mut env = vec![
        ("JETCALL_CONFIG", "/dev/null".to_owned()),
        ("JETCALL_GATEWAY__LISTEN", addr.to_string()),
        (
            "JETCALL_GATEWAY__CALLBACK_ALLOWLIST",
            r#"["127.0.0.1"]"#.to_owned(),
        ),
    ];
    env.extend_from_slice(extra);
    let pid = stack.spawn_service("gateway", gateway, &env)?;
    let base = format!("http://{addr}");
    let client = client(1)?;
    let ready = format!("{base}/readyz");
    poll::until(
        "the gateway's /readyz",
        Duration::from_secs(30),
        async || {
            stack.check_running()?;
            let ok = client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|response| response.status() == StatusCode::OK);
            Ok(ok.then_some(()))
        },
    )
    .await?;
    Ok((base, pid))
}

/// What the gateway benchmark measured.
#[derive(Debug)]
pub struct Figures {
    singles: Throughput,
    latency: Latency,
    batches: Throughput,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    /// Messages in `JOBS` at the end, and the jobs answered as accepted.
    stored: u64,
    accepted: usize,
    /// Every answer that was not an acceptance, over all three runs.
    refusals: Answers,
}

pub async fn measure(gateway: &Path, nats_server: &Path, sizes: Sizes) -> anyhow::Result<Figures> {
    let run = sizes.gateway;
    let mut setup = setup(nats_server).await?;
    let (base, pid) = start_gateway(&mut setup.stack, gateway).await?;
    let nats = child_pid("nats-server");
    let idle_rss_mib = rss_mib(pid).map_or(0.0, |(_, now)| now);
    let single_url = format!("{base}/api/v1/jobs");
    let batch_url = format!("{base}/api/v1/jobs/batch");

    println!(
        "==> {} single submissions over {} connections",
        run.jobs, run.connections
    );
    let singles = singles(&single_url, run, pid, nats).await?;
    println!(
        "==> {} accepted in {:.2} s: {:.0}/s, {} refused; CPU {}",
        singles.answers.accepted,
        singles.seconds,
        singles.per_second(),
        singles.answers.refused,
        singles.cpu
    );
    let after_singles = stored(&setup.topology).await?;
    println!("==> {after_singles} messages in JOBS");

    println!(
        "==> {}/s for {} s, open loop",
        run.rate_per_second, run.rate_seconds
    );
    let latency = fixed_rate(&single_url, run).await?;
    println!("==> {latency}");

    println!(
        "==> {} jobs in batches of {}, {} in flight",
        run.batch_jobs, run.batch_size, run.batches_in_flight
    );
    let batches = batches(&batch_url, run, pid, nats).await?;
    println!(
        "==> {} accepted in {:.2} s: {:.0}/s, {} refused; CPU {}",
        batches.answers.accepted,
        batches.seconds,
        batches.per_second(),
        batches.answers.refused,
        batches.cpu
    );

    let peak_rss_mib = rss_mib(pid).map_or(0.0, |(peak, _)| peak);
    let stored = stored(&setup.topology).await?;
    let mut refusals = Answers::default();
    for answers in [&singles.answers, &latency.answers, &batches.answers] {
        refusals.add(answers);
    }
    let accepted = refusals.accepted;
    println!(
        "==> gateway RSS idle {idle_rss_mib:.1} MiB, peak {peak_rss_mib:.1} MiB; \
         {stored} messages in JOBS for {accepted} accepted jobs"
    );
    if let Some(first) = &refusals.first_refusal {
        println!(
            "==> {} answers were not acceptances; the first: {first}",
            refusals.refused
        );
    }
    setup.stack.shutdown().await?;
    Ok(Figures {
        singles,
        latency,
        batches,
        idle_rss_mib,
        peak_rss_mib,
        stored,
        accepted,
        refusals,
    })
}

impl Figures {
    pub fn section(&self, sizes: Sizes) -> anyhow::Result<String> {
        let run = sizes.gateway;
        let Figures {
            singles,
            latency,
            batches,
            idle_rss_mib,
            peak_rss_mib,
            stored,
            accepted,
            refusals,
        } = self;
        let mut text = String::new();
        writeln!(text, "## Accepting jobs (gateway)\n")?;
        writeln!(text, "| measure | result | target |")?;
        writeln!(text, "|---|---|---|")?;
        writeln!(
            text,
            "| accepted jobs per second, {} `POST /api/v1/jobs` over {} keep-alive connections | **{:.0}/s** | ≥ 10,000/s |",
            run.jobs,
            run.connections,
            singles.per_second()
        )?;
        writeln!(
            text,
            "| CPU busy during that run, in cores | gateway {:.2} ({:.0} µs a job), nats-server {:.2}, load generator {:.2} | |",
            singles.cpu.gateway,
            singles.cpu.gateway * 1e6 / singles.per_second().max(f64::EPSILON),
            singles.cpu.nats,
            singles.cpu.load
        )?;
        writeln!(
            text,
            "| accept latency at a fixed {}/s for {} s, from the scheduled send to the whole answer | p50 {:.2} ms, **p99 {:.2} ms** (max {:.1} ms) | p99 ≤ 5 ms |",
            run.rate_per_second, run.rate_seconds, latency.p50_ms, latency.p99_ms, latency.max_ms
        )?;
        writeln!(
            text,
            "| accepted jobs per second through `POST /api/v1/jobs/batch`, {} jobs in batches of {}, {} batches in flight | **{:.0}/s** | |",
            run.batch_jobs,
            run.batch_size,
            run.batches_in_flight,
            batches.per_second()
        )?;
        writeln!(
            text,
            "| gateway RSS idle, and peak over all three runs | {idle_rss_mib:.1} MiB, {peak_rss_mib:.1} MiB | |"
        )?;
        writeln!(
            text,
            "| answers other than an acceptance | {} | 0 |",
            refusals.refused
        )?;
        writeln!(
            text,
            "| `jobs.requested` messages stored in `JOBS` for the {accepted} jobs accepted | {stored} | all |"
        )?;
        if let Some(first) = &refusals.first_refusal {
            writeln!(
                text,
                "\n**Not every job was accepted.** The first refusal: `{first}`"
            )?;
        }
        if *stored != *accepted as u64 {
            writeln!(
                text,
                "\n**The stream does not hold one request per accepted job.**"
            )?;
        }
        writeln!(
            text,
            "\nEach acceptance is the job validated, its status document created in the \
             `job_status` bucket, its `jobs.requested` event published and acknowledged by \
             JetStream, then the 202; nothing consumes the jobs. The load generator is the \
             benchmark's own process, one thread of reqwest over HTTP/1.1, on the same two \
             cores as the gateway and nats-server, so the throughput is what all three manage \
             together. The fixed-rate requests are started by a timer whatever the answers do, \
             and timed from their scheduled moment (p99 from the actual send: {:.2} ms).\n",
            latency.p99_sent_ms
        )?;
        Ok(text)
    }
}
