//! Each configuration layer, and that a bad value names its key.
//!
//! A test binary of its own: `figment::Jail` moves the process's working directory and, as it
//! ends, empties and refills its environment. Tests of other binaries that read a variable or
//! start a process in that window would see neither, so only jailed tests share this process.

// figment::Jail fixes the closure's error type to figment::Error, which is large.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use figment::Jail;
use jetcall::Config;
use jetcall::config::{ApiKey, ConfigError, LogFormat, ProviderChoice, Role};

fn load_err(jail_setup: impl FnOnce(&mut Jail) -> figment::error::Result<()>) -> String {
    let mut message = String::new();
    Jail::expect_with(|jail| {
        jail_setup(jail)?;
        message = Config::load()
            .expect_err("configuration must be refused")
            .to_string();
        Ok(())
    });
    message
}

#[test]
fn defaults_are_the_documented_ones() {
    Jail::expect_with(|_jail| {
        let config = Config::load().expect("defaults load");
        assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(config.nats.replicas, 1);
        assert_eq!(config.gateway.listen.to_string(), "127.0.0.1:8080");
        assert!(config.gateway.api_keys.is_empty());
        // Any public destination; nothing on loopback or a private network.
        assert_eq!(config.gateway.callback_allowlist.written(), ["*"]);
        assert!(config.callback.secrets_key.is_none());
        assert_eq!(config.generator.provider, ProviderChoice::Auto);
        assert_eq!(config.generator.concurrency, 256);
        assert_eq!(config.generator.max_prompt_bytes, 1024 * 1024);
        assert_eq!(config.generator.shutdown_grace, Duration::from_secs(25));
        assert_eq!(config.anthropic.base_url, "https://api.anthropic.com");
        assert_eq!(config.callback.timeout, Duration::from_secs(15));
        assert_eq!(config.callback.breaker_window, Duration::from_secs(10));
        assert_eq!(config.callback.max_round_age, None);
        assert_eq!(
            config.callback.longest_round(),
            2 * config.callback.retry_schedule.iter().sum::<Duration>(),
            "a round lasts at most twice the schedule"
        );
        let day: Duration = config.callback.retry_schedule.iter().sum();
        assert!(
            day > Duration::from_secs(20 * 3600) && day < Duration::from_secs(30 * 3600),
            "{day:?}"
        );
        assert!(config.callback.signing_secret.is_none());
        assert!(
            config.log.otlp_endpoint.is_none(),
            "no OTLP export by default"
        );
        assert!(config.kinds.contains_key("product-description"));
        assert!(config.kinds.contains_key("return-analysis"));
        Ok(())
    });
}

#[test]
fn file_then_ecosystem_variables_then_jetcall_variables() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "jetcall.toml",
            r#"
            [nats]
            url = "nats://from-file:4222"
            [gateway]
            listen = "127.0.0.1:9000"
            callback_allowlist = ["*.shop.example", "10.0.0.0/8"]
            [log]
            format = "json"
            "#,
        )?;
        let config = Config::load().expect("file loads");
        assert_eq!(config.nats.url, "nats://from-file:4222");
        assert_eq!(config.gateway.listen.port(), 9000);
        assert_eq!(config.log.format, LogFormat::Json);

        jail.set_env("NATS_URL", "nats://from-nats-url:4222");
        jail.set_env("ANTHROPIC_API_KEY", "sk-ant-xyz");
        jail.set_env("ANTHROPIC_BASE_URL", "http://127.0.0.1:1234");
        let config = Config::load().expect("ecosystem variables load");
        assert_eq!(config.nats.url, "nats://from-nats-url:4222");
        assert_eq!(
            config.anthropic.api_key.as_ref().map(|k| k.expose()),
            Some("sk-ant-xyz")
        );
        assert_eq!(config.anthropic.base_url, "http://127.0.0.1:1234");

        jail.set_env("JETCALL_NATS__URL", "nats://from-jetcall:4222");
        jail.set_env("JETCALL_GATEWAY__LISTEN", "127.0.0.1:9001");
        jail.set_env("JETCALL_CALLBACK__RETRY_SCHEDULE", r#"["1s","5s","30s"]"#);
        jail.set_env("JETCALL_GENERATOR__ACK_WAIT", "1500ms");
        // Tool paths share the prefix but are not settings.
        jail.set_env("JETCALL_NATS_SERVER", "/usr/bin/nats-server");
        let config = Config::load().expect("JETCALL_ variables load");
        assert_eq!(config.nats.url, "nats://from-jetcall:4222");
        assert_eq!(config.gateway.listen.port(), 9001);
        assert_eq!(
            config.callback.retry_schedule,
            [
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30)
            ]
        );
        assert_eq!(config.generator.ack_wait, Duration::from_millis(1500));
        Ok(())
    });
}

