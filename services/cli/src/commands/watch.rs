//! `jetcall watch ID`: a job's server-sent events (`GET /api/v1/jobs/{id}/events`), one line
//! per change, until it is delivered or undeliverable; a dropped connection is resumed with
//! `Last-Event-ID`. `jetcall watch` without an id polls the listing instead.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use jetcall::status::Status;
use jetcall::view::JobView;
use serde_json::json;

use super::{Context, NOT_DELIVERED};
use crate::args::WatchArgs;
use crate::client::{ClientError, Events};
use crate::commands::list::{JobList, JobSummary};
use crate::{CliError, backoff, output, sse, view};

/// Longer than the gateway's keep-alive (15 s): this long without a byte means the
/// connection is gone, though no one said so.
const SILENCE: Duration = Duration::from_secs(45);

pub async fn run(context: &Context, args: &WatchArgs) -> Result<ExitCode, CliError> {
    match &args.id {
        Some(id) => follow(context, id).await,
        None => poll(context, args).await,
    }
}

/// What the event stream has shown so far, kept across reconnections.
#[derive(Debug, Default)]
struct Seen {
    /// The last event's id, sent back as `Last-Event-ID`.
    last_id: Option<String>,
    last_status: Option<Status>,
}

/// Why reading one connection's events stopped.
enum End {
    /// Nothing more will happen to the job; exit with this.
    Done(ExitCode),
    /// The connection ended or broke before that: connect again.
    Lost,
}

async fn follow(context: &Context, id: &str) -> Result<ExitCode, CliError> {
    let mut seen = Seen::default();
    let mut failures = 0;
    loop {
        let opened = context.gateway.events(id, seen.last_id.as_deref()).await;
        let retry_after = match opened {
            Ok(Events::Finished) => return Ok(final_code(seen.last_status)),
            Ok(Events::Stream(response)) => {
                let before = seen.last_id.clone();
                match read_events(context, id, response, &mut seen).await? {
                    End::Done(code) => return Ok(code),
                    End::Lost => {}
                }
                // A connection that brought news starts the count of failures again.
                if seen.last_id != before {
                    failures = 0;
                }
                None
            }
            Err(err) if reconnectable(&err) => err.retry_after(),
            Err(err) => return Err(err.into()),
        };
        failures += 1;
        if failures > backoff::MAX_TRIES {
            return Err(CliError::EventStreamLost(id.to_owned()));
        }
        output::note(format!("reconnecting to the event stream of {id}…"));
        tokio::time::sleep(backoff::jittered(failures, retry_after)).await;
    }
}

async fn read_events(
    context: &Context,
    id: &str,
    mut response: reqwest::Response,
    seen: &mut Seen,
) -> Result<End, CliError> {
    let mut parser = sse::Parser::default();
    loop {
        let chunk = match tokio::time::timeout(SILENCE, response.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None) | Err(_)) | Err(_) => return Ok(End::Lost),
        };
        for event in parser.push(&chunk) {
            match event.event.as_str() {
                "status" => {
                    let data = serde_json::from_str(&event.data).unwrap_or_default();
                    let doc: JobView = context.gateway.read(data, "a status event")?;
                    if context.json {
                        output::line(&event.data);
                    } else {
                        output::line(view::change(&doc));
                    }
                    seen.last_id = event.id;
                    seen.last_status = Some(doc.status);
                    if doc.status.is_final() {
                        return Ok(End::Done(final_code(Some(doc.status))));
                    }
                }
                "removed" => {
                    if context.json {
                        output::line(json!({"job_id": id, "removed": true, "message": event.data}));
                    } else {
                        output::line(format!("{id}  removed: {}", event.data));
                    }
                    return Ok(End::Done(ExitCode::from(NOT_DELIVERED)));
                }
                _ => {}
            }
        }
    }
}

fn final_code(status: Option<Status>) -> ExitCode {
    match status {
        Some(Status::Delivered) => ExitCode::SUCCESS,
        _ => ExitCode::from(NOT_DELIVERED),
    }
}

/// The gateway is away, restarting or busy: worth connecting again.
fn reconnectable(err: &ClientError) -> bool {
    matches!(err, ClientError::Unreachable { .. }) || err.is_transient()
}

/// Every change among the jobs the listing shows, polled, until Ctrl-C. The first poll prints
/// each job's current state, oldest change first.
async fn poll(context: &Context, args: &WatchArgs) -> Result<ExitCode, CliError> {
    let mut known: HashMap<String, JobSummary> = HashMap::new();
    let mut failures = 0;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let mut wait = args.interval;
        match context
            .gateway
            .list(
                args.status.as_deref(),
                args.kind.as_deref(),
                Some(args.limit),
            )
            .await
        {
            Ok(answer) => {
                failures = 0;
                let listing: JobList = context.gateway.read(answer.body, "a job listing")?;
                // Only the jobs listed now are remembered: one that drops out of the listing
                // comes back only by changing, which is news anyway.
                let mut listed = HashMap::with_capacity(listing.jobs.len());
                for job in listing.jobs.into_iter().rev() {
                    if known.get(&job.job_id) != Some(&job) {
                        print_summary(context, &job);
                    }
                    listed.insert(job.job_id.clone(), job);
                }
                known = listed;
            }
            Err(err) if reconnectable(&err) && failures < backoff::MAX_TRIES => {
                failures += 1;
                wait = wait.max(backoff::jittered(failures, err.retry_after()));
            }
            Err(err) => return Err(err.into()),
        }
        tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn print_summary(context: &Context, job: &JobSummary) {
    if context.json {
        output::line(json!({
            "job_id": job.job_id,
            "status": job.status,
            "kind": job.kind,
            "updated_at": job.updated_at,
            "generation_attempts": job.generation_attempts,
            "delivery_attempts": job.delivery_attempts,
        }));
    } else {
        output::line(format!(
            "{}  {}  {:<13}  {}, {}, {}",
            output::time_text(&job.updated_at),
            job.job_id,
            job.status,
            job.kind,
            output::count(job.generation_attempts, "generation", "generations"),
            output::count(
                job.delivery_attempts,
                "delivery attempt",
                "delivery attempts"
            ),
        ));
    }
}
