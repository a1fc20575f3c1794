//! Configuration shared by every service.
//!
//! Layers, later ones winning: built-in defaults → `jetcall.toml` (or the file named by
//! `JETCALL_CONFIG`) → the ecosystem's own variables (`NATS_URL`, `ANTHROPIC_API_KEY`,
//! `ANTHROPIC_BASE_URL`, `OTEL_EXPORTER_OTLP_ENDPOINT`) → `JETCALL_<SECTION>__<KEY>`. Every
//! service loads the whole file so one `jetcall.toml` serves a whole deployment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::kinds::{KindSpec, builtin_kinds};

/// Why a configuration could not be used. The message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
    #[error("configuration file {path} does not exist (named by JETCALL_CONFIG)")]
    MissingFile { path: PathBuf },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// An API key: `"the-key"`, or `{ key = "the-key", name = "catalogue",
/// callback_allowlist = ["hooks.shop.example"], requests_per_second = 50 }` for a caller held
/// to fewer callback hosts than the gateway allows, or to a request rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiKey {
    Key(Secret),
    Scoped(ScopedApiKey),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedApiKey {
    pub key: Secret,
    /// Names the caller in logs (the key never appears).
    #[serde(default)]
    pub name: Option<String>,
    /// Narrows `gateway.callback_allowlist` for this key's jobs: a callback URL must pass both.
    #[serde(default)]
    pub callback_allowlist: Option<Vec<String>>,
    /// API requests a second this key may make to one gateway instance, with a burst of as
    /// many; past it `429 rate_limited`.
    #[serde(default)]
    pub requests_per_second: Option<std::num::NonZeroU32>,
    /// `"user"` (the default): the key sees and acts on the jobs it submitted. `"admin"`: an
    /// operator's key, which sees, lists, watches and redelivers every tenant's jobs. A string
    /// here, checked at load, so a misspelt role names its key instead of failing the list.
    #[serde(default)]
    pub role: Option<String>,
}

/// What a key may see: its own jobs, or (an operator's key) everyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    User,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "user" => Some(Self::User),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

impl ApiKey {
    pub fn secret(&self) -> &Secret {
        match self {
            Self::Key(key) => key,
            Self::Scoped(scoped) => &scoped.key,
        }
    }

    /// The tenant the key's jobs belong to: its `name`, or `key <index>` (its place in
    /// `gateway.api_keys`) without one. Keys sharing a name share their jobs, so a key can be
    /// rotated without its jobs changing hands.
    pub fn tenant(&self, index: usize) -> String {
        match self {
            Self::Scoped(ScopedApiKey {
                name: Some(name), ..
            }) => name.clone(),
            _ => format!("key {index}"),
        }
    }

    /// The key's role; an unknown one was refused when the configuration was loaded.
    pub fn role(&self) -> Role {
        match self {
            Self::Scoped(ScopedApiKey {
                role: Some(role), ..
            }) => Role::parse(role).unwrap_or_default(),
            _ => Role::User,
        }
    }

    /// The key's own callback allowlist, when it has one.
    pub fn callback_allowlist(&self) -> Option<&[String]> {
        match self {
            Self::Scoped(scoped) => scoped.callback_allowlist.as_deref(),
            Self::Key(_) => None,
        }
    }
}

/// A string that must never reach a log line, such as an API key or a signing secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"***\")")
    }
}

