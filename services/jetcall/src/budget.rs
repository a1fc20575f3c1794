//! Spending limits per API key (`budget = { per_day_usd, per_month_usd }`), held across every
//! gateway and generator instance in JetStream counters (nats-server 2.12+): one subject per
//! tenant and period in the `BUDGETS` stream, added to atomically with `Nats-Incr`, so no
//! compare-and-set loop contends on a busy tenant's total.
//!
//! A submission reserves the most its job can cost ([`estimate`]) in each limited period's
//! counter and is refused if a counter then stands over its limit, taking its reservation
//! back: whatever the number of gateways, the reservations admitted never pass a limit
//! together. Whoever records the job's outcome settles the reservation (the generator for a
//! completed, failed or expired job, the gateway for a cancelled one), adding what the job
//! cost less what was reserved, once, under a `Nats-Msg-Id` of its own. An instance that dies
//! between the outcome and the settlement leaves the reservation standing: the total then
//! overstates the spend until the period ends, and never understates it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime, Time};

use crate::config::Config;
use crate::cost::{PriceTable, Usage};
use crate::kinds::KindSpec;
use crate::status::JobStatus;

pub const STREAM: &str = "BUDGETS";

/// When a job's reservation is settled, each once (`Budgets::settle_job`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occasion {
    /// Its outcome is recorded (by the generator, or the gateway for a cancellation): the
    /// reservation becomes what the job cost.
    Outcome,
    /// A call answered after its job was cancelled, which gave the reservation back: what
    /// the call cost is added.
    ChargedAfterCancel,
}

impl Occasion {
    fn msg_id_token(self) -> &'static str {
        match self {
            Occasion::Outcome => "budget",
            Occasion::ChargedAfterCancel => "budget-late",
        }
    }
}
const SUBJECTS: &str = "budgets.>";

/// A key's limits, in micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub per_day: Option<u64>,
    pub per_month: Option<u64>,
}

/// The two periods a budget is counted over, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    fn limit(self, limits: &Limits) -> Option<u64> {
        match self {
            Period::Day => limits.per_day,
            Period::Month => limits.per_month,
        }
    }

    /// The period holding `at`: `2026-12-06` or `2026-12`.
    pub fn key(self, at: OffsetDateTime) -> String {
        match self {
            Period::Day => format!(
                "{:04}-{:02}-{:02}",
                at.year(),
                u8::from(at.month()),
                at.day()
            ),
            Period::Month => format!("{:04}-{:02}", at.year(), u8::from(at.month())),
        }
    }

    /// When the period holding `at` ends and a new budget starts.
    pub fn resets_at(self, at: OffsetDateTime) -> OffsetDateTime {
        let at = at.to_offset(time::UtcOffset::UTC);
        let next = match self {
            Period::Day => at.date().next_day(),
            Period::Month => {
                let (year, month) = match at.month() {
                    Month::December => (at.year() + 1, Month::January),
                    month => (at.year(), month.next()),
                };
                Date::from_calendar_date(year, month, 1).ok()
            }
        };
        next.unwrap_or(Date::MAX)
            .with_time(Time::MIDNIGHT)
            .assume_utc()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// What a job holds of its tenant's budget until its outcome settles it: the estimate, in
/// each limited period's counter (named by its key, so a job settled after midnight settles
/// the day it was reserved in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub microdollars: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<String>,
}

impl Reservation {
    fn counters(&self) -> impl Iterator<Item = (Period, &str)> {
        [(Period::Day, &self.day), (Period::Month, &self.month)]
            .into_iter()
            .filter_map(|(period, key)| Some((period, key.as_deref()?)))
    }
}

/// A limit the job would have passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub period: Period,
    pub limit: u64,
    pub resets_at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("budget counter {subject}: {message}")]
    Counter { subject: String, message: String },
}

/// The counter of `tenant`'s spend in period `key`: `budgets.<tenant as hex>.<day|month>.<key>`.
/// A tenant is a key's free-text name; in hex it is always one subject token.
pub fn subject(tenant: &str, period: Period, key: &str) -> String {
    format!(
        "budgets.{}.{}.{key}",
        crate::lanes::tenant_token(tenant),
        period.as_str()
    )
}

