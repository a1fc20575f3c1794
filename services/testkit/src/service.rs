//! A service binary (`gateway`, `generator`, `callback`) as a real child process, for tests
//! that kill it with SIGKILL and start it again: its standard error is kept, line by line,
//! across restarts, so a test can wait for a log line and show the logs when it fails.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

/// Lines kept per service; older ones are dropped.
const KEPT_LINES: usize = 20_000;

/// A service binary of this workspace, built next to the running test executable
/// (`target/<profile>/`). Another crate's binaries have no `CARGO_BIN_EXE_*`, so this is how a
/// test outside the service's crate finds it; `cargo xtask test` builds them first
/// (`cargo build --workspace --bins`). Panics, naming the command, when it is missing.
pub fn service_binary(name: &str) -> PathBuf {
    let test_executable = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = test_executable
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name))
        .expect("the test executable lies in target/<profile>/deps");
    assert!(
        path.is_file(),
        "{} is missing: build the service binaries first with `cargo build --workspace --bins` \
         (`cargo xtask test` does)",
        path.display()
    );
    path
}

#[derive(Debug, Default)]
struct Log {
    lines: VecDeque<String>,
}

/// A running service binary, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: Arc<Mutex<Log>>,
    starts: usize,
}

impl ServiceProcess {
    /// Starts `binary` (see [`service_binary`]) with exactly `env` on top of a cleared
    /// `JETCALL_*` environment; `name` labels its log lines. It dies with the test.
    pub fn start(name: &str, binary: PathBuf, env: Vec<(String, String)>) -> Self {
        let mut service = Self {
            name: name.to_owned(),
            binary,
            env,
            child: None,
            log: Arc::new(Mutex::new(Log::default())),
            starts: 0,
        };
        service.spawn();
        service
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn spawn(&mut self) {
        let mut command = Command::new(&self.binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("JETCALL_") {
                command.env_remove(key);
            }
        }
        command
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        crate::procs::die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", self.binary.display()));
        self.starts += 1;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.log.clone();
        let start = self.starts;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if log.lines.len() >= KEPT_LINES {
                    log.lines.pop_front();
                }
                log.lines.push_back(format!("[start {start}] {line}"));
            }
        });
        self.child = Some(child);
    }

    /// SIGSTOP: the process keeps its sockets, so connections are taken and requests sent,
    /// but answers nothing until it is killed.
    pub fn freeze(&self) {
        let Some(child) = &self.child else {
            panic!("{} is not running", self.name);
        };
        let stopped = Command::new("kill")
            .args(["-STOP", &child.id().to_string()])
            .status();
        assert!(
            stopped.as_ref().is_ok_and(|status| status.success()),
            "SIGSTOP {}: {stopped:?}",
            self.name
        );
    }

    /// SIGKILL, as a crash or the OOM killer would, and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the binary again with the same environment, after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many lines logged so far, across restarts, contain `needle` (of the last
    /// 20,000 kept).
    pub fn count(&self, needle: &str) -> usize {
        self.lock()
            .lines
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The last `n` lines logged, labelled with the service's name.
    pub fn tail(&self, n: usize) -> String {
        let log = self.lock();
        let skip = log.lines.len().saturating_sub(n);
        log.lines
            .iter()
            .skip(skip)
            .map(|line| format!("{}: {line}\n", self.name))
            .collect()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