#[test]
fn jetcall_config_names_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("other.toml", "[generator]\nconcurrency = 7\n")?;
        jail.set_env("JETCALL_CONFIG", "other.toml");
        assert_eq!(Config::load().expect("loads").generator.concurrency, 7);
        jail.set_env("JETCALL_CONFIG", "missing.toml");
        assert!(matches!(
            Config::load(),
            Err(ConfigError::MissingFile { .. })
        ));
        Ok(())
    });
}

#[test]
fn an_empty_api_key_is_no_key() {
    Jail::expect_with(|jail| {
        jail.set_env("ANTHROPIC_API_KEY", "");
        assert!(Config::load().expect("loads").anthropic.api_key.is_none());
        Ok(())
    });
}

#[test]
fn the_otel_endpoint_variable_sets_the_otlp_endpoint() {
    Jail::expect_with(|jail| {
        jail.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let config = Config::load().expect("loads");
        assert_eq!(
            config.log.otlp_endpoint.as_deref(),
            Some("http://collector:4318")
        );
        jail.set_env(
            "JETCALL_LOG__OTLP_ENDPOINT",
            "http://jetcall-collector:4318",
        );
        let config = Config::load().expect("loads");
        assert_eq!(
            config.log.otlp_endpoint.as_deref(),
            Some("http://jetcall-collector:4318"),
            "the JETCALL_ variable wins"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", "");
        assert!(Config::load().expect("loads").log.otlp_endpoint.is_none());
        Ok(())
    });
}

#[test]
fn secrets_are_not_printed() {
    Jail::expect_with(|jail| {
        jail.set_env("ANTHROPIC_API_KEY", "sk-ant-very-secret");
        let config = Config::load().expect("loads");
        assert!(!format!("{config:?}").contains("very-secret"));
        Ok(())
    });
}

#[test]
fn bad_values_name_their_key() {
    let cases: Vec<(&str, &str, &str)> = vec![
        ("JETCALL_CALLBACK__TIMEOUT", "soon", "callback.timeout"),
        ("JETCALL_NATS__REPLICAS", "0", "nats.replicas"),
        (
            "JETCALL_GENERATOR__CONCURRENCY",
            "0",
            "generator.concurrency",
        ),
        ("JETCALL_GENERATOR__PROVIDER", "gpt", "generator.provider"),
        (
            "JETCALL_GENERATOR__MAX_PROMPT_BYTES",
            "100",
            "generator.max_prompt_bytes",
        ),
        (
            "JETCALL_GENERATOR__SHUTDOWN_GRACE",
            "1h",
            "generator.shutdown_grace",
        ),
        (
            "JETCALL_CALLBACK__SIGNING_SECRET",
            "whsec_!!",
            "callback.signing_secret",
        ),
        (
            "JETCALL_GATEWAY__CALLBACK_ALLOWLIST",
            r#"["http://x"]"#,
            "gateway.callback_allowlist",
        ),
        (
            "JETCALL_CALLBACK__RETRY_SCHEDULE",
            r#"["1s","often"]"#,
            "callback.retry_schedule",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"["k1", {key="k2", callback_allowlist=["ftp://x"]}]"#,
            "gateway.api_keys.1 & callback_allowlist & ftp://x",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k", requests_per_second=0}]"#,
            "api_keys",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k1"}, {key="k2", role="root"}]"#,
            "gateway.api_keys.1 & role & root",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k1", name="shop"}, {key="k2", name="shop", callback_allowlist=["10.0.0.0/8"]}]"#,
            "gateway.api_keys[1].callback_allowlist",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k1", name="shop", budget={per_day_usd=5.0}}, {key="k2", name="shop"}]"#,
            "gateway.api_keys[1].budget",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k", budget={per_day_usd=-1.0}}]"#,
            "budget.per_day_usd & above 0",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k", budget={}}]"#,
            "neither",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k1", name="shop", weight=3}, {key="k2", name="shop"}]"#,
            "gateway.api_keys[1].weight & weight and max_concurrency",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k", weight=1001}]"#,
            "weight & 1 to 1000",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k", max_concurrency=0}]"#,
            "gateway.api_keys",
        ),
        (
            "JETCALL_GATEWAY__API_KEYS",
            r#"[{key="k", budget={per_week_usd=5.0}}]"#,
            "per_week_usd",
        ),
        (
            "JETCALL_CALLBACK__SECRETS_KEY",
            "too-short",
            "callback.secrets_key",
        ),
        (
            "JETCALL_CALLBACK__MAX_ROUND_AGE",
            "1s",
            "callback.max_round_age",
        ),
        (
            "JETCALL_CALLBACK__BREAKER_WINDOW",
            "a while",
            "breaker_window",
        ),
        ("JETCALL_GATEWAY__LISTN", "127.0.0.1:1", "listn"),
        (
            "JETCALL_LOG__OTLP_ENDPOINT",
            "grpc://127.0.0.1:4317",
            "log.otlp_endpoint",
        ),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "not a url",
            "log.otlp_endpoint",
        ),
    ];
    for (variable, value, key) in cases {
        let message = load_err(|jail| {
            jail.set_env(variable, value);
            Ok(())
        });
        // `a & b`: the message names each.
        for part in key.split(" & ") {
            assert!(
                message.to_lowercase().contains(part),
                "{variable}={value}: {message}"
            );
        }
    }
}

