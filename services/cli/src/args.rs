//! The command line: global options and one subcommand per thing an operator or a caller does.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use url::Url;

use crate::rows::Format;

/// Submit, follow, list and redeliver Jetcall jobs through the gateway; provision the NATS
/// topology.
///
/// Everything but `topology` and `cost` talks to the gateway's HTTP API, so API keys,
/// validation, idempotency and the callback allowlist apply as they do to any caller.
/// `topology` and `cost` talk to NATS directly, with the services' configuration.
#[derive(Debug, Parser)]
#[command(name = "jetcall", version)]
pub struct Cli {
    /// The gateway's base URL.
    #[arg(
        long,
        global = true,
        env = "JETCALL_GATEWAY",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL",
        display_order = 100
    )]
    pub gateway: Url,

    /// Sent as `Authorization: Bearer <key>` when the gateway has `gateway.api_keys`.
    #[arg(
        long,
        global = true,
        env = "JETCALL_API_KEY",
        hide_env_values = true,
        value_name = "KEY",
        display_order = 101
    )]
    pub api_key: Option<String>,

    /// Machine output: the gateway's JSON as it answered, one document per line.
    #[arg(long, global = true, display_order = 102)]
    pub json: bool,

    /// The configuration `topology` and `cost` read; without it, the file named by JETCALL_CONFIG or
    /// ./jetcall.toml, as the services load it (NATS_URL and JETCALL_* variables apply).
    #[arg(long, global = true, value_name = "FILE", display_order = 103)]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit one job from flags, or many from a JSONL, JSON or CSV file.
    Submit(SubmitArgs),
    /// A job's status document, summarised.
    Status {
        /// The job's id.
        id: String,
    },
    /// Follow a job's status changes live until it is delivered or undeliverable; without an
    /// id, print every change among recently changed jobs (polling) until interrupted.
    Watch(WatchArgs),
    /// Recently changed jobs, newest first.
    List(ListArgs),
    /// Put an undeliverable job, or every job that became undeliverable in a time window,
    /// back to be delivered.
    Redeliver(RedeliverArgs),
    /// Cancel jobs not yet generated: a waiting job never reaches the model, a call in
    /// flight is abandoned, and each job's webhook says `job.cancelled`.
    Cancel(CancelArgs),
    /// What the key's budget has left: each limited period's limit, what finished jobs cost
    /// and unfinished ones reserve, and when it resets.
    Budget {
        /// Another tenant's budget (an operator's key only).
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
    },
    /// What jobs cost, by API key and kind: the `usage` and `cost` of every
    /// `jobs.completed.*` and charged `jobs.failed.*` event in the JOBS stream since a time
    /// (straight to NATS, with the services' configuration, like `topology`).
    Cost {
        /// From this time: RFC 3339 (2026-11-29T00:00:00Z), or a duration before now (24h).
        #[arg(long, value_name = "TIME", default_value = "24h")]
        since: String,
    },
    /// Create the JOBS stream, its consumers and the KV buckets where missing, or bring them
    /// to the configuration; with --check, only report.
    Topology {
        /// Report what exists and what differs from the configuration; create nothing. Exits
        /// non-zero unless everything is as configured.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").args(["input", "fields", "file"]).multiple(true).required(true)))]
pub struct SubmitArgs {
    /// The job kind, e.g. `product-description`; with --file, for rows that name none.
    #[arg(long, required_unless_present = "file")]
    pub kind: Option<String>,

    /// The job's input as a JSON object.
    #[arg(long, value_name = "JSON", conflicts_with = "file")]
    pub input: Option<String>,

    /// One input field: `name=text`, or `name:=<JSON>` for a number, list or object. Repeat
    /// for more; added to --input.
    #[arg(
        long = "field",
        id = "fields",
        value_name = "NAME=VALUE",
        conflicts_with = "file"
    )]
    pub fields: Vec<String>,

    /// Where the result is POSTed; with --file, for rows that name none.
    #[arg(long, value_name = "URL", required_unless_present = "file")]
    pub callback_url: Option<String>,

    /// The job's id, to retry with safely; the gateway makes one when left out.
    #[arg(long, value_name = "ID", conflicts_with = "file")]
    pub job_id: Option<String>,

    /// Anything to get back in the webhook, as a JSON object; with --file, for rows that
    /// have none.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,

    /// How long the job may wait to be started before it expires (`90s`, `30m`, `2h`); with
    /// --file, for rows that give neither `ttl` nor `expires_at`.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,

    /// `interactive` (the kind's default, else this) or `bulk`: a key's bulk jobs run when its
    /// interactive ones leave room; with --file, for rows that give none.
    #[arg(long, value_parser = ["interactive", "bulk"])]
    pub priority: Option<String>,

    /// Jobs to submit in batches: `.jsonl` (one job body per line), `.json` (an array of job
    /// bodies) or `.csv` (a header row; `job_id`, `kind`, `callback_url` columns are job
    /// fields, every other column an input field).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// The file's format, when its extension does not tell.
    #[arg(long, value_enum, requires = "file")]
    pub format: Option<Format>,

    /// Jobs per `POST /api/v1/jobs/batch`.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000), requires = "file")]
    pub batch_size: u16,

    /// Batches in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=32), requires = "file")]
    pub in_flight: u8,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The job to follow; without it, recently changed jobs are polled.
    pub id: Option<String>,

    /// Without an id: only jobs in this status.
    #[arg(long, conflicts_with = "id")]
    pub status: Option<String>,

    /// Without an id: only jobs of this kind.
    #[arg(long, conflicts_with = "id")]
    pub kind: Option<String>,

    /// Without an id: how many of the most recently changed jobs each poll reads (1 to 1000).
    #[arg(long, default_value_t = 100, conflicts_with = "id")]
    pub limit: u16,

    /// Without an id: the time between polls.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, conflicts_with = "id")]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only jobs in this status: accepted, generating, batched, completed, failed, cancelled,
    /// expired, delivered, undeliverable.
    #[arg(long)]
    pub status: Option<String>,

    /// Only jobs of this kind.
    #[arg(long)]
    pub kind: Option<String>,

    /// At most this many jobs (1 to 1000; the gateway's default is 50).
    #[arg(long)]
    pub limit: Option<u16>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").args(["id", "since"]).required(true)))]
