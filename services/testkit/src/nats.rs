//! A real `nats-server` per test: JetStream on a temporary store, random loopback ports; or a
//! three-node cluster of them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::procs::{Process, command};

/// A running `nats-server`, killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Process>,
    store: TempDir,
    port: u16,
    options: NatsOptions,
    /// Set by `start_with_config`: the configuration file and the environment it reads.
    configured: Option<Configured>,
}

/// How to run a single `nats-server`: by default the one of [`nats_server_binary`], its
/// output discarded, no monitoring port.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// The server binary; [`nats_server_binary`] when `None`.
    pub binary: Option<PathBuf>,
    /// A file for its standard output and error (`cargo xtask demo` shows it).
    pub log: Option<PathBuf>,
    /// The HTTP monitoring endpoint on a random port (`-m -1`), as the demo has it.
    pub monitoring: bool,
}

impl NatsOptions {
    fn binary(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(nats_server_binary)
    }
}

#[derive(Debug)]
struct Configured {
    file: PathBuf,
    env: Vec<(String, String)>,
}

/// The server binary: `JETCALL_NATS_SERVER` (set by `cargo xtask test`) or `nats-server` on
/// `PATH`. Tests that need it fail loudly without it rather than skip.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("JETCALL_NATS_SERVER") {
        return PathBuf::from(path);
    }
    find_on_path("nats-server").unwrap_or_else(|| {
        panic!(
            "nats-server not found: run the suite with `cargo xtask test`, which installs it, \
             or set JETCALL_NATS_SERVER to a nats-server >= 2.12"
        )
    })
}