/// One value or several: `signing_secret = "whsec_a"` or `["whsec_new", "whsec_old"]` while
/// rotating keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<&T> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many.iter().collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub log: LogConfig,
    pub gateway: GatewayConfig,
    pub generator: GeneratorConfig,
    pub anthropic: AnthropicConfig,
    pub openai: OpenAiConfig,
    pub callback: CallbackConfig,
    /// Job kinds beyond the built-in `product-description` and `return-analysis`, or overrides
    /// of them, keyed by kind name.
    pub kinds: BTreeMap<String, KindSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated; `NATS_URL` sets it too.
    pub url: String,
    /// Replicas of the `JOBS` stream and the `job_status` bucket: 1 on a single server, 3 in a
    /// cluster.
    pub replicas: usize,
    /// How long a JetStream request (publish ack, KV write) may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long events stay in the `JOBS` stream.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The window in which a republished event with the same `Nats-Msg-Id` is stored once.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// The NATS user this service connects as, when the server requires one (see
    /// `nats/accounts.conf`); `password` goes with it.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A PEM file with the CA that signed the server's certificate, for a `tls://` URL to a
    /// server whose certificate the system's roots do not cover.
    pub tls_ca: Option<PathBuf>,
    /// Create or update the stream, the consumers and the buckets at start. `false` for a
    /// user that may only use them: the service then waits until they exist, and an operator
    /// creates them (`jetcall topology`, as a user that may).
    pub provision: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            replicas: 1,
            request_timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            user: None,
            password: None,
            tls_ca: None,
            provision: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `info,gateway=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// The base URL of an OTLP/HTTP collector, such as `http://127.0.0.1:4318`: spans (each
    /// job's `job` span in the job's W3C trace) are POSTed as protobuf to `<it>/v1/traces`.
    /// Unset (the default), nothing is exported. `OTEL_EXPORTER_OTLP_ENDPOINT` sets it too.
    pub otlp_endpoint: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            otlp_endpoint: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Bearer keys accepted by the API, each alone or with limits of its own; empty means no
    /// authentication (the gateway warns).
    pub api_keys: Vec<ApiKey>,
    /// Hosts callers may name in `callback_url`: exact hosts, `*.domain` patterns, CIDRs, and
    /// `*` for any host at a public address. Loopback, private and other special addresses
    /// are reached only through an address or CIDR entry (with API keys: in the key's own
    /// `callback_allowlist`), never through a name.
    pub callback_allowlist: Vec<String>,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The largest body of `POST /api/v1/jobs/batch` accepted, in bytes.
    pub max_batch_bytes: usize,
    /// API requests served at once; past it the gateway answers `429` with `Retry-After`
    /// instead of queueing without bound.
    pub max_in_flight: usize,
    /// `GET /api/v1/jobs/{id}/events` streams open at once; they last, so they are counted
    /// apart from `max_in_flight`.
    pub max_event_streams: usize,
    /// Of those, the most one API key may have open at once (`429` past it), so one caller
    /// cannot take them all.
    pub max_event_streams_per_key: usize,
    /// At start-up, jobs still `accepted` this long after submission whose request is not in
    /// the `JOBS` stream (a gateway died between the two writes) are published again.
    #[serde(with = "humantime_serde")]
    pub sweep_after: Duration,
    /// How often that sweep runs again while the gateway serves (one gateway at a time), so a
    /// gateway's crash is repaired without a restart.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// How long a connection may take to send a request's headers before it is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long an API request's body may take to arrive before the answer is `408`. The
    /// body is read before the request takes one of `max_in_flight`'s places, so a stalled
    /// upload holds none.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            callback_allowlist: vec!["*".into()],
            max_body_bytes: 256 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_in_flight: 2048,
            max_event_streams: 1024,
            max_event_streams_per_key: 64,
            sweep_after: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(5 * 60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

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
    /// The longest user message a job's input may make of its kind's template, in bytes; a
    /// job over it fails as `invalid_input` without an LLM call.
    pub max_prompt_bytes: usize,
    /// While the provider refuses our credentials, how often one request probes whether the
    /// configuration has been fixed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// On SIGTERM, how long LLM calls already made may run on to be recorded before what is
    /// left is handed back; below the orchestrator's stop timeout (compose: 30 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: SocketAddr,
}

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
            shutdown_grace: Duration::from_secs(25),
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicConfig {
    /// `ANTHROPIC_BASE_URL` sets it too.
    pub base_url: String,
    /// `ANTHROPIC_API_KEY` sets it too.
    pub api_key: Option<Secret>,
    /// The model used by kinds that do not name one.
    pub model: String,
    /// Per-request timeout for one Messages API call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sampling temperature, 0 to 1; the API's default when unset.
    pub temperature: Option<f64>,
    /// Speak HTTP/2 to a plain-`http` base URL without negotiating it (h2c), for a local
    /// server that supports it. An `https` base URL negotiates HTTP/2 by itself, and falls
    /// back to HTTP/1.1 if the server declines it.
    pub http2: bool,
    /// The most output tokens any call may ask for; a kind's `max_tokens` above it is lowered.
    pub max_tokens: Option<u32>,
    /// A PEM file of CA certificates trusted besides the Mozilla roots, for an `https` API
    /// behind a private CA (a company gateway, a self-hosted server).
    pub tls_ca: Option<PathBuf>,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.anthropic.com".into(),
            api_key: None,
            model: "claude-sonnet-4-5".into(),
            timeout: Duration::from_secs(120),
            temperature: None,
            http2: false,
            max_tokens: None,
            tls_ca: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Up to and including `/v1`; `OPENAI_BASE_URL` sets it too. A local server such as
    /// Ollama is `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    /// Sent as a bearer token when set; `OPENAI_API_KEY` sets it too. Local servers need none.
    pub api_key: Option<Secret>,
    /// The model used by kinds that do not name one.
    pub model: String,
    /// Per-request timeout for one chat completion.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sampling temperature, 0 to 2; the server's default when unset.
    pub temperature: Option<f64>,
    /// As `anthropic.http2`.
    pub http2: bool,
    /// As `anthropic.max_tokens`; small local models often need a low one.
    pub max_tokens: Option<u32>,
    /// As `anthropic.tls_ca`.
    pub tls_ca: Option<PathBuf>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            api_key: None,
            model: "gpt-4o-mini".into(),
            timeout: Duration::from_secs(120),
            temperature: None,
            http2: false,
            max_tokens: None,
            tls_ca: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackConfig {
    /// `whsec_<base64>`; several during key rotation, each producing a signature.
    pub signing_secret: Option<OneOrMany<Secret>>,
    /// 32 random bytes in base64 (`openssl rand -base64 32`) that seal a job's own
    /// `signing_secret` in the `job_status` bucket: the gateway seals, the callback opens.
    /// Both need the same key; without one the gateway refuses jobs that bring a secret.
    pub secrets_key: Option<Secret>,
    /// The wait before each retry of a failed delivery; its length is the number of retries.
    #[serde(with = "crate::durations::list")]
    pub retry_schedule: Vec<Duration>,
    /// The limit on one delivery attempt, connect to last byte.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Webhook deliveries in flight per callback instance.
    pub concurrency: usize,
    /// Deliveries in flight to one host per instance, so a slow or dead receiver can hold at
    /// most this many of the `concurrency` slots; the rest of its jobs wait in JetStream.
    pub per_host_concurrency: usize,
    /// How long a destination is left alone once its circuit opens: its deliveries wait in
    /// JetStream, spending none of their retries, and then one probe goes out.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// How long every attempt at a destination must have failed (at least 5 of them) before
    /// its circuit opens: longer than a first retry, so a receiver that fails first attempts
    /// and takes retries is not cut off; shorter than `timeout`, so a silent one is cut off
    /// by its first timeouts.
    #[serde(with = "humantime_serde")]
    pub breaker_window: Duration,
    /// The longest a delivery round may last, from its first request, while its destination's
    /// circuit keeps it from using its retries; then it is `undeliverable`. Unset: twice the
    /// length of `retry_schedule`.
    #[serde(default, with = "humantime_serde")]
    pub max_round_age: Option<Duration>,
    /// The longest wait a receiver's `Retry-After` can impose on the next attempt.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Deliveries the `callback` consumer hands out unacknowledged, including those waiting
    /// for a retry; large, so a backlog of retries never starves fresh completions.
    pub max_ack_pending: i64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: SocketAddr,
}

impl CallbackConfig {
    /// The longest a delivery round may last: `max_round_age`, or twice the schedule.
    pub fn longest_round(&self) -> Duration {
        self.max_round_age
            .unwrap_or_else(|| 2 * self.retry_schedule.iter().sum::<Duration>())
    }
}

impl Default for CallbackConfig {
    fn default() -> Self {
        let schedule = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800];
        Self {
            signing_secret: None,
            secrets_key: None,
            retry_schedule: schedule.into_iter().map(Duration::from_secs).collect(),
            timeout: Duration::from_secs(15),
            concurrency: 256,
            per_host_concurrency: 32,
            breaker_cooldown: Duration::from_secs(30),
            breaker_window: Duration::from_secs(10),
            max_round_age: None,
            max_retry_after: Duration::from_secs(3600),
            max_ack_pending: 20_000,
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
        }
    }
}

