//! The pipeline's recent flow, for the console's overview: how many events of each step the
//! `JOBS` stream stored in each 5-second bucket of the last 15 minutes, and how long jobs took
//! from their request to their delivery.
//!
//! Read from the stream itself by an ordered, headers-only consumer (a message's subject, time
//! and `Nats-Msg-Id` are all it needs, never a job's input or result), so every gateway shows
//! the same figures, a restarted one finds the last 15 minutes again, and nothing is scraped
//! from another service. It runs only while someone looks: the first overview request starts
//! it, and it stops after `IDLE` without one, so a gateway nobody watches reads nothing more.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use jetcall::subjects::{Event, STREAM_SUBJECTS};

pub const WINDOW: Duration = Duration::from_secs(15 * 60);
pub const BUCKET: Duration = Duration::from_secs(5);
const BUCKETS: i64 = (WINDOW.as_secs() / BUCKET.as_secs()) as i64;
/// How long the feed reads on after the last overview request.
const IDLE: Duration = Duration::from_secs(120);
/// Requests whose delivery is awaited to time it; past this many (a backlog of hours), new
/// ones go untimed rather than the map growing without bound.
const MAX_AWAITED: usize = 200_000;

/// Latency bins: bin `i` holds latencies up to `GROWTH^i` ms, so a percentile is read to
/// within 10 %; 160 bins reach past an hour.
const GROWTH: f64 = 1.1;
const BINS: usize = 160;

/// Counts of each step, in `Event::ALL`'s order.
type Counts = [u32; STEPS];
const STEPS: usize = Event::ALL.len();

#[derive(Debug, Default)]
struct Slot {
    bucket: i64,
    counts: Counts,
    /// Only for buckets in which a job was delivered.
    latency: Option<Box<[u32; BINS]>>,
    /// The longest of those deliveries, exactly.
    max_latency_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct Flow {
    /// Contiguous buckets, oldest first, at most `BUCKETS` of them.
    slots: VecDeque<Slot>,
    /// When each request seen and not yet delivered was stored.
    awaited: HashMap<String, OffsetDateTime>,
    /// Whether the feed has read up to the stream's end once: until then the figures are
    /// still growing from history.
    caught_up: bool,
}

fn bucket_of(at: OffsetDateTime) -> i64 {
    at.unix_timestamp().div_euclid(BUCKET.as_secs() as i64)
}

fn bin_of(latency_ms: f64) -> usize {
    if latency_ms <= 1.0 {
        return 0;
    }
    ((latency_ms.ln() / GROWTH.ln()).ceil() as usize).min(BINS - 1)
}

fn bin_upper_ms(bin: usize) -> f64 {
    GROWTH.powi(bin as i32)
}

impl Flow {
    /// The slot of `bucket`, making room for it; `None` for a bucket already out of the window.
    fn slot(&mut self, bucket: i64) -> Option<&mut Slot> {
        let newest = self.slots.back().map(|slot| slot.bucket);
        match newest {
            Some(newest) if bucket <= newest => {}
            Some(newest) if bucket - newest < BUCKETS => {
                for next in newest + 1..=bucket {
                    self.slots.push_back(Slot {
                        bucket: next,
                        ..Slot::default()
                    });
                }
            }
            _ => {
                self.slots.clear();
                self.slots.push_back(Slot {
                    bucket,
                    ..Slot::default()
                });
            }
        }
        while self.slots.len() as i64 > BUCKETS {
            self.slots.pop_front();
        }
        let oldest = self.slots.front()?.bucket;
        let index = usize::try_from(bucket - oldest).ok()?;
        self.slots.get_mut(index)
    }

    fn record(&mut self, event: Event, job_id: &str, at: OffsetDateTime) {
        let latency_ms = match event {
            Event::Requested => {
                if self.awaited.len() < MAX_AWAITED {
                    self.awaited.insert(job_id.to_owned(), at);
                }
                None
            }
            Event::Delivered => self
                .awaited
                .remove(job_id)
                .map(|requested| (at - requested).as_seconds_f64().max(0.0) * 1000.0),
            // Ended without a webhook of a result: not a delivery to time.
            Event::Undeliverable | Event::Cancelled | Event::Expired => {
                self.awaited.remove(job_id);
                None
            }
            Event::Completed | Event::Failed => None,
        };
        let Some(slot) = self.slot(bucket_of(at)) else {
            return;
        };
        slot.counts[event as usize] += 1;
        if let Some(latency_ms) = latency_ms {
            slot.latency.get_or_insert_with(|| Box::new([0; BINS]))[bin_of(latency_ms)] += 1;
            slot.max_latency_ms = Some(
                slot.max_latency_ms
                    .map_or(latency_ms, |max| max.max(latency_ms)),
            );
        }
    }

