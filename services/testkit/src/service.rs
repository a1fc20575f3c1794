//! A service binary (`gateway`, `generator`, `callback`) as a real child process (started as
//! [`crate::procs`] starts every child), for tests that kill it with SIGKILL and start it
//! again: its standard error is kept, line by line, across restarts, so a test can wait for a
//! log line and show the logs when it fails. `cargo xtask demo | bench` run theirs the same
//! way, with their output in a log file instead ([`Launch::log`]) and a graceful stop
//! ([`ServiceProcess::terminate`]).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::procs::Process;

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

/// How to run a service binary beyond its environment. The default is the tests': the
/// `JETCALL_*` variables of this process cleared, standard error kept in memory.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Keep every variable of this process, `JETCALL_*` ones included (xtask: the user's
    /// settings and `ANTHROPIC_API_KEY` reach the demo's services).
    pub inherit_jetcall_env: bool,
    /// The working directory (the services read `jetcall.toml` from theirs).
    pub dir: Option<PathBuf>,
    /// Standard output and error go to this file (truncated at each start) instead of being
    /// kept in memory; `count` and `tail` read it.
    pub log: Option<PathBuf>,
}

/// A running service binary, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    launch: Launch,
    child: Option<Process>,
    log: Arc<Mutex<Log>>,
    starts: usize,
}

impl ServiceProcess {
    /// Starts `binary` (see [`service_binary`]) with exactly `env` on top of a cleared
    /// `JETCALL_*` environment; `name` labels its log lines. It dies with the test.
    pub fn start(name: &str, binary: PathBuf, env: Vec<(String, String)>) -> Self {
        Self::try_start(name, binary, env, Launch::default()).unwrap_or_else(|err| panic!("{err}"))
    }

    /// `start` as `launch` says, failing with the reason instead of panicking.
    pub fn try_start(
        name: &str,
        binary: PathBuf,
        env: Vec<(String, String)>,
        launch: Launch,
    ) -> Result<Self, String> {
        let mut service = Self {
            name: name.to_owned(),
            binary,
            env,
            launch,
            child: None,
            log: Arc::new(Mutex::new(Log::default())),
            starts: 0,
        };
        service.spawn()?;
        Ok(service)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file, when it was started with one.
    pub fn log_file(&self) -> Option<&std::path::Path> {
        self.launch.log.as_deref()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Process::pid)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut command = crate::procs::command(&self.binary);
        if !self.launch.inherit_jetcall_env {
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("JETCALL_") {
                    command.env_remove(key);
                }
            }
        }
        if let Some(dir) = &self.launch.dir {
            command.current_dir(dir);
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        match &self.launch.log {
            Some(file) => crate::procs::log_to(&mut command, file)?,
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::piped());
            }
        }
        let mut child = Process::spawn(&self.name, &mut command)?;
        self.starts += 1;
        if let Some(stderr) = child.take_stderr() {
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
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGSTOP: the process keeps its sockets, so connections are taken and requests sent,
    /// but answers nothing until it is killed.
    pub fn freeze(&self) {
        let Some(child) = &self.child else {
            panic!("{} is not running", self.name);
        };
        if let Err(err) = child.signal(libc::SIGSTOP) {
            panic!("SIGSTOP {}: {err}", self.name);
        }
    }

    /// SIGKILL, as a crash or the OOM killer would, and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the binary again with the same environment, after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(err) = self.spawn() {
            panic!("{err}");
        }
    }

    /// Fails if the process has exited (or was killed).
    pub fn check_running(&mut self) -> Result<(), String> {
        match &mut self.child {
            Some(child) => child.check_running(),
            None => Err(format!("{} is not running", self.name)),
        }
    }

    /// SIGTERM, and waits up to `grace` for the clean exit 0 every service promises on it.
    pub async fn terminate(&mut self, grace: Duration) -> Result<(), String> {
        self.ask_to_stop()?;
        self.finish(grace).await
    }

    /// SIGTERM, unless it has exited; `finish` waits for it.
    pub fn ask_to_stop(&mut self) -> Result<(), String> {
        match &mut self.child {
            Some(child) => child.ask_to_stop(),
            None => Ok(()),
        }
    }

    /// Waits up to `grace` for the exit after `ask_to_stop` (SIGKILL after that); anything
    /// but exit 0 is an error.
    pub async fn finish(&mut self, grace: Duration) -> Result<(), String> {
        match &mut self.child {
            Some(child) => child.finish(grace).await,
            None => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lines logged so far: across restarts, the last 20,000; from the log file (the
    /// current start's) when there is one.
    fn lines(&self) -> Vec<String> {
        match &self.launch.log {
            Some(file) => std::fs::read(file)
                .map(|bytes| {
                    String::from_utf8_lossy(&bytes)
                        .lines()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            None => self.lock().lines.iter().cloned().collect(),
        }
    }

    /// How many lines logged so far, across restarts, contain `needle` (of the last
    /// 20,000 kept).
    pub fn count(&self, needle: &str) -> usize {
        if self.launch.log.is_some() {
            return self
                .lines()
                .iter()
                .filter(|line| line.contains(needle))
                .count();
        }
        self.lock()
            .lines
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The last `n` lines logged, as they were.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let mut lines = self.lines();
        lines.drain(..lines.len().saturating_sub(n));
        lines
    }

    /// The last `n` lines logged, labelled with the service's name.
    pub fn tail(&self, n: usize) -> String {
        if self.launch.log.is_some() {
            return self
                .last_lines(n)
                .iter()
                .map(|line| format!("{}: {line}\n", self.name))
                .collect();
        }
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
