//! Finding, or installing (with `go install`, pip into a venv, or apt-get), the tools the demo
//! and tests need: the NATS server and CLI, schemathesis, Python with nats-py, and Chromium
//! with its chromedriver.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail, ensure};
use tokio::process::Command;

use crate::procs;
use crate::workspace::Workspace;

const NATS_SERVER_MODULE: &str = "github.com/nats-io/nats-server/v2@v2.15.2";
const NATS_CLI_MODULE: &str = "github.com/nats-io/natscli/nats@v0.5.0";
/// The API fuzzer the gateway's tests run against `/openapi.json` (its `st` CLI).
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// The NATS client library for Python, which the external-subscriber test uses to consume
/// `jobs.completed.>` with a durable consumer of its own, as another team's service would.
const NATS_PY: &str = "nats-py==2.16.0";

/// The Debian packages of the browser the console's tests drive, and where they put it.
const BROWSER_PACKAGES: [&str; 2] = ["chromium", "chromium-driver"];
const DEBIAN_CHROMIUM: &str = "/usr/bin/chromium";
const DEBIAN_CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The budgets are JetStream counters (`allow_msg_counter`, 2.12); and the callback consumer
/// needs `filter_subjects`, which older servers (Debian ships 2.9) accept and silently ignore.
const MIN_NATS_SERVER: Version = Version(2, 12, 0);

/// nats-server ≥ 2.12: `JETCALL_NATS_SERVER`, else the one `go install` put under the
/// target directory, else `PATH`, else installs the pinned version.
pub async fn nats_server(ws: &Workspace) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("JETCALL_NATS_SERVER") {
        let path = std::path::absolute(&path).context("resolving JETCALL_NATS_SERVER")?;
        let version = server_version(&path)
            .await
            .with_context(|| format!("JETCALL_NATS_SERVER={}", path.display()))?;
        ensure!(
            version >= MIN_NATS_SERVER,
            "JETCALL_NATS_SERVER={} is nats-server v{version}; v{MIN_NATS_SERVER} or newer is needed",
            path.display()
        );
        announce("nats-server", &path, &format!("v{version}"));
        return Ok(path);
    }
    let candidates = [
        Some(ws.tools_bin().join("nats-server")),
        on_path("nats-server"),
    ];
    for path in candidates.into_iter().flatten().filter(|p| p.is_file()) {
        match server_version(&path).await {
            Ok(version) if version >= MIN_NATS_SERVER => {
                announce("nats-server", &path, &format!("v{version}"));
                return Ok(path);
            }
            Ok(version) => println!(
                "==> {} is nats-server v{version}, older than v{MIN_NATS_SERVER} (it would \
                 ignore the callback consumer's filter_subjects): not using it",
                path.display()
            ),
            Err(error) => println!("==> not using {}: {error:#}", path.display()),
        }
    }
    let path = go_install(ws, NATS_SERVER_MODULE, "nats-server", "nats-server ≥ 2.12").await?;
    let version = server_version(&path).await?;
    ensure!(
        version >= MIN_NATS_SERVER,
        "`go install {NATS_SERVER_MODULE}` produced nats-server v{version}"
    );
    announce("nats-server", &path, &format!("v{version}"));
    Ok(path)
}

/// The `nats` CLI, any version: `JETCALL_NATS_CLI`, the target directory, `PATH`, else
/// installs the pinned version.
pub async fn nats_cli(ws: &Workspace) -> anyhow::Result<PathBuf> {
    let installed = ws.tools_bin().join("nats");
    let path = if let Some(path) = std::env::var_os("JETCALL_NATS_CLI") {
        let path = std::path::absolute(&path).context("resolving JETCALL_NATS_CLI")?;
        ensure!(
            path.is_file(),
            "JETCALL_NATS_CLI={} does not exist",
            path.display()
        );
        path
    } else if installed.is_file() {
        installed
    } else if let Some(path) = on_path("nats") {
        path
    } else {
        go_install(ws, NATS_CLI_MODULE, "nats", "the nats CLI").await?
    };
    let version = version_output(&path).await?;
    announce("nats CLI", &path, &version);
    Ok(path)
}