/// The `nats` CLI: `JETCALL_NATS_CLI` or `nats` on `PATH`.
pub fn nats_cli_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("JETCALL_NATS_CLI") {
        return PathBuf::from(path);
    }
    find_on_path("nats").unwrap_or_else(|| {
        panic!(
            "the nats CLI was not found: run the suite with `cargo xtask test`, which installs it"
        )
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl NatsServer {
    /// Starts a server on a random port with a fresh store.
    pub fn start() -> Self {
        Self::try_start(NatsOptions::default()).unwrap_or_else(|err| panic!("{err}"))
    }

    /// `start` with `options`, failing with the reason instead of panicking.
    pub fn try_start(options: NatsOptions) -> Result<Self, String> {
        let store = tempfile::Builder::new()
            .prefix("jetcall-nats-")
            .tempdir()
            .map_err(|err| format!("temporary store directory: {err}"))?;
        let (child, port) = spawn(store.path(), None, &options, None)?;
        Ok(Self {
            child: Some(child),
            store,
            port,
            options,
            configured: None,
        })
    }

    /// Starts a server as `start` does (loopback, random port, fresh store, JetStream) with
    /// `config`, nats-server configuration text such as the shipped `nats/accounts.conf`, as
    /// its configuration file, and `env` in its environment for the `$NAME` references the
    /// configuration makes. Its log is kept: see `log`.
    pub fn start_with_config(config: &str, env: &[(&str, &str)]) -> Self {
        let store = tempfile::Builder::new()
            .prefix("jetcall-nats-")
            .tempdir()
            .expect("temporary store directory");
        let file = store.path().join("nats-server.conf");
        std::fs::write(&file, config).expect("write the server configuration");
        let configured = Configured {
            file,
            env: env
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        };
        let options = NatsOptions::default();
        let (child, port) = spawn(store.path(), None, &options, Some(&configured))
            .unwrap_or_else(|err| panic!("{err}"));
        Self {
            child: Some(child),
            store,
            port,
            options,
            configured: Some(configured),
        }
    }

    /// What the server has logged so far; empty unless it was started with
    /// `start_with_config`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats-server.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process, while it runs (for its pid, or to check on it).
    pub fn process(&mut self) -> Option<&mut Process> {
        self.child.as_mut()
    }

    /// SIGSTOP (`true`) or SIGCONT: a frozen server keeps its connections and answers nothing,
    /// so a request to it is in flight for as long as the test wants.
    pub fn freeze(&self, frozen: bool) {
        let Some(child) = &self.child else {
            panic!("nats-server is not running");
        };
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        if let Err(err) = child.signal(signal) {
            panic!("{err}");
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// SIGTERM, and waits up to `grace` for a clean exit: a graceful stop.
    pub async fn terminate(&mut self, grace: Duration) -> Result<(), String> {
        match &mut self.child {
            Some(child) => child.terminate(grace).await,
            None => Ok(()),
        }
    }

    /// Starts the server again on the same port and store, after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        let (child, _) = spawn(
            self.store.path(),
            Some(self.port),
            &self.options,
            self.configured.as_ref(),
        )
        .unwrap_or_else(|err| panic!("{err}"));
        self.child = Some(child);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(
    store: &Path,
    port: Option<u16>,
    options: &NatsOptions,
    configured: Option<&Configured>,
) -> Result<(Process, u16), String> {
    let ports_dir = store.join("ports");
    let _ = std::fs::remove_dir_all(&ports_dir);
    std::fs::create_dir_all(&ports_dir).map_err(|err| format!("ports directory: {err}"))?;
    let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
    let binary = options.binary();
    let mut command = command(&binary);
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port_arg])
        .arg("-sd")
        .arg(store.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(&ports_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if options.monitoring {
        command.args(["-m", "-1"]);
    }
    if let Some(log) = &options.log {
        crate::procs::log_to(&mut command, log)?;
    }
    if let Some(configured) = configured {
        // Flags win over the file, so the address, port and store above still apply.
        command
            .arg("-c")
            .arg(&configured.file)
            .arg("-l")
            .arg(store.join("nats-server.log"))
            .envs(configured.env.iter().map(|(name, value)| (name, value)))
            // What it says before its log is open: why it refuses the configuration.
            .stderr(std::fs::File::create(store.join("nats-server.stderr")).expect("stderr file"));
    }
    let mut child = Process::spawn("nats-server", &mut command)?;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(port) = read_ports_file(&ports_dir)
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            return Ok((child, port));
        }
        if let Some(status) = child.try_wait() {
            let said = [store.join("nats-server.stderr")]
                .into_iter()
                .chain(options.log.clone())
                .map(|file| std::fs::read_to_string(file).unwrap_or_default())
                .collect::<String>();
            return Err(format!(
                "nats-server exited at start-up with {status} {said}"
            ));
        }
        if Instant::now() > deadline {
            child.kill();
            return Err("nats-server did not start within 20 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// nats-server writes `{"nats": ["nats://127.0.0.1:PORT"], ...}` once it listens.
fn read_ports_file(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = ports["nats"].get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

/// How many messages the stream holds on `filter` once it holds at least `at_least`, within
/// 30 s. A service publishes its event just after it writes the status a test waits for, so a
/// count taken at once may miss it; one that goes on past `at_least` is still caught by the
/// caller's equality check.
pub async fn count_at_least(
    stream: &async_nats::jetstream::stream::Stream,
    filter: &str,
    at_least: usize,
) -> usize {
    crate::wait_until(
        &format!("{at_least} messages on {filter}"),
        std::time::Duration::from_secs(30),
        || async {
            let count = count_messages(stream, filter).await;
            (count >= at_least).then_some(count)
        },
    )
    .await
}

/// How many messages the stream holds on subjects matching `filter`.
pub async fn count_messages(stream: &async_nats::jetstream::stream::Stream, filter: &str) -> usize {
    use futures::TryStreamExt;
    let subjects = stream
        .info_with_subjects(filter)
        .await
        .expect("stream info with subjects");
    let counts: Vec<(String, usize)> = subjects.try_collect().await.expect("subject counts");
    counts.into_iter().map(|(_, count)| count).sum()
}

/// A cluster of `nats-server`s on loopback, each with JetStream on its own temporary store,
/// routed to one another: what `nats.replicas = 3` needs. Each node can be killed (SIGKILL)
/// and started again on its own ports and store. Killed when dropped.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes' configurations and stores, removed when dropped.
    _dir: TempDir,
    nodes: Vec<ClusterNode>,
    binary: PathBuf,
}

#[derive(Debug)]
struct ClusterNode {
    name: String,
    port: u16,
    config: PathBuf,
    child: Option<Process>,
}

impl NatsCluster {
    /// Starts `size` nodes named `n1`, `n2`, ... on free loopback ports. Their routes are up
    /// and JetStream elects its meta leader shortly after; a client's first JetStream request
    /// may have to wait for it.
    pub fn start(size: usize) -> Self {
        Self::start_with(nats_server_binary(), size)
    }

    /// `start`, with the nats-server at `binary`.
    pub fn start_with(binary: PathBuf, size: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("jetcall-nats-cluster-")
            .tempdir()
            .expect("temporary cluster directory");
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| (crate::free_port(), crate::free_port()))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, route))| {
                let name = format!("n{}", i + 1);
                let store = dir.path().join(&name);
                let config = dir.path().join(format!("{name}.conf"));
                let text = format!(
                    "server_name: {name}\n\
                     listen: \"127.0.0.1:{port}\"\n\
                     jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                     cluster {{\n  name: jetcall-test\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
                    store = store.display(),
                );
                std::fs::write(&config, text).expect("write a node's configuration");
                ClusterNode {
                    name,
                    port: *port,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self {
            _dir: dir,
            nodes,
            binary,
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut command = command(&self.binary);
        command
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = Process::spawn(&format!("nats-server {}", node.name), &mut command)
            .unwrap_or_else(|err| panic!("{err}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
            if let Some(status) = child.try_wait() {
                panic!("nats-server {} exited at start-up with {status}", node.name);
            }
            if Instant::now() > deadline {
                child.kill();
                panic!("nats-server {} did not start within 20 s", node.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        node.child = Some(child);
    }

    /// Every node's client URL, comma separated: the value for `nats.url`.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node called `name` (`n1`, ...), as a server names itself in stream info.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// SIGKILLs node `i`, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill();
        }
    }

    /// Starts node `i` again on its ports and store, after `kill`.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
