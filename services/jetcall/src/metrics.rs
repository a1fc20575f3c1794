//! What every service's `/metrics` shares: the OpenMetrics text of its registry, and the lag
//! of the durable consumer a service pulls from.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `content-type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// Counts one piece of work in its gauge (calls, attempts in flight) until it is dropped,
/// however the work ends.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl InFlight {
    pub fn enter(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Registers `<prefix>_settle_failures_total` in `registry`: the acks, NAKs and terms
/// [`crate::consume::consume`] could not send.
pub fn settle_failures(registry: &mut Registry) -> Counter {
    let failures = Counter::default();
    registry.register(
        "settle_failures",
        "Acks, NAKs and terms of consumed messages that could not be sent; such a message comes back after ack_wait",
        failures.clone(),
    );
    failures
}

/// How long a scrape waits for the consumer's info before it shows the last values.
pub const CONSUMER_INFO_TIMEOUT: Duration = Duration::from_secs(1);

/// A durable consumer's backlog, as `nats consumer info` shows it, in gauges refreshed on
/// demand (once per scrape of `/metrics`). A failed refresh keeps the last values and counts
/// the failure.
#[derive(Debug, Clone)]
pub struct ConsumerLag {
    consumer: PullConsumer,
    pending: Gauge,
    ack_pending: Gauge,
    redelivered: Gauge,
    errors: Counter,
}

impl ConsumerLag {
    /// Registers `<prefix>_consumer_pending`, `_ack_pending`, `_redelivered` and
    /// `_info_errors_total` in `registry` for `consumer`.
    pub fn register(registry: &mut Registry, consumer: PullConsumer) -> Self {
        let lag = Self {
            consumer,
            pending: Gauge::default(),
            ack_pending: Gauge::default(),
            redelivered: Gauge::default(),
            errors: Counter::default(),
        };
        registry.register(
            "consumer_pending",
            "Messages in the stream the durable consumer has not handed out yet (num_pending)",
            lag.pending.clone(),
        );
        registry.register(
            "consumer_ack_pending",
            "Messages handed out and not yet acknowledged: in progress or waiting for a retry (num_ack_pending)",
            lag.ack_pending.clone(),
        );
        registry.register(
            "consumer_redelivered",
            "Unacknowledged messages handed out more than once (num_redelivered)",
            lag.redelivered.clone(),
        );
        registry.register(
            "consumer_info_errors",
            "Consumer info requests that failed or timed out; the consumer gauges then keep their last values",
            lag.errors.clone(),
        );
        lag
    }

    /// Asks the server for the consumer's info (one request, at most
    /// [`CONSUMER_INFO_TIMEOUT`]) and updates the gauges; on failure they keep their values.
    pub async fn refresh(&self) -> Result<(), String> {
        let info = match tokio::time::timeout(CONSUMER_INFO_TIMEOUT, self.consumer.get_info()).await
        {
            Ok(Ok(info)) => info,
            Ok(Err(err)) => {
                self.errors.inc();
                return Err(err.to_string());
            }
            Err(_) => {
                self.errors.inc();
                return Err(format!("no consumer info within {CONSUMER_INFO_TIMEOUT:?}"));
            }
        };
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.pending.set(gauge(info.num_pending));
        self.ack_pending.set(gauge(info.num_ack_pending as u64));
        self.redelivered.set(gauge(info.num_redelivered as u64));
        Ok(())
    }
}
