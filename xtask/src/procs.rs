//! Commands run to completion (cargo, go, pip). The long-lived children (nats-server, the
//! services) are testkit's: see `stack.rs` and `testkit::procs`.

use std::fmt;
use std::process::ExitStatus;

use anyhow::Context as _;
use tokio::process::Command;

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
