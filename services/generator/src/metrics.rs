//! The generator's Prometheus metrics, one registry per instance so tests can read their own.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use async_nats::jetstream::consumer::PullConsumer;

use jetcall::cost::{Cost, Path, Usage};
use jetcall::metrics::{ConsumerLag, InFlight};

use crate::provider::{Generation, LlmError};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: &'static str,
    /// `ok`, or the error type (`overloaded_error`, `timeout`, ...).
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: String,
    /// `input`, `output`, `cache_write` or `cache_read`.
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    kind: String,
    /// The API key's name: the tenant whose bill it is; empty without keys.
    key: String,
    /// `sync` or `batch`.
    path: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    /// The API key's name; `anonymous` without keys.
    tenant: String,
    /// `interactive` or `bulk`.
    priority: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    /// The API key's name.
    tenant: String,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<ProviderLabels, Histogram>,
    in_flight: Gauge,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<CostLabels, Counter>,
    jobs: Family<JobLabels, Counter>,
    paused: Gauge,
    waiting: Family<LaneLabels, Gauge>,
    cap_waiting: Family<TenantLabels, Gauge>,
    cap_held: Family<TenantLabels, Gauge>,
    cap_wait_seconds: Family<TenantLabels, Histogram>,
    batches: Counter,
    batched_jobs: Counter,
    lag: ConsumerLag,
    settle_failures: Counter,
}

#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    /// The registry, with the lag of `consumer` (the `generator` consumer) in it.
    pub fn new(consumer: PullConsumer) -> Self {
        let mut registry = Registry::with_prefix("jetcall_generator");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "llm_calls",
            "LLM calls by provider and outcome",
            calls.clone(),
        );
        let call_seconds = Family::<ProviderLabels, Histogram>::new_with_constructor(
            // 10 ms to about 80 s.
            || Histogram::new(exponential_buckets(0.01, 2.0, 14)),
        );
        registry.register(
            "llm_call_duration_seconds",
            "How long LLM calls take, rate-limit waits excluded",
            call_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("llm_in_flight", "LLM calls in progress", in_flight.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens used, by kind and direction (input, output, cache_write, cache_read)",
            tokens.clone(),
        );
        let cost = Family::<CostLabels, Counter>::default();
        registry.register(
            "cost_microdollars",
            "What jobs cost at the configured prices (completed ones, and failed ones charged for answers), in micro-dollars, by kind, API key and path",
            cost.clone(),
        );
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register(
            "jobs",
            "Jobs generated, or expired before they were started, by kind and final status",
            jobs.clone(),
        );
        let paused = Gauge::default();
        registry.register(
            "paused",
            "1 while consumption is paused by a provider configuration fault",
            paused.clone(),
        );
        let waiting = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "jobs_waiting",
            "Requests waiting for a generator, by tenant and priority, as JetStream counts them (every instance reports the same), at the last listing of the lanes",
            waiting.clone(),
        );
        let cap_waiting = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "cap_waiting",
            "Calls of this instance waiting for a place under their key's max_concurrency, by tenant",
            cap_waiting.clone(),
        );
        let cap_held = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "cap_held",
            "Places under their key's max_concurrency this instance holds, by tenant",
            cap_held.clone(),
        );
        let cap_wait_seconds = Family::<TenantLabels, Histogram>::new_with_constructor(
            // 1 ms to about 65 s.
            || Histogram::new(exponential_buckets(0.001, 2.0, 17)),
        );
        registry.register(
            "cap_wait_duration_seconds",
            "How long a capped key's calls waited for a place under its max_concurrency, by tenant",
            cap_wait_seconds.clone(),
        );
        let batches = Counter::default();
        registry.register(
            "batches_created",
            "Message Batches this instance created",
            batches.clone(),
        );
        let batched_jobs = Counter::default();
        registry.register(
            "batched_jobs",
            "Jobs this instance sent in Message Batches",
            batched_jobs.clone(),
        );
        let lag = ConsumerLag::register(&mut registry, consumer);
        let settle_failures = jetcall::metrics::settle_failures(&mut registry);
        Self(Arc::new(Inner {
            registry,
            calls,
            call_seconds,
            in_flight,
            tokens,
            cost,
            jobs,
            paused,
            waiting,
            cap_waiting,
            cap_held,
            cap_wait_seconds,
            batches,
            batched_jobs,
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

    /// Counts a call in flight until the guard is dropped.
    pub fn call_started(&self) -> InFlight {
        InFlight::enter(&self.0.in_flight)
    }

    pub fn call_finished(
        &self,
        provider: &'static str,
        result: &Result<Generation, LlmError>,
        took: Duration,
    ) {
        let outcome = match result {
            Ok(_) => "ok".to_owned(),
            Err(err) => err.error_type.clone(),
        };
        self.0
            .calls
            .get_or_create(&CallLabels { provider, outcome })
            .inc();
        self.0
            .call_seconds
            .get_or_create(&ProviderLabels { provider })
            .observe(took.as_secs_f64());
    }

    pub fn tokens_used(&self, kind: &str, usage: Usage) {
        for (direction, count) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
            ("cache_read", usage.cache_read_input_tokens),
        ] {
            self.0
                .tokens
                .get_or_create(&TokenLabels {
                    kind: kind.to_owned(),
                    direction,
                })
                .inc_by(count);
        }
    }

    pub fn cost(&self, kind: &str, tenant: Option<&str>, path: Path, cost: Cost) {
        self.0
            .cost
            .get_or_create(&CostLabels {
                kind: kind.to_owned(),
                key: tenant.unwrap_or_default().to_owned(),
                path: path.as_str(),
            })
            .inc_by(cost.microdollars);
    }

    pub fn job_finished(&self, kind: &str, status: &'static str) {
        self.0
            .jobs
            .get_or_create(&JobLabels {
                kind: kind.to_owned(),
                status,
            })
            .inc();
    }

    pub fn set_waiting(&self, lane: &jetcall::lanes::Lane, waiting: u64) {
        self.0
            .waiting
            .get_or_create(&LaneLabels {
                tenant: lane.tenant_label().to_owned(),
                priority: lane.priority.as_str(),
            })
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Counts a call of capped `tenant` waiting for a place until the guard is dropped.
    pub fn cap_waiting(&self, tenant: &str) -> InFlight {
        InFlight::enter(&self.0.cap_waiting.get_or_create(&tenant_labels(tenant)))
    }

    /// Records that a call of capped `tenant` got its place after `waited`, and counts the
    /// place as held until the guard is dropped.
    pub fn cap_taken(&self, tenant: &str, waited: Duration) -> InFlight {
        let labels = tenant_labels(tenant);
        self.0
            .cap_wait_seconds
            .get_or_create(&labels)
            .observe(waited.as_secs_f64());
        InFlight::enter(&self.0.cap_held.get_or_create(&labels))
    }

    pub fn batch_created(&self, jobs: usize) {
        self.0.batches.inc();
        self.0.batched_jobs.inc_by(jobs as u64);
    }

    pub fn set_paused(&self, paused: bool) {
        self.0.paused.set(i64::from(paused));
    }
}

fn tenant_labels(tenant: &str) -> TenantLabels {
    TenantLabels {
        tenant: tenant.to_owned(),
    }
}

impl jetcall::admin::Exposition for Metrics {
    fn render(&self) -> String {
        jetcall::metrics::render(&self.0.registry)
    }
}
