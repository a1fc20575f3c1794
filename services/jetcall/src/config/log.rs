//! `[log]`: the format and level of log lines, and where spans are exported.

use serde::{Deserialize, Serialize};

use super::ConfigError;

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

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let parsed = url::Url::parse(endpoint)
                .map_err(|err| ConfigError::invalid("log.otlp_endpoint", err.to_string()))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::invalid(
                    "log.otlp_endpoint",
                    "must be an http:// or https:// URL (OTLP/HTTP; gRPC is not supported)",
                ));
            }
        }
        Ok(())
    }
}