pub struct RedeliverArgs {
    /// The undeliverable job to deliver again.
    pub id: Option<String>,

    /// Every job that became undeliverable since this time: RFC 3339
    /// (`2026-11-29T10:00:00Z`) or a duration before now (`2h`, `30m`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,

    /// The end of the window (RFC 3339 or a duration before now); now when left out.
    #[arg(long, value_name = "TIME", requires = "since")]
    pub until: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").args(["ids", "file"]).multiple(true).required(true)))]
pub struct CancelArgs {
    /// The jobs to cancel.
    pub ids: Vec<String>,

    /// A file of job ids, one a line (`-` for standard input); blank lines and lines
    /// starting with `#` are skipped.
    #[arg(long, value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_single_submission_needs_a_kind_and_a_callback_url_but_a_file_does_not() {
        let parse = |args: &[&str]| Cli::try_parse_from(["jetcall", "submit"].iter().chain(args));
        assert!(parse(&["--input", "{}"]).is_err());
        assert!(
            parse(&[
                "--kind",
                "k",
                "--callback-url",
                "http://x",
                "--field",
                "a=b"
            ])
            .is_ok()
        );
        assert!(parse(&["--file", "jobs.csv"]).is_ok());
        assert!(parse(&["--file", "jobs.csv", "--job-id", "J"]).is_err());
        assert!(parse(&["--kind", "k", "--callback-url", "http://x"]).is_err());
    }

    #[test]
    fn redeliver_takes_an_id_or_a_window() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["jetcall", "redeliver"].iter().chain(args));
        assert!(parse(&[]).is_err());
        assert!(parse(&["JOB-1"]).is_ok());
        assert!(parse(&["--since", "2h"]).is_ok());
        assert!(parse(&["JOB-1", "--since", "2h"]).is_err());
        assert!(parse(&["--until", "1h"]).is_err());
    }
}
