//! The deployment files, checked without a container engine: `compose.yaml` and
//! `compose.cluster.yaml` against the Compose Specification's schema; every Jetcall container's
//! environment loaded by the services' own configuration code; the NATS containers'
//! configuration and environment by the real nats-server; the Dockerfile's binaries against
//! the workspace; and the demo webhook receiver against real signatures.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use figment::Jail;
use serde_json::Value;

use jetcall::Config;
use jetcall::signing::{Signer, SigningKey};

const COMPOSE_FILES: [&str; 2] = ["compose.yaml", "compose.cluster.yaml"];
/// The image every Jetcall container runs, built from the Dockerfile.
const IMAGE: &str = "jetcall:local";

/// `load_config` empties the process's environment and moves its working directory (inside
/// `figment::Jail`) while a test runs in it. A test beside it that reads a variable, or
/// spawns a program (which inherits both), saw them gone: Python, spawned then, could not
/// find its own path. So the tests of this file take turns; they are quick.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// A Compose file as Compose reads it: YAML with anchors and merge keys resolved.
fn load_yaml(file: &str) -> Value {
    let mut yaml: serde_yaml::Value =
        serde_yaml::from_str(&read(file)).unwrap_or_else(|err| panic!("{file}: {err}"));
    yaml.apply_merge()
        .unwrap_or_else(|err| panic!("{file}: merge keys: {err}"));
    serde_json::to_value(yaml).unwrap_or_else(|err| panic!("{file}: not JSON-like: {err}"))
}

/// The variables a deployer's `.env` holds: every `NAME=` of `.env.example` filled in (each
/// password its own, a fresh signing secret, no Anthropic key), and with `optional` the
/// commented-out examples too.
fn dotenv(optional: bool) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in read(".env.example").lines() {
        let (commented, line) = match line.trim().strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line.trim()),
        };
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !is_name || (commented && !optional) {
            continue;
        }
        let value = if !value.is_empty() {
            value.to_owned()
        } else if name.ends_with("_PASSWORD") {
            format!("{}-test-value", name.to_ascii_lowercase())
        } else if name == "JETCALL_CALLBACK__SIGNING_SECRET" {
            SigningKey::generate()
        } else {
            String::new()
        };
        vars.insert(name.to_owned(), value);
    }
    assert!(
        vars.contains_key("JETCALL_CALLBACK__SIGNING_SECRET"),
        ".env.example names the signing secret"
    );
    vars
}

/// Compose's interpolation of one string (the Compose Specification, "Interpolation"): `$$`,
/// `$NAME`, `${NAME}`, and `${NAME` followed by `:-`, `-`, `:?`, `?`, `:+` or `+` and a word.
fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix('{') {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
            let expression = &after[..end];
            rest = &after[end + 1..];
            let split = expression
                .find(|c: char| !is_name(c))
                .unwrap_or(expression.len());
            let (name, operation) = expression.split_at(split);
            let value = vars.get(name);
            let set = value.is_some();
            let filled = value.is_some_and(|v| !v.is_empty());
            let value = value.cloned().unwrap_or_default();
            let expanded = if operation.is_empty() {
                value
            } else if let Some(word) = operation.strip_prefix(":-") {
                if filled { value } else { word.to_owned() }
            } else if let Some(word) = operation.strip_prefix(":?") {
                if !filled {
                    return Err(format!("{name} is required: {word}"));
                }
                value
            } else if let Some(word) = operation.strip_prefix(":+") {
                if filled {
                    word.to_owned()
                } else {
                    String::new()
                }
            } else if let Some(word) = operation.strip_prefix('-') {
                if set { value } else { word.to_owned() }
            } else if let Some(word) = operation.strip_prefix('?') {
                if !set {
                    return Err(format!("{name} is required: {word}"));
                }
                value
            } else if let Some(word) = operation.strip_prefix('+') {
                if set { word.to_owned() } else { String::new() }
            } else {
                return Err(format!(
                    "`${{{expression}}}` is not an interpolation Compose knows"
                ));
            };
            out.push_str(&expanded);
        } else {
            let end = rest.find(|c: char| !is_name(c)).unwrap_or(rest.len());
            if end == 0 {
                return Err(format!("a lone `$` in `{text}`: write `$$`"));
            }
            out.push_str(vars.get(&rest[..end]).map_or("", String::as_str));
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Interpolates every string in `value`, collecting each failure with where it is.
fn interpolate_all(
    value: &mut Value,
    vars: &BTreeMap<String, String>,
    at: &str,
    errors: &mut Vec<String>,
) {
    match value {
        Value::String(text) => match interpolate(text, vars) {
            Ok(done) => *text = done,
            Err(err) => errors.push(format!("{at}: {err}")),
        },
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                interpolate_all(item, vars, &format!("{at}[{index}]"), errors);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                interpolate_all(item, vars, &format!("{at}.{key}"), errors);
            }
        }
        _ => {}
    }
}

