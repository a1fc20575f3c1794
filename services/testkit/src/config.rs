//! Configuration for a test or a benchmark: the built-in defaults, never a `jetcall.toml` that
//! happens to lie in the working directory nor a variable of the environment, with the given
//! settings on top.

use figment::providers::Serialized;
use serde_json::Value;

use jetcall::Config;

/// The callback allowlist tests use: the loopback hosts their receivers listen on.
pub const LOOPBACK_ALLOWLIST: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// `nats.url` set to `nats_url`, then `settings` (dotted keys, e.g.
/// `("callback.retry_schedule", json!(["100ms"]))`), later ones winning.
///
/// Tests receive their webhooks on loopback, which the built-in allowlist refuses: the
/// allowlist here names the loopback hosts, and a test of the default sets it back.
pub fn config(nats_url: &str, settings: &[(&str, Value)]) -> Config {
    let mut figment = Config::builtin()
        .merge(Serialized::default("nats.url", nats_url))
        .merge(Serialized::default(
            "gateway.callback_allowlist",
            LOOPBACK_ALLOWLIST,
        ));
    for (key, value) in settings {
        figment = figment.merge(Serialized::default(key, value));
    }
    Config::from_figment(figment).unwrap_or_else(|err| panic!("invalid test configuration: {err}"))
}

/// Connects to `config`'s NATS and creates the stream, consumers and bucket it describes, as
/// every service does at start-up, for a test to fill or read before (or without) starting one.
pub async fn provision(config: &Config) -> jetcall::topology::Topology {
    // The services' own connection settings (user, TLS, several URLs), without their endless
    // retrying: a test fails at once when its server is not there.
    let client = jetcall::connect::options(config)
        .connect(jetcall::connect::servers(&config.nats.url))
        .await
        .expect("connect to NATS");
    jetcall::topology::provision(client, config, jetcall::topology::Provisioner::Operator)
        .await
        .expect("provision the topology")
}