    /// Forgets what left the window: requests never delivered within it are not timed.
    fn prune(&mut self, now: OffsetDateTime) {
        let horizon = now - WINDOW;
        self.awaited.retain(|_, requested| *requested > horizon);
    }

    fn snapshot(&self, now: OffsetDateTime) -> FlowView {
        let newest = bucket_of(now);
        let oldest = newest - BUCKETS + 1;
        let bucket_seconds = BUCKET.as_secs() as i64;
        let into_newest = (now.unix_timestamp() - newest * bucket_seconds).max(1) as f64;
        let mut series: [Vec<f64>; STEPS] = Default::default();
        let mut totals: Counts = [0; STEPS];
        let mut bins = [0u64; BINS];
        let mut max: Option<f64> = None;
        for bucket in oldest..=newest {
            let slot = self.slots.front().and_then(|front| {
                usize::try_from(bucket - front.bucket)
                    .ok()
                    .and_then(|index| self.slots.get(index))
            });
            let seconds = if bucket == newest {
                into_newest
            } else {
                bucket_seconds as f64
            };
            for (event, values) in series.iter_mut().enumerate() {
                let count = slot.map_or(0, |slot| slot.counts[event]);
                totals[event] += count;
                values.push(f64::from(count) / seconds);
            }
            if let Some(latency) = slot.and_then(|slot| slot.latency.as_deref()) {
                for (bin, count) in latency.iter().enumerate() {
                    bins[bin] += u64::from(*count);
                }
            }
            if let Some(slot_max) = slot.and_then(|slot| slot.max_latency_ms) {
                max = Some(max.map_or(slot_max, |max| max.max(slot_max)));
            }
        }
        let [
            accepted,
            completed,
            failed,
            delivered,
            undeliverable,
            cancelled,
            expired,
        ] = series;
        FlowView {
            now,
            window_seconds: WINDOW.as_secs(),
            bucket_seconds: BUCKET.as_secs(),
            since: OffsetDateTime::from_unix_timestamp(oldest * bucket_seconds).unwrap_or(now),
            catching_up: !self.caught_up,
            series: Series {
                accepted,
                completed,
                failed,
                delivered,
                undeliverable,
                cancelled,
                expired,
            },
            totals: Totals {
                accepted: totals[Event::Requested as usize],
                completed: totals[Event::Completed as usize],
                failed: totals[Event::Failed as usize],
                delivered: totals[Event::Delivered as usize],
                undeliverable: totals[Event::Undeliverable as usize],
                cancelled: totals[Event::Cancelled as usize],
                expired: totals[Event::Expired as usize],
            },
            latency_ms: Latency::of(&bins, max),
        }
    }
}

/// Events per second of each step, one value per 5-second bucket, oldest first; the last
/// bucket is the one still filling, its rate over the seconds it has had.
#[derive(Debug, Serialize, ToSchema)]
pub struct Series {
    pub accepted: Vec<f64>,
    pub completed: Vec<f64>,
    pub failed: Vec<f64>,
    pub delivered: Vec<f64>,
    pub undeliverable: Vec<f64>,
    pub cancelled: Vec<f64>,
    pub expired: Vec<f64>,
}

/// How many events of each step the window holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct Totals {
    pub accepted: u32,
    pub completed: u32,
    pub failed: u32,
    pub delivered: u32,
    pub undeliverable: u32,
    pub cancelled: u32,
    pub expired: u32,
}

