//! Request bodies, and turning one into a validated job.

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;

use jetcall::budget::{self, Limits};
use jetcall::events::JobRequested;
use jetcall::kinds::{KindSpec, MAX_TTL, MIN_TTL};
use jetcall::lanes::Priority;
use jetcall::signing::SigningKey;
use jetcall::{JobId, Kind};

use crate::error::ApiError;
use crate::keys::Caller;
use crate::state::AppState;

/// Longest accepted text in a single input field, so one field cannot fill a status document.
pub(crate) const MAX_FIELD_CHARS: usize = 32 * 1024;

/// The most `metadata` a job may carry, encoded: it rides on every event and the webhook.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The deepest nesting of `metadata`, so no consumer of an event recurses without bound.
const MAX_METADATA_DEPTH: usize = 8;

/// Room in a NATS message for what goes with a job's content: its id, timestamps, headers.
const ENVELOPE_BYTES: usize = 4 * 1024;

/// `POST /api/v1/generate-description`: the article's body, unchanged. Unknown fields are
/// refused so that a misspelt field is an error rather than silently dropped.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "job_id": "JOB-771",
    "product_id": "PROD-AC15",
    "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
    "specs": "1.5 Ton, 5 Star, Dual Inverter",
    "callback_url": "https://hooks.shopmax.example/webhooks/description"
})))]
pub struct GenerateDescription {
    /// The caller's id for the job, to retry with; one is made when left out.
    #[schema(pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 128)]
    pub job_id: Option<String>,
    pub product_id: String,
    pub product_name: String,
    /// Free text, or an object of named specifications (text, numbers, booleans).
    #[schema(value_type = Value)]
    pub specs: Value,
    /// Where the result is POSTed: http(s), on the gateway's allowlist.
    #[schema(format = "uri")]
    pub callback_url: String,
}

/// `POST /api/v1/jobs`: any configured kind.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "job_id": "JOB-772",
    "kind": "product-description",
    "input": {
        "product_id": "PROD-AC15",
        "product_name": "LG 1.5 Ton 5 Star Inverter Split AC",
        "specs": {"capacity": "1.5 Ton", "rating": "5 Star"}
    },
    "callback_url": "https://hooks.shopmax.example/webhooks/description",
    "metadata": {"batch": "onboarding-7"}
})))]
pub struct SubmitJob {
    /// The caller's id for the job, to retry with; one is made when left out.
    #[schema(pattern = r"^[A-Za-z0-9_-]+$", min_length = 1, max_length = 128)]
    pub job_id: Option<String>,
    /// A configured job kind: `product-description` and `return-analysis` are built in.
    #[schema(value_type = jetcall::Kind)]
    pub kind: String,
    /// The kind's input fields: text, numbers, booleans and flat lists or objects of them.
    pub input: Map<String, Value>,
    /// Where the result is POSTed: http(s), on the gateway's allowlist.
    #[schema(format = "uri")]
    pub callback_url: String,
    /// Anything the caller wants back in the webhook.
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// A `whsec_` secret to sign this job's webhook with instead of the service's. Kept sealed,
    /// and never shown again.
    #[serde(default)]
    pub signing_secret: Option<String>,
    /// RFC 3339: if the job has not started by then it expires, with no LLM call, and its
    /// webhook says `job.expired`. 1 s to 365 days from now; the kind's `ttl` when left out
    /// (or `null`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    /// Another way to give `expires_at`: how long from now, such as `"90s"`, `"30m"` or
    /// `"2h"`. A retry of the job does not move its expiry.
    #[serde(default)]
    #[schema(example = "2h")]
    pub ttl: Option<String>,
    /// `interactive` jobs go before the same key's `bulk` ones; bulk still gets a share. The
    /// kind's priority when left out, else `interactive`. A retry does not change it.
    #[serde(default)]
    pub priority: Option<Priority>,
}