impl Config {
    /// Loads the layered configuration from the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let file = match std::env::var_os("JETCALL_CONFIG") {
            Some(path) => {
                let path = PathBuf::from(path);
                if !path.exists() {
                    return Err(ConfigError::MissingFile { path });
                }
                path
            }
            None => PathBuf::from("jetcall.toml"),
        };
        Self::from_figment(Self::figment(&file))
    }

    /// The layers without validation, so a test can add or replace one.
    pub fn figment(file: &Path) -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            .merge(Env::raw().only(&["NATS_URL"]).map(|_| "nats.url".into()))
            .merge(
                Env::raw()
                    .only(&["OTEL_EXPORTER_OTLP_ENDPOINT"])
                    .map(|_| "log.otlp_endpoint".into()),
            )
            .merge(
                Env::raw()
                    .only(&["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"])
                    .map(|key| {
                        let field = key.as_str().trim_start_matches("ANTHROPIC_");
                        format!("anthropic.{}", field.to_ascii_lowercase()).into()
                    }),
            )
            .merge(
                Env::raw()
                    .only(&["OPENAI_API_KEY", "OPENAI_BASE_URL"])
                    .map(|key| {
                        let field = key.as_str().trim_start_matches("OPENAI_");
                        format!("openai.{}", field.to_ascii_lowercase()).into()
                    }),
            )
            // Only `SECTION__KEY` variables: `JETCALL_CONFIG` and tool paths such as
            // `JETCALL_NATS_SERVER` share the prefix but are not settings.
            .merge(
                Env::prefixed("JETCALL_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
    }

    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        // `ANTHROPIC_API_KEY=` (set but empty) means no key, as it does to the official SDKs'
        // users who blank it to switch Claude off.
        config.anthropic.api_key = config
            .anthropic
            .api_key
            .filter(|key| !key.expose().trim().is_empty());
        config.openai.api_key = config
            .openai
            .api_key
            .filter(|key| !key.expose().trim().is_empty());
        // `JETCALL_CALLBACK__SECRETS_KEY=` (set but empty, as compose passes an unset one)
        // means no key.
        config.callback.secrets_key = config
            .callback
            .secrets_key
            .filter(|key| !key.expose().trim().is_empty());
        // `OTEL_EXPORTER_OTLP_ENDPOINT=` (set but empty) means no exporter.
        config.log.otlp_endpoint = config
            .log
            .otlp_endpoint
            .filter(|endpoint| !endpoint.trim().is_empty());
        config.merge_builtin_kinds();
        config.validate()?;
        Ok(config)
    }

    fn merge_builtin_kinds(&mut self) {
        for (name, spec) in builtin_kinds() {
            self.kinds.entry(name).or_insert(spec);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.nats.replicas == 0 || self.nats.replicas > 5 {
            return Err(ConfigError::invalid("nats.replicas", "must be 1 to 5"));
        }
        if self.nats.duplicate_window < Duration::from_secs(120) {
            return Err(ConfigError::invalid(
                "nats.duplicate_window",
                "must be at least 2m so a retried publish is stored once",
            ));
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return Err(ConfigError::invalid(
                if self.nats.user.is_some() {
                    "nats.password"
                } else {
                    "nats.user"
                },
                "must be set together with the other of nats.user and nats.password",
            ));
        }
        for (key, ca) in [
            ("nats.tls_ca", &self.nats.tls_ca),
            ("anthropic.tls_ca", &self.anthropic.tls_ca),
            ("openai.tls_ca", &self.openai.tls_ca),
        ] {
            if let Some(ca) = ca
                && !ca.is_file()
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("names {}, which is not a file", ca.display()),
                ));
            }
        }
        if self.generator.concurrency == 0 {
            return Err(ConfigError::invalid(
                "generator.concurrency",
                "must be at least 1",
            ));
        }
        if self.generator.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "generator.ack_wait",
                "must be at least 1s",
            ));
        }
        if self.generator.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "generator.max_attempts",
                "must be at least 1",
            ));
        }
        if i64::try_from(self.generator.concurrency).unwrap_or(i64::MAX)
            > self.generator.max_ack_pending
        {
            return Err(ConfigError::invalid(
                "generator.concurrency",
                "must not exceed generator.max_ack_pending, or the extra slots never get a job",
            ));
        }
        let longest_template = self
            .kinds
            .values()
            .map(|spec| spec.template.len())
            .max()
            .unwrap_or(0);
        if self.generator.max_prompt_bytes < longest_template {
            return Err(ConfigError::invalid(
                "generator.max_prompt_bytes",
                format!(
                    "must be at least the longest kind's template ({longest_template} bytes), or every job of it fails"
                ),
            ));
        }
        if self.generator.probe_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "generator.probe_interval",
                "must be at least 1s",
            ));
        }
        if self.generator.shutdown_grace > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                "generator.shutdown_grace",
                "must be at most 10m: a stop that waits longer is taken for a hang and killed",
            ));
        }
        if self.callback.concurrency == 0 {
            return Err(ConfigError::invalid(
                "callback.concurrency",
                "must be at least 1",
            ));
        }
        if self.callback.per_host_concurrency == 0 {
            return Err(ConfigError::invalid(
                "callback.per_host_concurrency",
                "must be at least 1",
            ));
        }
        if let Some(longest) = self.callback.max_round_age
            && longest < self.callback.retry_schedule.iter().sum::<Duration>()
        {
            return Err(ConfigError::invalid(
                "callback.max_round_age",
                "must be at least the whole length of `callback.retry_schedule`",
            ));
        }
        if self.callback.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "callback.timeout",
                "must be above zero",
            ));
        }
        if let Some(secrets) = &self.callback.signing_secret {
            for secret in secrets.to_vec() {
                crate::signing::SigningKey::parse(secret.expose()).map_err(|err| {
                    ConfigError::invalid("callback.signing_secret", err.to_string())
                })?;
            }
        }
        if self.gateway.max_batch_bytes < self.gateway.max_body_bytes {
            return Err(ConfigError::invalid(
                "gateway.max_batch_bytes",
                "must be at least gateway.max_body_bytes, so any job a single submission takes fits in a batch",
            ));
        }
        for (key, value) in [
            ("gateway.max_in_flight", self.gateway.max_in_flight),
            ("gateway.max_event_streams", self.gateway.max_event_streams),
            (
                "gateway.max_event_streams_per_key",
                self.gateway.max_event_streams_per_key,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if let Some(key) = &self.callback.secrets_key {
            crate::sealing::SecretsKey::parse(key)
                .map_err(|err| ConfigError::invalid("callback.secrets_key", err.to_string()))?;
        }
        self.validate_key_policies()?;
        for (key, timeout) in [
            ("gateway.header_timeout", self.gateway.header_timeout),
            ("gateway.body_timeout", self.gateway.body_timeout),
        ] {
            if timeout.is_zero() {
                return Err(ConfigError::invalid(key, "must be above zero"));
            }
        }
        if self.gateway.sweep_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "gateway.sweep_interval",
                "must be at least 1s",
            ));
        }
        for (index, key) in self.gateway.api_keys.iter().enumerate() {
            if let ApiKey::Scoped(ScopedApiKey {
                callback_allowlist: Some(allowlist),
                ..
            }) = key
            {
                crate::allowlist::Allowlist::parse(allowlist).map_err(|err| {
                    ConfigError::invalid(
                        format!("gateway.api_keys[{index}].callback_allowlist"),
                        err.to_string(),
                    )
                })?;
            }
        }
        crate::allowlist::Allowlist::parse(&self.gateway.callback_allowlist)
            .map_err(|err| ConfigError::invalid("gateway.callback_allowlist", err.to_string()))?;
        if let Some(endpoint) = &self.log.otlp_endpoint {
            let parsed = url::Url::parse(endpoint)
                .map_err(|err| ConfigError::invalid("log.otlp_endpoint", err.to_string()))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::invalid(
                    "log.otlp_endpoint",
                    "must be an http:// or https:// URL (OTLP/HTTP; gRPC is not supported)",
                ));
            }
        }
        url::Url::parse(&self.anthropic.base_url)
            .map_err(|err| ConfigError::invalid("anthropic.base_url", err.to_string()))?;
        url::Url::parse(&self.openai.base_url)
            .map_err(|err| ConfigError::invalid("openai.base_url", err.to_string()))?;
        check_temperature("anthropic.temperature", self.anthropic.temperature, 1.0)?;
        for (key, cap) in [
            ("anthropic.max_tokens", self.anthropic.max_tokens),
            ("openai.max_tokens", self.openai.max_tokens),
        ] {
            if cap == Some(0) {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        check_temperature("openai.temperature", self.openai.temperature, 2.0)?;
        for (name, spec) in &self.kinds {
            crate::job::Kind::parse(name)
                .map_err(|err| ConfigError::invalid(format!("kinds.{name}"), err.to_string()))?;
            spec.validate()
                .map_err(|problem| ConfigError::invalid(format!("kinds.{name}"), problem))?;
        }
        Ok(())
    }
}

