//! Backoff policies as pure functions: the caller supplies the randomness, tests pin it.

use std::time::{Duration, SystemTime};

/// The fraction of a scheduled delay that jitter may take off, so that deliveries failed by
/// one outage do not all come back at the same instant.
const DELIVERY_JITTER: f64 = 0.2;

/// The wait before retry number `retry` (1-based) of a webhook delivery, or `None` when the
/// schedule is used up. `unit` is a random number in `[0, 1)`.
pub fn delivery_delay(schedule: &[Duration], retry: usize, unit: f64) -> Option<Duration> {
    let base = *schedule.get(retry.checked_sub(1)?)?;
    Some(base.mul_f64(1.0 - DELIVERY_JITTER * unit.clamp(0.0, 1.0)))
}

/// The official Anthropic SDKs' backoff before retry number `retry` (1-based):
/// `min(0.5·2^(retry-1), 8)` seconds, less up to 25 % jitter. `unit` is random in `[0, 1)`.
pub fn llm_backoff(retry: u32, unit: f64) -> Duration {
    let exponent = retry.saturating_sub(1).min(16);
    let seconds = (0.5 * f64::from(1u32 << exponent)).min(8.0);
    Duration::from_secs_f64(seconds * (1.0 - 0.25 * unit.clamp(0.0, 1.0)))
}

/// A `Retry-After` header's wait: delay-seconds or an HTTP-date (RFC 9110 §10.2.3). A date in
/// the past means no wait; anything unreadable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_delay_follows_the_schedule_less_jitter() {
        let schedule = [Duration::from_secs(10), Duration::from_secs(60)];
        assert_eq!(
            delivery_delay(&schedule, 1, 0.0),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            delivery_delay(&schedule, 2, 0.5),
            Some(Duration::from_secs(54))
        );
        assert_eq!(delivery_delay(&schedule, 3, 0.0), None);
        assert_eq!(delivery_delay(&schedule, 0, 0.0), None);
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Sun, 29 Nov 2026 10:00:00 GMT").expect("date");
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 29 Nov 2026 10:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Sun, 29 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn llm_backoff_doubles_to_a_cap_of_eight_seconds() {
        let secs = |n| llm_backoff(n, 0.0).as_secs_f64();
        assert_eq!(
            [secs(1), secs(2), secs(3), secs(5), secs(9)],
            [0.5, 1.0, 2.0, 8.0, 8.0]
        );
        assert_eq!(llm_backoff(1, 1.0), Duration::from_millis(375));
    }
}
