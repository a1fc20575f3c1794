//! `cargo xtask demo`: the article's example job, end to end, on this machine.

use std::path::Path;
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use base64::Engine as _;
use serde_json::{Value, json};
use testkit::receiver::Delivery;

use crate::poll;
use crate::procs;
use crate::stack::{self, SERVICES, Stack};
use crate::workspace::Workspace;

const JOB_ID: &str = "JOB-771";
/// Where the demo's receiver takes its webhooks.
const RECEIVER_PATH: &str = "/webhooks/description";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stop as soon as the job is delivered (the smoke test).
    Once,
    /// Leave everything running for the user to explore.
    UntilCtrlC,
}

pub async fn run(ws: &Workspace, nats_server: &Path, mode: Mode) -> anyhow::Result<()> {
    let mut build = vec!["build", "--bins"];
    for name in SERVICES {
        build.extend(["-p", name]);
    }
    println!("==> cargo {}", build.join(" "));
    procs::run(&mut ws.cargo(&build), &format!("cargo {}", build.join(" "))).await?;

    // The receiver checks signatures against the secret the callback service signs with.
    let secret = signing_secret();
    let mut stack = Stack::with_receiver(ws, nats_server, &secret).await?;
    println!("==> nats-server with JetStream on {}", stack.nats_url());
    // From here on Ctrl-C means "stop cleanly": the children are in their own process
    // group, so only xtask sees it and shuts them down in order.
    let mut stop = pin!(stop_signal());
    let mut outcome = tokio::select! {
        result = scenario(&mut stack, &secret, mode) => result.map_err(Failure::Broken),
        signal = &mut stop => Err(Failure::interrupted(signal)),
    };
    if outcome.is_ok() && mode == Mode::UntilCtrlC {
        outcome = tokio::select! {
            signal = &mut stop => signal.map(drop).map_err(Failure::Broken),
            error = stack.watch() => Err(Failure::Broken(error)),
        };
    }
    if let Err(Failure::Broken(_)) = outcome {
        stack.print_log_tails();
    }
    println!("==> stopping the services, then nats-server");
    let stopped = stack.shutdown().await;
    match (outcome, stopped) {
        (Ok(()), stopped) => stopped,
        (Err(failure), Ok(())) => Err(failure.into_error()),
        (Err(failure), Err(also)) => {
            eprintln!("error while stopping: {also:#}");
            Err(failure.into_error())
        }
    }
}

/// Why the demo ended early. Only a breakage calls for the services' logs; the user
/// who pressed Ctrl-C knows why it stopped.
enum Failure {
    Broken(anyhow::Error),
    Interrupted(anyhow::Error),
}

impl Failure {
    fn interrupted(signal: anyhow::Result<&'static str>) -> Self {
        match signal {
            Ok(name) => Self::Interrupted(anyhow!("interrupted by {name}")),
            Err(error) => Self::Broken(error),
        }
    }

    fn into_error(self) -> anyhow::Error {
        match self {
            Self::Broken(error) | Self::Interrupted(error) => error,
        }
    }
}

/// Resolves with the signal's name on Ctrl-C, or on SIGTERM (say, from a CI timeout),
/// so either way the services are stopped and the temporary directory removed.
async fn stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        _ = interrupt.recv() => Ok("Ctrl-C"),
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}

/// Everything between starting nats-server and shutting down.
async fn scenario(stack: &mut Stack, secret: &str, mode: Mode) -> anyhow::Result<()> {
    let receiver = stack.receiver().clone();
    let callback_url = receiver.url(RECEIVER_PATH);
    println!("==> webhook receiver on {callback_url}");
    if std::env::var_os("ANTHROPIC_API_KEY").is_some_and(|key| !key.is_empty()) {
        println!("==> ANTHROPIC_API_KEY is set: the generator calls Claude");
    } else {
        println!("==> no ANTHROPIC_API_KEY: the generator uses the offline template writer");
    }
    // 8080 makes the curl commands printed for exploring memorable. A run that stops by
    // itself prints none, and a random port keeps it clear of a demo already running.
    let preferred = (mode == Mode::UntilCtrlC).then_some(8080);
    stack.start_services(stack::free_addr(preferred)?, secret)?;
    println!(
        "==> started {}; their logs are in {}",
        SERVICES.join(", "),
        stack.logs_dir().display()
    );

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let starting = Instant::now();
    stack.wait_ready(&client).await?;
    let gateway = stack.gateway_url()?;
    println!(
        "==> gateway ready on {gateway} after {} ms",
        starting.elapsed().as_millis()
    );
    println!("==> the console: open {gateway}/console in a browser and watch the job go through");

    let accepted_at = submit(&client, &gateway, &callback_url).await?;
    let delivery = tokio::select! {
        delivery = receiver.arrival(1) => delivery,
        error = stack.watch() => return Err(error),
        () = tokio::time::sleep(Duration::from_secs(60)) => {
            bail!("no webhook arrived within 60 s of the 202")
        }
    };
    report_delivery(&delivery, accepted_at)?;

    let url = format!("{gateway}/api/v1/jobs/{JOB_ID}");
    let document = poll::until(
        "the job to be delivered",
        Duration::from_secs(30),
        async || {
            stack.check_running()?;
            delivered(&client, &url).await
        },
    )
    .await?;
    println!("==> GET {url}\n{}", pretty_value(&document));
    if mode == Mode::UntilCtrlC {
        println!(
            "\nThe services keep running: open {gateway}/console, try `curl -s {url}`, logs in {}; \
             Ctrl-C stops everything",
            stack.logs_dir().display()
        );
    }
    Ok(())
}