/// Schemathesis, from PyPI, whose `st` the gateway's tests run against `/openapi.json`:
/// `JETCALL_SCHEMATHESIS`, else the pinned version in a venv under the target directory,
/// installed there with pip when missing or of another version.
pub async fn schemathesis(ws: &Workspace) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("JETCALL_SCHEMATHESIS") {
        let path = std::path::absolute(&path).context("resolving JETCALL_SCHEMATHESIS")?;
        let version = version_output(&path)
            .await
            .with_context(|| format!("JETCALL_SCHEMATHESIS={}", path.display()))?;
        announce("schemathesis", &path, &version);
        return Ok(path);
    }
    let venv = ws.tools_venv();
    let st = venv.join("bin").join("st");
    let wanted = SCHEMATHESIS.split("==").nth(1).unwrap_or(SCHEMATHESIS);
    if st.is_file() {
        match version_output(&st).await {
            Ok(version) if version.ends_with(wanted) => {
                announce("schemathesis", &st, &version);
                return Ok(st);
            }
            Ok(version) => println!(
                "==> {} is {version}, not {wanted}: reinstalling",
                st.display()
            ),
            Err(error) => println!("==> not using {}: {error:#}", st.display()),
        }
    }
    let pip = venv_pip(ws, "schemathesis", "JETCALL_SCHEMATHESIS to an `st` binary").await?;
    println!(
        "==> installing {SCHEMATHESIS} into {} (pip: about half a minute)",
        venv.display()
    );
    let mut cmd = Command::new(&pip);
    cmd.args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        SCHEMATHESIS,
    ]);
    procs::run(&mut cmd, &format!("pip install {SCHEMATHESIS}")).await?;
    let version = version_output(&st).await?;
    ensure!(
        version.ends_with(wanted),
        "`pip install {SCHEMATHESIS}` produced `{version}`"
    );
    announce("schemathesis", &st, &version);
    Ok(st)
}

/// A Python with nats-py, for the test whose subscriber is written against another client
/// library: `JETCALL_PYTHON`, else the venv's Python with the pinned nats-py, installed there
/// with pip when missing or of another version.
pub async fn python_with_nats_py(ws: &Workspace) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("JETCALL_PYTHON") {
        let path = std::path::absolute(&path).context("resolving JETCALL_PYTHON")?;
        let version = nats_py_version(&path)
            .await
            .with_context(|| format!("JETCALL_PYTHON={}", path.display()))?;
        announce("Python with nats-py", &path, &version);
        return Ok(path);
    }
    let python = ws.tools_venv().join("bin").join("python");
    let wanted = NATS_PY.split("==").nth(1).unwrap_or(NATS_PY);
    if python.is_file() {
        match nats_py_version(&python).await {
            Ok(version) if version == wanted => {
                announce("Python with nats-py", &python, &version);
                return Ok(python);
            }
            Ok(version) => {
                println!("==> nats-py {version} in the venv, not {wanted}: reinstalling")
            }
            Err(error) => println!("==> {}: {error:#}: installing it", python.display()),
        }
    }
    let pip = venv_pip(ws, "nats-py", "JETCALL_PYTHON to a Python with nats-py").await?;
    println!(
        "==> installing {NATS_PY} into {}",
        ws.tools_venv().display()
    );
    let mut cmd = Command::new(&pip);
    cmd.args(["install", "--quiet", "--disable-pip-version-check", NATS_PY]);
    procs::run(&mut cmd, &format!("pip install {NATS_PY}")).await?;
    let version = nats_py_version(&python).await?;
    ensure!(
        version == wanted,
        "`pip install {NATS_PY}` produced nats-py {version}"
    );
    announce("Python with nats-py", &python, &version);
    Ok(python)
}

/// Chromium and its chromedriver, for the console's browser tests (`testkit::Browser`):
/// `JETCALL_CHROMIUM` and `JETCALL_CHROMEDRIVER`, else `chromium` and `chromedriver` on `PATH`,
/// else Debian's packages, installed with apt-get (as root, or through `sudo -n`). A
/// chromedriver drives only the Chromium of its own major version, so the two must agree.
pub async fn chromium_and_chromedriver() -> anyhow::Result<(PathBuf, PathBuf)> {
    let chromium = browser_tool("JETCALL_CHROMIUM", "chromium").await?;
    let chromedriver = browser_tool("JETCALL_CHROMEDRIVER", "chromedriver").await?;
    let (chromium, chromedriver) = match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => (chromium, chromedriver),
        (chromium, chromedriver) => {
            apt_install(
                &BROWSER_PACKAGES,
                "JETCALL_CHROMIUM and JETCALL_CHROMEDRIVER",
            )
            .await?;
            let installed = |path: &str| {
                let path = PathBuf::from(path);
                ensure!(
                    path.is_file(),
                    "`apt-get install {}` succeeded but {} is missing",
                    BROWSER_PACKAGES.join(" "),
                    path.display()
                );
                Ok(path)
            };
            (
                chromium.map_or_else(|| installed(DEBIAN_CHROMIUM), Ok)?,
                chromedriver.map_or_else(|| installed(DEBIAN_CHROMEDRIVER), Ok)?,
            )
        }
    };
    let browser_version = version_output(&chromium).await?;
    let driver_version = version_output(&chromedriver).await?;
    let major = |text: &str| Version::parse(text).map(|Version(major, ..)| major);
    ensure!(
        major(&browser_version) == major(&driver_version),
        "{} is `{browser_version}` but {} is `{driver_version}`: a chromedriver drives only the \
         Chromium of its own major version (Debian's chromium and chromium-driver packages \
         always agree)",
        chromium.display(),
        chromedriver.display()
    );
    announce("Chromium", &chromium, version_word(&browser_version));
    announce("chromedriver", &chromedriver, version_word(&driver_version));
    Ok((chromium, chromedriver))
}

