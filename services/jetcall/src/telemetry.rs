//! Logging set-up shared by the binaries.
//!
//! Work on one job runs inside a `job` span (`job_id`, `kind`, `trace_id`): with
//! `log.format = "json"` every line logged inside it carries those fields at the top level,
//! beside the event's own, so `jq 'select(.job_id == "JOB-771")'` finds all of a job's lines.
//!
//! With `log.otlp_endpoint` set, spans are also exported over OTLP/HTTP (protobuf, batched),
//! the `job` span in the job's W3C trace: its trace id is the one in `trace_id`, its span id
//! the one the service passes on in `traceparent`, and its parent the span it received, so
//! the gateway's, the generator's and the callback's spans join the caller's trace.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};
use crate::trace::TraceParent;

/// The OTLP exporter's provider, once [`init`] installed one.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber: `RUST_LOG` if set, else `log.level`; JSON lines when
/// `log.format = "json"`; spans over OTLP when `log.otlp_endpoint` is set, under the service
/// name `jetcall-<binary>` (or `OTEL_SERVICE_NAME`). Safe to call twice (tests do): the second
/// call is a no-op. Call [`shutdown`] when the service has stopped, so the last spans are sent.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (json, text) = match config.format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .fmt_fields(JsonFields::new())
                    .event_format(FlatJson),
            ),
            None,
        ),
        LogFormat::Text => (
            None,
            // Colours only for a person at a terminal, not escape codes in a log file.
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            ),
        ),
    };
    let mut failure = None;
    let provider =
        config
            .otlp_endpoint
            .as_deref()
            .and_then(|endpoint| match otlp_provider(endpoint) {
                Ok(provider) => Some(provider),
                Err(err) => {
                    failure = Some(format!("OTLP exporter to {endpoint} not started: {err}"));
                    None
                }
            });
    let otel = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("jetcall")));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(text)
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(failure) = failure {
        tracing::warn!("{failure}");
    }
    match provider {
        Some(provider) if installed => {
            tracing::info!(
                endpoint = config.otlp_endpoint.as_deref().unwrap_or_default(),
                "exporting spans over OTLP/HTTP"
            );
            let _ = PROVIDER.set(provider);
        }
        Some(provider) => {
            let _ = provider.shutdown();
        }
        None => {}
    }
}

/// Sends the spans the OTLP exporter still holds and stops it; nothing without one. Call once
/// the service has stopped: spans ended later are not exported.
pub async fn shutdown() {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    let provider = provider.clone();
    // The exporter's thread sends on this runtime: wait for it off the runtime's threads.
    let outcome = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    if let Ok(Err(err)) = outcome {
        eprintln!("OTLP exporter shutdown: {err}");
    }
}

/// The provider exporting to `<endpoint>/v1/traces` in batches. Needs a Tokio runtime: the
/// requests run on it.
fn otlp_provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "no Tokio runtime to send from".to_owned())?;
    let client = reqwest::Client::builder()
        .build()
        .map_err(|err| err.to_string())?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpClient { client, runtime })
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .map_err(|err| err.to_string())?;
    let resource = match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.trim().is_empty() => Resource::builder().build(),
        _ => Resource::builder()
            .with_service_name(service_name())
            .build(),
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(JobIds)
        .with_resource(resource)
        .build())
}

/// `jetcall-gateway`, `jetcall-generator`, `jetcall-callback`: `jetcall-` and the binary's
/// name.
fn service_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|path| {
            path.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "service".into());
    if binary.starts_with("jetcall") {
        binary
    } else {
        format!("jetcall-{binary}")
    }
}

/// The exporter's HTTP client: our reqwest, each request run on the service's runtime (the
/// batch exporter works on a thread of its own, outside it).
#[derive(Debug)]
struct OtlpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl HttpClient for OtlpClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let response = client.execute(request).await?;
            let mut answer = Response::builder().status(response.status());
            if let Some(headers) = answer.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = response.bytes().await?;
            Ok::<_, HttpError>(answer.body(body)?)
        });
        Box::pin(async move { sent.await.map_err(|err| Box::new(err) as HttpError)? })
    }
}

thread_local! {
    /// The ids the next span started on this thread takes, set by [`in_trace`].
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Random ids, except for a `job` span, which takes the ids of its [`TraceParent`].
#[derive(Debug, Default)]
struct JobIds;

impl IdGenerator for JobIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_IDS
            .with(Cell::get)
            .map_or_else(|| RandomIdGenerator::default().new_trace_id(), |ids| ids.0)
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_IDS
            .with(Cell::get)
            .map_or_else(|| RandomIdGenerator::default().new_span_id(), |ids| ids.1)
    }
}

