//! A real browser for the tests of a web page: Debian's headless Chromium, driven over
//! WebDriver through its chromedriver, which this harness starts on a free loopback port.
//!
//! Everything the page logs to its console is kept ([`Browser::browser_log`]), so a test ends
//! with [`Browser::assert_no_console_errors`]: an uncaught JavaScript error or a refusal by
//! the Content-Security-Policy fails it. A wait that times out ([`Browser::wait_for`] and the
//! like) panics with what the page showed: its URL, the element's text and that log.
//!
//! The binaries: `JETCALL_CHROMEDRIVER` (set by `cargo xtask test`, which installs Debian's
//! `chromium` and `chromium-driver`) or `chromedriver` on `PATH`; `JETCALL_CHROMIUM` or
//! `/usr/bin/chromium`. A test that needs them fails loudly without them rather than skip.
//!
//! chromedriver is a child of [`crate::procs`], so it dies with the thread that started it:
//! call [`Browser::start`] from the test's own future, not from a spawned task. Dropping the
//! `Browser` ends the session (which closes Chromium) and kills chromedriver's process group.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::procs::{Process, command, log_to};

/// How long the `wait_for` helpers wait before they fail, unless told otherwise
/// ([`Browser::set_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The flags Chromium runs with: headless, no sandbox (tests run as root in CI), nothing that
/// reaches the network on its own, a window of the size the screenshots are taken at.
pub const CHROMIUM_ARGS: [&str; 10] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
];

/// The chromedriver binary: `JETCALL_CHROMEDRIVER` or `chromedriver` on `PATH`.
pub fn chromedriver_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("JETCALL_CHROMEDRIVER") {
        return PathBuf::from(path);
    }
    on_path("chromedriver").unwrap_or_else(|| {
        panic!(
            "chromedriver not found: run the suite with `cargo xtask test`, which installs \
             Debian's chromium and chromium-driver, or `apt-get install chromium \
             chromium-driver`, or set JETCALL_CHROMEDRIVER to a chromedriver"
        )
    })
}

/// The Chromium binary: `JETCALL_CHROMIUM` or `/usr/bin/chromium`.
pub fn chromium_binary() -> PathBuf {
    let path = std::env::var_os("JETCALL_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.is_file(),
        "Chromium not found at {}: run the suite with `cargo xtask test`, which installs \
         Debian's chromium and chromium-driver, or `apt-get install chromium chromium-driver`, \
         or set JETCALL_CHROMIUM to a Chromium binary",
        path.display()
    );
    path
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// One entry of the browser's console, as chromedriver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// `SEVERE`, `WARNING`, `INFO`, `DEBUG`.
    pub level: String,
    /// Where it came from: `javascript` (an uncaught error), `console-api` (`console.*`),
    /// `network` (a failed request), `security` (a CSP violation), ...
    pub source: String,
    pub message: String,
}

impl LogEntry {
    pub fn is_severe(&self) -> bool {
        self.level == "SEVERE"
    }

    fn from_json(entry: &Value) -> Self {
        let text = |key: &str| entry[key].as_str().unwrap_or_default().to_owned();
        Self {
            level: text("level"),
            source: text("source"),
            message: text("message"),
        }
    }
}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} {}] {}", self.level, self.source, self.message)
    }
}

/// chromedriver's legacy `POST /session/{id}/se/log` with `{"type": "browser"}`: the console
/// entries since the last such call.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

/// chromedriver's `POST /session/{id}/goog/cdp/execute`: one Chrome DevTools Protocol command.
#[derive(Debug)]
struct Cdp {
    cmd: &'static str,
    params: Value,
}

impl WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/goog/cdp/execute",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        let body = json!({"cmd": self.cmd, "params": self.params});
        (http::Method::POST, Some(body.to_string()))
    }
}

