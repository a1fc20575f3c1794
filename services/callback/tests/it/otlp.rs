//! The optional OTLP exporter: with `log.otlp_endpoint` set, the callback binary exports its
//! `job` span to an OTLP/HTTP collector, in the trace of the `traceparent` its completion
//! carried; without it, nothing is sent anywhere.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use time::OffsetDateTime;

use jetcall::events::JobRequested;
use jetcall::publish::publish_event_with_headers;
use jetcall::signing::SigningKey;
use jetcall::status::{JobStatus, Status};
use jetcall::topology::Topology;
use jetcall::trace::TraceParent;
use jetcall::{JobId, Kind};
use testkit::{NatsServer, WebhookReceiver, wait_until};

const WAIT: Duration = Duration::from_secs(30);
/// The caller's span: the callback's `job` span must be its child, in its trace.
const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// What the fake collector was sent: each request's body, decoded.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

impl Collector {
    async fn start() -> (Self, String) {
        let collector = Self::default();
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(collector.clone());
        let addr = testkit::serve(app, "the fake OTLP collector").await;
        (collector, format!("http://{addr}"))
    }

    fn requests(&self) -> usize {
        self.0.lock().expect("lock").len()
    }

    /// Every span received, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut spans = Vec::new();
        for request in self.0.lock().expect("lock").iter() {
            for resource in &request.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|resource| string(&resource.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }
}

async fn receive(State(collector): State<Collector>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    collector.0.lock().expect("lock").push(request);
    ExportTraceServiceResponse::default().encode_to_vec()
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
        .and_then(|value| match value {
            any_value::Value::StringValue(text) => Some(text.clone()),
            _ => None,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A completed job, published with the caller's `traceparent`.
async fn completed_job(topology: &Topology, job_id: &str, callback_url: &str) {
    let request = JobRequested {
        job_id: JobId::parse(job_id).expect("a job id"),
        kind: Kind::product_description(),
        input: json!({"product_id": job_id, "product_name": "Test AC"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        callback_url: jetcall::allowlist::CallbackUrl::parse(callback_url).expect("a callback URL"),
        metadata: Default::default(),
        requested_at: OffsetDateTime::now_utc(),
        expires_at: None,
        tenant: None,
        priority: Default::default(),
    };
    let mut doc = JobStatus::accepted(&request, "seeded".into());
    doc.advance(Status::Completed, OffsetDateTime::now_utc());
    doc.result = Some(json!({"description": "Cool."}));
    doc.model = Some("seeded".into());
    topology.status.create(&doc).await.expect("the status");
    let event = doc.finished_event().expect("a completed job has an event");
    let kind = event.event();
    let caller = TraceParent::parse(CALLER).expect("a valid traceparent");
    publish_event_with_headers(
        &topology.jetstream,
        kind.subject(&event.kind),
        &kind.msg_id(&event.job_id),
        &event,
        caller.to_headers(),
    )
    .await
    .expect("publish the completion");
}

/// The callback binary, with `otlp_endpoint` if given; `trap` is where the OpenTelemetry
/// SDK's own variable points, which must not matter.
fn callback(nats_url: &str, otlp_endpoint: Option<&str>, trap: &str) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_callback"));
    command
        .env("NATS_URL", nats_url)
        .env("JETCALL_CONFIG", "/dev/null")
        .env("JETCALL_CALLBACK__SIGNING_SECRET", SigningKey::generate())
        // Its receivers listen on loopback, which the default allowlist refuses.
        .env("JETCALL_GATEWAY__CALLBACK_ALLOWLIST", r#"["127.0.0.1"]"#)
        .env("JETCALL_CALLBACK__LISTEN", "127.0.0.1:0")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("JETCALL_LOG__OTLP_ENDPOINT")
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("{trap}/v1/traces"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(endpoint) = otlp_endpoint {
        command.env("JETCALL_LOG__OTLP_ENDPOINT", endpoint);
    }
    testkit::procs::die_with_parent(&mut command);
    command.spawn().expect("start the callback binary")
}

/// SIGTERM, a clean stop, and waits for the process to exit.
async fn stop(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM");
    wait_until("the callback to exit", WAIT, || {
        let exited = child.try_wait().expect("try_wait").is_some();
        async move { exited.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_span_is_exported_in_the_callers_trace_only_when_configured() {
    testkit::init_logs();
    let nats = NatsServer::start();
    let config = testkit::config::config(&nats.url(), &[]);
    let topology = testkit::config::provision(&config).await;
    let receiver = WebhookReceiver::start().await;
    let (collector, endpoint) = Collector::start().await;

    // Unconfigured: the job is delivered, the service stops cleanly (which would flush an
    // exporter), and the collector has heard nothing.
    let child = callback(&nats.url(), None, &endpoint);
    completed_job(&topology, "JOB-OTLP-OFF", &receiver.url("/hook")).await;
    receiver.wait_for_count(1, WAIT).await;
    stop(child).await;
    assert_eq!(collector.requests(), 0, "nothing is exported by default");

    // Configured: the `job` span reaches the collector, in the caller's trace, by the time
    // the service has stopped (the batch's 5 s delay has not passed: its shutdown sent it).
    let child = callback(&nats.url(), Some(&endpoint), "http://127.0.0.1:9");
    completed_job(&topology, "JOB-OTLP-ON", &receiver.url("/hook")).await;
    let deliveries = receiver.wait_for(2, WAIT).await;
    stop(child).await;
    let spans = collector.spans();
    let (service, job) = spans
        .iter()
        .find(|(_, span)| {
            span.name == "job"
                && string(&span.attributes, "job_id").as_deref() == Some("JOB-OTLP-ON")
        })
        .unwrap_or_else(|| panic!("no `job` span for JOB-OTLP-ON among {spans:#?}"));
    assert_eq!(service, "jetcall-callback");
    let caller = TraceParent::parse(CALLER).expect("valid");
    assert_eq!(hex(&job.trace_id), caller.trace_id(), "the caller's trace");
    assert_eq!(
        hex(&job.parent_span_id),
        caller.span_id(),
        "the caller's span"
    );
    assert_eq!(
        string(&job.attributes, "trace_id").as_deref(),
        Some(caller.trace_id().as_str())
    );
    assert_eq!(
        string(&job.attributes, "kind").as_deref(),
        Some("product-description")
    );
    // The webhook's `traceparent` names the exported span, so the receiver's spans join on.
    let webhook = deliveries
        .iter()
        .find(|delivery| delivery.json()["job_id"] == "JOB-OTLP-ON")
        .expect("the webhook of JOB-OTLP-ON");
    let sent = TraceParent::parse(webhook.header("traceparent")).expect("a traceparent");
    assert_eq!(sent.trace_id(), caller.trace_id());
    assert_eq!(sent.span_id(), hex(&job.span_id));
    assert!(
        spans
            .iter()
            .all(|(_, span)| string(&span.attributes, "job_id").as_deref() != Some("JOB-OTLP-OFF")),
        "nothing from the unconfigured run"
    );
}