/// The browser tool named by `env` (which must exist) or `name` on `PATH`; `None` when
/// neither, for apt-get to install.
async fn browser_tool(env: &str, name: &str) -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = std::env::var_os(env) {
        let path = std::path::absolute(&path).with_context(|| format!("resolving {env}"))?;
        ensure!(path.is_file(), "{env}={} does not exist", path.display());
        return Ok(Some(path));
    }
    Ok(on_path(name))
}

/// `apt-get install -y --no-install-recommends <packages>`, as root or through `sudo -n`;
/// after an `apt-get update` when the first try fails (a fresh machine has no package lists).
/// `instead` names the variables that spare the install, for the error when it cannot run.
async fn apt_install(packages: &[&str], instead: &str) -> anyhow::Result<()> {
    let wanted = packages.join(" ");
    let cannot = |why: &str| {
        anyhow!(
            "{wanted} not found, and {why}: install them (on Debian, as root: `apt-get install \
             -y --no-install-recommends {wanted}`), or set {instead}"
        )
    };
    if on_path("apt-get").is_none() {
        return Err(cannot("apt-get is not here to install them"));
    }
    let sudo = if effective_uid()? == 0 {
        None
    } else {
        let Some(sudo) = on_path("sudo") else {
            return Err(cannot("we are not root and there is no sudo"));
        };
        let allowed = Command::new(&sudo)
            .args(["-n", "true"])
            .output()
            .await
            .is_ok_and(|output| output.status.success());
        if !allowed {
            return Err(cannot(
                "we are not root and `sudo -n` (without a password) is not allowed",
            ));
        }
        Some(sudo)
    };
    let apt_get = |args: &[&str]| {
        let mut cmd = match &sudo {
            Some(sudo) => {
                let mut cmd = Command::new(sudo);
                // sudo resets the environment; `env` sets the one variable apt needs.
                cmd.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
                cmd
            }
            None => {
                let mut cmd = Command::new("apt-get");
                cmd.env("DEBIAN_FRONTEND", "noninteractive");
                cmd
            }
        };
        cmd.args(args);
        cmd
    };
    let install: Vec<&str> = ["install", "-y", "--no-install-recommends"]
        .into_iter()
        .chain(packages.iter().copied())
        .collect();
    let line = format!(
        "{}apt-get {}",
        if sudo.is_some() { "sudo -n " } else { "" },
        install.join(" ")
    );
    println!("==> installing {wanted}: {line}");
    if procs::run(&mut apt_get(&install), &line).await.is_ok() {
        return Ok(());
    }
    println!("==> `{line}` failed: updating the package lists and trying again");
    procs::run(&mut apt_get(&["update"]), "apt-get update").await?;
    procs::run(&mut apt_get(&install), &line).await
}

/// This process's effective user id, from `/proc/self/status` (Linux).
fn effective_uid() -> anyhow::Result<u32> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("no effective user id in /proc/self/status")
}

/// The version in a `--version` line: `156.0.8078.114` of `Chromium 156.0.8078.114 built on
/// Debian`; the whole line when no word starts with a digit.
fn version_word(text: &str) -> &str {
    text.split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or(text)
}

/// The version of nats-py that `python` imports.
async fn nats_py_version(python: &Path) -> anyhow::Result<String> {
    let output = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata, nats; print(importlib.metadata.version('nats-py'))",
        ])
        .output()
        .await
        .with_context(|| format!("running {}", python.display()))?;
    // The traceback's last line says what is wrong ("No module named 'nats'", ...).
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "it has no nats-py ({})",
        stderr.lines().last().unwrap_or_default().trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The pip of the tools' venv, creating the venv with `python3 -m venv` when missing. `what`
/// and `instead` go into the error when there is no python3.
async fn venv_pip(ws: &Workspace, what: &str, instead: &str) -> anyhow::Result<PathBuf> {
    let venv = ws.tools_venv();
    let pip = venv.join("bin").join("pip");
    if pip.is_file() {
        return Ok(pip);
    }
    let Some(python) = on_path("python3") else {
        bail!(
            "{what} not found and python3 is not installed: install Python 3 (with its venv \
             module), or set {instead}"
        );
    };
    println!("==> creating a Python venv in {}", venv.display());
    let mut cmd = Command::new(&python);
    cmd.arg("-m").arg("venv").arg(&venv);
    procs::run(
        &mut cmd,
        "python3 -m venv (on Debian: apt-get install python3-venv)",
    )
    .await?;
    Ok(pip)
}

