//! Waiting for something to become true without guessing how long it takes.

use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

/// Short enough that a ready service is noticed at once, long enough not to busy-loop.
const INTERVAL: Duration = Duration::from_millis(50);

/// Calls `probe` until it yields a value, fails, or `timeout` passes.
///
/// `probe` answers `Ok(None)` for "not yet" and `Err` for "this will never happen" (say,
/// the process we wait for has exited), which ends the wait at once.
pub async fn until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        tokio::time::sleep(INTERVAL).await;
    }
}