impl Config {
    /// Roles name a known one, and keys that share a tenant (a name) share its policy: what
    /// the callback applies to a job is looked up by its tenant.
    fn validate_key_policies(&self) -> Result<(), ConfigError> {
        let keys = &self.gateway.api_keys;
        for (index, key) in keys.iter().enumerate() {
            if let ApiKey::Scoped(ScopedApiKey {
                role: Some(role), ..
            }) = key
                && Role::parse(role).is_none()
            {
                return Err(ConfigError::invalid(
                    format!("gateway.api_keys[{index}].role"),
                    format!("is `{role}`; it must be `user` or `admin`"),
                ));
            }
            let tenant = key.tenant(index);
            if let Some((first, _)) = keys.iter().enumerate().find(|(other, earlier)| {
                earlier.tenant(*other) == tenant
                    && earlier.callback_allowlist() != key.callback_allowlist()
            }) && first < index
            {
                return Err(ConfigError::invalid(
                    format!("gateway.api_keys[{index}].callback_allowlist"),
                    format!(
                        "differs from that of gateway.api_keys[{first}], which has the same name `{tenant}`; keys of one tenant share one callback allowlist"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn check_temperature(key: &str, value: Option<f64>, max: f64) -> Result<(), ConfigError> {
    match value {
        Some(t) if !(0.0..=max).contains(&t) => Err(ConfigError::invalid(
            key,
            format!("must be between 0 and {max}"),
        )),
        _ => Ok(()),
    }
}