fn announce(tool: &str, path: &Path, version: &str) {
    println!("==> {tool} {version}: {}", path.display());
}

async fn go_install(
    ws: &Workspace,
    module: &str,
    binary: &str,
    wanted: &str,
) -> anyhow::Result<PathBuf> {
    let Some(go) = on_path("go") else {
        let releases = match binary {
            "nats-server" => "https://github.com/nats-io/nats-server/releases",
            _ => "https://github.com/nats-io/natscli/releases",
        };
        bail!(
            "{wanted} not found and Go is not installed: install Go (https://go.dev/dl) or \
             put {wanted} on PATH ({releases})"
        );
    };
    let bin = ws.tools_bin();
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    println!(
        "==> installing {module} into {} (go install: about a minute the first time)",
        bin.display()
    );
    let mut cmd = Command::new(go);
    cmd.args(["install", module])
        .env("GOBIN", &bin)
        // A static binary needs no C compiler and runs on any Linux.
        .env("CGO_ENABLED", "0");
    procs::run(&mut cmd, &format!("go install {module}")).await?;
    let path = bin.join(binary);
    ensure!(
        path.is_file(),
        "`go install {module}` succeeded but {} is missing",
        path.display()
    );
    Ok(path)
}

/// The first executable file called `name` in `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| {
            file.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

async fn server_version(path: &Path) -> anyhow::Result<Version> {
    let output = version_output(path).await?;
    Version::parse(&output).ok_or_else(|| anyhow!("no version in `{output}`"))
}

/// The trimmed output of `<path> --version`.
async fn version_output(path: &Path) -> anyhow::Result<String> {
    let output = Command::new(path)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("running {} --version", path.display()))?;
    ensure!(
        output.status.success(),
        "{} --version failed ({})",
        path.display(),
        output.status
    );
    // The nats CLI has printed its version to stderr in some releases.
    let text = if output.stdout.is_empty() {
        output.stderr
    } else {
        output.stdout
    };
    Ok(String::from_utf8_lossy(&text).trim().to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Version(u32, u32, u32);

impl Version {
    /// Reads the first `vX.Y.Z` (or `X.Y.Z`) in `nats-server --version` output such as
    /// `nats-server: v2.15.2`; a suffix like `-beta.1` is ignored.
    fn parse(text: &str) -> Option<Self> {
        let word = text
            .split_whitespace()
            .map(|w| w.strip_prefix('v').unwrap_or(w))
            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
        let mut parts = word.split('.').map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = parts.next()??;
        let minor = parts.next().flatten().unwrap_or(0);
        let patch = parts.next().flatten().unwrap_or(0);
        Some(Self(major, minor, patch))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::{MIN_NATS_SERVER, Version, effective_uid, version_word};

    #[test]
    fn reads_the_browsers_versions() {
        let chromium = "Chromium 156.0.8078.114 built on Debian GNU/Linux 12 (bookworm)";
        let driver = "ChromeDriver 156.0.8078.114 (ea19f9737303a76e07b53c6a1eec43355aca3b1d)";
        assert_eq!(version_word(chromium), "156.0.8078.114");
        assert_eq!(version_word(driver), "156.0.8078.114");
        assert_eq!(version_word("ChromeDriver"), "ChromeDriver");
        assert_eq!(Version::parse(chromium), Some(Version(156, 0, 8078)));
        assert_eq!(Version::parse(driver), Some(Version(156, 0, 8078)));
    }

    #[test]
    fn knows_who_it_runs_as() {
        use std::os::unix::fs::MetadataExt as _;
        // `/proc/self` belongs to the process's effective user.
        let owner = std::fs::metadata("/proc/self").expect("/proc/self").uid();
        assert_eq!(effective_uid().expect("an effective uid"), owner);
    }

    #[test]
    fn parses_nats_server_version_output() {
        assert_eq!(
            Version::parse("nats-server: v2.15.2"),
            Some(Version(2, 15, 2))
        );
        assert_eq!(
            Version::parse("nats-server: v2.12.0-beta.3"),
            Some(Version(2, 12, 0))
        );
        assert_eq!(Version::parse("2.10.1"), Some(Version(2, 10, 1)));
        assert_eq!(Version::parse("nats-server: unknown"), None);
    }

    #[test]
    fn minimum_version_rejects_debians_server() {
        assert!(Version(2, 9, 25) < MIN_NATS_SERVER);
        assert!(Version(2, 10, 29) < MIN_NATS_SERVER);
        assert!(Version(2, 11, 9) < MIN_NATS_SERVER, "no counters");
        assert!(Version(2, 12, 0) >= MIN_NATS_SERVER);
        assert!(Version(2, 15, 2) >= MIN_NATS_SERVER);
    }
}
