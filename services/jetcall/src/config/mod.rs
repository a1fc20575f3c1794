//! Configuration shared by every service.
//!
//! Layers, later ones winning: built-in defaults → `jetcall.toml` (or the file named by
//! `JETCALL_CONFIG`) → the ecosystem's own variables (`NATS_URL`, `ANTHROPIC_API_KEY`,
//! `ANTHROPIC_BASE_URL`, `OTEL_EXPORTER_OTLP_ENDPOINT`) → `JETCALL_<SECTION>__<KEY>`. Every
//! service loads the whole file so one `jetcall.toml` serves a whole deployment.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

use crate::cost::PriceTable;
use crate::kinds::{KindSpec, builtin_kinds};

mod callback;
mod gateway;
mod generator;
mod log;
mod nats;

pub use callback::CallbackConfig;
pub use gateway::{ApiKey, GatewayConfig, Role, ScopedApiKey};
pub use generator::{GeneratorConfig, LlmEndpointConfig, ProviderChoice};
pub use log::{LogConfig, LogFormat};
pub use nats::NatsConfig;

pub use crate::secret::Secret;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub generator: GeneratorConfig,
    #[serde(default = "LlmEndpointConfig::anthropic")]
    pub anthropic: LlmEndpointConfig,
    #[serde(default = "LlmEndpointConfig::openai")]
    pub openai: LlmEndpointConfig,
    #[serde(default)]
    pub callback: CallbackConfig,
    /// Job kinds beyond the built-in `product-description` and `return-analysis`, or overrides
    /// of them, keyed by kind name.
    #[serde(default)]
    pub kinds: BTreeMap<String, KindSpec>,
    /// What each model's tokens cost, in dollars per million tokens: Anthropic's published
    /// prices unless replaced or added to here.
    #[serde(default)]
    pub prices: PriceTable,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            log: LogConfig::default(),
            gateway: GatewayConfig::default(),
            generator: GeneratorConfig::default(),
            anthropic: LlmEndpointConfig::anthropic(),
            openai: LlmEndpointConfig::openai(),
            callback: CallbackConfig::default(),
            kinds: BTreeMap::new(),
            prices: PriceTable::default(),
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
        Self::builtin()
            .merge(Toml::file(file))
            .merge(Self::environment())
    }

    /// The built-in defaults alone: what tests and benchmarks start from, so that neither a
    /// `jetcall.toml` nor a variable of whoever runs them (a real `ANTHROPIC_API_KEY`, say)
    /// reaches them.
    pub fn builtin() -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
    }

    fn environment() -> Figment {
        Figment::new()
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

    /// Each section checks its own fields; what spans sections is checked here.
    fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.log.validate()?;
        self.gateway.validate()?;
        self.generator.validate(&self.kinds)?;
        self.anthropic.validate("anthropic", 1.0)?;
        self.openai.validate("openai", 2.0)?;
        self.callback.validate()?;
        self.prices
            .validate()
            .map_err(|problem| ConfigError::invalid("prices", problem))?;
        for (name, spec) in &self.kinds {
            crate::job::Kind::parse(name)
                .map_err(|err| ConfigError::invalid(format!("kinds.{name}"), err.to_string()))?;
            spec.validate()
                .map_err(|problem| ConfigError::invalid(format!("kinds.{name}"), problem))?;
        }
        Ok(())
    }
}

/// A file a key names must exist.
fn check_file(key: &str, path: Option<&Path>) -> Result<(), ConfigError> {
    match path {
        Some(path) if !path.is_file() => Err(ConfigError::invalid(
            key,
            format!("names {}, which is not a file", path.display()),
        )),
        _ => Ok(()),
    }
}

/// For an optional value read from text: set but blank (`JETCALL_CALLBACK__SECRETS_KEY=`, as
/// compose passes an unset variable) means unset, and anything else must parse.
fn blank_is_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<String>,
    T::Error: fmt::Display,
{
    match Option::<String>::deserialize(deserializer)? {
        Some(text) if !text.trim().is_empty() => T::try_from(text)
            .map(Some)
            .map_err(serde::de::Error::custom),
        _ => Ok(None),
    }
}
