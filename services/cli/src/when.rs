//! Times on the command line: RFC 3339, or a duration before now (`2h` is two hours ago).

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `text` as an RFC 3339 time in UTC, ready for the gateway's query string.
pub fn parse(text: &str, now: OffsetDateTime) -> Result<String, String> {
    at(text, now)?
        .format(&Rfc3339)
        .map_err(|err| format!("`{}`: {err}", text.trim()))
}

/// The moment `text` names, in UTC.
pub fn at(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let text = text.trim();
    let at = match OffsetDateTime::parse(text, &Rfc3339) {
        Ok(at) => at,
        Err(_) => {
            let ago = humantime::parse_duration(text).map_err(|_| {
                format!(
                    "`{text}` is neither an RFC 3339 time (2026-11-29T10:00:00Z) nor a duration before now (2h, 30m)"
                )
            })?;
            time::Duration::try_from(ago)
                .ok()
                .and_then(|ago| now.checked_sub(ago))
                .ok_or_else(|| format!("`{text}` reaches too far back"))?
        }
    };
    Ok(at.to_offset(time::UtcOffset::UTC))
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-11-29 10:00:00 UTC);

    #[test]
    fn rfc3339_times_are_taken_as_they_are_in_utc() {
        assert_eq!(
            parse("2026-11-29T15:30:00+05:30", NOW).as_deref(),
            Ok("2026-11-29T10:00:00Z")
        );
    }

    #[test]
    fn a_duration_means_that_long_ago() {
        assert_eq!(parse("2h", NOW).as_deref(), Ok("2026-11-29T08:00:00Z"));
        assert_eq!(
            parse("1day 30m", NOW).as_deref(),
            Ok("2026-11-28T09:30:00Z")
        );
    }

    #[test]
    fn anything_else_is_refused_with_examples() {
        let err = parse("yesterday", NOW).expect_err("not a time");
        assert!(err.contains("2026-11-29T10:00:00Z"), "{err}");
    }
}
