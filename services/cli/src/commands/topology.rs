//! `jetcall topology [--check]`: straight to NATS with the services' configuration. Without
//! `--check` it provisions (creating what is missing, updating what differs) and reports
//! what it did; with it, it only reports.

use std::path::Path;
use std::process::ExitCode;

use serde_json::{Value, json};

use super::exit;
use crate::topology::{self, Part, State};
use crate::{CliError, output};

pub async fn run(config: Option<&Path>, check: bool, json: bool) -> Result<ExitCode, CliError> {
    let config = topology::load_config(config)?;
    let client = topology::connect(&config).await?;
    let js = topology::context(client.clone(), &config);
    let before = topology::inspect(&js, &config).await?;
    let after = if check {
        before.clone()
    } else {
        topology::provision(client.clone(), &config).await?;
        topology::inspect(&js, &config).await?
    };
    let _ = client.flush().await;

    let report: Vec<(&Part, &'static str, Vec<String>)> = before
        .iter()
        .zip(&after)
        .map(|(before, after)| {
            let (word, details) = outcome(&before.state, &after.state, check);
            (after, word, details)
        })
        .collect();
    if json {
        let parts: Vec<Value> = report
            .iter()
            .map(|(part, word, details)| {
                json!({"what": part.what, "name": part.name, "state": word, "details": details})
            })
            .collect();
        output::line(Value::Array(parts));
    } else {
        let rows: Vec<Vec<String>> = report
            .iter()
            .map(|(part, word, details)| {
                let details = if details.is_empty() {
                    String::new()
                } else {
                    format!(": {}", details.join("; "))
                };
                vec![
                    part.what.to_owned(),
                    part.name.to_owned(),
                    format!("{word}{details}"),
                ]
            })
            .collect();
        output::line(output::table(&["WHAT", "NAME", "STATE"], &rows));
    }
    let as_configured = after.iter().all(|part| part.state == State::AsConfigured);
    if !as_configured {
        output::note(if check {
            "the topology is not as configured: `jetcall topology` creates or updates it"
        } else {
            "the topology is still not as configured after provisioning"
        });
    }
    Ok(exit(as_configured))
}

/// One word for a part, and the differences behind it.
fn outcome(before: &State, after: &State, check: bool) -> (&'static str, Vec<String>) {
    match (before, after) {
        (_, State::Differs(details)) => ("differs", details.clone()),
        (_, State::Missing) => ("missing", Vec::new()),
        (State::Missing, State::AsConfigured) if !check => ("created", Vec::new()),
        (State::Differs(details), State::AsConfigured) if !check => ("updated", details.clone()),
        _ => ("as configured", Vec::new()),
    }
}
