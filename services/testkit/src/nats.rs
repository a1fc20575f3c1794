//! A real `nats-server` per test: JetStream on a temporary store, random loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running `nats-server`, killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    store: TempDir,
    port: u16,
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
             or set JETCALL_NATS_SERVER to a nats-server >= 2.11"
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
        let store = tempfile::Builder::new()
            .prefix("jetcall-nats-")
            .tempdir()
            .expect("temporary store directory");
        let (child, port) = spawn(store.path(), None);
        Self {
            child: Some(child),
            store,
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store, after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        let (child, _) = spawn(self.store.path(), Some(self.port));
        self.child = Some(child);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(store: &Path, port: Option<u16>) -> (Child, u16) {
    let ports_dir = store.join("ports");
    let _ = std::fs::remove_dir_all(&ports_dir);
    std::fs::create_dir_all(&ports_dir).expect("ports directory");
    let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
    let mut command = Command::new(nats_server_binary());
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port_arg])
        .arg("-sd")
        .arg(store.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(&ports_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    crate::procs::die_with_parent(&mut command);
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("could not start {}: {err}", nats_server_binary().display()));

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(port) = read_ports_file(&ports_dir)
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            return (child, port);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited at start-up with {status}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nats-server did not start within 20 s");
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
