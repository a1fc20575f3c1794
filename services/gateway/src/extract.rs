//! A JSON body extractor whose every failure is one of our JSON errors, naming the field.

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Request};
use axum::http::{StatusCode, header};
use bytes::BytesMut;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use jetcall::JobId;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON request body of at most `gateway.max_body_bytes`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// A JSON request body of at most `gateway.max_batch_bytes`: the route using it must carry a
/// `DefaultBodyLimit` of that size (see `app::router`).
#[derive(Debug)]
pub struct BatchBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read(request, state, state.config.gateway.max_body_bytes).await?;
        parse(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for BatchBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read(request, state, state.config.gateway.max_batch_bytes).await?;
        parse(&bytes).map(BatchBody)
    }
}

/// The body of a JSON request; `limit` is the body limit in force on its route, named in
/// the error when the body is larger.
async fn read(request: Request, state: &AppState, limit: usize) -> Result<Bytes, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::MalformedJson(format!("could not read the request body: {rejection}"))
            }
        })
}

/// The path whose body limit is `gateway.max_batch_bytes` (see `app::router`).
const BATCH_PATH: &str = "/api/v1/jobs/batch";

/// Reads the whole body of `request` within `gateway.body_timeout`, and no more than its
/// route's limit, into memory: what the JSON extractors then read at once. `Err` is the
/// answer: `408` at the deadline, `413` past the limit, `400` for a body cut off by the client.
pub async fn buffer_body(request: Request, state: &AppState) -> Result<Request, ApiError> {
    let gateway = &state.config.gateway;
    let limit = if request.uri().path() == BATCH_PATH {
        gateway.max_batch_bytes
    } else {
        gateway.max_body_bytes
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let (parts, body) = request.into_parts();
    let read = async {
        let mut chunks = body.into_data_stream();
        let mut bytes = BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|err| {
                ApiError::MalformedJson(format!("could not read the request body: {err}"))
            })?;
            if bytes.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes.freeze())
    };
    let bytes = tokio::time::timeout(gateway.body_timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout {
            timeout: gateway.body_timeout,
        })??;
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Parses `bytes`, telling malformed JSON (400) from well-formed JSON with a wrong field (422).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Syntax first, so that `{} {}` is malformed JSON rather than a missing field.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|err| malformed(&err))?;
    // serde would take an array as a struct's fields by position; only objects are requests.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid_field(
            ".",
            "the request body must be a JSON object",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(field_error)?;
    deserializer.end().map_err(|err| malformed(&err))?;
    Ok(value)
}

/// Reads one job of a batch, already parsed as JSON, with the errors `parse` gives for the
/// same job sent alone (less the line and column, which would point into the job rather than
/// the request). Fields are named within the job.
pub fn parse_job<T: DeserializeOwned>(job: serde_json::Value) -> Result<T, ApiError> {
    if !job.is_object() {
        return Err(ApiError::invalid_field(
            ".",
            "each job must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(job).map_err(field_error)
}

fn field_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            if path == "." {
                ApiError::invalid_field(field_in_message(&inner), inner.to_string())
            } else {
                ApiError::invalid_field(&path, format!("`{path}`: {inner}"))
            }
        }
        _ => malformed(&inner),
    }
}

fn malformed(err: &serde_json::Error) -> ApiError {
    ApiError::MalformedJson(format!("request body is not valid JSON: {err}"))
}

/// serde reports a missing or unknown field at the parent's path, naming it in the message.
fn field_in_message(err: &serde_json::Error) -> String {
    let message = err.to_string();
    message
        .split('`')
        .nth(1)
        .map(str::to_owned)
        .unwrap_or_else(|| ".".into())
}

/// A job id from the path; one that cannot be an id cannot name a job either.
pub fn parse_path_id(job_id: Result<Path<String>, PathRejection>) -> Result<JobId, ApiError> {
    let Path(job_id) = job_id.map_err(|err| ApiError::NotFound(err.body_text()))?;
    JobId::parse(&job_id).map_err(|_| {
        let shown: String = job_id.chars().take(JobId::MAX_LEN).collect();
        ApiError::NotFound(format!("no job with id `{shown}`"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::submission::GenerateDescription;

    #[test]
    fn wrong_types_name_their_field() {
        let body = br#"{"callback_url":"http://127.0.0.1:9/webhooks/description","job_id":"JOB-1","product_id":15,"product_name":"LG","specs":"1.5 Ton"}"#;
        let err = parse::<GenerateDescription>(body).expect_err("wrong type");
        assert!(
            matches!(&err, ApiError::InvalidField { field, .. } if field == "product_id"),
            "{err:?}"
        );
    }

    #[test]
    fn a_job_of_a_batch_gets_the_errors_of_a_job_sent_alone() {
        use crate::submission::SubmitJob;
        let cases = [
            r#"{"kind":"product-description","input":{},"callback_url":7}"#,
            r#"{"kind":"product-description","input":{}}"#,
            r#"{"kind":"product-description","input":[],"callback_url":"http://localhost/"}"#,
            r#"{"kind":"x","input":{},"callback_url":"http://localhost/","colour":"white"}"#,
        ];
        for case in cases {
            let alone = parse::<SubmitJob>(case.as_bytes()).expect_err(case);
            let value = serde_json::from_str(case).expect("JSON");
            let in_batch = parse_job::<SubmitJob>(value).expect_err(case);
            let (
                ApiError::InvalidField {
                    field: a,
                    message: m,
                },
                ApiError::InvalidField {
                    field: b,
                    message: n,
                },
            ) = (&alone, &in_batch)
            else {
                panic!("{case}: {alone:?} / {in_batch:?}");
            };
            assert_eq!(a, b, "{case}");
            assert!(m.starts_with(n.as_str()), "{case}: {m:?} / {n:?}");
        }
        let err = parse_job::<SubmitJob>(serde_json::json!(["JOB-1"])).expect_err("array");
        assert!(
            matches!(&err, ApiError::InvalidField { field, .. } if field == "."),
            "{err:?}"
        );
    }
}
