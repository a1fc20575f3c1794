//! `jetcall budget [--tenant NAME]`: `GET /api/v1/budget`, a line per limited period.

use std::process::ExitCode;

use serde::Deserialize;

use jetcall::cost::Cost;

use super::Context;
use crate::{CliError, output};

#[derive(Debug, Deserialize)]
struct BudgetView {
    tenant: Option<String>,
    periods: Vec<PeriodView>,
}

#[derive(Debug, Deserialize)]
struct PeriodView {
    period: String,
    key: String,
    limit: Cost,
    used: Cost,
    remaining: Cost,
    resets_at: String,
}

pub async fn run(context: &Context, tenant: Option<&str>) -> Result<ExitCode, CliError> {
    let answer = context.gateway.budget(tenant).await?;
    if context.json {
        output::line(&answer.body);
        return Ok(ExitCode::SUCCESS);
    }
    let view: BudgetView = context.gateway.read(answer.body, "a budget")?;
    let Some(tenant) = view.tenant else {
        output::line("the gateway has no API keys, so no budgets");
        return Ok(ExitCode::SUCCESS);
    };
    if view.periods.is_empty() {
        output::line(format!("{tenant}: no budget"));
    }
    for period in view.periods {
        output::line(format!(
            "{tenant} {} {}: ${} of ${} used, ${} left; resets {}",
            period.period,
            period.key,
            dollars(period.used),
            dollars(period.limit),
            dollars(period.remaining),
            period.resets_at
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// Dollars to the micro-dollar, as `jetcall cost` prints them.
fn dollars(cost: Cost) -> String {
    super::cost::dollars(cost.microdollars)
}