/// From a job's request to its first delivery, for the jobs delivered in the window whose
/// request the feed also read; percentiles are read to within 10 %, `max` exactly. Without
/// deliveries every figure but `count` is `null`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Latency {
    pub count: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Latency {
    fn of(bins: &[u64; BINS], max: Option<f64>) -> Self {
        let count: u64 = bins.iter().sum();
        let percentile = |fraction: f64| {
            let rank = ((count as f64) * fraction).ceil().max(1.0) as u64;
            let mut seen = 0;
            bins.iter().enumerate().find_map(|(bin, n)| {
                seen += n;
                (seen >= rank).then(|| {
                    let upper = bin_upper_ms(bin);
                    // Never above the largest seen: a bin's bound may be.
                    max.map_or(upper, |max| upper.min(max))
                })
            })
        };
        if count == 0 {
            return Self {
                count,
                p50: None,
                p90: None,
                p99: None,
                max: None,
            };
        }
        Self {
            count,
            p50: percentile(0.50),
            p90: percentile(0.90),
            p99: percentile(0.99),
            max,
        }
    }
}

/// The flow part of `GET /api/v1/overview`.
#[derive(Debug)]
pub struct FlowView {
    pub now: OffsetDateTime,
    pub window_seconds: u64,
    pub bucket_seconds: u64,
    pub since: OffsetDateTime,
    pub catching_up: bool,
    pub series: Series,
    pub totals: Totals,
    pub latency_ms: Latency,
}

#[derive(Debug)]
struct Running {
    flow: Arc<Mutex<Flow>>,
    last_asked: Arc<Mutex<Instant>>,
    task: JoinHandle<()>,
}

/// The feed of one gateway, started on demand.
#[derive(Debug, Default)]
pub struct Feed(Mutex<Option<Running>>);

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Feed {
    /// The last 15 minutes as far as the feed has read them, starting it if it is not running.
    pub fn snapshot(&self, stream: &Stream, shutdown: &CancellationToken) -> FlowView {
        let now = OffsetDateTime::now_utc();
        let mut running = lock(&self.0);
        let needs_start = running
            .as_ref()
            .is_none_or(|running| running.task.is_finished());
        if needs_start {
            let flow = Arc::new(Mutex::new(Flow::default()));
            let last_asked = Arc::new(Mutex::new(Instant::now()));
            let task = tokio::spawn(read(
                stream.clone(),
                flow.clone(),
                last_asked.clone(),
                shutdown.clone(),
            ));
            *running = Some(Running {
                flow,
                last_asked,
                task,
            });
        }
        let running = running.as_ref().expect("started above");
        *lock(&running.last_asked) = Instant::now();
        lock(&running.flow).snapshot(now)
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(running) = lock(&self.0).take() {
            running.task.abort();
        }
    }
}

/// Reads the stream from 15 minutes ago into `flow` until nobody has asked for `IDLE`.
async fn read(
    stream: Stream,
    flow: Arc<Mutex<Flow>>,
    last_asked: Arc<Mutex<Instant>>,
    shutdown: CancellationToken,
) {
    let start_time = OffsetDateTime::now_utc() - WINDOW;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: STREAM_SUBJECTS.to_owned(),
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            headers_only: true,
            ..OrderedConfig::default()
        })
        .await;
    let consumer = match consumer {
        Ok(consumer) => consumer,
        Err(err) => {
            tracing::warn!(error = %err, "overview feed: could not read the stream");
            return;
        }
    };
    // A window with nothing in it has nothing to catch up on: no message will say so. (As
    // the consumer was created, so no API call, which the gateway's NATS user may not make.)
    lock(&flow).caught_up = consumer.cached_info().num_pending == 0;
    let mut messages = match consumer.messages().await {
        Ok(messages) => messages.ready_chunks(512),
        Err(err) => {
            tracing::warn!(error = %err, "overview feed: could not read the stream");
            return;
        }
    };
    let mut tick = tokio::time::interval(BUCKET);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if lock(&last_asked).elapsed() > IDLE {
                    return;
                }
                lock(&flow).prune(OffsetDateTime::now_utc());
            }
            // What has arrived, under one lock: the feed reads every event of a busy pipeline.
            batch = messages.next() => {
                let Some(batch) = batch else { return };
                let mut flow = lock(&flow);
                for message in batch {
                    match message {
                        Ok(message) => record(&mut flow, &message),
                        Err(err) => tracing::debug!(error = %err, "overview feed: the stream read failed; it resumes"),
                    }
                }
            }
        }
    }
}

