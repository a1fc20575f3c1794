//! Bulk jobs through Message Batches, end to end: a catalogue of bulk jobs submitted to the
//! gateway, gathered into batches by the generator, answered by testkit's fake Anthropic
//! server (its Batches API ends a batch a few seconds after it is created), and delivered to
//! a webhook. Measured: jobs a second from the first submission to the last webhook, the
//! generator's memory while the jobs wait and while the results stream, and what the run
//! cost against the same tokens sent one call at a time.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use jetcall::events::Usage;
use testkit::FakeAnthropic;

use super::callback::{Arrivals, start_receiver};
use super::gateway::{client, job_to, start_gateway_with, submit_in_batches};
use super::pipeline::wait_ok;
use super::{rss_mib, setup};
use crate::poll;
use crate::stack::free_addr;

/// One run's sizes.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub jobs: usize,
    /// How long the fake keeps each batch `in_progress`.
    pub processing: Duration,
}

#[derive(Debug)]
pub struct Figures {
    run: Run,
    seconds: f64,
    /// Until the generator had recorded every result (its metric, read once a second).
    generated_seconds: f64,
    /// Until 99 % of the webhooks had arrived.
    most_delivered_seconds: f64,
    batches: usize,
    /// The generator's largest resident memory before the first webhook, and after it.
    waiting_rss_mib: f64,
    streaming_rss_mib: f64,
    batch_cost: u64,
    sync_cost: u64,
}

pub async fn measure(
    binaries: super::pipeline::Binaries<'_>,
    nats_server: &Path,
    run: Run,
) -> anyhow::Result<Figures> {
    let mut setup = setup(nats_server).await?;
    let claude = FakeAnthropic::start().await;
    claude.set_batch_processing_time(run.processing);
    let arrivals = Arrivals::default();
    let hook = start_receiver(arrivals.clone()).await?;
    // A batch gathers what its lane hands out unacked: room for a full batch. The generator's
    // setting alone: the gateway and the callback, started with the default, leave it be.
    let lane_room = ("JETCALL_GENERATOR__MAX_ACK_PENDING", "20000".to_owned());
    let (base, _) = start_gateway_with(&mut setup.stack, binaries.gateway, &[]).await?;
    let generator_admin = free_addr(None)?;
    let generator_env = vec![
        ("JETCALL_CONFIG", "/dev/null".to_owned()),
        ("JETCALL_GENERATOR__PROVIDER", "anthropic".to_owned()),
        (
            "ANTHROPIC_API_KEY",
            testkit::fake_anthropic::API_KEY.to_owned(),
        ),
        ("ANTHROPIC_BASE_URL", claude.base_url()),
        ("JETCALL_GENERATOR__LISTEN", generator_admin.to_string()),
        ("JETCALL_GENERATOR__BATCH_MAX_WAIT", "2s".to_owned()),
        ("JETCALL_GENERATOR__BATCH_POLL_INTERVAL", "500ms".to_owned()),
        lane_room,
    ];
    let generator_pid =
        setup
            .stack
            .spawn_service("generator", binaries.generator, &generator_env)?;
    let callback_env = super::callback::callback_env(&setup.secret);
    setup
        .stack
        .spawn_service("callback", binaries.callback, &callback_env)?;
    let http = client(64)?;
    let metrics_url = format!("http://{generator_admin}/metrics");
    wait_ok(
        &mut setup.stack,
        &http,
        &format!("http://{generator_admin}/readyz"),
    )
    .await?;

    println!(
        "==> {} bulk jobs through Message Batches, each batch processed in {:?}",
        run.jobs, run.processing
    );
    let started = Instant::now();
    let batch_url = format!("{base}/api/v1/jobs/batch");
    let jobs: Vec<Value> = (0..run.jobs)
        .map(|n| {
            let mut job = job_to(&format!("BULK-{n}"), n, &hook);
            job["priority"] = json!("bulk");
            job
        })
        .collect();
    // Not awaited yet: the sampler below starts with the submission.
    let submitting = submit_in_batches(&http, &batch_url, None, &jobs);
    // Sampled from the first submission on: jobs wait in batches while others are submitted.
    let sampler = tokio::spawn({
        let arrivals = arrivals.clone();
        let jobs = run.jobs;
        async move {
            let (mut waiting, mut streaming) = (0.0f64, 0.0f64);
            let mut every = tokio::time::interval(Duration::from_millis(100));
            while arrivals.count() < jobs {
                every.tick().await;
                let Some((_, now)) = rss_mib(generator_pid) else {
                    break;
                };
                if arrivals.count() == 0 {
                    waiting = waiting.max(now);
                } else {
                    streaming = streaming.max(now);
                }
            }
            (waiting, streaming)
        }
    });
    submitting.await?;
    let submitted_seconds = started.elapsed().as_secs_f64();
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(1800);
    let (mut generated_at, mut most_delivered_at) = (None, None);
    let mut looked = Instant::now();
    while arrivals.count() < run.jobs {
        every.tick().await;
        if most_delivered_at.is_none() && arrivals.count() * 100 >= run.jobs * 99 {
            most_delivered_at = Some(started.elapsed());
        }
        if generated_at.is_none() && looked.elapsed() >= Duration::from_secs(1) {
            looked = Instant::now();
            let text = http.get(&metrics_url).send().await?.text().await?;
            let completed = testkit::metrics::sum(
                &text,
                "jetcall_generator_jobs_total",
                &["status=\"completed\""],
            );
            if completed as usize >= run.jobs {
                generated_at = Some(started.elapsed());
            }
        }
        setup.stack.check_running()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} webhooks in 30 minutes",
            arrivals.count(),
            run.jobs
        );
    }
    let (waiting_rss_mib, streaming_rss_mib) = sampler.await?;
    let last = arrivals
        .snapshot()
        .values()
        .max()
        .copied()
        .unwrap_or(started);
    let seconds = last.duration_since(started).as_secs_f64();
    let metrics = poll::until("the cost metric", Duration::from_secs(30), async || {
        let text = http.get(&metrics_url).send().await?.text().await?;
        Ok(text
            .contains("jetcall_generator_cost_microdollars_total")
            .then_some(text))
    })
    .await?;
    let batch_cost = testkit::metrics::sum(
        &metrics,
        "jetcall_generator_cost_microdollars_total",
        &["path=\"batch\""],
    ) as u64;
    let usage = Usage {
        input_tokens: tokens(&metrics, "input"),
        output_tokens: tokens(&metrics, "output"),
        cache_creation_input_tokens: tokens(&metrics, "cache_write"),
        cache_read_input_tokens: tokens(&metrics, "cache_read"),
    };
    let model = jetcall::config::LlmEndpointConfig::anthropic().model;
    let sync_cost = jetcall::cost::PriceTable::default()
        .cost(&model, &usage, jetcall::cost::Path::Sync)
        .map_or(0, |cost| cost.microdollars);
    let created = claude.batches();
    let batches = created.len();
    let sizes: Vec<usize> = created.iter().map(|batch| batch.custom_ids.len()).collect();
    println!("    submitted in {submitted_seconds:.1} s; batches of {sizes:?}");
    setup.stack.shutdown().await?;
    let figures = Figures {
        run,
        seconds,
        generated_seconds: generated_at.map_or(seconds, |at| at.as_secs_f64()),
        most_delivered_seconds: most_delivered_at.map_or(seconds, |at| at.as_secs_f64()),
        batches,
        waiting_rss_mib,
        streaming_rss_mib,
        batch_cost,
        sync_cost,
    };
    println!("    {figures:?}");
    Ok(figures)
}