impl From<GenerateDescription> for SubmitJob {
    fn from(body: GenerateDescription) -> Self {
        let mut input = Map::new();
        input.insert("product_id".into(), Value::String(body.product_id));
        input.insert("product_name".into(), Value::String(body.product_name));
        input.insert("specs".into(), body.specs);
        SubmitJob {
            job_id: body.job_id,
            kind: Kind::product_description().to_string(),
            input,
            callback_url: body.callback_url,
            metadata: Map::new(),
            signing_secret: None,
            expires_at: None,
            ttl: None,
            priority: None,
        }
    }
}

/// A job that passed every check, ready to be recorded and published.
#[derive(Debug)]
pub struct ValidJob {
    pub request: JobRequested,
    /// Identifies the submission's content, to tell an idempotent retry from a conflict.
    pub digest: String,
    /// The caller's own webhook secret, sealed for this job (`jetcall::sealing`).
    pub sealed_signing_secret: Option<String>,
    /// For a key with a budget: its limits, and the most this job can cost.
    pub budget: Option<(Limits, u64)>,
}

impl SubmitJob {
    /// `caller` is the API key the job came with, when keys are configured: its own callback
    /// allowlist applies on top of the gateway's.
    pub fn validate(self, state: &AppState, caller: Option<&Caller>) -> Result<ValidJob, ApiError> {
        let job_id = match &self.job_id {
            Some(id) => JobId::parse(id)
                .map_err(|err| ApiError::invalid_field("job_id", format!("`job_id` {err}")))?,
            None => JobId::generate(),
        };
        let kind = Kind::parse(&self.kind)
            .ok()
            .filter(|kind| state.config.kinds.contains_key(kind.as_str()))
            .ok_or_else(|| ApiError::unknown_kind(&self.kind, &state.config))?;
        let spec = &state.config.kinds[kind.as_str()];
        check_input(spec, &self.input)?;
        // Measured as the generator will render it, so a prompt it would refuse is the
        // caller's 422 now rather than a job that fails later.
        let prompt_bytes = spec
            .check_prompt(&self.input, state.config.generator.max_prompt_bytes)
            .map_err(|err| ApiError::invalid_field("input", err.to_string()))?;
        let callback_url = state
            .allowlist
            .check(&self.callback_url)
            .map_err(|err| ApiError::InvalidCallbackUrl(err.to_string()))?;
        if let Some(caller) = caller {
            caller.admits(&callback_url)?;
        }

        // Stored sealed, and in the digest only as an HMAC under the same key: neither is of
        // use to a reader of the bucket.
        let sealed = match &self.signing_secret {
            None => None,
            Some(secret) => {
                SigningKey::parse(secret).map_err(|err| {
                    ApiError::invalid_field("signing_secret", format!("`signing_secret` {err}"))
                })?;
                let key = state.secrets_key.as_ref().ok_or_else(|| {
                    ApiError::invalid_field(
                        "signing_secret",
                        "this gateway does not take `signing_secret`: it has no `callback.secrets_key` to keep one with; leave it out to have the service's signature",
                    )
                })?;
                Some((key.seal(&job_id, secret), key.digest_of(secret)))
            }
        };
        check_metadata(&self.metadata)?;
        let canonical = canonical(
            &kind,
            &self.input,
            callback_url.as_str(),
            &self.metadata,
            sealed
                .as_ref()
                .map(|(_, secret_digest)| secret_digest.as_str()),
        );
        let limit = job_size_limit(state);
        if canonical.len() > limit {
            return Err(ApiError::JobTooLarge { limit });
        }
        let digest = format!("{:x}", Sha256::digest(&canonical));
        let now = OffsetDateTime::now_utc();
        let expires_at = expiry(self.expires_at, self.ttl.as_deref(), spec, now)?;
        Ok(ValidJob {
            request: JobRequested {
                job_id,
                kind,
                input: self.input,
                callback_url,
                metadata: self.metadata,
                requested_at: now,
                expires_at,
                tenant: caller.map(|caller| caller.name.clone()),
                priority: self.priority.unwrap_or(spec.priority),
            },
            digest,
            sealed_signing_secret: sealed.map(|(sealed, _)| sealed),
            budget: caller
                .and_then(|caller| state.config.gateway.budget_of(&caller.name))
                .map(|limits| {
                    let estimate = budget::model_of(&state.config, spec)
                        .and_then(|model| {
                            budget::estimate(
                                &state.config.prices,
                                model,
                                spec,
                                spec.system.len() + prompt_bytes,
                            )
                        })
                        // A model with no price is not held by any budget.
                        .unwrap_or(0);
                    (*limits, estimate)
                }),
        })
    }
}

