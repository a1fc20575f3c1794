//! Child processes: commands run to completion, and long-lived ones that must never
//! outlive xtask.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::process::{Child, Command};

/// A command that ran and exited unsuccessfully. `main` passes its exit code on, so
/// `cargo xtask test` fails the way the `cargo test` inside it did.
#[derive(Debug)]
pub struct Failed {
    what: String,
    status: ExitStatus,
}

impl Failed {
    pub fn exit_code(&self) -> u8 {
        self.status
            .code()
            .and_then(|code| u8::try_from(code).ok())
            .filter(|&code| code != 0)
            .unwrap_or(1)
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.what, self.status)
    }
}

impl std::error::Error for Failed {}

/// Runs `cmd` with the terminal's stdio (its progress is the user's to see) and fails
/// with [`Failed`] unless it exits 0.
pub async fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .await
        .with_context(|| format!("could not start `{what}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failed {
            what: what.to_owned(),
            status,
        }
        .into())
    }
}

/// A long-lived child whose stdout and stderr go to a log file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Dropping the handle on an error path must not leave the process running.
            .kill_on_drop(true)
            // Its own process group keeps the terminal's Ctrl-C away from the children, so
            // xtask alone decides the shutdown order: services first, nats-server last.
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails if the process has already exited: whatever we wait for will never come.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited unexpectedly ({status})", self.name),
            Err(error) => Err(error).with_context(|| format!("checking on {}", self.name)),
        }
    }

    /// Asks the process to shut down; [`Proc::finish`] waits for it.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        // `try_wait` reaps an exited child, after which its pid may belong to someone else,
        // so only a child still running is signalled.
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        match self.child.id() {
            Some(pid) => sigterm(pid).with_context(|| format!("sending SIGTERM to {}", self.name)),
            None => Ok(()),
        }
    }

    /// Waits up to `grace` for the process to exit, then kills it. Anything but a clean
    /// exit 0 is an error: the services promise one on SIGTERM.
    pub async fn finish(&mut self, grace: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                let status = status.with_context(|| format!("waiting for {}", self.name))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(anyhow!("{} exited with {status}", self.name))
                }
            }
            Err(_) => {
                self.child
                    .kill()
                    .await
                    .with_context(|| format!("killing {}", self.name))?;
                bail!(
                    "{} did not exit within {} s of SIGTERM and was killed",
                    self.name,
                    grace.as_secs()
                )
            }
        }
    }

    /// The last `lines` lines of the log, for error reports.
    pub fn log_tail(&self, lines: usize) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), lines),
            Err(error) => format!("(could not read {}: {error})", self.log.display()),
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Makes the kernel send the child SIGTERM when xtask dies, however it dies (even
/// SIGKILL), which neither `kill_on_drop` nor a signal handler can promise.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // `pre_exec` and `prctl` have no safe wrapper in std, tokio or libc.
fn die_with_parent(cmd: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(libc::pid_t::MAX);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl, getppid and building an io::Error from
    // an errno (no allocation) are.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // xtask may have died before prctl took effect; then no signal would ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

#[allow(unsafe_code)] // std and tokio can only send SIGKILL; a graceful stop needs SIGTERM.
fn sigterm(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped
    // child (see `terminate`), so it cannot name another process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a\n", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
