//! The whole deployment as real processes on loopback: nats-server (one, or a cluster), the
//! gateway, generator and callback binaries (any number of each) as child processes, and, in
//! this process, a webhook receiver and a fake LLM. The one harness behind the fault suite
//! (`services/e2e/tests/faults`), `cargo xtask demo` and `cargo xtask bench`.
//!
//! ```ignore
//! let mut deployment = Deployment::builder().fake_llm().receiver().start().await?;
//! deployment.set_env(my_settings(&deployment.nats_url()));
//! deployment.start_service(Service::Gateway, "gateway", None, &[])?;
//! ```
//!
//! Every child is started by [`crate::procs`] (killed with its parent's thread, in a process
//! group of its own). Dropping the deployment kills everything; [`Deployment::shutdown`] stops
//! it gracefully instead: the services with SIGTERM, then nats-server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::nats::{NatsOptions, nats_server_binary};
use crate::service::{Launch, ServiceProcess};
use crate::{FakeAnthropic, NatsCluster, NatsServer, WebhookReceiver};

/// How long a process may take to exit after SIGTERM before it is killed.
pub const GRACE: Duration = Duration::from_secs(10);

/// The deployment's NATS.
#[derive(Debug)]
pub enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Nats {
    /// The value for `nats.url`: one URL, or every node's, comma separated.
    pub fn url(&self) -> String {
        match self {
            Nats::Single(server) => server.url(),
            Nats::Cluster(cluster) => cluster.url(),
        }
    }
}

/// One of the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Gateway,
    Generator,
    Callback,
}

impl Service {
    /// In the order they are started; stopped in the same order, before nats-server.
    pub const ALL: [Service; 3] = [Service::Gateway, Service::Generator, Service::Callback];

    /// Its binary's name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Generator => "generator",
            Service::Callback => "callback",
        }
    }

    /// The variable for the address its HTTP surface listens on (the gateway's API, the
    /// others' health and metrics).
    pub fn listen_variable(self) -> &'static str {
        match self {
            Service::Gateway => "JETCALL_GATEWAY__LISTEN",
            Service::Generator => "JETCALL_GENERATOR__LISTEN",
            Service::Callback => "JETCALL_CALLBACK__LISTEN",
        }
    }
}

/// A running service and the base URL of its HTTP port.
#[derive(Debug)]
pub struct Instance {
    pub process: ServiceProcess,
    pub url: String,
}

/// What to start; see [`Deployment::builder`].
#[derive(Debug, Default)]
pub struct DeploymentBuilder {
    cluster: Option<usize>,
    nats: NatsOptions,
    binaries: Option<PathBuf>,
    files: Option<String>,
    inherit_env: bool,
    fake_llm: bool,
    receiver: bool,
    signing_secret: Option<String>,
}

impl DeploymentBuilder {
    /// A cluster of `size` nats-servers instead of one (the services then need
    /// `nats.replicas`, which is the caller's to set).
    pub fn cluster(mut self, size: usize) -> Self {
        self.cluster = Some(size);
        self
    }

    /// The nats-server binary; [`nats_server_binary`] by default.
    pub fn nats_server(mut self, binary: &Path) -> Self {
        self.nats.binary = Some(binary.to_owned());
        self
    }

    /// The single nats-server's HTTP monitoring endpoint, on a random port.
    pub fn nats_monitoring(mut self) -> Self {
        self.nats.monitoring = true;
        self
    }

    /// Where the service binaries are (`target/debug`, `target/release`); by default next to
    /// the running test executable (see [`crate::service_binary`]).
    pub fn binaries_in(mut self, dir: &Path) -> Self {
        self.binaries = Some(dir.to_owned());
        self
    }

    /// A temporary directory (named `prefix...`, removed by `shutdown`) as the services'
    /// working directory, with every process's output in `logs/<name>.log` there, a single
    /// nats-server's too, instead of kept in memory: what xtask shows its user.
    pub fn log_files(mut self, prefix: &str) -> Self {
        self.files = Some(prefix.to_owned());
        self
    }

    /// The services inherit this process's `JETCALL_*` variables (the demo honours the
    /// user's); by default they are cleared, so a test sees only the settings it gives.
    pub fn inherit_jetcall_env(mut self) -> Self {
        self.inherit_env = true;
        self
    }

