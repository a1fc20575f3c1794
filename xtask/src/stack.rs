//! A throwaway Jetcall installation for the demo and the benchmark: a [`testkit::Deployment`]
//! (nats-server with a fresh JetStream store, or a cluster; the gateway, generator and
//! callback binaries; the demo's signature-checking receiver) with its files in one
//! temporary directory, and the settings xtask gives the services.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use testkit::deployment::Nats;
use testkit::{Deployment, Service, WebhookReceiver};

use crate::poll;
use crate::workspace::Workspace;

/// Started in this order, stopped before nats-server.
pub const SERVICES: [&str; 3] = ["gateway", "generator", "callback"];

#[derive(Debug)]
pub struct Stack {
    deployment: Deployment,
    /// Set for every service `spawn_service` starts, under its own `envs`.
    common_env: Vec<(String, String)>,
    nats_url: String,
    gateway: Option<SocketAddr>,
}

fn owned(env: &[(&str, String)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

impl Stack {
    /// Starts nats-server on a free port and waits until it listens.
    pub async fn start(nats_server: &Path) -> anyhow::Result<Self> {
        Self::deploy(
            Deployment::builder().nats_monitoring(),
            nats_server,
            "jetcall-demo-",
            &[],
        )
        .await
    }

    /// `start`, with a receiver on loopback that checks each delivery's signature against
    /// `signing_secret` (see [`Stack::receiver`]), what a Jetcall customer would run, and the
    /// debug builds of the services for `start_services`.
    pub async fn with_receiver(
        ws: &Workspace,
        nats_server: &Path,
        signing_secret: &str,
    ) -> anyhow::Result<Self> {
        let debug_bins = ws.debug_bin("gateway");
        let builder = Deployment::builder()
            .nats_monitoring()
            .binaries_in(debug_bins.parent().context("the binaries' directory")?)
            .verifying_receiver(signing_secret);
        Self::deploy(builder, nats_server, "jetcall-demo-", &[]).await
    }

    /// A cluster of `size` nats-servers; each service is also given `common_env` (e.g. the
    /// replicas). Its JetStream may still be electing a leader.
    pub async fn cluster(
        nats_server: &Path,
        size: usize,
        common_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let builder = Deployment::builder().cluster(size);
        Self::deploy(builder, nats_server, "jetcall-bench-", common_env).await
    }

    async fn deploy(
        builder: testkit::deployment::DeploymentBuilder,
        nats_server: &Path,
        prefix: &str,
        common_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        // The services read `jetcall.toml` from their working directory, the temporary one,
        // so the demo does not pick up whatever one lies where the user happens to be; they
        // inherit every variable (ANTHROPIC_API_KEY, the user's JETCALL_*), as any program.
        let deployment = builder
            .nats_server(nats_server)
            .log_files(prefix)
            .inherit_jetcall_env()
            .start()
            .await
            .map_err(|error| anyhow!(error))?;
        Ok(Self {
            nats_url: deployment.nats_url(),
            deployment,
            common_env: common_env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            gateway: None,
        })
    }

    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.deployment
            .logs_dir()
            .expect("xtask's deployments keep log files")
    }

    /// The receiver started by `with_receiver`.
    pub fn receiver(&self) -> &WebhookReceiver {
        self.deployment.receiver()
    }

    /// The gateway's base URL, once the services are started.
    pub fn gateway_url(&self) -> anyhow::Result<String> {
        let addr = self.gateway.context("the gateway has not been started")?;
        Ok(format!("http://{addr}"))
    }

    /// Starts the three services built by cargo (after `with_receiver`): the gateway
    /// listening on `gateway`, the callback signing webhooks with `signing_secret`.
    pub fn start_services(
        &mut self,
        gateway: SocketAddr,
        signing_secret: &str,
    ) -> anyhow::Result<()> {
        for service in Service::ALL {
            let name = service.name();
            // The demo's receiver listens on loopback, which the default allowlist refuses;
            // the callback reads the allowlist too, to check addresses at delivery.
            let mut env = vec![
                ("NATS_URL", self.nats_url.clone()),
                ("JETCALL_LOG__FORMAT", "text".to_owned()),
                (
                    "JETCALL_GATEWAY__CALLBACK_ALLOWLIST",
                    r#"["127.0.0.1"]"#.to_owned(),
                ),
            ];
            if std::env::var_os("RUST_LOG").is_none() {
                env.push(("RUST_LOG", "info".to_owned()));
            }
            let listen = match service {
                Service::Gateway => gateway,
                Service::Callback => {
                    env.push((
                        "JETCALL_CALLBACK__SIGNING_SECRET",
                        signing_secret.to_owned(),
                    ));
                    free_addr(Some(8082))?
                }
                // The generator inherits ANTHROPIC_API_KEY, if any, like every variable.
                Service::Generator => free_addr(Some(8081))?,
            };
            self.deployment
                .start_service(service, name, Some(listen), &owned(&env))
                .map_err(|error| anyhow!(error))?;
        }
        self.gateway = Some(gateway);
        Ok(())
    }

    /// Starts one service binary with `envs` on top of `NATS_URL`; returns its pid.
    pub fn spawn_service(
        &mut self,
        name: &str,
        program: &Path,
        envs: &[(&str, String)],
    ) -> anyhow::Result<u32> {
        let mut env = vec![
            ("NATS_URL".to_owned(), self.nats_url.clone()),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
        ];
        env.extend(self.common_env.iter().cloned());
        env.extend(owned(envs));
        let process = self
            .deployment
            .spawn(name, program.to_owned(), &env)
            .map_err(|error| anyhow!(error))?;
        process.pid().context("the service exited at once")
    }

    /// Waits for the gateway's `/readyz`, failing early if any process exits.
    pub async fn wait_ready(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.gateway_url()?);
        poll::until(
            "the gateway's /readyz",
            Duration::from_secs(30),
            async || {
                self.check_running()?;
                let ready = client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|response| response.status() == reqwest::StatusCode::OK);
                Ok(ready.then_some(()))
            },
        )
        .await
    }

    /// Fails if any process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.deployment
            .check_running()
            .map_err(|error| anyhow!(error))
    }

    /// Resolves, with the reason, once any process has exited.
    pub async fn watch(&mut self) -> anyhow::Error {
        anyhow!(self.deployment.watch().await)
    }

    /// Prints the end of each service's log, and of nats-server's if it has stopped
    /// (while it runs its log is a start-up banner), for a failure report.
    pub fn print_log_tails(&mut self) {
        let nats_stopped = match &mut self.deployment.nats {
            Nats::Single(server) => server
                .process()
                .is_none_or(|process| process.check_running().is_err()),
            Nats::Cluster(_) => false,
        };
        for process in self.deployment.services() {
            let log = process.log_file().unwrap_or(Path::new("?"));
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                process.name(),
                log.display(),
                process.last_lines(20).join("\n")
            );
        }
        if nats_stopped {
            let log = self.logs_dir().join("nats-server.log");
            let tail = match std::fs::read(&log) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let all: Vec<&str> = text.lines().collect();
                    all[all.len().saturating_sub(20)..].join("\n")
                }
                Err(error) => format!("(could not read {}: {error})", log.display()),
            };
            eprintln!(
                "---- last lines of nats-server ({}) ----\n{tail}",
                log.display()
            );
        }
    }

    /// Stops the services, then nats-server (which they need while shutting down), each
    /// given [`testkit::deployment::GRACE`] after SIGTERM, and deletes the temporary directory. Reports every process
    /// that did not exit cleanly.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.deployment
            .shutdown()
            .await
            .map_err(|error| anyhow!(error))
    }
}

/// A loopback address that is free now: `preferred` if it is, else one the kernel picks.
pub fn free_addr(preferred: Option<u16>) -> anyhow::Result<SocketAddr> {
    let listener = preferred
        .and_then(|port| TcpListener::bind(("127.0.0.1", port)).ok())
        .map_or_else(|| TcpListener::bind("127.0.0.1:0"), Ok)
        .context("finding a free port")?;
    listener.local_addr().context("reading a port number")
}