/// Submits the article's job and returns when the gateway accepted it.
async fn submit(
    client: &reqwest::Client,
    gateway: &str,
    callback_url: &str,
) -> anyhow::Result<Instant> {
    let url = format!("{gateway}/api/v1/generate-description");
    println!("==> POST {url}");
    let response = client
        .post(&url)
        .json(&job_request(callback_url))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let accepted_at = Instant::now();
    let status = response.status();
    let body = response
        .text()
        .await
        .context("reading the gateway's answer")?;
    println!("{status}\n{}", pretty(&body));
    ensure!(
        status == reqwest::StatusCode::ACCEPTED,
        "the gateway answered {status}, not 202 Accepted"
    );
    Ok(accepted_at)
}

/// The job's status document once it is `delivered`; an error once it never will be.
async fn delivered(client: &reqwest::Client, url: &str) -> anyhow::Result<Option<Value>> {
    let document: Value = client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {url}"))?
        .json()
        .await
        .with_context(|| format!("reading GET {url}"))?;
    match document["status"].as_str() {
        Some("delivered") => Ok(Some(document)),
        Some(status @ ("failed" | "undeliverable")) => {
            bail!("job {JOB_ID} is {status}:\n{}", pretty_value(&document))
        }
        _ => Ok(None),
    }
}

/// What the demo tells the callback service to sign with: 32 random bytes, in the
/// Standard Webhooks `whsec_<base64>` form.
fn signing_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The article's example request, unchanged but for where the webhook goes.
fn job_request(callback_url: &str) -> Value {
    json!({
        "job_id": JOB_ID,
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": {
            "capacity": "1.5 Ton",
            "energy_rating": "5 Star",
            "compressor": "Dual Inverter",
            "condenser": "100% Copper",
            "features": "4-way swing, Wi-Fi control"
        },
        "callback_url": callback_url
    })
}

fn report_delivery(delivery: &Delivery, accepted_at: Instant) -> anyhow::Result<()> {
    let waited = delivery.at.saturating_duration_since(accepted_at);
    println!(
        "==> webhook received {} ms after the 202",
        waited.as_millis()
    );
    let event: Value = serde_json::from_slice(&delivery.body).with_context(|| {
        format!(
            "the webhook body is not JSON: {}",
            String::from_utf8_lossy(&delivery.body)
        )
    })?;
    let field = |name: &str| event[name].as_str().unwrap_or("(missing)").to_owned();
    let header = |name: &str| {
        delivery
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("(missing)")
            .to_owned()
    };
    println!("    webhook-id:  {}", header("webhook-id"));
    println!("    job:         {}", field("job_id"));
    println!("    status:      {}", field("status"));
    println!("    model:       {}", field("model"));
    println!("    description: {}", field("description"));
    match &delivery.signature {
        Some(Ok(())) => println!("    signature verified ✓"),
        Some(Err(why)) => bail!("the webhook's signature did not verify: {why}"),
        None => bail!("the webhook's signature was not checked"),
    }
    ensure!(
        event["job_id"] == JOB_ID,
        "the webhook is for another job:\n{}",
        pretty_value(&event)
    );
    ensure!(
        event["type"] == "job.completed" && event["status"] == "completed",
        "the job did not complete:\n{}",
        pretty_value(&event)
    );
    Ok(())
}

/// JSON indented for reading; anything else as it came.
fn pretty(text: &str) -> String {
    serde_json::from_str::<Value>(text).map_or_else(|_| text.to_owned(), |v| pretty_value(&v))
}

fn pretty_value(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn signing_secret_is_a_standard_webhooks_secret() {
        let secret = super::signing_secret();
        assert!(secret.starts_with("whsec_"));
        assert!(standardwebhooks::Webhook::new(&secret).is_ok());
        assert_ne!(secret, super::signing_secret());
    }
}