/// Places `span` in `trace` for the OTLP exporter (see the module's documentation); returns
/// it unchanged when there is none. Used by [`job_span!`](crate::job_span).
pub fn in_trace(span: tracing::Span, trace: &TraceParent) -> tracing::Span {
    if PROVIDER.get().is_none() || span.is_disabled() {
        return span;
    }
    let trace_id = TraceId::from_bytes(trace.trace_id_bytes());
    let flags = if trace.sampled() {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let parent = match trace.parent_span_id_bytes() {
        Some(parent) => opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            SpanId::from_bytes(parent),
            flags,
            true,
            TraceState::default(),
        )),
        // A trace started here: a root span, whichever span is current.
        None => opentelemetry::Context::new(),
    };
    if span.set_parent(parent).is_ok() {
        NEXT_IDS.with(|ids| ids.set(Some((trace_id, SpanId::from_bytes(trace.span_id_bytes())))));
        // Starts the span now, on this thread, so it takes the ids just set.
        let _ = span.context();
        NEXT_IDS.with(|ids| ids.set(None));
    }
    span
}

/// The span every service opens around its work on one job: each line logged inside it
/// names the job, its kind and its trace (a [`crate::trace::TraceParent`]); exported over
/// OTLP, it is that trace's span ([`in_trace`]).
///
/// At level `ERROR` so that no filter that lets a line through drops the span: an `info` span
/// under `RUST_LOG=warn` would leave a job's warnings without their `job_id`. A macro, so the
/// span's target is the calling service's module, as its events' are.
#[macro_export]
macro_rules! job_span {
    ($job_id:expr, $kind:expr, $trace:expr) => {
        $crate::telemetry::in_trace(
            ::tracing::error_span!(
                "job",
                job_id = %$job_id,
                kind = %$kind,
                trace_id = %$trace.trace_id(),
            ),
            &$trace,
        )
    };
}

/// One JSON object per line: `timestamp`, `level`, `message`, the fields of every span the
/// event is in (outermost first), the event's own fields, and `target`. Unlike
/// tracing-subscriber's JSON format, span fields are not nested under `span`/`spans`.
///
/// Span fields must be recorded with [`JsonFields`], which keeps them as a JSON object.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let recorded = extensions
                    .get::<FormattedFields<N>>()
                    .and_then(|recorded| serde_json::from_str::<Value>(recorded).ok());
                if let Some(Value::Object(recorded)) = recorded {
                    fields.extend(recorded);
                }
            }
        }
        event.record(&mut JsonVisitor(&mut fields));

        let mut line = Map::new();
        let now = time::OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), meta.level().as_str().into());
        if let Some(message) = fields.remove("message") {
            line.insert("message".into(), message);
        }
        line.extend(fields);
        line.insert("target".into(), meta.target().into());
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;
    use crate::trace::TraceParent;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Self;

        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    fn json_lines(log: impl FnOnce()) -> Vec<Value> {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("debug"))
            .with_writer(captured.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("UTF-8");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("each line is a JSON object"))
            .collect()
    }

    #[test]
    fn every_line_inside_a_job_span_carries_the_job_at_the_top_level() {
        let trace = TraceParent::start();
        let lines = json_lines(|| {
            tracing::info!("before any job");
            let span = crate::job_span!("JOB-771", "product-description", trace);
            let _entered = span.enter();
            tracing::info!(attempt = 2_u32, "generation failed");
            let inner = tracing::debug_span!("deliver", destination = "127.0.0.1:9000");
            let _inner = inner.enter();
            tracing::warn!(error = %"HTTP 500", retry = true, "webhook attempt failed");
        });
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["message"], "before any job");
        assert!(lines[0].get("job_id").is_none());
        for line in &lines[1..] {
            assert_eq!(line["job_id"], "JOB-771", "{line}");
            assert_eq!(line["kind"], "product-description", "{line}");
            assert_eq!(line["trace_id"], trace.trace_id(), "{line}");
            assert!(line["timestamp"].as_str().is_some_and(|t| t.contains('T')));
            assert!(line["target"].is_string());
        }
        assert_eq!(lines[1]["level"], "INFO");
        assert_eq!(lines[1]["message"], "generation failed");
        assert_eq!(lines[1]["attempt"], 2);
        assert_eq!(lines[2]["level"], "WARN");
        assert_eq!(lines[2]["error"], "HTTP 500");
        assert_eq!(lines[2]["retry"], true);
        assert_eq!(lines[2]["destination"], "127.0.0.1:9000", "inner spans too");
    }

    #[test]
    fn a_span_field_recorded_later_is_shown() {
        let lines = json_lines(|| {
            let span = tracing::info_span!("job", job_id = "JOB-1", status = tracing::field::Empty);
            let _entered = span.enter();
            span.record("status", "delivered");
            tracing::info!("done");
        });
        assert_eq!(lines[0]["job_id"], "JOB-1");
        assert_eq!(lines[0]["status"], "delivered");
    }
}
