//! A job's own webhook secret at rest: sealed by the gateway into the status document, opened
//! by the callback service, under `callback.secrets_key`.
//!
//! The `job_status` bucket is read by operators (`nats kv get`), by every service and by the
//! API's status answers; a secret stored there in plain text lets any of them forge the
//! caller's webhooks. Sealed with ChaCha20-Poly1305 under a key only the gateway and the
//! callback hold, with a random nonce per job and the job id as associated data (a sealed
//! secret copied onto another job does not open), it is of no use to them.
//!
//! The same key, through a second derived key, makes the HMAC that stands for the secret in
//! a submission's digest, so the digest is no unsalted hash of it either.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::job::JobId;
use crate::secret::Secret;

/// Marks the format, so another one can follow without guessing.
const VERSION: &str = "v1.";
const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealingError {
    #[error("must be {KEY_LEN} bytes in base64 (e.g. `openssl rand -base64 32`)")]
    BadKey,
    #[error("is not a sealed secret of this job under this key")]
    DoesNotOpen,
}

/// `callback.secrets_key`, as the two keys derived from it (and as it was written, for a
/// configuration serialised back).
#[derive(Clone, serde::Serialize)]
#[serde(into = "Secret")]
pub struct SecretsKey {
    seal: Arc<LessSafeKey>,
    digest: hmac::Key,
    written: Secret,
}

impl TryFrom<String> for SecretsKey {
    type Error = SealingError;

    fn try_from(written: String) -> Result<Self, SealingError> {
        Self::parse(&Secret::new(written))
    }
}

impl From<SecretsKey> for Secret {
    fn from(key: SecretsKey) -> Self {
        key.written
    }
}

impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretsKey(***)")
    }
}

impl SecretsKey {
    pub fn parse(configured: &Secret) -> Result<Self, SealingError> {
        let bytes = STANDARD
            .decode(configured.expose().trim())
            .map_err(|_| SealingError::BadKey)?;
        if bytes.len() != KEY_LEN {
            return Err(SealingError::BadKey);
        }
        // One configured key, two uses: each gets its own key derived by HMAC with a label,
        // so neither use can be turned against the other.
        let root = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        let derive = |label: &[u8]| hmac::sign(&root, label);
        let seal = UnboundKey::new(&CHACHA20_POLY1305, derive(b"jetcall seal v1").as_ref())
            .map_err(|_| SealingError::BadKey)?;
        let digest = hmac::Key::new(
            hmac::HMAC_SHA256,
            derive(b"jetcall request digest v1").as_ref(),
        );
        Ok(Self {
            seal: Arc::new(LessSafeKey::new(seal)),
            digest,
            written: configured.clone(),
        })
    }

    /// `secret`, sealed for `job_id` alone: `v1.<base64url of nonce, ciphertext and tag>`.
    pub fn seal(&self, job_id: &JobId, secret: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source works");
        let mut sealed = secret.as_bytes().to_vec();
        self.seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(job_id.as_str().as_bytes()),
                &mut sealed,
            )
            .expect("a webhook secret is far below ChaCha20-Poly1305's length limit");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("{VERSION}{}", URL_SAFE_NO_PAD.encode(out))
    }

    /// The secret `seal` made for `job_id`.
    pub fn open(&self, job_id: &JobId, sealed: &str) -> Result<Secret, SealingError> {
        let bytes = sealed
            .strip_prefix(VERSION)
            .and_then(|encoded| URL_SAFE_NO_PAD.decode(encoded).ok())
            .filter(|bytes| bytes.len() > NONCE_LEN)
            .ok_or(SealingError::DoesNotOpen)?;
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealingError::DoesNotOpen)?;
        let mut ciphertext = ciphertext.to_vec();
        let plain = self
            .seal
            .open_in_place(
                nonce,
                Aad::from(job_id.as_str().as_bytes()),
                &mut ciphertext,
            )
            .map_err(|_| SealingError::DoesNotOpen)?;
        String::from_utf8(plain.to_vec())
            .map(Secret::new)
            .map_err(|_| SealingError::DoesNotOpen)
    }

    /// What stands for `secret` in a submission's digest: equal for equal secrets, and of no
    /// use to guess one without the key.
    pub fn digest_of(&self, secret: &str) -> String {
        hmac::sign(&self.digest, secret.as_bytes())
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fill: u8) -> SecretsKey {
        SecretsKey::parse(&Secret::new(STANDARD.encode([fill; KEY_LEN]))).expect("a key")
    }

    fn id(text: &str) -> JobId {
        JobId::parse(text).expect("id")
    }

    #[test]
    fn a_sealed_secret_opens_for_its_job_under_its_key_only() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sealed = key(1).seal(&id("JOB-1"), secret);
        assert!(!sealed.contains("MfKQ9r8G"), "{sealed}");
        assert_ne!(
            sealed,
            key(1).seal(&id("JOB-1"), secret),
            "a nonce per seal"
        );
        let opened = key(1).open(&id("JOB-1"), &sealed).expect("opens");
        assert_eq!(opened.expose(), secret);
        assert_eq!(
            key(2).open(&id("JOB-1"), &sealed).err(),
            Some(SealingError::DoesNotOpen)
        );
        assert_eq!(
            key(1).open(&id("JOB-2"), &sealed).err(),
            Some(SealingError::DoesNotOpen)
        );
        assert!(key(1).open(&id("JOB-1"), "v1.AAAA").is_err());
        assert!(key(1).open(&id("JOB-1"), secret).is_err());
    }

    #[test]
    fn the_digest_depends_on_the_key() {
        assert_eq!(key(1).digest_of("whsec_a"), key(1).digest_of("whsec_a"));
        assert_ne!(key(1).digest_of("whsec_a"), key(2).digest_of("whsec_a"));
        assert_ne!(key(1).digest_of("whsec_a"), key(1).digest_of("whsec_b"));
    }

    #[test]
    fn only_32_bytes_of_base64_make_a_key() {
        for bad in ["", "not base64!", &STANDARD.encode([0u8; 16])] {
            assert!(SecretsKey::parse(&Secret::new(bad)).is_err(), "{bad:?}");
        }
    }
}
