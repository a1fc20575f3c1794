//! A JSON body extractor whose every failure is one of our JSON errors, naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
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
        let limit = state.config.gateway.max_body_bytes;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::MalformedJson(format!("could not read the request body: {rejection}"))
                }
            })?;
        parse(&bytes).map(JsonBody)
    }
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
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
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
    })?;
    deserializer.end().map_err(|err| malformed(&err))?;
    Ok(value)
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
}