/// The most a job of `spec` whose prompt is `prompt_bytes` long can cost, by `prices`: two
/// calls (an unusable answer is asked for once more), each of the whole prompt as tokens (a
/// token is at least a byte) at the dearer of the input and cache-write prices, and
/// `max_tokens` of output. `None` for a model with no price, which no budget can hold.
pub fn estimate(
    prices: &PriceTable,
    model: &str,
    spec: &KindSpec,
    prompt_bytes: usize,
) -> Option<u64> {
    let price = prices.price_of(model)?;
    let prompt = u64::try_from(prompt_bytes).unwrap_or(u64::MAX);
    let sync = crate::cost::Path::Sync;
    let input = price
        .cost(
            &Usage {
                input_tokens: prompt,
                ..Usage::default()
            },
            sync,
        )
        .microdollars
        .max(
            price
                .cost(
                    &Usage {
                        cache_creation_input_tokens: prompt,
                        ..Usage::default()
                    },
                    sync,
                )
                .microdollars,
        );
    let output = price
        .cost(
            &Usage {
                output_tokens: u64::from(spec.max_tokens),
                ..Usage::default()
            },
            sync,
        )
        .microdollars;
    Some(input.saturating_add(output).saturating_mul(2))
}

/// The model a job of `spec` is sent to: its kind's, or the configured provider's.
pub fn model_of<'a>(config: &'a Config, spec: &'a KindSpec) -> Option<&'a str> {
    use crate::config::ProviderChoice;
    spec.model.as_deref().or(match config.generator.provider {
        ProviderChoice::Auto | ProviderChoice::Anthropic => Some(config.anthropic.model.as_str()),
        ProviderChoice::OpenAi => Some(config.openai.model.as_str()),
        ProviderChoice::Offline => None,
    })
}

pub fn stream_config(config: &Config) -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        description: Some("Jetcall spend per API key and day or month, as counters".into()),
        subjects: vec![SUBJECTS.into()],
        allow_message_counter: true,
        // The total is the latest message of a subject; older ones are history.
        max_messages_per_subject: 1,
        // A month and a few days: a period's counter outlives the period.
        max_age: Duration::from_secs(35 * 24 * 3600),
        // What keeps a settlement sent twice (a retried publish) from counting twice.
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        num_replicas: config.nats.replicas,
        ..Default::default()
    }
}

/// The tenants' counters, through JetStream.
#[derive(Debug, Clone)]
pub struct Budgets {
    jetstream: jetstream::Context,
}

impl Budgets {
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self { jetstream }
    }

    /// Reserves `estimate` in each of `limits`' periods, or, if a counter then stands over its
    /// limit, takes back what it added and says which limit.
    pub async fn reserve(
        &self,
        tenant: &str,
        limits: &Limits,
        estimate: u64,
        now: OffsetDateTime,
    ) -> Result<Result<Reservation, Exceeded>, BudgetError> {
        let mut reservation = Reservation {
            microdollars: estimate,
            day: None,
            month: None,
        };
        for period in [Period::Day, Period::Month] {
            let Some(limit) = period.limit(limits) else {
                continue;
            };
            let key = period.key(now);
            let total = self
                .add(&subject(tenant, period, &key), i128::from(estimate), None)
                .await;
            let over = match total {
                Ok(total) => total > i128::from(limit),
                Err(err) => {
                    self.release(tenant, &reservation).await;
                    return Err(err);
                }
            };
            match period {
                Period::Day => reservation.day = Some(key),
                Period::Month => reservation.month = Some(key),
            }
            if over {
                self.release(tenant, &reservation).await;
                return Ok(Err(Exceeded {
                    period,
                    limit,
                    resets_at: period.resets_at(now),
                }));
            }
        }
        Ok(Ok(reservation))
    }

    /// Takes a reservation back whole, for a job that was not accepted after all. A counter
    /// that cannot be reached keeps it: the total then overstates the spend, never the other
    /// way.
    pub async fn release(&self, tenant: &str, reservation: &Reservation) {
        for (period, key) in reservation.counters() {
            let subject = subject(tenant, period, key);
            let taken_back = -i128::from(reservation.microdollars);
            if let Err(err) = self.add(&subject, taken_back, None).await {
                tracing::warn!(error = %err, "a budget reservation could not be taken back");
            }
        }
    }

    /// Settles the reservation `doc` holds, if any, against its `cost` on `occasion`, once:
    /// JetStream drops a repeat within its duplicate window. A settlement that cannot be
    /// written is logged and leaves the reservation standing, which overstates the tenant's
    /// spend and never understates it.
    pub async fn settle_job(&self, doc: &JobStatus, occasion: Occasion) {
        let (Some(reservation), Some(tenant)) = (&doc.budget, &doc.tenant) else {
            return;
        };
        let spent = i128::from(doc.cost.map_or(0, |cost| cost.microdollars));
        let still_reserved = match occasion {
            Occasion::Outcome => i128::from(reservation.microdollars),
            Occasion::ChargedAfterCancel => 0,
        };
        for (period, key) in reservation.counters() {
            let msg_id = format!(
                "{}.{}.{}",
                doc.job_id,
                occasion.msg_id_token(),
                period.as_str()
            );
            let subject = subject(tenant, period, key);
            if let Err(err) = self
                .add(&subject, spent - still_reserved, Some(&msg_id))
                .await
            {
                tracing::warn!(error = %err, "a job's budget reservation was not settled");
            }
        }
    }

    /// What `tenant` has spent and holds reserved in period `key`, in micro-dollars, read
    /// from the counter's last value without adding to it: 0 before the period's first job.
    pub async fn total(
        &self,
        tenant: &str,
        period: Period,
        key: &str,
    ) -> Result<i128, BudgetError> {
        let subject = subject(tenant, period, key);
        let failed = counter_failed(&subject);
        let stream = self
            .jetstream
            .get_stream_no_info(STREAM)
            .await
            .map_err(|err| failed(err.to_string()))?;
        let message = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(0);
            }
            Err(err) => return Err(failed(err.to_string())),
        };
        #[derive(Deserialize)]
        struct Counter {
            val: String,
        }
        let counter: Counter = serde_json::from_slice(&message.payload)
            .map_err(|err| failed(format!("not a counter's value: {err}")))?;
        parse_total(&counter.val).map_err(failed)
    }

    /// Adds `delta` to the counter at `subject` and answers its new total.
    async fn add(
        &self,
        subject: &str,
        delta: i128,
        msg_id: Option<&str>,
    ) -> Result<i128, BudgetError> {
        let failed = counter_failed(subject);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Incr", format!("{delta:+}").as_str());
        if let Some(msg_id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        }
        let ack = self
            .jetstream
            .publish_with_headers(subject.to_owned(), headers, bytes::Bytes::new())
            .await
            .map_err(|err| failed(err.to_string()))?
            .await
            .map_err(|err| failed(err.to_string()))?;
        let total = ack
            .value
            .as_deref()
            .ok_or_else(|| failed("the ack carries no total: is the stream a counter?".into()))?;
        parse_total(total).map_err(failed)
    }
}