    /// A fake Anthropic Messages API ([`FakeAnthropic`]) in this process.
    pub fn fake_llm(mut self) -> Self {
        self.fake_llm = true;
        self
    }

    /// A recording webhook receiver ([`WebhookReceiver`]) in this process.
    pub fn receiver(mut self) -> Self {
        self.receiver = true;
        self
    }

    /// A receiver that also verifies each delivery's signature with `signing_secret`, and
    /// answers a bad one 401 ([`WebhookReceiver::verifying`]).
    pub fn verifying_receiver(mut self, signing_secret: &str) -> Self {
        self.receiver = true;
        self.signing_secret = Some(signing_secret.to_owned());
        self
    }

    /// Starts NATS, then the receiver and the fake LLM; no service yet (see
    /// [`Deployment::start_service`]). Waits until NATS accepts connections, not for a
    /// cluster's JetStream leader.
    pub async fn start(self) -> Result<Deployment, String> {
        let dir = match &self.files {
            Some(prefix) => {
                let dir = tempfile::Builder::new()
                    .prefix(prefix)
                    .tempdir()
                    .map_err(|err| format!("creating a temporary directory: {err}"))?;
                std::fs::create_dir(dir.path().join("logs"))
                    .map_err(|err| format!("creating the logs directory: {err}"))?;
                Some(dir)
            }
            None => None,
        };
        let nats = match self.cluster {
            Some(size) => Nats::Cluster(NatsCluster::start_with(
                self.nats.binary.clone().unwrap_or_else(nats_server_binary),
                size,
            )),
            None => {
                let mut options = self.nats.clone();
                options.log = dir
                    .as_ref()
                    .map(|dir| dir.path().join("logs/nats-server.log"));
                Nats::Single(NatsServer::try_start(options)?)
            }
        };
        let receiver = match (self.receiver, &self.signing_secret) {
            (false, _) => None,
            (true, None) => Some(WebhookReceiver::start().await),
            (true, Some(secret)) => Some(WebhookReceiver::verifying(secret).await?),
        };
        let llm = match self.fake_llm {
            true => Some(FakeAnthropic::start().await),
            false => None,
        };
        Ok(Deployment {
            nats,
            llm,
            receiver,
            gateways: Vec::new(),
            generators: Vec::new(),
            callbacks: Vec::new(),
            others: Vec::new(),
            env: Vec::new(),
            binaries: self.binaries,
            inherit_env: self.inherit_env,
            dir,
        })
    }
}

/// A running deployment; see the module's documentation.
#[derive(Debug)]
pub struct Deployment {
    pub nats: Nats,
    pub llm: Option<FakeAnthropic>,
    pub receiver: Option<WebhookReceiver>,
    pub gateways: Vec<Instance>,
    pub generators: Vec<Instance>,
    pub callbacks: Vec<Instance>,
    /// Service processes started with [`Deployment::spawn`], their ports their caller's.
    others: Vec<ServiceProcess>,
    /// Given to every service started from now on, before its own variables.
    env: Vec<(String, String)>,
    binaries: Option<PathBuf>,
    inherit_env: bool,
    // Last, so that it is deleted only after the processes writing to it have been killed.
    dir: Option<TempDir>,
}

impl Deployment {
    pub fn builder() -> DeploymentBuilder {
        DeploymentBuilder::default()
    }

    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    /// The fake LLM; panics unless the builder asked for one.
    pub fn llm(&self) -> &FakeAnthropic {
        self.llm
            .as_ref()
            .expect("a deployment built with `fake_llm`")
    }

    /// The webhook receiver; panics unless the builder asked for one.
    pub fn receiver(&self) -> &WebhookReceiver {
        self.receiver
            .as_ref()
            .expect("a deployment built with a receiver")
    }

    /// The services' working directory, with `logs/` in it, when built with `log_files`.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }

    /// The directory of the log files, when built with `log_files`.
    pub fn logs_dir(&self) -> Option<PathBuf> {
        self.dir().map(|dir| dir.join("logs"))
    }

