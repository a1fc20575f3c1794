//! `jetcall list`: `GET /api/v1/jobs?status=&kind=&limit=` as a table.

use std::process::ExitCode;

use serde::Deserialize;

use super::Context;
use crate::args::ListArgs;
use crate::{CliError, output};

/// The listing, as far as the table needs it.
#[derive(Debug, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
    pub scanned: u64,
    pub complete: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobSummary {
    pub job_id: String,
    pub status: String,
    pub kind: String,
    pub updated_at: String,
    pub generation_attempts: u32,
    pub delivery_attempts: u64,
}

pub async fn run(context: &Context, args: &ListArgs) -> Result<ExitCode, CliError> {
    let answer = context
        .gateway
        .list(args.status.as_deref(), args.kind.as_deref(), args.limit)
        .await?;
    if context.json {
        output::line(&answer.body);
        return Ok(ExitCode::SUCCESS);
    }
    let list: JobList = context.gateway.read(answer.body, "a job listing")?;
    if list.jobs.is_empty() {
        output::note("no jobs match");
    } else {
        let rows: Vec<Vec<String>> = list
            .jobs
            .iter()
            .map(|job| {
                vec![
                    job.job_id.clone(),
                    job.status.clone(),
                    job.kind.clone(),
                    output::time_text(&job.updated_at),
                    job.generation_attempts.to_string(),
                    job.delivery_attempts.to_string(),
                ]
            })
            .collect();
        output::line(output::table(
            &[
                "JOB ID",
                "STATUS",
                "KIND",
                "UPDATED",
                "GENERATIONS",
                "DELIVERIES",
            ],
            &rows,
        ));
    }
    if !list.complete {
        output::note(format!(
            "note: the gateway read the latest {} status writes; jobs untouched since are not \
             listed (`jetcall status ID` finds any job)",
            list.scanned
        ));
    }
    Ok(ExitCode::SUCCESS)
}