/// The error of the counter at `subject`, from what went wrong.
fn counter_failed(subject: &str) -> impl Fn(String) -> BudgetError + '_ {
    move |message| BudgetError::Counter {
        subject: subject.to_owned(),
        message,
    }
}

/// A counter's total as JetStream writes it, in an ack or a stored value: a decimal string.
fn parse_total(text: &str) -> Result<i128, String> {
    text.parse()
        .map_err(|err| format!("the total is not a number: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn periods_are_named_and_reset_in_utc() {
        let at = datetime!(2026-12-31 23:59:59 UTC);
        assert_eq!(Period::Day.key(at), "2026-12-31");
        assert_eq!(Period::Month.key(at), "2026-12");
        assert_eq!(Period::Day.resets_at(at), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(Period::Month.resets_at(at), datetime!(2027-01-01 00:00 UTC));
        let february = datetime!(2028-02-29 12:00 UTC);
        assert_eq!(
            Period::Day.resets_at(february),
            datetime!(2028-03-01 00:00 UTC)
        );
        assert_eq!(
            Period::Month.resets_at(february),
            datetime!(2028-03-01 00:00 UTC)
        );
    }

    #[test]
    fn any_tenant_name_is_one_subject_token() {
        assert_eq!(
            subject("a.b *>", Period::Day, "2026-12-06"),
            "budgets.612e62202a3e.day.2026-12-06"
        );
    }

    #[test]
    fn an_estimate_is_the_most_two_calls_can_cost() {
        let prices: PriceTable =
            serde_json::from_value(serde_json::json!({"m": {"input": 3.0, "output": 15.0}}))
                .expect("a price table");
        let spec = crate::kinds::builtin_kinds()
            .remove("product-description")
            .expect("a built-in kind");
        // 1,000 prompt bytes at the cache-write price (1.25 × $3 per million tokens) and
        // max_tokens of output at $15 per million, twice.
        let expected = 2 * (1_000 * 375 / 100 + u64::from(spec.max_tokens) * 15);
        assert_eq!(estimate(&prices, "m", &spec, 1_000), Some(expected));
        assert_eq!(estimate(&prices, "unpriced", &spec, 1_000), None);
    }
}