/// When the job expires if not started: `expires_at`, `ttl` from `now`, or the kind's `ttl`.
/// Left out of the submission's digest: a retry with a `ttl` names a later moment, and is
/// still the same job (the first expiry stands).
fn expiry(
    expires_at: Option<OffsetDateTime>,
    ttl: Option<&str>,
    spec: &KindSpec,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, ApiError> {
    let (field, at) = match (expires_at, ttl) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_field(
                "ttl",
                "give `ttl` or `expires_at`, not both",
            ));
        }
        (Some(at), None) => ("expires_at", at),
        (None, Some(ttl)) => {
            let ttl = humantime::parse_duration(ttl).map_err(|err| {
                ApiError::invalid_field(
                    "ttl",
                    format!("`ttl` is not a duration such as \"90s\" or \"2h\": {err}"),
                )
            })?;
            ("ttl", now + bounded(ttl))
        }
        (None, None) => return Ok(spec.ttl.map(|ttl| now + ttl)),
    };
    let from_now = at - now;
    if from_now < MIN_TTL || from_now > MAX_TTL {
        return Err(ApiError::invalid_field(
            field,
            format!("`{field}` must be between 1 s and 365 days from now"),
        ));
    }
    Ok(Some(at))
}

/// A duration past what `time` adds without overflow is as far out of range as `MAX_TTL`'s
/// next second.
fn bounded(ttl: std::time::Duration) -> time::Duration {
    time::Duration::try_from(ttl.min(MAX_TTL + std::time::Duration::from_secs(1)))
        .unwrap_or(time::Duration::MAX)
}

fn check_input(spec: &KindSpec, input: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(field) = spec.missing_fields(input).first() {
        return Err(ApiError::invalid_field(
            *field,
            format!("`{field}` is required and must not be empty"),
        ));
    }
    for (field, value) in input {
        check_value(field, value)?;
    }
    Ok(())
}

/// Inputs are prompt material: text, numbers and flat collections of them, of bounded size,
/// without control characters that have no place in a prompt.
fn check_value(field: &str, value: &Value) -> Result<(), ApiError> {
    match value {
        Value::String(text) => {
            if text.chars().count() > MAX_FIELD_CHARS {
                return Err(ApiError::invalid_field(
                    field,
                    format!("`{field}` is longer than {MAX_FIELD_CHARS} characters"),
                ));
            }
            if text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
            {
                return Err(ApiError::invalid_field(
                    field,
                    format!("`{field}` contains control characters"),
                ));
            }
            Ok(())
        }
        Value::Number(_) | Value::Bool(_) | Value::Null => Ok(()),
        Value::Array(items) => items.iter().try_for_each(|item| match item {
            Value::Array(_) | Value::Object(_) => Err(ApiError::invalid_field(
                field,
                format!("`{field}` may hold only text, numbers and booleans"),
            )),
            scalar => check_value(field, scalar),
        }),
        Value::Object(map) => map.iter().try_for_each(|(key, item)| {
            let path = format!("{field}.{key}");
            match item {
                Value::Object(_) | Value::Array(_) => Err(ApiError::invalid_field(
                    &path,
                    format!("`{path}` must be text, a number or a boolean"),
                )),
                scalar => check_value(&path, scalar),
            }
        }),
    }
}

