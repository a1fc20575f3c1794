//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningKeyError {
    #[error("must look like `whsec_<base64>`: {0}")]
    NotBase64(String),
    #[error("must decode to at least 24 bytes, got {0}")]
    TooShort(usize),
}

/// One decoded signing secret; read from and written as `whsec_<base64>`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SigningKey(Vec<u8>);

impl TryFrom<String> for SigningKey {
    type Error = SigningKeyError;

    fn try_from(secret: String) -> Result<Self, SigningKeyError> {
        Self::parse(&secret)
    }
}

impl From<SigningKey> for String {
    fn from(key: SigningKey) -> Self {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&key.0))
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

impl SigningKey {
    /// The shortest key taken: 192 bits.
    pub const MIN_BYTES: usize = 24;

    /// Accepts `whsec_<base64>`, or bare base64 as other Standard Webhooks libraries do.
    pub fn parse(secret: &str) -> Result<Self, SigningKeyError> {
        let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|err| SigningKeyError::NotBase64(err.to_string()))?;
        if bytes.len() < Self::MIN_BYTES {
            return Err(SigningKeyError::TooShort(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// A fresh random secret in the `whsec_` form.
    pub fn generate() -> String {
        let bytes: [u8; 32] = rand::random();
        format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
    }

    fn sign(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Signs with every configured key, newest first, so receivers on either side of a key
/// rotation accept the message.
#[derive(Debug, Clone)]
pub struct Signer {
    keys: Vec<SigningKey>,
}

impl Signer {
    pub fn new(keys: Vec<SigningKey>) -> Self {
        Self { keys }
    }

    pub fn from_secrets<'a>(
        secrets: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, SigningKeyError> {
        let keys = secrets
            .into_iter()
            .map(SigningKey::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(keys))
    }

    /// The `webhook-signature` header value: space-separated `v1,<sig>` entries.
    pub fn signature(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        self.keys
            .iter()
            .map(|key| key.sign(webhook_id, timestamp, body))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_webhooks_crate_accepts_our_signature() {
        let secret = SigningKey::generate();
        let signer = Signer::from_secrets([secret.as_str()]).expect("valid secret");
        let body = br#"{"job_id":"JOB-771"}"#;
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", "msg_JOB-771".parse().expect("header"));
        headers.insert(
            "webhook-timestamp",
            timestamp.to_string().parse().expect("header"),
        );
        headers.insert(
            "webhook-signature",
            signer
                .signature("msg_JOB-771", timestamp, body)
                .parse()
                .expect("header"),
        );
        let verifier = standardwebhooks::Webhook::new(&secret).expect("secret");
        assert!(verifier.verify(body, &headers).is_ok());

        // A changed body must not verify: the test is not vacuous.
        assert!(
            verifier
                .verify(br#"{"job_id":"JOB-772"}"#, &headers)
                .is_err()
        );
    }

    #[test]
    fn every_rotated_key_signs() {
        let old = SigningKey::generate();
        let new = SigningKey::generate();
        let signer = Signer::from_secrets([new.as_str(), old.as_str()]).expect("valid");
        let header = signer.signature("msg_1", 1_700_000_000, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.split(' ').all(|sig| sig.starts_with("v1,")));
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert!(matches!(
            SigningKey::parse("whsec_not base64!"),
            Err(SigningKeyError::NotBase64(_))
        ));
        assert_eq!(
            SigningKey::parse("whsec_c2hvcnQ=").err(),
            Some(SigningKeyError::TooShort(5))
        );
    }
}
