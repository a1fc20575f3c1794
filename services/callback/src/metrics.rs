//! The callback service's Prometheus metrics, one registry per instance so tests can read
//! their own.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use jetcall::metrics::{ConsumerLag, InFlight};

use crate::hosts::Destinations;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    /// What the attempt led to: `delivered`, `retry` or `undeliverable`.
    outcome: &'static str,
    /// The attempt log's `error_kind` (`http_status`, `timeout`, `connect`, `request`,
    /// `refused`, `circuit_open`), `none` for a delivery.
    error_kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    /// `delivered` or `undeliverable`.
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParkedLabels {
    /// `busy` (every slot at the destination taken) or `circuit_open`.
    reason: &'static str,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    attempts: Family<AttemptLabels, Counter>,
    attempt_seconds: Histogram,
    latency_seconds: Histogram,
    in_flight: Gauge,
    open_circuits: Gauge,
    jobs: Family<JobLabels, Counter>,
    parked: Family<ParkedLabels, Counter>,
    destinations: Arc<Destinations>,
    lag: ConsumerLag,
    settle_failures: Counter,
}

#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    /// The registry, with the lag of `consumer` (the `callback` consumer) in it, and the open
    /// circuits of `destinations` counted at each scrape.
    pub fn new(consumer: PullConsumer, destinations: Arc<Destinations>) -> Self {
        let mut registry = Registry::with_prefix("jetcall_callback");
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "attempts",
            "Delivery attempts recorded, by what they led to and their error kind",
            attempts.clone(),
        );
        // 5 ms to about 40 s: one attempt, up to `callback.timeout`.
        let attempt_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "delivery_duration_seconds",
            "How long one webhook HTTP attempt takes, connect to the answer's first bytes",
            attempt_seconds.clone(),
        );
        // 10 ms to about 2 days: retries follow `callback.retry_schedule`.
        let latency_seconds = Histogram::new(exponential_buckets(0.01, 4.0, 14));
        registry.register(
            "delivery_latency_seconds",
            "From a job's completion (its event's finished_at) to its webhook's successful delivery",
            latency_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Webhook HTTP attempts in progress",
            in_flight.clone(),
        );
        let open_circuits = Gauge::default();
        registry.register(
            "open_circuits",
            "Destinations (host and port) whose circuit breaker is open",
            open_circuits.clone(),
        );
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register(
            "jobs",
            "Jobs whose delivery ended, by kind and final status",
            jobs.clone(),
        );
        let parked = Family::<ParkedLabels, Counter>::default();
        registry.register(
            "parked",
            "Deliveries handed back to JetStream without an attempt, by reason",
            parked.clone(),
        );
        let lag = ConsumerLag::register(&mut registry, consumer);
        let settle_failures = jetcall::metrics::settle_failures(&mut registry);
        Self(Arc::new(Inner {
            registry,
            attempts,
            attempt_seconds,
            latency_seconds,
            in_flight,
            open_circuits,
            jobs,
            parked,
            destinations,
            lag,
            settle_failures,
        }))
    }

    /// The consumer's lag gauges, refreshed by each scrape.
    pub fn lag(&self) -> ConsumerLag {
        self.0.lag.clone()
    }

    /// The count of messages `jetcall::consume` could not settle.
    pub fn settle_failures(&self) -> Counter {
        self.0.settle_failures.clone()
    }

    /// Counts an HTTP attempt in flight until the guard is dropped.
    pub fn attempt_started(&self) -> InFlight {
        InFlight::enter(&self.0.in_flight)
    }

    pub fn attempt_finished(&self, took: Duration) {
        self.0.attempt_seconds.observe(took.as_secs_f64());
    }

    /// An attempt in the job's log, and what it led to.
    pub fn attempt_recorded(&self, outcome: &'static str, error_kind: Option<&str>) {
        self.0
            .attempts
            .get_or_create(&AttemptLabels {
                outcome,
                error_kind: error_kind.unwrap_or("none").to_owned(),
            })
            .inc();
    }

    /// A job delivered: its latency from `finished_at`, the generator's time.
    pub fn delivered(&self, kind: &str, finished_at: OffsetDateTime) {
        let latency = (OffsetDateTime::now_utc() - finished_at).as_seconds_f64();
        self.0.latency_seconds.observe(latency.max(0.0));
        self.job_ended(kind, "delivered");
    }

    pub fn undeliverable(&self, kind: &str) {
        self.job_ended(kind, "undeliverable");
    }

    fn job_ended(&self, kind: &str, status: &'static str) {
        self.0
            .jobs
            .get_or_create(&JobLabels {
                kind: kind.to_owned(),
                status,
            })
            .inc();
    }

    pub fn parked(&self, reason: &'static str) {
        self.0.parked.get_or_create(&ParkedLabels { reason }).inc();
    }
}

impl jetcall::admin::Exposition for Metrics {
    fn render(&self) -> String {
        let open = self.0.destinations.open_circuits();
        self.0
            .open_circuits
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        jetcall::metrics::render(&self.0.registry)
    }
}
