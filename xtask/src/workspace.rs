//! Where the workspace, its target directory and the driving `cargo` are.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::process::Command;

#[derive(Debug)]
pub struct Workspace {
    pub root: PathBuf,
    /// Always absolute, so child cargos started from `root` agree with the one that
    /// started us even when the user gave a relative `CARGO_TARGET_DIR`.
    pub target_dir: PathBuf,
    /// The cargo that runs xtask, so a `+nightly` or rustup override carries through.
    cargo: OsString,
}

impl Workspace {
    pub fn locate() -> anyhow::Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => {
                let cwd = std::env::current_dir().context("reading the current directory")?;
                cwd.join(dir)
            }
            _ => root.join("target"),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Ok(Self {
            root,
            target_dir,
            cargo,
        })
    }

    /// Where `go install` puts nats-server and the nats CLI: inside the target directory
    /// so `cargo clean` removes them and nothing outside the checkout is touched.
    pub fn tools_bin(&self) -> PathBuf {
        self.target_dir.join("tools").join("bin")
    }

    /// The Python venv that holds the test tools (schemathesis, nats-py): in the target
    /// directory too.
    pub fn tools_venv(&self) -> PathBuf {
        self.target_dir.join("tools").join("venv")
    }

    pub fn debug_bin(&self, name: &str) -> PathBuf {
        self.target_dir.join("debug").join(name)
    }

    pub fn release_bin(&self, name: &str) -> PathBuf {
        self.target_dir.join("release").join(name)
    }

    /// `cargo <args>` in the workspace root, against the same target directory.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args)
            .current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target_dir);
        // `cargo run` gave xtask its own package's variables. Some build scripts (ring's)
        // watch CARGO_MANIFEST_DIR, so passing them on would make every nested build, and
        // the user's next plain `cargo build`, recompile the TLS stack.
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("CARGO_PKG_") || key_text.starts_with("CARGO_MANIFEST_") {
                cmd.env_remove(&key);
            }
        }
        cmd
    }
}