    /// Variables every service started from now on gets, before its own.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// The instances of `service` started so far.
    pub fn instances(&mut self, service: Service) -> &mut Vec<Instance> {
        match service {
            Service::Gateway => &mut self.gateways,
            Service::Generator => &mut self.generators,
            Service::Callback => &mut self.callbacks,
        }
    }

    /// Starts `binary` as the service process `name` with the common variables and `env`;
    /// whatever it listens on is the caller's to say in `env`.
    pub fn spawn(
        &mut self,
        name: &str,
        binary: PathBuf,
        env: &[(String, String)],
    ) -> Result<&mut ServiceProcess, String> {
        let process = self.launch(name, binary, env)?;
        self.others.push(process);
        Ok(self.others.last_mut().expect("just pushed"))
    }

    /// Starts an instance of `service`, labelled `name`, listening on `listen` (a free
    /// loopback port when `None`), with the common variables and `env`.
    pub fn start_service(
        &mut self,
        service: Service,
        name: &str,
        listen: Option<SocketAddr>,
        env: &[(String, String)],
    ) -> Result<&mut Instance, String> {
        let listen =
            listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], crate::free_port())));
        let mut env = env.to_vec();
        env.push((service.listen_variable().to_owned(), listen.to_string()));
        let binary = match &self.binaries {
            Some(dir) => dir.join(service.name()),
            None => crate::service_binary(service.name()),
        };
        let process = self.launch(name, binary, &env)?;
        let instances = self.instances(service);
        instances.push(Instance {
            process,
            url: format!("http://{listen}"),
        });
        Ok(instances.last_mut().expect("just pushed"))
    }

    fn launch(
        &self,
        name: &str,
        binary: PathBuf,
        env: &[(String, String)],
    ) -> Result<ServiceProcess, String> {
        let launch = Launch {
            inherit_jetcall_env: self.inherit_env,
            dir: self.dir().map(Path::to_owned),
            log: self.logs_dir().map(|logs| logs.join(format!("{name}.log"))),
        };
        let env = self.env.iter().chain(env).cloned().collect();
        ServiceProcess::try_start(name, binary, env, launch)
    }

    /// Every service process, in the order started.
    pub fn services(&self) -> impl Iterator<Item = &ServiceProcess> {
        self.gateways
            .iter()
            .chain(&self.generators)
            .chain(&self.callbacks)
            .map(|instance| &instance.process)
            .chain(&self.others)
    }

    fn services_mut(&mut self) -> impl Iterator<Item = &mut ServiceProcess> {
        self.gateways
            .iter_mut()
            .chain(&mut self.generators)
            .chain(&mut self.callbacks)
            .map(|instance| &mut instance.process)
            .chain(&mut self.others)
    }

    /// Fails if a single nats-server or any service has exited.
    pub fn check_running(&mut self) -> Result<(), String> {
        if let Nats::Single(server) = &mut self.nats
            && let Some(process) = server.process()
        {
            process.check_running()?;
        }
        self.services_mut()
            .try_for_each(ServiceProcess::check_running)
    }

    /// Resolves, with the reason, once any process has exited.
    pub async fn watch(&mut self) -> String {
        loop {
            if let Err(error) = self.check_running() {
                return error;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last `lines` lines every service logged, each labelled, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        self.services().map(|process| process.tail(lines)).collect()
    }

    /// Stops the services (SIGTERM, all at once, each given [`GRACE`] to exit 0), then a
    /// single nats-server the same way, which they need while they shut down, and removes
    /// the temporary directory. A cluster is killed instead (SIGKILL), as the benchmark
    /// always did with its. Reports every process that did not exit cleanly.
    pub async fn shutdown(mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        for process in self.services_mut() {
            if let Err(error) = process.ask_to_stop() {
                problems.push(error);
            }
        }
        for process in self.services_mut() {
            if let Err(error) = process.finish(GRACE).await {
                problems.push(error);
            }
        }
        if let Nats::Single(server) = &mut self.nats
            && let Err(error) = server.terminate(GRACE).await
        {
            problems.push(error);
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().display().to_string();
            if let Err(error) = dir.close() {
                problems.push(format!("removing {path}: {error}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "shutdown was not clean:\n  {}",
                problems.join("\n  ")
            ))
        }
    }
}
