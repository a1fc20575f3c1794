//! The one way the harness starts a long-lived child (nats-server, a service binary): for the
//! tests, the fault suite, and `cargo xtask demo | bench` alike.
//!
//! Every such child
//! - gets SIGKILL from the kernel when the *thread* that spawned it exits (PR_SET_PDEATHSIG),
//!   however the parent dies, so a crashed test or an interrupted xtask leaves no server
//!   behind. The signal is tied to the spawning thread, not the process: spawn only from a
//!   thread that lives as long as the child should — a test's own thread, xtask's
//!   single-threaded runtime (see its `main`) — never from `spawn_blocking` or a thread that
//!   retires, or the child dies with it;
//! - runs in a process group of its own, so the terminal's Ctrl-C reaches the parent alone,
//!   which decides the order of the shutdown (xtask: services first, nats-server last, each
//!   with SIGTERM, see [`Process::terminate`]).
//!
//! Why SIGKILL and not SIGTERM: the death signal is the last resort, sent when the parent can
//! no longer order anything. A graceful stop is the parent's job while it lives (the demo's
//! Ctrl-C does that); once it is gone nobody waits for a drain or removes the temporary store,
//! and a child the fault suite froze with SIGSTOP would hold SIGTERM pending for ever.

use std::ffi::OsStr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A [`Command`] for `program` that never outlives its parent and keeps out of the terminal's
/// process group (see the module's documentation); stdin is closed. Set its output, then
/// [`Process::spawn`] it.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    command.stdin(Stdio::null()).process_group(0);
    die_with_parent(&mut command);
    command
}

/// Sends the child's stdout and stderr both to `log`, created afresh.
pub fn log_to(command: &mut Command, log: &std::path::Path) -> Result<(), String> {
    let out =
        std::fs::File::create(log).map_err(|err| format!("creating {}: {err}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|err| format!("duplicating a log file handle: {err}"))?;
    command.stdout(out).stderr(err);
    Ok(())
}

/// Asks Linux to SIGKILL the child when the thread that spawns it exits (see the module's
/// documentation); [`command`] does this, and a test that builds its own command calls it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // `pre_exec` and `prctl` have no safe wrapper in std or libc.
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(libc::pid_t::MAX);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl, getppid and building an io::Error from an
    // errno (no allocation) are; it touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect; then no signal would come.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_command: &mut Command) {}

/// A running child started from [`command`], named for messages. Killed (SIGKILL) and reaped
/// when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self, String> {
        let child = command.spawn().map_err(|err| {
            format!(
                "could not start {name} ({}): {err}",
                command.get_program().to_string_lossy()
            )
        })?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's standard error, once, when it was piped.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Its exit status, once it has exited (and is reaped).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails if the process has already exited: whatever the caller waits for will never come.
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited unexpectedly ({status})", self.name)),
            Err(error) => Err(format!("checking on {}: {error}", self.name)),
        }
    }

    /// Sends `signal` (`libc::SIGSTOP`, ...). The child is not reaped before `kill` or
    /// `terminate` (which check first), so its pid is still its own.
    pub fn signal(&self, signal: libc::c_int) -> Result<(), String> {
        send(self.child.id(), signal)
            .map_err(|err| format!("signal {signal} to {}: {err}", self.name))
    }

    /// SIGKILL, as a crash or the OOM killer would, and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `grace` for the exit (SIGKILL after that). Anything but a
    /// clean exit 0 is an error: the services and nats-server promise one on SIGTERM.
    pub async fn terminate(&mut self, grace: Duration) -> Result<(), String> {
        self.ask_to_stop()?;
        self.finish(grace).await
    }

    /// SIGTERM, unless it has exited already; [`Process::finish`] waits for it.
    pub fn ask_to_stop(&mut self) -> Result<(), String> {
        // An exited child is reaped here, after which its pid may be someone else's: only a
        // child still running is signalled.
        if self.try_wait().is_some() {
            return Ok(());
        }
        send(self.child.id(), libc::SIGTERM)
            .map_err(|err| format!("sending SIGTERM to {}: {err}", self.name))
    }

    /// Waits up to `grace` for the process to exit, then kills it. Anything but a clean
    /// exit 0 is an error.
    pub async fn finish(&mut self, grace: Duration) -> Result<(), String> {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("{} exited with {status}", self.name)),
                Ok(None) => {}
                Err(error) => return Err(format!("waiting for {}: {error}", self.name)),
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "{} did not exit within {} s of SIGTERM and was killed",
                    self.name,
                    grace.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[allow(unsafe_code)] // std can only send SIGKILL; SIGTERM, SIGSTOP and SIGCONT need kill(2).
fn send(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is an unreaped child of
    // ours (see `Process::signal`), so it cannot name another process.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
