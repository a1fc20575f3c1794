//! The gateway's Prometheus metrics, one registry per instance so tests can read their own.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route as declared, e.g. `/api/v1/jobs/{job_id}`: a bounded set.
    route: String,
    method: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    /// `completed` or `failed`.
    outcome: &'static str,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    in_flight: Gauge,
    event_streams: Gauge,
    requests: Family<RequestLabels, Counter>,
    seconds: Family<RouteLabels, Histogram>,
    accepted: Family<KindLabels, Counter>,
    cancelled: Family<KindLabels, Counter>,
    sweeps: Family<OutcomeLabels, Counter>,
    sweep_republished: Counter,
}

#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("jetcall_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let seconds = Family::<RouteLabels, Histogram>::new_with_constructor(
            // 100 µs to about 1.6 s.
            || Histogram::new(exponential_buckets(0.000_1, 2.0, 15)),
        );
        registry.register(
            "http_request_duration_seconds",
            "How long requests take, by route: for the submission routes, the accept latency",
            seconds.clone(),
        );
        let accepted = Family::<KindLabels, Counter>::default();
        registry.register(
            "jobs_accepted",
            "New jobs recorded and stored in JetStream, by kind",
            accepted.clone(),
        );
        let cancelled = Family::<KindLabels, Counter>::default();
        registry.register(
            "jobs_cancelled",
            "Jobs cancelled before they were generated, by kind",
            cancelled.clone(),
        );
        let sweeps = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "sweeps",
            "Start-up sweeps of jobs stuck in `accepted`, by outcome",
            sweeps.clone(),
        );
        let sweep_republished = Counter::default();
        registry.register(
            "sweep_republished",
            "Jobs the start-up sweep found accepted but never published, and published",
            sweep_republished.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "API requests being served now; past gateway.max_in_flight they are refused with 429",
            in_flight.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "event_streams_open",
            "Job event streams open now; past gateway.max_event_streams they are refused with 429",
            event_streams.clone(),
        );
        Self(Arc::new(Inner {
            registry,
            in_flight,
            event_streams,
            requests,
            seconds,
            accepted,
            cancelled,
            sweeps,
            sweep_republished,
        }))
    }
}

impl Metrics {
    pub fn job_accepted(&self, kind: &str) {
        self.0
            .accepted
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn job_cancelled(&self, kind: &str) {
        self.0
            .cancelled
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn sweep_completed(&self, republished: u64) {
        self.0.sweep_republished.inc_by(republished);
        self.0
            .sweeps
            .get_or_create(&OutcomeLabels {
                outcome: "completed",
            })
            .inc();
    }

    pub fn sweep_failed(&self) {
        self.0
            .sweeps
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .inc();
    }

    pub fn request(&self, route: String, method: String, status: u16, took: Duration) {
        self.0
            .seconds
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .observe(took.as_secs_f64());
        self.0
            .requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    /// The OpenMetrics text exposition, with the gauges of the limits read off as it is
    /// scraped rather than counted on every request.
    pub fn render(&self, in_flight: usize, event_streams: usize) -> String {
        self.0.in_flight.set(in_flight as i64);
        self.0.event_streams.set(event_streams as i64);
        jetcall::metrics::render(&self.0.registry)
    }
}
