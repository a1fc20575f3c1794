//! Validated names: a job id and a job kind are parsed once at the edge and trusted after.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {max} characters, got {len}")]
    TooLong { max: usize, len: usize },
    #[error("may contain only {allowed}; found {found:?} at position {position}")]
    BadChar {
        allowed: &'static str,
        found: char,
        position: usize,
    },
}

fn check(
    text: &str,
    max: usize,
    allowed: &'static str,
    is_allowed: impl Fn(char) -> bool,
) -> Result<(), NameError> {
    if text.is_empty() {
        return Err(NameError::Empty);
    }
    let len = text.chars().count();
    if len > max {
        return Err(NameError::TooLong { max, len });
    }
    match text.char_indices().find(|(_, c)| !is_allowed(*c)) {
        Some((position, found)) => Err(NameError::BadChar {
            allowed,
            found,
            position,
        }),
        None => Ok(()),
    }
}

/// A job's id: `[A-Za-z0-9_-]{1,128}`. It is a KV key and part of `Nats-Msg-Id`, so dots,
/// wildcards and spaces, which mean something to NATS, are never allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(text: &str) -> Result<Self, NameError> {
        check(text, Self::MAX_LEN, "letters, digits, `_` and `-`", |c| {
            c.is_ascii_alphanumeric() || c == '_' || c == '-'
        })?;
        Ok(Self(text.to_owned()))
    }

    /// A fresh id for a caller that did not bring one; time-ordered, so ids sort by age.
    pub fn generate() -> Self {
        Self(format!("job_{}", uuid::Uuid::now_v7().simple()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl utoipa::PartialSchema for JobId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        name_schema(
            JobId::MAX_LEN,
            "^[A-Za-z0-9_-]+$",
            "A job's id: letters, digits, `_` and `-`.",
        )
    }
}

impl utoipa::ToSchema for JobId {}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A job kind such as `product-description`: lower-case letters, digits and `-`. It is the last
/// token of the `jobs.*.<kind>` subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Kind(String);

impl Kind {
    pub const MAX_LEN: usize = 64;

    pub fn parse(text: &str) -> Result<Self, NameError> {
        check(
            text,
            Self::MAX_LEN,
            "lower-case letters, digits and `-`",
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        )?;
        Ok(Self(text.to_owned()))
    }

    pub fn product_description() -> Self {
        Self("product-description".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl utoipa::PartialSchema for Kind {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        name_schema(
            Kind::MAX_LEN,
            "^[a-z0-9-]+$",
            "A job kind such as `product-description`: lower-case letters, digits and `-`.",
        )
    }
}

impl utoipa::ToSchema for Kind {}

/// The OpenAPI schema of a name: a string of 1 to `max` characters matching `pattern`.
fn name_schema(
    max: usize,
    pattern: &str,
    description: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(pattern))
        .description(Some(description))
        .into()
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_accept_the_documented_alphabet() {
        assert!(JobId::parse("JOB-771").is_ok());
        assert!(JobId::parse("a_b-C9").is_ok());
        assert!(JobId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn job_ids_reject_nats_tokens_and_control_characters() {
        for bad in ["", "a.b", "a*", "a>", "a b", "a\0b", "a\nb", "é", "a/b"] {
            assert!(JobId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            JobId::parse(&"x".repeat(129)),
            Err(NameError::TooLong { max: 128, len: 129 })
        );
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert_ne!(a, b);
        assert!(JobId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn kinds_are_single_lower_case_tokens() {
        assert!(Kind::parse("return-analysis").is_ok());
        for bad in ["", "Product", "a.b", "a_b", "a>"] {
            assert!(Kind::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
