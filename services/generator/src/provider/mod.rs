//! LLM providers: where a job's prompt goes and what comes back.

mod anthropic;
pub mod batches;
mod h2;
mod http;
mod offline;
mod openai;

use std::time::Duration;

use serde_json::{Map, Value};

use jetcall::config::{Config, ProviderChoice};
use jetcall::events::Usage;
use jetcall::kinds::KindSpec;

pub use anthropic::Anthropic;
pub use offline::Offline;
pub use openai::OpenAi;

/// The longest any answer of a provider may hold calls back: a `retry-after` on a failed call,
/// a rate-limit reset on a nearly spent budget, a pause every instance takes. The README
/// promises at most a minute; a longer wait is re-read from the next answer instead.
pub const MAX_PROVIDER_WAIT: Duration = Duration::from_secs(60);

/// One job's worth of generation work.
#[derive(Debug, Clone, Copy)]
pub struct GenerationRequest<'a> {
    pub spec: &'a KindSpec,
    pub input: &'a Map<String, Value>,
    /// The user message: `input` rendered once by the kind's template, within
    /// `generator.max_prompt_bytes`.
    pub prompt: &'a str,
}

impl GenerationRequest<'_> {
    /// The kind's `max_tokens`, lowered to the provider's cap if it has one.
    pub fn max_tokens(&self, cap: Option<u32>) -> u32 {
        cap.map_or(self.spec.max_tokens, |cap| self.spec.max_tokens.min(cap))
    }
}

/// What the model answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub model: String,
    pub usage: Usage,
    /// The API's rate-limit headers say our budget is nearly spent until this long from now:
    /// every generator instance should hold off that long.
    pub slow_down: Option<Duration>,
}

/// How a failed call should be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Worth another try, after at least `retry_after` if the API said so.
    Retry { retry_after: Option<Duration> },
    /// Trying again will not help: the job fails.
    Permanent,
    /// The deployment is misconfigured (bad key, no credit, no permission): no job is at fault.
    Configuration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct LlmError {
    pub disposition: Disposition,
    /// The API's error type (`overloaded_error`, ...) or ours (`connection_error`, ...).
    pub error_type: String,
    pub message: String,
    /// The API refused the call for our rate (HTTP 429): every instance should slow down.
    pub rate_limited: bool,
    /// Answers already paid for when the error came after them (answers that did not fit
    /// the kind): the failed job's cost is still counted. Boxed: rare, and every call's
    /// future holds room for an error.
    pub paid: Option<Box<Paid>>,
}

/// Tokens paid for, and the model that answered, which prices them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paid {
    pub model: String,
    pub usage: Usage,
}

impl LlmError {
    pub fn new(
        disposition: Disposition,
        error_type: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            disposition,
            error_type: error_type.into(),
            message: message.into(),
            rate_limited: false,
            paid: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderSetupError {
    #[error(
        "invalid configuration: `generator.provider` is `anthropic` but no API key is set (anthropic.api_key / ANTHROPIC_API_KEY)"
    )]
    MissingApiKey,
    #[error(transparent)]
    Transport(#[from] http::TransportError),
    #[error("the API key cannot be sent as an HTTP header (it holds characters a header cannot)")]
    InvalidApiKey,
}

#[derive(Debug, Clone)]
pub enum Provider {
    Anthropic(Anthropic),
    OpenAi(OpenAi),
    Offline(Offline),
}

impl Provider {
    /// The configured provider; `auto` picks Anthropic when a key is set.
    pub fn from_config(config: &Config) -> Result<Self, ProviderSetupError> {
        let key = config.anthropic.api_key.clone();
        match (config.generator.provider, key) {
            (ProviderChoice::Offline, _) | (ProviderChoice::Auto, None) => {
                Ok(Self::Offline(Offline))
            }
            (ProviderChoice::Anthropic | ProviderChoice::Auto, Some(key)) => Ok(Self::Anthropic(
                Anthropic::new(&config.anthropic, key, config.generator.concurrency)?,
            )),
            (ProviderChoice::Anthropic, None) => Err(ProviderSetupError::MissingApiKey),
            // Local servers need no key: `openai.api_key` is sent only when set.
            (ProviderChoice::OpenAi, _) => Ok(Self::OpenAi(OpenAi::new(
                &config.openai,
                config.generator.concurrency,
            )?)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Anthropic(_) => "anthropic",
            Self::OpenAi(_) => "openai",
            Self::Offline(_) => "offline",
        }
    }

    pub async fn generate(&self, request: GenerationRequest<'_>) -> Result<Generation, LlmError> {
        match self {
            Self::Anthropic(client) => client.generate(request).await,
            Self::OpenAi(client) => client.generate(request).await,
            Self::Offline(writer) => Ok(writer.generate(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetcall::kinds::builtin_kinds;

    #[test]
    fn a_providers_max_tokens_caps_the_kinds() {
        let kinds = builtin_kinds();
        let spec = &kinds["product-description"];
        let input = Map::new();
        let request = GenerationRequest {
            spec,
            input: &input,
            prompt: "",
        };
        assert_eq!(request.max_tokens(None), spec.max_tokens);
        assert_eq!(request.max_tokens(Some(256)), 256);
        assert_eq!(request.max_tokens(Some(u32::MAX)), spec.max_tokens);
    }
}