fn tokens(metrics: &str, direction: &str) -> u64 {
    let label = format!("direction=\"{direction}\"");
    testkit::metrics::sum(metrics, "jetcall_generator_tokens_total", &[&label]) as u64
}

impl Figures {
    pub fn section(&self) -> anyhow::Result<String> {
        let per_second = self.run.jobs as f64 / self.seconds.max(f64::EPSILON);
        let ratio = self.batch_cost as f64 / (self.sync_cost as f64).max(1.0);
        let mut text = String::new();
        writeln!(text, "## Bulk jobs through Message Batches\n")?;
        writeln!(
            text,
            "{} bulk jobs submitted to the gateway in batch requests of 1,000, gathered by one \
             generator into Message Batches (`batch_max_wait` 2 s, up to 10,000 jobs each), \
             answered by testkit's fake Batches API {:?} after each batch's creation, and \
             delivered by the callback service. Cost is the generator's cost metric against \
             the same tokens (its token metric) priced as synchronous calls.\n",
            self.run.jobs, self.run.processing
        )?;
        writeln!(text, "| measure | result | target |")?;
        writeln!(text, "|---|---|---|")?;
        writeln!(
            text,
            "| jobs per second, first submission to last webhook | **{per_second:.0}/s** ({:.1} s, {} batches) | |",
            self.seconds, self.batches
        )?;
        writeln!(
            text,
            "| jobs per second, first submission to every result recorded by the generator | {:.0}/s ({:.1} s) | |",
            self.run.jobs as f64 / self.generated_seconds.max(f64::EPSILON),
            self.generated_seconds
        )?;
        writeln!(
            text,
            "| jobs per second, first submission to 99 % of the webhooks | {:.0}/s ({:.1} s) | |",
            self.run.jobs as f64 * 0.99 / self.most_delivered_seconds.max(f64::EPSILON),
            self.most_delivered_seconds
        )?;
        writeln!(
            text,
            "| generator peak RSS while the jobs wait in batches | **{:.1} MiB** | ≤ 100 MB |",
            self.waiting_rss_mib
        )?;
        writeln!(
            text,
            "| generator peak RSS while results stream | **{:.1} MiB** | ≤ 100 MB |",
            self.streaming_rss_mib
        )?;
        writeln!(
            text,
            "| cost through batches against the same jobs sent synchronously | **{:.4}** (${:.2} against ${:.2}) | 0.5 ± rounding |",
            ratio,
            self.batch_cost as f64 / 1e6,
            self.sync_cost as f64 / 1e6
        )?;
        writeln!(text)?;
        Ok(text)
    }
}
