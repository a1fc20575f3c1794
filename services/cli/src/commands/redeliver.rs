//! `jetcall redeliver ID` (`POST /api/v1/jobs/{id}/redeliver`) and `jetcall redeliver --since`
//! (`POST /api/v1/deliveries/redeliver`).

use std::process::ExitCode;

use serde::Deserialize;
use time::OffsetDateTime;

use super::Context;
use crate::args::RedeliverArgs;
use crate::{CliError, output, when};

#[derive(Debug, Deserialize)]
struct Requeued {
    job_id: String,
    status: String,
    delivery_round: u32,
}

#[derive(Debug, Deserialize)]
struct WindowResult {
    requeued: Vec<Requeued>,
    skipped: Vec<String>,
}

pub async fn run(context: &Context, args: &RedeliverArgs) -> Result<ExitCode, CliError> {
    let answer = match (&args.id, &args.since) {
        (Some(id), _) => context.gateway.redeliver(id).await?,
        (None, Some(since)) => {
            let now = OffsetDateTime::now_utc();
            let since = when::parse(since, now).map_err(CliError::Usage)?;
            let until = args
                .until
                .as_deref()
                .map(|until| when::parse(until, now))
                .transpose()
                .map_err(CliError::Usage)?;
            context
                .gateway
                .redeliver_window(&since, until.as_deref())
                .await?
        }
        (None, None) => return Err(CliError::Usage("name a job, or --since".into())),
    };
    if context.json {
        output::line(&answer.body);
        return Ok(ExitCode::SUCCESS);
    }
    if args.id.is_some() {
        let requeued: Requeued = context.gateway.read(answer.body, "a redelivery")?;
        output::line(requeued_line(&requeued));
    } else {
        let window: WindowResult = context.gateway.read(answer.body, "a window's redelivery")?;
        for requeued in &window.requeued {
            output::line(requeued_line(requeued));
        }
        for job_id in &window.skipped {
            output::line(format!("{job_id}: skipped, no longer undeliverable"));
        }
        output::note(format!(
            "{} requeued, {} skipped",
            window.requeued.len(),
            window.skipped.len()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn requeued_line(requeued: &Requeued) -> String {
    format!(
        "{}: requeued as {}, delivery round {}",
        requeued.job_id, requeued.status, requeued.delivery_round
    )
}
