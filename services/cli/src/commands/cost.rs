//! `jetcall cost --since 24h`: what jobs cost, by API key and kind.
//!
//! Summed from the `jobs.completed.*` and `jobs.failed.*` events in the JOBS stream, which
//! carry each job's tenant, `usage` and `cost` (a failed job's only when it was charged for
//! answers it could not use): one pass from the first event published at `--since` to the
//! stream's end as the pass began. A job counts once even if its event was published twice
//! (a republish after a crash). What the stream no longer holds (`nats.max_age`) cannot be
//! counted, and the report says so.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::ExitCode;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;

use jetcall::cost::{Cost, Currency, Usage};
use jetcall::events::{JobFinished, Outcome};
use jetcall::scan::Scan;
use jetcall::subjects::{Event, STREAM};

use crate::topology::{self, TopologyError};
use crate::{CliError, output};

/// What one API key's jobs of one kind used and cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Jobs charged for: every completed one, and each failed one that was.
    pub jobs: u64,
    pub usage: Usage,
    pub microdollars: u64,
    /// Jobs whose model had no price: their tokens are counted, their cost is not.
    pub unpriced_jobs: u64,
}

impl Totals {
    fn add(&mut self, usage: Usage, cost: Option<Cost>) {
        self.jobs += 1;
        self.usage = self.usage.plus(usage);
        match cost {
            Some(cost) => self.microdollars = self.microdollars.saturating_add(cost.microdollars),
            None => self.unpriced_jobs += 1,
        }
    }

    fn plus(mut self, other: &Totals) -> Totals {
        self.jobs += other.jobs;
        self.usage = self.usage.plus(other.usage);
        self.microdollars = self.microdollars.saturating_add(other.microdollars);
        self.unpriced_jobs += other.unpriced_jobs;
        self
    }
}

/// The sums of a pass, keyed by (API key name, or `""` without keys; kind).
#[derive(Debug, Default)]
struct Ledger {
    rows: BTreeMap<(String, String), Totals>,
    seen: HashSet<String>,
    unreadable: u64,
}

impl Ledger {
    fn record(&mut self, payload: &[u8]) {
        let Ok(event) = serde_json::from_slice::<JobFinished>(payload) else {
            self.unreadable += 1;
            return;
        };
        let (usage, cost) = match event.outcome {
            Outcome::Completed { usage, cost, .. } => (usage, cost),
            Outcome::Failed {
                usage: Some(usage),
                cost,
                ..
            } => (usage, cost),
            // Their events carry no usage: what a call cut short by a cancellation was
            // charged is on the job's document and in the generator's cost metric.
            Outcome::Failed { usage: None, .. }
            | Outcome::Cancelled { .. }
            | Outcome::Expired { .. } => return,
        };
        if !self.seen.insert(event.job_id.to_string()) {
            return;
        }
        let key = (
            event.tenant.unwrap_or_default(),
            event.kind.as_str().to_owned(),
        );
        self.rows.entry(key).or_default().add(usage, cost);
    }

    fn total(&self) -> Totals {
        self.rows
            .values()
            .fold(Totals::default(), |sum, row| sum.plus(row))
    }
}

pub async fn run(
    config: Option<&Path>,
    since: OffsetDateTime,
    json: bool,
) -> Result<ExitCode, CliError> {
    let config = topology::load_config(config)?;
    let client = topology::connect(&config).await?;
    let js = topology::context(client, &config);
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|err| TopologyError::Read {
            what: "stream",
            name: STREAM.to_owned(),
            message: err.to_string(),
        })?;
    let state = &stream.cached_info().state;
    // The stream has dropped events (by age or size) and its oldest is later than `since`.
    let aged_out = (state.first_sequence > 1 && state.first_timestamp > since)
        .then_some(state.first_timestamp);

    let mut ledger = Ledger::default();
    // A pass per subject: an ordered consumer given both filters and a start time delivered
    // only the last message (async-nats 0.51, nats-server 2.15), which would undercount.
    for event in [Event::Completed, Event::Failed] {
        let mut scan = Scan::open(
            &stream,
            OrderedConfig {
                filter_subject: event.filter(),
                deliver_policy: DeliverPolicy::ByStartTime { start_time: since },
                ..Default::default()
            },
        )
        .await?;
        while let Some(scanned) = scan.next().await? {
            ledger.record(&scanned.message.payload);
        }
    }

    let total = ledger.total();
    if json {
        let rows: Vec<_> = ledger
            .rows
            .iter()
            .map(|((key, kind), totals)| json!({"key": key, "kind": kind, "totals": totals}))
            .collect();
        output::line(json!({
            "since": output::time(since),
            "currency": Currency::Usd,
            "rows": rows,
            "total": total,
            "unreadable_events": ledger.unreadable,
            "events_kept_since": aged_out.map(output::time),
        }));
    } else {
        let mut rows: Vec<Vec<String>> = ledger
            .rows
            .iter()
            .map(|((key, kind), totals)| row(if key.is_empty() { "-" } else { key }, kind, totals))
            .collect();
        rows.push(row("TOTAL", "", &total));
        output::line(output::table(
            &[
                "KEY",
                "KIND",
                "JOBS",
                "INPUT",
                "OUTPUT",
                "CACHE W",
                "CACHE R",
                "COST (USD)",
            ],
            &rows,
        ));
        if total.unpriced_jobs > 0 {
            output::note(format!(
                "{} without a price for their model: add it under [prices] to count their cost",
                output::count(total.unpriced_jobs, "job", "jobs")
            ));
        }
        if ledger.unreadable > 0 {
            output::note(format!(
                "{} could not be read and are left out",
                output::count(ledger.unreadable, "event", "events")
            ));
        }
    }
    if let Some(first) = aged_out {
        output::note(format!(
            "the stream keeps events from {} on (nats.max_age): jobs completed before are not counted",
            output::time(first)
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn row(key: &str, kind: &str, totals: &Totals) -> Vec<String> {
    vec![
        key.to_owned(),
        kind.to_owned(),
        totals.jobs.to_string(),
        totals.usage.input_tokens.to_string(),
        totals.usage.output_tokens.to_string(),
        totals.usage.cache_creation_input_tokens.to_string(),
        totals.usage.cache_read_input_tokens.to_string(),
        dollars(totals.microdollars),
    ]
}

/// Micro-dollars as dollars to the micro-dollar: `12.345678`.
pub(super) fn dollars(microdollars: u64) -> String {
    format!(
        "{}.{:06}",
        microdollars / 1_000_000,
        microdollars % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_are_exact() {
        assert_eq!(dollars(0), "0.000000");
        assert_eq!(dollars(4_500), "0.004500");
        assert_eq!(dollars(12_345_678), "12.345678");
    }
}
