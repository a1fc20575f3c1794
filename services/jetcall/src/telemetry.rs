//! Logging set-up shared by the binaries.
//!
//! Work on one job runs inside a `job` span (`job_id`, `kind`, `trace_id`): with
//! `log.format = "json"` every line logged inside it carries those fields at the top level,
//! beside the event's own, so `jq 'select(.job_id == "JOB-771")'` finds all of a job's lines.

use std::fmt;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber: `RUST_LOG` if set, else `log.level`; JSON lines when
/// `log.format = "json"`. Safe to call twice (tests do): the second call is a no-op.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The span every service opens around its work on one job: each line logged inside it
/// names the job, its kind and its trace (a [`crate::trace::TraceParent`]).
///
/// At level `ERROR` so that no filter that lets a line through drops the span: an `info` span
/// under `RUST_LOG=warn` would leave a job's warnings without their `job_id`. A macro, so the
/// span's target is the calling service's module, as its events' are.
#[macro_export]
macro_rules! job_span {
    ($job_id:expr, $kind:expr, $trace:expr) => {
        ::tracing::error_span!(
            "job",
            job_id = %$job_id,
            kind = %$kind,
            trace_id = %$trace.trace_id(),
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
