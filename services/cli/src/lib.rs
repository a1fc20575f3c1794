//! `jetcall`, the command line for Jetcall. Every job command is a client of the gateway's
//! HTTP API, so API keys, validation, idempotency and the callback allowlist apply to it as to
//! any caller; only `topology` and `cost` talk to NATS, with the services' own configuration
//! (and `topology` with their provisioning code).

mod args;
mod backoff;
mod bulk;
mod client;
mod commands;
mod output;
mod rows;
mod sse;
mod topology;
mod view;
mod when;

use std::process::ExitCode;

pub use args::Cli;
use args::Command;
use client::{ClientError, Gateway};
use commands::Context;

/// Why a command could not do its work. Each message is complete: `main` prints it after
/// `error: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Gateway(#[from] ClientError),
    #[error(transparent)]
    Rows(#[from] rows::ReadError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    /// The command line asked for something that cannot be done.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Scan(#[from] jetcall::scan::ScanError),
    #[error(
        "lost the event stream of job {0} and could not resume it; `jetcall status {0}` shows where it is"
    )]
    EventStreamLost(String),
}

/// Runs the command; `Ok` carries the exit status when the command ran to its end, including
/// ones that report a failure of their own (a rejected row, a topology that differs).
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let context = || -> Result<Context, CliError> {
        Ok(Context {
            gateway: Gateway::new(cli.gateway.clone(), cli.api_key.clone())
                .map_err(CliError::Usage)?,
            json: cli.json,
        })
    };
    match cli.command {
        Command::Submit(ref args) => commands::submit::run(&context()?, args).await,
        Command::Status { ref id } => commands::status::run(&context()?, id).await,
        Command::Watch(ref args) => commands::watch::run(&context()?, args).await,
        Command::List(ref args) => commands::list::run(&context()?, args).await,
        Command::Redeliver(ref args) => commands::redeliver::run(&context()?, args).await,
        Command::Cancel(ref args) => commands::cancel::run(&context()?, args).await,
        Command::Budget { ref tenant } => {
            commands::budget::run(&context()?, tenant.as_deref()).await
        }
        Command::Cost { ref since } => {
            let since =
                when::at(since, time::OffsetDateTime::now_utc()).map_err(CliError::Usage)?;
            commands::cost::run(cli.config.as_deref(), since, cli.json).await
        }
        Command::Topology { check } => {
            commands::topology::run(cli.config.as_deref(), check, cli.json).await
        }
    }
}