/// A Compose file as `docker compose up` would see it with `vars` as its `.env`.
fn compose(file: &str, vars: &BTreeMap<String, String>) -> Result<Value, Vec<String>> {
    let mut doc = load_yaml(file);
    let mut errors = Vec::new();
    interpolate_all(&mut doc, vars, file, &mut errors);
    if errors.is_empty() {
        Ok(doc)
    } else {
        Err(errors)
    }
}

fn services(doc: &Value) -> &serde_json::Map<String, Value> {
    doc["services"].as_object().expect("services")
}

/// A service's environment, from the mapping or the `NAME=value` list form.
fn environment(service: &Value) -> BTreeMap<String, String> {
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match &service["environment"] {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|item| {
                let (k, v) = item.as_str()?.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn command(service: &Value) -> Vec<String> {
    service["command"]
        .as_array()
        .expect("every service names its command as a list")
        .iter()
        .map(|word| word.as_str().expect("a word").to_owned())
        .collect()
}

/// `Config::load` in a process environment of exactly `env`, and no `jetcall.toml`: what the
/// service in that container reads at start.
// figment::Jail fixes the closure's error type to figment::Error, which is large.
#[allow(clippy::result_large_err)]
fn load_config(env: &BTreeMap<String, String>) -> Result<Config, String> {
    let mut loaded = Err("not loaded".to_owned());
    Jail::expect_with(|jail| {
        jail.clear_env();
        for (name, value) in env {
            jail.set_env(name, value);
        }
        loaded = Config::load().map_err(|err| err.to_string());
        Ok(())
    });
    loaded
}

#[test]
fn the_compose_files_follow_the_compose_specification() {
    let _turn = one_at_a_time();
    let schema: Value =
        serde_json::from_str(&read("services/e2e/tests/compose-spec/compose-spec.json"))
            .expect("the vendored schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the Compose schema compiles");
    for file in COMPOSE_FILES {
        let doc = compose(file, &dotenv(true))
            .unwrap_or_else(|errors| panic!("{file}: {}", errors.join("\n")));
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|err| format!("{err} at {}", err.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{file}:\n{}", errors.join("\n"));
    }
}

#[test]
fn every_secret_comes_from_the_environment_and_none_has_a_default() {
    let _turn = one_at_a_time();
    // Without a `.env`, Compose refuses both files, naming every secret.
    let empty = BTreeMap::new();
    for file in COMPOSE_FILES {
        let errors = compose(file, &empty)
            .err()
            .unwrap_or_else(|| panic!("{file} starts without any secret"))
            .join("\n");
        for secret in [
            "JETCALL_NATS_ADMIN_PASSWORD",
            "JETCALL_NATS_GATEWAY_PASSWORD",
            "JETCALL_NATS_GENERATOR_PASSWORD",
            "JETCALL_NATS_CALLBACK_PASSWORD",
            "JETCALL_NATS_SYS_PASSWORD",
            "JETCALL_CALLBACK__SIGNING_SECRET",
        ] {
            assert!(
                errors.contains(&format!("{secret} is required")),
                "{file} does not require {secret}:\n{errors}"
            );
        }
    }
    // With `.env.example`'s required variables filled in, the single-server file starts; the
    // cluster also wants the callback allowlist, which has no demo default there.
    compose("compose.yaml", &dotenv(false))
        .unwrap_or_else(|errors| panic!("compose.yaml: {}", errors.join("\n")));
    let errors = compose("compose.cluster.yaml", &dotenv(false))
        .expect_err("the cluster wants an allowlist")
        .join("\n");
    assert!(
        errors.contains("JETCALL_GATEWAY__CALLBACK_ALLOWLIST is required"),
        "{errors}"
    );
    // Nothing secret is written into either file.
    for file in COMPOSE_FILES {
        let text = read(file);
        let secrets = text.match_indices("whsec_").filter(|(at, prefix)| {
            let key = &text[at + prefix.len()..];
            key.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
                .count()
                >= 16
        });
        assert_eq!(secrets.count(), 0, "{file} holds a signing secret");
        assert!(!text.contains("sk-ant-"), "{file} holds an Anthropic key");
    }
    let ignored = read(".dockerignore");
    for path in [".env", "target/", ".git/"] {
        assert!(
            ignored.lines().any(|line| line.trim() == path),
            ".dockerignore keeps {path} out of the image's build context"
        );
    }
}

#[test]
fn every_jetcall_container_gets_a_configuration_its_service_accepts() {
    let _turn = one_at_a_time();
    for (file, optional) in [
        ("compose.yaml", false),
        ("compose.yaml", true),
        ("compose.cluster.yaml", true),
    ] {
        let doc = compose(file, &dotenv(optional))
            .unwrap_or_else(|errors| panic!("{file}: {}", errors.join("\n")));
        let services = services(&doc);
        let nats_nodes: Vec<&String> = services
            .iter()
            .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("nats:")))
            .map(|(name, _)| name)
            .collect();
        assert!(!nats_nodes.is_empty(), "{file} runs NATS");
        // Every node has the same users and passwords.
        let passwords = environment(&services[nats_nodes[0].as_str()]);

        let mut seen = Vec::new();
        for (name, service) in services {
            for port in service["ports"].as_array().into_iter().flatten() {
                let port = port.as_str().expect("ports in the short form");
                assert!(
                    port.starts_with("127.0.0.1:"),
                    "{file}: {name} publishes {port} beyond this machine"
                );
            }
            if service["image"] != IMAGE {
                continue;
            }
            assert!(
                service["build"].is_object(),
                "{file}: {name} builds {IMAGE} from the Dockerfile"
            );
            let env = environment(service);
            let config = load_config(&env).unwrap_or_else(|err| {
                panic!("{file}: {name}'s environment is refused by jetcall::Config: {err}")
            });
            let program = command(service);
            let role = match program.as_slice() {
                [program] => program.as_str(),
                [cli, topology] if cli == "jetcall" && topology == "topology" => "admin",
                other => panic!("{file}: {name} runs {other:?}"),
            };
            seen.push(role.to_owned());

            // Its own NATS user, with the password the NATS server was given for that user.
            assert_eq!(config.nats.user.as_deref(), Some(role), "{file}: {name}");
            let wanted =
                &passwords[&format!("JETCALL_NATS_{}_PASSWORD", role.to_ascii_uppercase())];
            assert_eq!(
                config.nats.password.as_ref().map(|p| p.expose()),
                Some(wanted.as_str()),
                "{file}: {name}'s password is the one the server has for `{role}`"
            );
            // Only the admin creates the topology; the users of accounts.conf cannot.
            assert_eq!(config.nats.provision, role == "admin", "{file}: {name}");
            // Every NATS node, at its client port, and a replica on each.
            let urls: Vec<&str> = config.nats.url.split(',').collect();
            assert_eq!(urls.len(), nats_nodes.len(), "{file}: {name}: {urls:?}");
            for node in &nats_nodes {
                assert!(
                    urls.contains(&format!("nats://{node}:4222").as_str()),
                    "{file}: {name} does not know {node}: {urls:?}"
                );
            }
            assert_eq!(config.nats.replicas, nats_nodes.len(), "{file}: {name}");

            // An HTTP port on every interface of the container, which the healthcheck asks.
            let listen = match role {
                "gateway" => Some(config.gateway.listen),
                "generator" => Some(config.generator.listen),
                "callback" => Some(config.callback.listen),
                _ => None,
            };
            let health = service["healthcheck"]["test"]
                .as_array()
                .map(|test| test.iter().filter_map(Value::as_str).collect::<Vec<_>>());
            match (listen, health) {
                (Some(listen), Some(health)) => {
                    assert!(listen.ip().is_unspecified(), "{file}: {name} on {listen}");
                    let url = format!("http://127.0.0.1:{}/healthz", listen.port());
                    assert_eq!(health.last(), Some(&url.as_str()), "{file}: {name}");
                    assert_eq!(health.first(), Some(&"CMD"), "{file}: {name}");
                }
                (None, None) => {}
                (listen, health) => {
                    panic!("{file}: {name} listens on {listen:?} and is checked with {health:?}")
                }
            }
            if role == "callback" {
                assert!(
                    config.callback.signing_secret.is_some(),
                    "{file}: the callback service has its signing secret"
                );
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            ["admin", "callback", "gateway", "generator"],
            "{file} runs each service and the topology's provisioning once"
        );
    }
}

#[test]
fn the_nats_containers_configuration_is_accepted_by_nats_server() {
    let _turn = one_at_a_time();
    for file in COMPOSE_FILES {
        let doc = compose(file, &dotenv(true))
            .unwrap_or_else(|errors| panic!("{file}: {}", errors.join("\n")));
        for (name, service) in services(&doc) {
            if !service["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("nats:"))
            {
                continue;
            }
            // `--config <path in the container>`, mounted from nats/ in this repository.
            let program = command(service);
            let [flag, inside] = program.as_slice() else {
                panic!("{file}: {name} runs {program:?}");
            };
            assert_eq!(flag, "--config", "{file}: {name}");
            let mut config_file = None;
            let mut data_volume = None;
            for volume in service["volumes"].as_array().expect("volumes") {
                let volume = volume.as_str().expect("volumes in the short form");
                let parts: Vec<&str> = volume.split(':').collect();
                match parts.as_slice() {
                    [source, target, "ro"] if source.starts_with("./") => {
                        if let Some(rest) = inside.strip_prefix(&format!("{target}/")) {
                            config_file = Some(root().join(source).join(rest));
                        }
                    }
                    [source, target] if !source.starts_with('.') => {
                        data_volume = Some(target.to_string());
                    }
                    _ => panic!("{file}: {name}: unexpected volume {volume}"),
                }
            }
            let config_file = config_file
                .unwrap_or_else(|| panic!("{file}: {name}: {inside} is not mounted read-only"));
            let text = std::fs::read_to_string(&config_file)
                .unwrap_or_else(|err| panic!("{}: {err}", config_file.display()));
            let store = data_volume.unwrap_or_else(|| panic!("{file}: {name} keeps no data"));
            assert!(
                text.contains(&format!("store_dir: \"{store}\"")),
                "{file}: {name}: JetStream's store_dir in {} is not the volume at {store}",
                config_file.display()
            );

            let output = Command::new(testkit::nats::nats_server_binary())
                .arg("-t")
                .arg("-c")
                .arg(&config_file)
                .env_clear()
                .envs(environment(service))
                .output()
                .expect("run nats-server -t");
            assert!(
                output.status.success(),
                "{file}: {name}: nats-server refuses {} with the container's environment: {}{}",
                config_file.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn the_image_holds_every_binary_compose_runs() {
    let _turn = one_at_a_time();
    let dockerfile = read("Dockerfile");
    let words: Vec<&str> = dockerfile.split_whitespace().collect();
    let built: Vec<&str> = words
        .windows(2)
        .filter(|pair| pair[0] == "--bin")
        .map(|pair| pair[1])
        .collect();
    let installed: Vec<&str> = words
        .iter()
        .filter_map(|word| word.strip_prefix("target/release/"))
        .collect();
    assert_eq!(built, installed, "the Dockerfile installs what it builds");

    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata JSON");
    let binaries: Vec<&str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .flat_map(|package| package["targets"].as_array().into_iter().flatten())
        .filter(|target| {
            target["kind"]
                .as_array()
                .is_some_and(|k| k.contains(&"bin".into()))
        })
        .filter_map(|target| target["name"].as_str())
        .collect();
    for binary in &built {
        assert!(
            binaries.contains(binary),
            "the Dockerfile builds `{binary}`, which is no binary of the workspace: {binaries:?}"
        );
    }

    for file in COMPOSE_FILES {
        let doc = compose(file, &dotenv(true))
            .unwrap_or_else(|errors| panic!("{file}: {}", errors.join("\n")));
        for (name, service) in services(&doc) {
            if service["image"] != IMAGE {
                continue;
            }
            let program = command(service);
            assert!(
                built.contains(&program[0].as_str()),
                "{file}: {name} runs `{}`, which the image does not hold ({built:?})",
                program[0]
            );
            if let Some(test) = service["healthcheck"]["test"].as_array() {
                let tool = test[1].as_str().expect("the healthcheck's program");
                assert!(
                    dockerfile.contains(&format!("/usr/local/bin/{tool}\n")),
                    "{file}: {name}'s healthcheck runs `{tool}`, which the image does not hold"
                );
            }
        }
    }
}

#[test]
fn the_demo_receiver_accepts_signed_webhooks_and_refuses_others() {
    let _turn = one_at_a_time();
    let doc = compose("compose.yaml", &dotenv(true))
        .unwrap_or_else(|errors| panic!("compose.yaml: {}", errors.join("\n")));
    let receiver = &services(&doc)["webhook-receiver"];
    assert_eq!(receiver["profiles"][0], "demo");
    let program = command(receiver);
    let [python, unbuffered, dash_c, script] = program.as_slice() else {
        panic!("the receiver runs {program:?}");
    };
    assert_eq!(
        (python.as_str(), unbuffered.as_str(), dash_c.as_str()),
        ("python", "-u", "-c")
    );
    let secret = environment(receiver)["SIGNING_SECRET"].clone();

    let (mut child, port) = start_demo_receiver(script, &secret);
    let mut printed = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let body = br#"{"type":"job.completed","job_id":"JOB-771"}"#;
    let signer = Signer::from_secrets([secret.as_str()]).expect("the secret");
    let timestamp = 1_790_000_000;
    let signature = signer.signature("msg_JOB-771", timestamp, body);
    let forged = Signer::from_secrets([SigningKey::generate().as_str()])
        .expect("another secret")
        .signature("msg_JOB-771", timestamp, body);
    for (signature, status, verdict) in [
        (signature, 204, "signature verified"),
        (forged, 401, "signature INVALID"),
    ] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        write!(
            stream,
            "POST /webhooks/description HTTP/1.1\r\nhost: webhook-receiver\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nwebhook-id: msg_JOB-771\r\n\
             webhook-timestamp: {timestamp}\r\nwebhook-signature: {signature}\r\n\
             connection: close\r\n\r\n",
            body.len()
        )
        .expect("write");
        stream.write_all(body).expect("write body");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).expect("read the answer");
        assert!(
            answer.starts_with(&format!("HTTP/1.0 {status}"))
                || answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        let line = printed
            .next()
            .expect("the receiver prints each delivery")
            .expect("its output");
        assert!(line.starts_with(verdict), "{line}");
        assert!(
            line.ends_with(std::str::from_utf8(body).expect("text")),
            "{line}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The compose file's demo receiver `script`, run with the suite's Python on a free loopback port,
/// once it listens. A port found free can be taken by a parallel test before Python binds
/// it, so that one failure gets another port; any other exit is the test's failure.
fn start_demo_receiver(script: &str, secret: &str) -> (std::process::Child, u16) {
    for _ in 0..3 {
        let port = testkit::free_port();
        let mut child = Command::new(testkit::python())
            .args(["-u", "-c", script])
            .current_dir(root())
            .env("SIGNING_SECRET", secret)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("Python runs the demo receiver");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                if stderr.contains("Address already in use") {
                    break;
                }
                panic!("the demo receiver exited with {status}:\n{stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "the demo receiver did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("the demo receiver found no free port in three tries");
}
