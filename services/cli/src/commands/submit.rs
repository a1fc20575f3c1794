//! `jetcall submit`: one job from flags (`POST /api/v1/jobs`), or a file's worth in batches
//! (`POST /api/v1/jobs/batch`) with a progress bar and a summary.

use std::path::Path;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};

use super::{Context, exit};
use crate::CliError;
use crate::args::SubmitArgs;
use crate::bulk::{self, Options, Summary};
use crate::output;
use crate::rows::{self, Defaults, Place};

/// Rejections listed in the text summary; `--json` lists them all.
const REJECTIONS_SHOWN: usize = 50;

pub async fn run(context: &Context, args: &SubmitArgs) -> Result<ExitCode, CliError> {
    let metadata = args
        .metadata
        .as_deref()
        .map(|text| json_object("--metadata", text))
        .transpose()?;
    match &args.file {
        Some(file) => submit_file(context, args, file, metadata).await,
        None => submit_one(context, args, metadata).await,
    }
}

async fn submit_one(
    context: &Context,
    args: &SubmitArgs,
    metadata: Option<Map<String, Value>>,
) -> Result<ExitCode, CliError> {
    let mut input = match &args.input {
        Some(text) => json_object("--input", text)?,
        None => Map::new(),
    };
    for field in &args.fields {
        let (name, value) = parse_field(field)?;
        input.insert(name, value);
    }
    let mut job = json!({
        "kind": args.kind,
        "input": input,
        "callback_url": args.callback_url,
    });
    if let Some(id) = &args.job_id {
        job["job_id"] = Value::String(id.clone());
    }
    if let Some(metadata) = metadata {
        job["metadata"] = Value::Object(metadata);
    }
    if let Some(ttl) = &args.ttl {
        job["ttl"] = Value::String(ttl.clone());
    }
    if let Some(priority) = &args.priority {
        job["priority"] = Value::String(priority.clone());
    }
    let answer = context.gateway.submit(&job).await?;
    if context.json {
        output::line(&answer.body);
        return Ok(ExitCode::SUCCESS);
    }
    let id = answer.body["job_id"].as_str().unwrap_or("?");
    let status = answer.body["status"].as_str().unwrap_or("?");
    if answer.status == StatusCode::OK {
        output::line(format!(
            "{id}: {status} (submitted before; nothing new was published)"
        ));
    } else {
        output::line(format!("{id}: {status}"));
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit_file(
    context: &Context,
    args: &SubmitArgs,
    file: &Path,
    metadata: Option<Map<String, Value>>,
) -> Result<ExitCode, CliError> {
    let defaults = Defaults {
        kind: args.kind.clone(),
        callback_url: args.callback_url.clone(),
        metadata,
        ttl: args.ttl.clone(),
        priority: args.priority.clone(),
    };
    let rows = rows::open(file, args.format, defaults)?;
    let total = rows.total;
    let bar = progress_bar(total, context.json);
    let options = Options {
        batch_size: usize::from(args.batch_size),
        in_flight: usize::from(args.in_flight),
    };
    let mut summary = bulk::submit_all(&context.gateway, rows, options, |n| bar.inc(n)).await;
    bar.finish_and_clear();
    summary.rejected.sort_by_key(|rejection| rejection.place);

    if context.json {
        output::line(json_summary(total, &summary));
    } else {
        text_summary(total, &summary);
    }
    if let Some(fatal) = &summary.fatal {
        output::note(format!("error: {fatal}"));
    }
    Ok(exit(summary.all_in()))
}

/// On stderr, and only for a person at a terminal: hidden when stderr is redirected, and
/// with `--json`.
fn progress_bar(total: u64, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {human_pos}/{human_len} jobs  {per_sec:0}  eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

fn text_summary(total: u64, summary: &Summary) {
    let mut counts = format!(
        "{total} rows: {} accepted, {} duplicate, {} rejected",
        summary.accepted,
        summary.duplicates,
        summary.rejected.len()
    );
    if summary.not_sent > 0 {
        counts.push_str(&format!(", {} not sent", summary.not_sent));
    }
    output::line(counts);
    for rejection in summary.rejected.iter().take(REJECTIONS_SHOWN) {
        let id = rejection
            .job_id
            .as_ref()
            .map(|id| format!(" ({id})"))
            .unwrap_or_default();
        let field = rejection
            .error
            .field
            .as_ref()
            .map(|field| format!(" [field {field}]"))
            .unwrap_or_default();
        output::line(format!(
            "  {}{id}: {}{field}",
            rejection.place, rejection.error
        ));
    }
    if summary.rejected.len() > REJECTIONS_SHOWN {
        output::line(format!(
            "  … and {} more (--json lists them all)",
            summary.rejected.len() - REJECTIONS_SHOWN
        ));
    }
    if summary.without_id > 0 {
        output::note(format!(
            "note: {} had no job_id, so the gateway made ids for them: submitting the file again \
             would make new jobs of them. Give every row a job_id to make a retry safe.",
            output::count(summary.without_id, "row", "rows")
        ));
    }
}

fn json_summary(total: u64, summary: &Summary) -> Value {
    let rejections: Vec<Value> = summary
        .rejected
        .iter()
        .map(|rejection| {
            let mut entry = match rejection.place {
                Place::Line(line) => json!({"line": line}),
                Place::Item(item) => json!({"item": item}),
            };
            entry["job_id"] = json!(rejection.job_id);
            entry["error"] = json!(rejection.error);
            entry
        })
        .collect();
    json!({
        "rows": total,
        "accepted": summary.accepted,
        "duplicates": summary.duplicates,
        "rejected": summary.rejected.len(),
        "not_sent": summary.not_sent,
        "rejections": rejections,
    })
}

fn json_object(flag: &str, text: &str) -> Result<Map<String, Value>, CliError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(CliError::Usage(format!("{flag} must be a JSON object"))),
        Err(err) => Err(CliError::Usage(format!("{flag} is not JSON: {err}"))),
    }
}

/// `name=text`, or `name:=<JSON>` for a value that is not text.
fn parse_field(field: &str) -> Result<(String, Value), CliError> {
    let usage = || {
        CliError::Usage(format!(
            "--field `{field}`: write name=text or name:=<JSON>"
        ))
    };
    let (name, value) = field.split_once('=').ok_or_else(usage)?;
    let (name, value) = match name.strip_suffix(':') {
        Some(name) => {
            let value = serde_json::from_str(value).map_err(|err| {
                CliError::Usage(format!("--field `{field}`: the value is not JSON: {err}"))
            })?;
            (name, value)
        }
        None => (name, Value::String(value.to_owned())),
    };
    if name.is_empty() {
        return Err(usage());
    }
    Ok((name.to_owned(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_text_unless_marked_as_json() {
        assert_eq!(
            parse_field("product_name=LG 1.5 Ton = cool").ok(),
            Some(("product_name".into(), json!("LG 1.5 Ton = cool")))
        );
        assert_eq!(
            parse_field("specs:={\"capacity\": \"1.5 Ton\"}").ok(),
            Some(("specs".into(), json!({"capacity": "1.5 Ton"})))
        );
        assert_eq!(
            parse_field("count:=3").ok(),
            Some(("count".into(), json!(3)))
        );
        assert!(parse_field("novalue").is_err());
        assert!(parse_field("=x").is_err());
        assert!(parse_field("n:=not json").is_err());
    }

    #[test]
    fn input_and_metadata_must_be_objects() {
        assert!(json_object("--input", "{\"a\": 1}").is_ok());
        assert!(json_object("--input", "[1]").is_err());
        assert!(json_object("--input", "{").is_err());
    }
}