/// A headless Chromium in a WebDriver session of its own chromedriver; see the module's
/// documentation.
pub struct Browser {
    client: Option<Client>,
    session_id: String,
    driver: Option<Process>,
    driver_addr: SocketAddr,
    /// Chromium's fresh profile, and chromedriver's log: removed when dropped.
    dir: TempDir,
    /// Every console entry read so far: chromedriver hands each one out only once.
    log: Mutex<Vec<LogEntry>>,
    timeout: Duration,
}

impl fmt::Debug for Browser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Browser")
            .field("session_id", &self.session_id)
            .field("driver", &self.driver_addr)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Starts chromedriver on a free loopback port, waits until it is ready, and opens a
    /// session on a fresh headless Chromium; panics, saying why, when it cannot.
    pub async fn start() -> Self {
        let started = Instant::now();
        let driver_binary = chromedriver_binary();
        let chromium = chromium_binary();
        let dir = tempfile::Builder::new()
            .prefix("jetcall-browser-")
            .tempdir()
            .expect("a temporary directory for the browser");
        let driver_log = dir.path().join("chromedriver.log");
        let profile = dir.path().join("profile");

        let mut cmd = command(&driver_binary);
        // Port 0: chromedriver picks a free one and says which in its log, so no other server
        // can take it between our choice and its bind.
        cmd.args(["--port=0", "--allowed-ips=127.0.0.1"]);
        log_to(&mut cmd, &driver_log).unwrap_or_else(|err| panic!("{err}"));
        let mut driver =
            Process::spawn("chromedriver", &mut cmd).unwrap_or_else(|err| panic!("{err}"));

        let port = crate::wait_until(
            &format!(
                "chromedriver ({}) to say which port it listens on",
                driver_binary.display()
            ),
            Duration::from_secs(20),
            || {
                let running = driver
                    .check_running()
                    .map_err(|err| format!("{err}: {}", read_log(&driver_log)));
                let port = std::fs::read_to_string(&driver_log)
                    .ok()
                    .and_then(|text| listening_port(&text));
                async move {
                    running.unwrap_or_else(|err| panic!("{err}"));
                    port
                }
            },
        )
        .await;
        let driver_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let driver_url = format!("http://{driver_addr}");
        let http = reqwest::Client::new();
        crate::wait_until(
            "chromedriver's /status to say ready",
            Duration::from_secs(20),
            || {
                let running = driver
                    .check_running()
                    .map_err(|err| format!("{err}: {}", read_log(&driver_log)));
                let request = http.get(format!("{driver_url}/status")).send();
                async move {
                    running.unwrap_or_else(|err| panic!("{err}"));
                    let status: Value = request.await.ok()?.json().await.ok()?;
                    (status["value"]["ready"] == true).then_some(())
                }
            },
        )
        .await;

        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|&arg| arg.to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium, "args": args}),
        );
        capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = match ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&driver_url)
            .await
        {
            Ok(client) => client,
            Err(err) => panic!(
                "chromedriver could not start Chromium ({}): {err}\nchromedriver's log:\n{}",
                chromium.display(),
                read_log(&driver_log)
            ),
        };
        let session_id = client
            .session_id()
            .await
            .ok()
            .flatten()
            .expect("a new session has an id");
        tracing::info!(
            driver = %driver_addr,
            session = %session_id,
            took_ms = started.elapsed().as_millis() as u64,
            "headless Chromium is up"
        );
        Self {
            client: Some(client),
            session_id,
            driver: Some(driver),
            driver_addr,
            dir,
            log: Mutex::new(Vec::new()),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The fantoccini client, for whatever the helpers here do not cover.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    /// How long the `wait_for` helpers wait from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Opens `url` and waits for its document to load.
    pub async fn goto(&self, url: &str) {
        tracing::debug!(%url, "browser: goto");
        if let Err(err) = self.client().goto(url).await {
            self.fail(&format!("opening {url}: {err}"), None).await;
        }
    }

    /// The page's current URL.
    pub async fn url(&self) -> String {
        self.client()
            .current_url()
            .await
            .map_or_else(|err| format!("(no URL: {err})"), |url| url.to_string())
    }

    /// Waits until an element matching `css` is displayed, and returns it.
    pub async fn wait_for(&self, css: &str) -> Element {
        self.wait_for_element(css, &format!("`{css}` to be displayed"), |_| true)
            .await
            .0
    }

    /// Waits until an element matching `css` is displayed and its text satisfies `check`, and
    /// returns the text.
    pub async fn wait_for_text(&self, css: &str, check: impl Fn(&str) -> bool) -> String {
        self.wait_for_element(
            css,
            &format!("the text of `{css}` to be as expected"),
            check,
        )
        .await
        .1
    }

    /// Waits until no element matching `css` is displayed (none exists, or each is hidden).
    pub async fn wait_for_hidden(&self, css: &str) {
        let deadline = Instant::now() + self.timeout;
        loop {
            let seen = match self.displayed_text(css).await {
                Ok(None) => return,
                Ok(Some(text)) => text,
                // Replaced while it was looked at: look again.
                Err(err) => format!("(unreadable: {err})"),
            };
            if Instant::now() >= deadline {
                self.fail(
                    &format!(
                        "timed out after {:?} waiting for `{css}` to be hidden",
                        self.timeout
                    ),
                    Some(&seen),
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether an element matching `css` is displayed now.
    pub async fn is_displayed(&self, css: &str) -> bool {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.displayed_text(css).await {
                Ok(shown) => return shown.is_some(),
                Err(err) if Instant::now() >= deadline => {
                    self.fail(&format!("looking for `{css}`: {err}"), None)
                        .await;
                }
                // An element the page replaced between finding and asking: ask again.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The text of the first displayed element matching `css`, `None` when none is; an error
    /// when the page changed under the question (an element found, then replaced).
    async fn displayed_text(&self, css: &str) -> Result<Option<String>, String> {
        let elements = self
            .client()
            .find_all(Locator::Css(css))
            .await
            .map_err(|err| err.to_string())?;
        for element in elements {
            if element
                .is_displayed()
                .await
                .map_err(|err| err.to_string())?
            {
                let text = element.text().await.map_err(|err| err.to_string())?;
                return Ok(Some(text));
            }
        }
        Ok(None)
    }

    /// The elements matching `css` now, displayed or not.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        self.client()
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
    }

    /// Waits for `css` to be displayed and clicks it, as a person would (the element must be
    /// interactable: shown, enabled, not covered).
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + self.timeout;
        loop {
            let element = self.wait_for(css).await;
            match element.click().await {
                Ok(()) => return,
                // A dialog still opening, a button not enabled yet: try again until the timeout.
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!(%css, error = %err, "browser: click refused, retrying");
                }
                Err(err) => {
                    self.fail(&format!("clicking `{css}`: {err}"), None).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the input `css`, empties it and types `text` into it.
    pub async fn fill(&self, css: &str, text: &str) {
        let element = self.wait_for(css).await;
        let typed = async {
            element.clear().await?;
            element.send_keys(text).await
        };
        if let Err(err) = typed.await {
            self.fail(&format!("typing into `{css}`: {err}"), None)
                .await;
        }
    }

    /// Gives the page a screen of `width`×`height` CSS pixels: the window is resized and the
    /// device metrics set to match (a desktop window cannot be made as narrow as a phone).
    /// Below 600 px wide the device is a phone's (`mobile`), whose layout viewport is 980 px
    /// unless the page says `<meta name="viewport" content="width=device-width">`, as on a
    /// real phone: [`Browser::viewport`] then tells whether the page is laid out for it.
    pub async fn set_window_size(&self, width: u32, height: u32) {
        if let Err(err) = self.client().set_window_size(width, height).await {
            self.fail(
                &format!("resizing the window to {width}×{height}: {err}"),
                None,
            )
            .await;
        }
        let metrics = Cdp {
            cmd: "Emulation.setDeviceMetricsOverride",
            params: json!({
                "width": width,
                "height": height,
                "deviceScaleFactor": 1,
                "mobile": width < 600,
            }),
        };
        if let Err(err) = self.client().issue_cmd(metrics).await {
            self.fail(
                &format!("setting the viewport to {width}×{height}: {err}"),
                None,
            )
            .await;
        }
    }

    /// The viewport's size in CSS pixels, as the page sees it.
    pub async fn viewport(&self) -> (u64, u64) {
        let size = self
            .client()
            .execute("return [window.innerWidth, window.innerHeight];", vec![])
            .await
            .unwrap_or(Value::Null);
        (
            size[0].as_u64().unwrap_or_default(),
            size[1].as_u64().unwrap_or_default(),
        )
    }

    /// A PNG of the viewport, written to `path` (its directory is created) and returned.
    pub async fn screenshot(&self, path: &Path) -> Vec<u8> {
        let png = self.screenshot_png().await;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|err| panic!("creating {}: {err}", dir.display()));
        }
        std::fs::write(path, &png)
            .unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
        tracing::info!(path = %path.display(), bytes = png.len(), "browser: screenshot");
        png
    }

    /// A PNG of the viewport, kept in memory.
    pub async fn screenshot_png(&self) -> Vec<u8> {
        match self.client().screenshot().await {
            Ok(png) => png,
            Err(err) => {
                self.fail(&format!("taking a screenshot: {err}"), None)
                    .await
            }
        }
    }

    /// Every console entry of the browser so far (each page it opened), oldest first.
    pub async fn browser_log(&self) -> Vec<LogEntry> {
        match self.client().issue_cmd(BrowserLog).await {
            Ok(Value::Array(entries)) => {
                let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                for entry in &entries {
                    let entry = LogEntry::from_json(entry);
                    tracing::debug!(%entry, "browser console");
                    log.push(entry);
                }
            }
            Ok(other) => tracing::warn!(answer = %other, "browser log: not a list"),
            Err(err) => tracing::warn!(error = %err, "browser log: chromedriver refused"),
        }
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fails on any SEVERE console entry: an uncaught JavaScript error, a `console.error`, a
    /// resource that failed to load, a Content-Security-Policy violation.
    pub async fn assert_no_console_errors(&self) {
        self.assert_no_console_errors_but(&[]).await;
    }

    /// As [`Browser::assert_no_console_errors`], except for the failed requests the test
    /// caused on purpose: a SEVERE entry from the `network` source whose message contains
    /// every part of one of `expected` (e.g. `&["/api/v1/whoami", "401"]`) is excused.
    pub async fn assert_no_console_errors_but(&self, expected: &[&[&str]]) {
        let log = self.browser_log().await;
        let errors: Vec<&LogEntry> = log
            .iter()
            .filter(|entry| entry.is_severe())
            .filter(|entry| {
                !(entry.source == "network"
                    && expected
                        .iter()
                        .any(|parts| parts.iter().all(|part| entry.message.contains(part))))
            })
            .collect();
        if !errors.is_empty() {
            let list = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  ");
            panic!(
                "the browser's console has {} error(s) (at {}):\n  {list}",
                errors.len(),
                self.url().await
            );
        }
    }

    /// Ends the session (Chromium exits) and stops chromedriver, reporting nothing: what
    /// dropping does, awaited.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take()
            && let Err(err) = client.close().await
        {
            tracing::warn!(error = %err, "browser: closing the session");
        }
        // Drop kills what is left.
    }

    async fn wait_for_element(
        &self,
        css: &str,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> (Element, String) {
        let deadline = Instant::now() + self.timeout;
        let mut last_text: Option<String> = None;
        loop {
            if let Ok(elements) = self.client().find_all(Locator::Css(css)).await {
                for element in elements {
                    if !element.is_displayed().await.unwrap_or(false) {
                        continue;
                    }
                    let text = element.text().await.unwrap_or_default();
                    if check(&text) {
                        return (element, text);
                    }
                    last_text = Some(text);
                }
            }
            if Instant::now() >= deadline {
                self.fail(
                    &format!("timed out after {:?} waiting for {what}", self.timeout),
                    Some(
                        last_text
                            .as_deref()
                            .unwrap_or("(no such element displayed)"),
                    ),
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics with `what` and what the page shows: its URL, `text` (an element's), the
    /// browser's console and chromedriver's log's end.
    async fn fail(&self, what: &str, text: Option<&str>) -> ! {
        let url = self.url().await;
        let log = self
            .browser_log()
            .await
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ");
        let text = text.map_or_else(String::new, |text| format!("\nelement's text: {text:?}"));
        panic!("browser: {what}\nat: {url}{text}\nbrowser console:\n  {log}");
    }

    /// Ends the session with a plain blocking request: `Drop` has no runtime to await on, and
    /// chromedriver must close Chromium before it is killed.
    fn delete_session_now(&self) {
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.session_id, self.driver_addr
        );
        let Ok(mut stream) = TcpStream::connect_timeout(&self.driver_addr, Duration::from_secs(1))
        else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(request.as_bytes()).is_ok() {
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The client's own task would end the session too, later, racing the kill below.
        if self.client.take().is_some() {
            self.delete_session_now();
        }
        if let Some(mut driver) = self.driver.take() {
            // chromedriver is unreaped until `kill` below, so its group id is still ours:
            // whatever Chromium left behind in the group goes with it.
            kill_group(driver.pid());
            driver.kill();
        }
    }
}

/// SIGKILL to the process group `pgid` (a child of ours that leads its own group).
#[allow(unsafe_code)] // std can signal a child only, not its group.
fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; `pgid` is the pid of an unreaped
    // child of ours that leads its own process group, so the group is that child's.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// The port in chromedriver's "ChromeDriver was started successfully on port N." line.
fn listening_port(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|line| line.split("started successfully on port ").nth(1))
        .and_then(|rest| rest.trim().trim_end_matches('.').parse().ok())
}

fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::http::header;
    use axum::response::IntoResponse;
    use axum::routing::get;

    use super::{Browser, listening_port};

    const CSP: &str =
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:";

    fn page(body: &'static str) -> impl IntoResponse {
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CONTENT_SECURITY_POLICY, CSP),
            ],
            body,
        )
    }

    fn script(text: &'static str) -> impl IntoResponse {
        ([(header::CONTENT_TYPE, "text/javascript")], text)
    }

    /// A page that counts clicks and echoes what is typed, one that throws, and one whose
    /// inline script the CSP refuses.
    async fn site() -> String {
        let app = Router::new()
            .route(
                "/",
                get(|| async {
                    page(
                        "<!doctype html><html><head><title>t</title>\
                         <meta name=\"viewport\" content=\"width=device-width\">\
                         <link rel=\"icon\" href=\"data:,\">\
                         <script src=\"/app.js\" defer></script></head><body>\
                         <p id=\"late\" hidden>ready</p>\
                         <button id=\"more\">more</button><output id=\"count\">0</output>\
                         <input id=\"name\" value=\"old\"><output id=\"echo\"></output>\
                         </body></html>",
                    )
                }),
            )
            .route(
                "/app.js",
                get(|| async {
                    script(
                        "const late = document.getElementById('late');\n\
                         setTimeout(() => { late.hidden = false; }, 300);\n\
                         let n = 0;\n\
                         document.getElementById('more').addEventListener('click', () => {\n\
                           n += 1; document.getElementById('count').textContent = String(n);\n\
                         });\n\
                         document.getElementById('name').addEventListener('input', (e) => {\n\
                           document.getElementById('echo').textContent = e.target.value;\n\
                         });\n\
                         console.info('app ready');\n",
                    )
                }),
            )
            .route(
                "/broken",
                get(|| async {
                    page(
                        "<!doctype html><html><head><link rel=\"icon\" href=\"data:,\">\
                         <script src=\"/broken.js\"></script></head><body><p id=\"x\">x</p></body></html>",
                    )
                }),
            )
            .route(
                "/broken.js",
                get(|| async { script("undefinedFunctionOfTheTest();\n") }),
            )
            .route(
                "/inline",
                get(|| async {
                    page(
                        "<!doctype html><html><head><link rel=\"icon\" href=\"data:,\"></head><body>\
                         <p id=\"x\">x</p><script>document.title = 'ran';</script></body></html>",
                    )
                }),
            );
        let addr = crate::serve(app, "the browser test's site").await;
        format!("http://{addr}")
    }

    #[test]
    fn reads_chromedrivers_port() {
        let log = "Starting ChromeDriver 156.0 on port 0\nOnly local connections are allowed.\n\
                   ChromeDriver was started successfully on port 40505.\n";
        assert_eq!(listening_port(log), Some(40505));
        assert_eq!(listening_port("Starting ChromeDriver"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drives_a_page_and_reports_its_console() {
        crate::init_logs();
        let site = site().await;
        let mut browser = Browser::start().await;
        browser.set_timeout(Duration::from_secs(10));

        browser.goto(&format!("{site}/")).await;
        assert_eq!(
            browser.wait_for_text("#late", |t| t == "ready").await,
            "ready"
        );
        browser.click("#more").await;
        browser.click("#more").await;
        browser.wait_for_text("#count", |t| t == "2").await;
        browser.fill("#name", "Chromium").await;
        browser.wait_for_text("#echo", |t| t == "Chromium").await;
        assert!(!browser.is_displayed("#nothing").await);

        browser.set_window_size(390, 844).await;
        assert_eq!(browser.viewport().await, (390, 844));
        browser.set_window_size(1280, 800).await;
        assert_eq!(browser.viewport().await, (1280, 800));
        let png = browser.screenshot_png().await;
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let log = browser.browser_log().await;
        assert!(
            log.iter().any(|entry| entry.message.contains("app ready")),
            "console.info is logged: {log:?}"
        );
        browser.assert_no_console_errors().await;

        // An uncaught error is reported, so the assertion above can fail.
        browser.goto(&format!("{site}/broken")).await;
        browser.wait_for("#x").await;
        let log = browser.browser_log().await;
        assert!(
            log.iter().any(|entry| entry.is_severe()
                && entry.source == "javascript"
                && entry.message.contains("undefinedFunctionOfTheTest")),
            "{log:?}"
        );
        let failed = tokio::spawn(async move {
            browser.assert_no_console_errors().await;
            browser
        })
        .await;
        assert!(failed.is_err(), "the error fails the assertion");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_a_csp_violation_and_times_out_with_the_page() {
        crate::init_logs();
        let site = site().await;
        let mut browser = Browser::start().await;
        browser.set_timeout(Duration::from_millis(500));

        browser.goto(&format!("{site}/inline")).await;
        browser.wait_for("#x").await;
        let title = browser.client().title().await.expect("the title");
        assert_ne!(title, "ran", "the CSP refuses the inline script");
        let log = browser.browser_log().await;
        assert!(
            log.iter()
                .any(|entry| entry.is_severe() && entry.message.contains("Content Security Policy")),
            "{log:?}"
        );

        let timed_out = tokio::spawn(async move {
            browser.wait_for_text("#x", |t| t == "y").await;
        })
        .await
        .expect_err("the wait times out");
        let message = timed_out
            .into_panic()
            .downcast::<String>()
            .map(|m| *m)
            .unwrap_or_default();
        assert!(message.contains("/inline"), "{message}");
        assert!(message.contains("\"x\""), "{message}");
        assert!(message.contains("Content Security Policy"), "{message}");
    }
}
