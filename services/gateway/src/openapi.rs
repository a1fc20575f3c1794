//! `GET /openapi.json`: the OpenAPI 3.2 description of the HTTP API, generated from the
//! handlers' `#[utoipa::path(...)]` annotations and the `ToSchema` types they name.
//!
//! To document a route: annotate its handler with `#[utoipa::path(...)]` listing every status
//! the handler itself can answer (error bodies are `ErrorBody`), mark it
//! `security(("bearer" = []))` when it sits behind the API's middleware (the API key and the
//! in-flight limit), and name it in `paths(...)` below. [`document`] adds the middleware's own
//! answers, `401`, `408` and `429`, to every operation so marked, and drops the requirement (and the
//! `401`) when no API key is configured, so the document says what this gateway does.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApiVersion, Ref, RefOr, ResponseBuilder};

use crate::error::{ErrorBody, ErrorType};
use jetcall::Config;

use crate::state::AppState;
use crate::{budget, events, input_schema, listing, overview, routes};

/// The name of the API-key security scheme, as `security(...)` names it.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Jetcall gateway",
        description = "Submit AI jobs, answered `202` once they are durably in NATS JetStream; \
                       the result arrives later as a signed webhook. Errors are JSON: \
                       `{\"type\": \"<stable slug>\", \"message\", \"field\"?}`."
    ),
    paths(
        routes::generate_description,
        routes::submit_job,
        routes::submit_batch,
        routes::job_named_batch,
        routes::job_named_cancel,
        routes::job_status,
        routes::cancel_job,
        routes::cancel_jobs,
        listing::list_jobs,
        events::job_events,
        budget::budget,
        routes::redeliver_job,
        routes::redeliver_window,
        routes::whoami,
        overview::overview,
        routes::healthz,
        routes::readyz,
        routes::metrics,
        serve,
    ),
    components(schemas(ErrorBody, ErrorType)),
    tags(
        (name = "jobs", description = "Submitting jobs and reading their status"),
        (name = "deliveries", description = "Delivering webhooks again"),
        (name = "operators", description = "What the console at `/console` shows: who the caller is, and the pipeline at a glance"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The document this gateway serves: `api_keys` tells whether API keys are configured; the
/// configuration's kinds are the only values a `Kind` may take here, and what each requires of
/// a job's input is part of the bodies' schemas. Finished as JSON, because the hand-made
/// schemas use keywords (`const`, `contentSchema`) that utoipa's types do not model.
pub fn document(api_keys: bool, config: &Config) -> Value {
    let mut doc = ApiDoc::openapi();
    // 3.2 is the version that can say what each event of a `text/event-stream` is
    // (`itemSchema`); every 3.1 construct the rest of the document uses means the same in it.
    doc.openapi = OpenApiVersion::Version32;
    add_middleware_answers(&mut doc, api_keys);
    let mut doc = serde_json::to_value(&doc).expect("the OpenAPI document serialises");
    let schemas = &mut doc["components"]["schemas"];
    schemas[JOB_EVENT] = job_event_schema();
    schemas["Kind"] = configured_kinds(config.kinds.keys().map(String::as_str));
    for (name, schema) in input_schema::components(config) {
        schemas[name] = schema;
    }
    input_schema::constrain_submit_job(&mut schemas["SubmitJob"], config);
    input_schema::constrain_generate_description(&mut schemas["GenerateDescription"], config);
    doc
}

/// The API middleware's own answers, `401` and `429`, on every operation behind it; without
/// API keys, no security requirement.
fn add_middleware_answers(doc: &mut utoipa::openapi::OpenApi, api_keys: bool) {
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            if operation.security.is_none() {
                continue;
            }
            let responses = &mut operation.responses.responses;
            if api_keys {
                responses.entry("401".into()).or_insert_with(|| {
                    error_response(
                        "No API key, or an unknown one (`unauthorized`): send \
                         `Authorization: Bearer <key>`",
                        None,
                    )
                });
            } else {
                operation.security = None;
            }
            responses.entry("429".into()).or_insert_with(|| {
                error_response(
                    "The gateway is shedding load (`overloaded`), or the API key has spent its \
                     `requests_per_second` (`rate_limited`); retry after `retry-after` seconds",
                    Some("retry-after"),
                )
            });
            // The middleware reads every API request's body before its place is taken.
            responses.entry("408".into()).or_insert_with(|| {
                error_response(
                    "The request's body did not arrive within `gateway.body_timeout` \
                     (`request_timeout`)",
                    None,
                )
            });
        }
    }
    if api_keys {
        let components = doc.components.get_or_insert_with(Default::default);
        components.security_schemes.insert(
            BEARER.into(),
            RefOr::T(SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer))),
        );
    }
}

/// `Kind` as this gateway takes it: one of its configured kinds.
fn configured_kinds<'k>(kinds: impl IntoIterator<Item = &'k str>) -> Value {
    let mut kinds: Vec<&str> = kinds.into_iter().collect();
    kinds.sort_unstable();
    json!({
        "type": "string",
        "enum": kinds,
        "description": "A job kind this gateway is configured with"
    })
}

/// The schema the job event stream's `itemSchema` names.
pub const JOB_EVENT: &str = "JobEvent";

/// One server-sent event of `GET /api/v1/jobs/{job_id}/events`, as a parsed event
/// (`event`, `id`, `data`): a `status` event's `data` is the status document as JSON, which
/// `contentMediaType` and `contentSchema` say, so a validator checks it too; `removed`
/// carries a sentence.
fn job_event_schema() -> Value {
    let revision = json!({
        "type": "string",
        "pattern": "^[0-9]+$",
        "description": "The document's revision in the `job_status` bucket; send it back as `Last-Event-ID` to resume after it"
    });
    json!({
        "description": "One server-sent event of a job's stream",
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "id", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["status"]},
                    "id": revision,
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#/components/schemas/JobStatus"}
                    }
                }
            },
            {
                "type": "object",
                "required": ["event", "id", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["removed"]},
                    "id": revision,
                    "data": {"type": "string", "description": "Why nothing more will come"}
                }
            }
        ]
    })
}

/// A JSON error response, with the header `header` in seconds when given.
fn error_response(description: &str, header: Option<&str>) -> RefOr<utoipa::openapi::Response> {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    let mut response = ResponseBuilder::new()
        .description(description)
        .content("application/json", content);
    if let Some(name) = header {
        let seconds = utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Integer)
            .minimum(Some(0));
        response = response.header(
            name,
            HeaderBuilder::new()
                .schema(Some(seconds))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    RefOr::T(response.build())
}

/// This document: every route, its parameters and bodies, and every status it answers.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.2 document", body = Object)),
)]
pub async fn serve(State(state): State<AppState>) -> Json<Value> {
    Json(document(!state.keys.is_empty(), &state.config))
}
