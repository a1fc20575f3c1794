//! `[generator]`, and the LLM endpoints it calls: `[anthropic]` and `[openai]`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, check_file};
use crate::kinds::KindSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderChoice {
    /// `anthropic` when `ANTHROPIC_API_KEY` is set, otherwise `offline`.
    Auto,
    Anthropic,
    /// Any OpenAI-compatible `/chat/completions` server (OpenAI, Ollama, vLLM, llama.cpp).
    OpenAi,
    Offline,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorConfig {
    pub provider: ProviderChoice,
    /// LLM calls in flight per generator instance.
    pub concurrency: usize,
    /// How long JetStream waits for an ack before redelivering a request; long calls send
    /// progress acks every half of it.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Attempts at one job (across redeliveries) before it is failed.
    pub max_attempts: u32,
    /// Requests the `generator` consumer hands out unacknowledged across all instances; at
    /// least `concurrency` times the number of instances, or instances sit idle.
    pub max_ack_pending: i64,
    /// LLM requests per minute across every generator instance; 0 for no limit.
    pub requests_per_minute: u32,
    /// LLM tokens (input and output) per minute across every generator instance; 0 for no
    /// limit.
    pub tokens_per_minute: u64,
    /// The longest user message a job's input may make of its kind's template, in bytes. The
    /// gateway refuses a job over it (`422`); one accepted before the limit was lowered fails
    /// as `invalid_input` without an LLM call.
    pub max_prompt_bytes: usize,
    /// While the provider refuses our credentials, how often one request probes whether the
    /// configuration has been fixed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How often the lanes (`jetcall::lanes`) are listed: how soon a new tenant's lane is
    /// pulled, and how fresh `jetcall_generator_jobs_waiting` is.
    #[serde(with = "humantime_serde")]
    pub lane_refresh: Duration,
    /// On SIGTERM, how long LLM calls already made may run on to be recorded before what is
    /// left is handed back; below the orchestrator's stop timeout (compose: 30 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: SocketAddr,
    /// Bulk jobs (`priority = "bulk"`) go through Anthropic's Message Batches API, at half
    /// the price, with results within 24 hours. Off, or for another provider, they are
    /// called one by one after interactive work.
    pub batches: bool,
    /// A batch is sent once it holds this many jobs (at most 100,000, the API's limit) …
    pub batch_max_requests: usize,
    /// … or this many bytes of requests (below the API's 256 MB) …
    pub batch_max_bytes: usize,
    /// … or its first job has waited this long.
    #[serde(with = "humantime_serde")]
    pub batch_max_wait: Duration,
    /// How long after its creation a batch is first asked whether it has ended; the wait
    /// doubles with each answer that it has not, up to ten times this.
    #[serde(with = "humantime_serde")]
    pub batch_poll_interval: Duration,
}

/// The Message Batches API's limits on one batch.
pub const BATCH_API_MAX_REQUESTS: usize = 100_000;
pub const BATCH_API_MAX_BYTES: usize = 256 * 1000 * 1000;

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            provider: ProviderChoice::Auto,
            concurrency: 256,
            ack_wait: Duration::from_secs(30),
            max_attempts: 5,
            max_ack_pending: 4096,
            requests_per_minute: 0,
            tokens_per_minute: 0,
            // Claude's whole context (200,000 tokens) is about 800 KB of text.
            max_prompt_bytes: 1024 * 1024,
            probe_interval: Duration::from_secs(30),
            lane_refresh: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(25),
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            batches: true,
            batch_max_requests: 10_000,
            batch_max_bytes: 64 * 1024 * 1024,
            batch_max_wait: Duration::from_secs(60),
            batch_poll_interval: Duration::from_secs(30),
        }
    }
}

