//! `jetcall cancel ID... [--file F]`: `POST /api/v1/jobs/cancel`, 1,000 ids a request.

use std::io::BufRead;
use std::process::ExitCode;

use serde::Deserialize;

use super::Context;
use crate::args::CancelArgs;
use crate::{CliError, output};

/// The gateway's limit for one request.
const IDS_PER_REQUEST: usize = 1_000;

#[derive(Debug, Deserialize)]
struct CancelResults {
    results: Vec<CancelItem>,
}

#[derive(Debug, Deserialize)]
struct CancelItem {
    job_id: String,
    status_code: u16,
    #[serde(default)]
    job: Option<Job>,
    #[serde(default)]
    error: Option<ItemError>,
}

#[derive(Debug, Deserialize)]
struct Job {
    status: String,
}

#[derive(Debug, Deserialize)]
struct ItemError {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

/// Exits non-zero when any job was not cancelled; each gets a line either way.
pub async fn run(context: &Context, args: &CancelArgs) -> Result<ExitCode, CliError> {
    let mut ids = args.ids.clone();
    if let Some(path) = &args.file {
        ids.extend(read_ids(path)?);
    }
    let (mut cancelled, mut rejected) = (0, 0);
    for chunk in ids.chunks(IDS_PER_REQUEST) {
        let answer = context.gateway.cancel(chunk).await?;
        if context.json {
            output::line(&answer.body);
        }
        let results: CancelResults = context.gateway.read(answer.body, "a cancellation")?;
        for item in &results.results {
            match (&item.job, &item.error) {
                (Some(job), _) => {
                    cancelled += 1;
                    if !context.json {
                        output::line(format!("{}: cancelled ({})", item.job_id, job.status));
                    }
                }
                (None, error) => {
                    rejected += 1;
                    if !context.json {
                        let why = error.as_ref().map_or_else(
                            || format!("HTTP {}", item.status_code),
                            |error| format!("{} ({})", error.message, error.kind),
                        );
                        output::line(format!("{}: not cancelled: {why}", item.job_id));
                    }
                }
            }
        }
    }
    if !context.json {
        output::note(format!("{cancelled} cancelled, {rejected} not"));
    }
    Ok(super::exit(rejected == 0))
}

fn read_ids(path: &std::path::Path) -> Result<Vec<String>, CliError> {
    let unreadable = |err: std::io::Error| CliError::Usage(format!("{}: {err}", path.display()));
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).map_err(unreadable)?,
        ))
    };
    let mut ids = Vec::new();
    for line in reader.lines() {
        let line = line.map_err(unreadable)?;
        let id = line.trim();
        if !id.is_empty() && !id.starts_with('#') {
            ids.push(id.to_owned());
        }
    }
    Ok(ids)
}
