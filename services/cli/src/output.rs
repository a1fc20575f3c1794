//! Writing to the terminal: lines on stdout, times and durations for people, aligned tables.

use std::fmt::Display;
use std::io::Write;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Prints a line on stdout. A closed stdout (`jetcall list | head`) ends nothing important,
/// so a failed write is ignored rather than a panic.
pub fn line(text: impl Display) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// Prints a note for people on stderr, out of the way of what a script reads.
pub fn note(text: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// A time in UTC to the second, RFC 3339: `2026-11-29T10:00:05Z`.
pub fn time(at: OffsetDateTime) -> String {
    let at = at
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(at);
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// An RFC 3339 time from the gateway, shown as `time` shows it; anything else as it is.
pub fn time_text(text: &str) -> String {
    OffsetDateTime::parse(text, &Rfc3339).map_or_else(|_| text.to_owned(), time)
}

/// `1 attempt`, `2 attempts`.
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Text on one line, at most `max` characters, with `…` when cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > max {
        line.chars().take(max).chain(['…']).collect()
    } else {
        line
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|header| (*header).to_owned()).collect();
    std::iter::once(&header)
        .chain(rows)
        .map(|row| {
            let last = row.len().saturating_sub(1);
            row.iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, width))| {
                    if i == last {
                        cell.clone()
                    } else {
                        format!("{cell:<width$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn times_are_shown_in_utc_to_the_second() {
        assert_eq!(
            time(datetime!(2026-11-29 15:30:05.123 +05:30)),
            "2026-11-29T10:00:05Z"
        );
    }

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            vec!["JOB-1".into(), "accepted".into(), "0".into()],
            vec!["JOB-LONGER".into(), "delivered".into(), "12".into()],
        ];
        assert_eq!(
            table(&["JOB ID", "STATUS", "N"], &rows),
            "JOB ID      STATUS     N\nJOB-1       accepted   0\nJOB-LONGER  delivered  12"
        );
    }

    #[test]
    fn excerpts_are_one_line_and_cut() {
        assert_eq!(excerpt("a\n b  c", 10), "a b c");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(count(1u32, "attempt", "attempts"), "1 attempt");
    }
}
