//! `jetcall cost --since 24h`: what jobs cost, by API key and kind.
//!
//! Summed from the `jobs.completed.*` and `jobs.failed.*` events in the JOBS stream, which
//! carry each job's tenant, `usage` and `cost` (a failed job's only when it was charged for
//! answers it could not use): one pass from the first event published at `--since` to the
//! stream's end as the pass began. A job counts once even if its event was published twice
//! (a republish after a crash). What the stream no longer holds (`nats.max_age`) cannot be
//! counted, and the report says so.
//!
//! A call that answered after its job was cancelled was paid for, but no event says so: the
//! charge is written on the cancelled job's status document. So the `jobs.cancelled.*`
//! events of the window are read too, and each of those jobs' documents looked up for one.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::ExitCode;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;

use jetcall::JobId;
use jetcall::cost::{Cost, Currency, Usage};
use jetcall::events::{JobFinished, Outcome};
use jetcall::scan::Scan;
use jetcall::status::JobStatus;
use jetcall::store::StatusStore;
use jetcall::subjects::{Event, STATUS_BUCKET, STREAM};

use crate::topology::{self, TopologyError};
use crate::{CliError, output};

/// What one API key's jobs of one kind used and cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Jobs charged for: every completed one, and each failed or cancelled one that was.
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
    /// Cancelled jobs, by id, with their (key name, kind): each may have been charged for a
    /// call that answered after the cancellation.
    cancelled: BTreeMap<String, (String, String)>,
    unreadable: u64,
}

impl Ledger {
    fn record(&mut self, payload: &[u8]) {
        let Ok(event) = serde_json::from_slice::<JobFinished>(payload) else {
            self.unreadable += 1;
            return;
        };
        let key = (
            event.tenant.unwrap_or_default(),
            event.kind.as_str().to_owned(),
        );
        let (usage, cost) = match event.outcome {
            Outcome::Completed { usage, cost, .. } => (usage, cost),
            Outcome::Failed {
                usage: Some(usage),
                cost,
                ..
            } => (usage, cost),
            // What a cancelled job's call was charged is on its document: looked up later.
            Outcome::Cancelled { .. } => {
                self.cancelled.insert(event.job_id.to_string(), key);
                return;
            }
            Outcome::Failed { usage: None, .. } | Outcome::Expired { .. } => return,
        };
        self.charge(event.job_id.as_str(), key, usage, cost);
    }

    /// Counts a job's charge, once whatever the number of events or looks that found it.
    fn charge(&mut self, job_id: &str, key: (String, String), usage: Usage, cost: Option<Cost>) {
        if self.seen.insert(job_id.to_owned()) {
            self.rows.entry(key).or_default().add(usage, cost);
        }
    }

    /// Adds what each cancelled job's document says its call was charged, if anything.
    async fn charge_cancelled(&mut self, status: &StatusStore) -> Result<(), CliError> {
        for (job_id, key) in std::mem::take(&mut self.cancelled) {
            let Ok(id) = JobId::parse(&job_id) else {
                continue;
            };
            let doc = status.get(&id).await.map_err(|err| TopologyError::Read {
                what: "status document",
                name: job_id.clone(),
                message: err.to_string(),
            })?;
            if let Some((
                JobStatus {
                    usage: Some(usage),
                    cost,
                    ..
                },
                _,
            )) = doc
            {
                self.charge(&job_id, key, usage, cost);
            }
        }
        Ok(())
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
    for event in [Event::Completed, Event::Failed, Event::Cancelled] {
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
    if !ledger.cancelled.is_empty() {
        let bucket = js
            .get_key_value(STATUS_BUCKET)
            .await
            .map_err(|err| TopologyError::Read {
                what: "bucket",
                name: STATUS_BUCKET.to_owned(),
                message: err.to_string(),
            })?;
        ledger.charge_cancelled(&StatusStore::new(bucket)).await?;
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