fn record(flow: &mut Flow, message: &async_nats::jetstream::Message) {
    let Ok(info) = message.info() else { return };
    let Some(event) = Event::of_subject(&message.subject) else {
        return;
    };
    let job_id = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
        .map_or("", |id| job_of_msg_id(id.as_str()));
    flow.record(event, job_id, info.published);
    if info.pending == 0 {
        flow.caught_up = true;
    }
}

/// The job of an event's `Nats-Msg-Id`: `<job>.<event>`, with more after it for a
/// redelivery (`.<round>`, `.redeliver.<round>`). A job id has no dot.
fn job_of_msg_id(msg_id: &str) -> &str {
    msg_id.split('.').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).expect("time")
    }

    #[test]
    fn counts_land_in_their_bucket_and_leave_the_window_after_fifteen_minutes() {
        let mut flow = Flow::default();
        flow.record(Event::Requested, "JOB-1", at(0));
        flow.record(Event::Requested, "JOB-2", at(1));
        flow.record(Event::Delivered, "JOB-1", at(3));
        let view = flow.snapshot(at(4));
        assert_eq!(view.totals.accepted, 2);
        assert_eq!(view.totals.delivered, 1);
        assert_eq!(view.series.accepted.len(), BUCKETS as usize);
        assert!(view.series.accepted.last().copied().unwrap_or_default() > 0.0);

        let later = flow.snapshot(at(15 * 60 + 10));
        assert_eq!(later.totals.accepted, 0);
        assert_eq!(later.totals.delivered, 0);
    }

    #[test]
    fn latency_is_from_request_to_first_delivery_within_a_tenth() {
        let mut flow = Flow::default();
        for n in 0..100 {
            let job = format!("JOB-{n}");
            flow.record(Event::Requested, &job, at(0));
            // 1 s for 99 of them, 4 s for the slowest.
            let delivered = if n == 99 { at(4) } else { at(1) };
            flow.record(Event::Delivered, &job, delivered);
        }
        // A redelivery's report is no second sample.
        flow.record(Event::Delivered, "JOB-1", at(5));
        let latency = flow.snapshot(at(6)).latency_ms;
        assert_eq!(latency.count, 100);
        let p50 = latency.p50.expect("p50");
        assert!((1000.0..=1100.0).contains(&p50), "{p50}");
        assert_eq!(latency.max, Some(4000.0));
        assert!(latency.p99.expect("p99") <= 1100.0);
    }

    #[test]
    fn the_max_is_of_the_deliveries_still_in_the_window() {
        let mut flow = Flow::default();
        flow.record(Event::Requested, "JOB-SLOW", at(0));
        flow.record(Event::Delivered, "JOB-SLOW", at(10));
        for n in 0..1100 {
            let job = format!("JOB-{n}");
            flow.record(Event::Requested, &job, at(600));
            flow.record(Event::Delivered, &job, at(601));
        }
        flow.prune(at(602));
        // The slow delivery has left the window; the thousand fast ones have not.
        flow.prune(at(15 * 60 + 20));
        let latency = flow.snapshot(at(15 * 60 + 20)).latency_ms;
        assert_eq!(latency.count, 1100);
        assert_eq!(latency.max, Some(1000.0));
        assert!(latency.p50.is_some_and(|p50| p50 <= 1000.0), "{latency:?}");
    }

    #[test]
    fn a_delivery_whose_request_came_before_the_feed_is_counted_but_not_timed() {
        let mut flow = Flow::default();
        flow.record(Event::Delivered, "JOB-OLD", at(0));
        let view = flow.snapshot(at(1));
        assert_eq!(view.totals.delivered, 1);
        assert_eq!(view.latency_ms.count, 0);
        assert_eq!(view.latency_ms.p50, None);
    }

    #[test]
    fn the_job_is_read_from_every_msg_id_shape() {
        for event in Event::ALL {
            assert_eq!(job_of_msg_id(&event.msg_id(&job("JOB-1"))), "JOB-1");
        }
        assert_eq!(job_of_msg_id("JOB-1.delivered.2"), "JOB-1");
        assert_eq!(job_of_msg_id("JOB-1.completed.redeliver.1"), "JOB-1");
    }

    fn job(id: &str) -> jetcall::JobId {
        jetcall::JobId::parse(id).expect("a job id")
    }
}