impl GeneratorConfig {
    pub(super) fn validate(&self, kinds: &BTreeMap<String, KindSpec>) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "generator.concurrency",
                "must be at least 1",
            ));
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "generator.ack_wait",
                "must be at least 1s",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "generator.max_attempts",
                "must be at least 1",
            ));
        }
        if i64::try_from(self.concurrency).unwrap_or(i64::MAX) > self.max_ack_pending {
            return Err(ConfigError::invalid(
                "generator.concurrency",
                "must not exceed generator.max_ack_pending, or the extra slots never get a job",
            ));
        }
        let longest_template = kinds
            .values()
            .map(|spec| spec.template.len())
            .max()
            .unwrap_or(0);
        if self.max_prompt_bytes < longest_template {
            return Err(ConfigError::invalid(
                "generator.max_prompt_bytes",
                format!(
                    "must be at least the longest kind's template ({longest_template} bytes), or every job of it fails"
                ),
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.lane_refresh) {
            return Err(ConfigError::invalid(
                "generator.lane_refresh",
                "must be from 100ms to 60s",
            ));
        }
        if self.probe_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "generator.probe_interval",
                "must be at least 1s",
            ));
        }
        if !(1..=BATCH_API_MAX_REQUESTS).contains(&self.batch_max_requests) {
            return Err(ConfigError::invalid(
                "generator.batch_max_requests",
                format!("must be from 1 to {BATCH_API_MAX_REQUESTS}, the API's limit"),
            ));
        }
        if !(1024 * 1024..BATCH_API_MAX_BYTES).contains(&self.batch_max_bytes) {
            return Err(ConfigError::invalid(
                "generator.batch_max_bytes",
                format!("must be from 1 MiB to below {BATCH_API_MAX_BYTES}, the API's limit"),
            ));
        }
        if self.batch_max_wait > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "generator.batch_max_wait",
                "must be at most 1h",
            ));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(3600))
            .contains(&self.batch_poll_interval)
        {
            return Err(ConfigError::invalid(
                "generator.batch_poll_interval",
                "must be from 10ms to 1h",
            ));
        }
        if self.shutdown_grace > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                "generator.shutdown_grace",
                "must be at most 10m: a stop that waits longer is taken for a hang and killed",
            ));
        }
        Ok(())
    }
}

/// One LLM API endpoint: `[anthropic]` (the Messages API) or `[openai]` (any OpenAI-compatible
/// `/chat/completions` server, such as OpenAI, Ollama, vLLM or llama.cpp). The two sections
/// have the same keys and differ in their defaults and their temperature range.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmEndpointConfig {
    /// Anthropic: the API's origin (`ANTHROPIC_BASE_URL` sets it too). OpenAI-compatible: up to
    /// and including `/v1` (`OPENAI_BASE_URL`); a local Ollama is `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    /// `ANTHROPIC_API_KEY` / `OPENAI_API_KEY` set it too. Local servers often need none.
    pub api_key: Option<Secret>,
    /// The model used by kinds that do not name one.
    pub model: String,
    /// Per-request timeout for one call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sampling temperature: 0 to 1 for Anthropic, 0 to 2 for OpenAI-compatible servers; the
    /// server's default when unset.
    pub temperature: Option<f64>,
    /// Speak HTTP/2 to a plain-`http` base URL without negotiating it (h2c), for a local
    /// server that supports it. An `https` base URL negotiates HTTP/2 by itself, and falls
    /// back to HTTP/1.1 if the server declines it.
    pub http2: bool,
    /// The most output tokens any call may ask for; a kind's `max_tokens` above it is lowered
    /// (small local models often need a low one).
    pub max_tokens: Option<u32>,
    /// A PEM file of CA certificates trusted besides the Mozilla roots, for an `https` API
    /// behind a private CA (a company gateway, a self-hosted server).
    pub tls_ca: Option<PathBuf>,
}

impl LlmEndpointConfig {
    pub fn anthropic() -> Self {
        Self::with("https://api.anthropic.com", "claude-sonnet-4-5")
    }

    pub fn openai() -> Self {
        Self::with("https://api.openai.com/v1", "gpt-4o-mini")
    }

    fn with(base_url: &str, model: &str) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            model: model.into(),
            timeout: Duration::from_secs(120),
            temperature: None,
            http2: false,
            max_tokens: None,
            tls_ca: None,
        }
    }

    /// `section` is the section's name; `max_temperature` its API's highest temperature.
    pub(super) fn validate(&self, section: &str, max_temperature: f64) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{section}.{field}");
        url::Url::parse(&self.base_url)
            .map_err(|err| ConfigError::invalid(key("base_url"), err.to_string()))?;
        if let Some(t) = self.temperature
            && !(0.0..=max_temperature).contains(&t)
        {
            return Err(ConfigError::invalid(
                key("temperature"),
                format!("must be between 0 and {max_temperature}"),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(ConfigError::invalid(
                key("max_tokens"),
                "must be at least 1",
            ));
        }
        check_file(&key("tls_ca"), self.tls_ca.as_deref())
    }
}