#[test]
fn a_kind_added_in_the_file_needs_no_code() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "jetcall.toml",
            r#"
            [kinds.seo-title]
            system = "You write SEO titles."
            template = "Title for {{product_name}}"
            required_fields = ["product_name"]
            max_tokens = 64
            output = { type = "text", field = "title" }
            "#,
        )?;
        let config = Config::load().expect("loads");
        assert!(config.kinds.contains_key("seo-title"));
        assert!(
            config.kinds.contains_key("product-description"),
            "built-ins stay"
        );
        Ok(())
    });
}

#[test]
fn nats_credentials_come_in_pairs_and_a_named_ca_must_exist() {
    for (variable, value, key) in [
        ("JETCALL_NATS__USER", "gateway", "nats.password"),
        ("JETCALL_NATS__PASSWORD", "secret", "nats.user"),
        ("JETCALL_NATS__TLS_CA", "/nonexistent/ca.pem", "nats.tls_ca"),
        (
            "JETCALL_ANTHROPIC__TLS_CA",
            "/nonexistent/ca.pem",
            "anthropic.tls_ca",
        ),
        (
            "JETCALL_OPENAI__TLS_CA",
            "/nonexistent/ca.pem",
            "openai.tls_ca",
        ),
    ] {
        let message = load_err(|jail| {
            jail.set_env(variable, value);
            Ok(())
        });
        assert!(message.contains(key), "{variable}={value}: {message}");
    }
    Jail::expect_with(|jail| {
        jail.set_env("JETCALL_NATS__USER", "gateway");
        jail.set_env("JETCALL_NATS__PASSWORD", "pw-8f3a2c");
        jail.set_env("JETCALL_NATS__PROVISION", "false");
        let config = Config::load().expect("a user with a password");
        assert_eq!(config.nats.user.as_deref(), Some("gateway"));
        assert_eq!(
            config.nats.password.as_ref().map(|p| p.expose()),
            Some("pw-8f3a2c")
        );
        assert!(!config.nats.provision);
        assert!(!format!("{config:?}").contains("pw-8f3a2c"), "{config:?}");
        Ok(())
    });
}

#[test]
fn a_key_s_role_is_user_unless_it_says_admin() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "JETCALL_GATEWAY__API_KEYS",
            r#"["k0", {key="k1", name="ops", role="admin"}, {key="k2", role="user"}]"#,
        );
        let config = Config::load().expect("loads");
        let keys = &config.gateway.api_keys;
        let roles: Vec<Role> = keys.iter().map(ApiKey::role).collect();
        assert_eq!(roles, [Role::User, Role::Admin, Role::User]);
        let tenants: Vec<String> = keys.iter().enumerate().map(|(i, k)| k.tenant(i)).collect();
        assert_eq!(tenants, ["key 0", "ops", "key 2"]);
        Ok(())
    });
}

#[test]
fn a_keys_share_is_its_weight_and_cap_found_by_tenant() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "JETCALL_GATEWAY__API_KEYS",
            r#"["k0", {key="k1", name="shop", weight=3, max_concurrency=20}, {key="k2", name="shop", weight=3, max_concurrency=20}]"#,
        );
        let config = Config::load().expect("loads");
        assert_eq!(config.gateway.tenants(), ["key 0", "shop"]);
        let share = config.gateway.share_of("shop");
        assert_eq!((share.weight, share.max_concurrency), (3, Some(20)));
        let default = config.gateway.share_of("key 0");
        assert_eq!((default.weight, default.max_concurrency), (1, None));
        Ok(())
    });
}

#[test]
fn a_budget_is_read_in_whole_micro_dollars_and_found_by_tenant() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "JETCALL_GATEWAY__API_KEYS",
            r#"["k0", {key="k1", name="shop", budget={per_day_usd=2.5, per_month_usd=0.000001}}]"#,
        );
        let config = Config::load().expect("loads");
        let limits = config.gateway.budget_of("shop").expect("a budget");
        assert_eq!(
            (limits.per_day, limits.per_month),
            (Some(2_500_000), Some(1))
        );
        assert!(config.gateway.budget_of("key 0").is_none());
        Ok(())
    });
}
