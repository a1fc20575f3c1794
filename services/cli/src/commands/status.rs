//! `jetcall status ID`: `GET /api/v1/jobs/{id}`, summarised.

use std::process::ExitCode;

use jetcall::view::JobView;

use super::Context;
use crate::{CliError, output, view};

pub async fn run(context: &Context, id: &str) -> Result<ExitCode, CliError> {
    let answer = context.gateway.job(id).await?;
    if context.json {
        output::line(&answer.body);
        return Ok(ExitCode::SUCCESS);
    }
    let doc: JobView = context.gateway.read(answer.body, "a status document")?;
    output::line(view::summary(&doc));
    Ok(ExitCode::SUCCESS)
}