/// The largest job, encoded, that the gateway takes: one a single submission may carry
/// (`gateway.max_body_bytes`), and one whose request fits in half of NATS's `max_payload`, so
/// that its outcome event and status document, which hold the input and metadata again with
/// the result, fit too. A job over it is refused for good (`413`), never a retryable error
/// from NATS or a failure after its LLM call was paid for.
fn job_size_limit(state: &AppState) -> usize {
    let max_payload = state.topology.jetstream.client().server_info().max_payload;
    let fits_in_nats = (max_payload / 2).saturating_sub(ENVELOPE_BYTES);
    state.config.gateway.max_body_bytes.min(fits_in_nats)
}

/// `metadata` is the caller's, passed through untouched; it is only bounded.
fn check_metadata(metadata: &Map<String, Value>) -> Result<(), ApiError> {
    fn depth(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    let deepest = 1 + metadata.values().map(depth).max().unwrap_or(0);
    if deepest > MAX_METADATA_DEPTH {
        return Err(ApiError::invalid_field(
            "metadata",
            format!("`metadata` is nested deeper than {MAX_METADATA_DEPTH} levels"),
        ));
    }
    let size = serde_json::to_vec(metadata).map_or(usize::MAX, |encoded| encoded.len());
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::invalid_field(
            "metadata",
            format!("`metadata` is larger than {MAX_METADATA_BYTES} bytes encoded"),
        ));
    }
    Ok(())
}

#[cfg(test)]
/// `secret_digest` is the HMAC that stands for the job's own signing secret
/// (`SecretsKey::digest_of`), never the secret: a plain hash of a whole submission whose other
/// parts a reader of the bucket sees would let them test guesses of the secret.
fn digest(
    kind: &Kind,
    input: &Map<String, Value>,
    callback_url: &str,
    metadata: &Map<String, Value>,
    secret_digest: Option<&str>,
) -> String {
    let canonical = canonical(kind, input, callback_url, metadata, secret_digest);
    format!("{:x}", Sha256::digest(&canonical))
}

/// What a submission's digest is taken of; its length is the job's size. `secret_digest` is
/// the HMAC that stands for the job's own signing secret (`SecretsKey::digest_of`), never the
/// secret: a plain hash of a whole submission whose other parts a reader of the bucket sees
/// would let them test guesses of the secret.
fn canonical(
    kind: &Kind,
    input: &Map<String, Value>,
    callback_url: &str,
    metadata: &Map<String, Value>,
    secret_digest: Option<&str>,
) -> Vec<u8> {
    // serde_json's map is ordered by key, so equal submissions serialise identically.
    // A tuple serialises as the JSON array of its parts without copying them into a `Value`
    // first, and the hash is written in one go: built byte by byte through `format!`, the
    // digest took 5 % of the gateway's CPU under load (perf).
    serde_json::to_vec(&(kind, input, callback_url, metadata, secret_digest))
        .expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs recorded by an earlier gateway keep their digest: a resubmission after an upgrade
    /// must still be recognised as the same job, not a 409.
    #[test]
    fn digest_is_the_sha256_of_the_json_array_of_the_submission() {
        let kind = Kind::parse("product-description").unwrap();
        let input: Map<String, Value> =
            serde_json::from_str(r#"{"specs":["1.5 ton","5 star"],"name":"AC \"15\""}"#).unwrap();
        let metadata: Map<String, Value> = serde_json::from_str(r#"{"shop":"ShopMax"}"#).unwrap();
        let canonical = serde_json::json!([kind, input, "https://hooks.test/x", metadata, null]);
        let expected = Sha256::digest(canonical.to_string().as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>();
        assert_eq!(
            digest(&kind, &input, "https://hooks.test/x", &metadata, None),
            expected
        );
        assert_ne!(
            digest(
                &kind,
                &input,
                "https://hooks.test/x",
                &metadata,
                Some("whsec_a")
            ),
            expected
        );
    }
}
