//! How long to wait before trying again, as a pure function: the caller supplies the
//! randomness, tests pin it.

use std::time::Duration;

/// Tries at one request (or one reconnection) before giving up: with the waits below, about a
/// minute of an unavailable gateway or NATS.
pub const MAX_TRIES: u32 = 10;

/// The longest wait, whatever the server asks for: a CLI should not look hung.
const CAP: Duration = Duration::from_secs(30);

/// The wait before retry number `retry` (1-based): `0.5·2^(retry-1)` seconds up to 10 s, or
/// the server's `Retry-After` if that is longer, plus up to 25 % jitter (`unit` is random in
/// `[0, 1)`). The jitter only lengthens the wait, so `Retry-After` is always honoured, and it
/// spreads requests that were turned away together so they do not come back together.
pub fn delay(retry: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
    let exponent = retry.saturating_sub(1).min(16);
    let backoff = Duration::from_secs_f64((0.5 * f64::from(1u32 << exponent)).min(10.0));
    let base = backoff.max(retry_after.unwrap_or_default());
    base.mul_f64(1.0 + 0.25 * unit.clamp(0.0, 1.0)).min(CAP)
}

/// `delay` with fresh jitter.
pub fn jittered(retry: u32, retry_after: Option<Duration>) -> Duration {
    delay(retry, retry_after, rand::random())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_to_ten_seconds() {
        let secs = |retry| delay(retry, None, 0.0).as_secs_f64();
        assert_eq!(
            [secs(1), secs(2), secs(3), secs(5), secs(6), secs(40)],
            [0.5, 1.0, 2.0, 8.0, 10.0, 10.0]
        );
        assert_eq!(delay(1, None, 1.0), Duration::from_millis(625));
    }

    #[test]
    fn retry_after_is_honoured_within_a_cap() {
        let after = |secs| Some(Duration::from_secs(secs));
        assert_eq!(delay(1, after(1), 0.0), Duration::from_secs(1));
        assert_eq!(delay(1, after(1), 0.5), Duration::from_millis(1125));
        assert_eq!(delay(4, after(1), 0.0), Duration::from_secs(4));
        assert_eq!(delay(1, after(3600), 0.0), Duration::from_secs(30));
    }
}
