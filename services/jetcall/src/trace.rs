//! W3C Trace Context (`traceparent`) carried from the caller's HTTP request through every
//! event on `jobs.*` to the webhook, so one trace id follows a job end to end.
//!
//! Each service that handles a job is a span of its own: it continues the trace it received
//! ([`TraceParent::child`]: the same trace id, a new span id) and passes its own span on. A
//! request without a valid `traceparent` starts a new trace ([`TraceParent::start`]).

use std::fmt;

/// The header's name, on HTTP requests and on NATS messages alike.
pub const HEADER: &str = "traceparent";

/// The sampled flag: set on the traces we start.
const SAMPLED: u8 = 0x01;

/// One span's place in a trace, as the `traceparent` header spells it:
/// `00-<trace id: 32 hex>-<span id: 16 hex>-<flags: 2 hex>`.
///
/// A [`child`](Self::child) also remembers its parent's span id (not part of the header, nor
/// of equality), so an exported span can name its parent.
#[derive(Clone, Copy)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
    parent_span_id: Option<[u8; 8]>,
}

impl PartialEq for TraceParent {
    fn eq(&self, other: &Self) -> bool {
        (self.trace_id, self.span_id, self.flags) == (other.trace_id, other.span_id, other.flags)
    }
}

impl Eq for TraceParent {}

impl std::hash::Hash for TraceParent {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.trace_id, self.span_id, self.flags).hash(state);
    }
}

impl TraceParent {
    /// Reads a `traceparent` value; `None` unless it is valid (lowercase hex, neither id all
    /// zeros, version not `ff`). A later version's value is read for the fields version 00
    /// defines, as the specification asks.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim_matches([' ', '\t']);
        let bytes = value.as_bytes();
        if bytes.len() < 55 || !value.is_ascii() {
            return None;
        }
        let version = decode::<1>(&value[..2])?[0];
        let exact = bytes.len() == 55;
        let valid_length = match version {
            0xff => false,
            0x00 => exact,
            // A future version may add fields after a dash.
            _ => exact || bytes[55] == b'-',
        };
        if !valid_length || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = decode::<16>(&value[3..35])?;
        let span_id = decode::<8>(&value[36..52])?;
        let flags = decode::<1>(&value[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
            parent_span_id: None,
        })
    }

    /// A new trace: random trace and span ids, sampled.
    pub fn start() -> Self {
        Self {
            trace_id: nonzero(),
            span_id: nonzero(),
            flags: SAMPLED,
            parent_span_id: None,
        }
    }

    /// The next span of this trace: the same trace id and flags, a new span id.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero(),
            parent_span_id: Some(self.span_id),
            ..*self
        }
    }

    /// A new span in the trace whose id is `trace_id` (32 hex digits), as kept in a status
    /// document; `None` if it is not a valid trace id.
    pub fn in_trace(trace_id: &str) -> Option<Self> {
        let trace_id = decode::<16>(trace_id).filter(|id| *id != [0; 16])?;
        Some(Self {
            trace_id,
            span_id: nonzero(),
            flags: SAMPLED,
            parent_span_id: None,
        })
    }

    /// Continues the trace of a NATS message: a child of its `traceparent`, or a new trace
    /// when it has none (or an invalid one).
    pub fn continue_from(headers: Option<&async_nats::HeaderMap>) -> Self {
        Self::from_headers(headers).map_or_else(Self::start, |parent| parent.child())
    }

    /// The valid `traceparent` of a NATS message, if it has one.
    pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Option<Self> {
        Self::parse(headers?.get(HEADER)?.as_str())
    }

    /// NATS headers holding this `traceparent`, for a publish.
    pub fn to_headers(&self) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER, self.to_string().as_str());
        headers
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// This span's id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span_id)
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The trace id's 16 bytes.
    pub fn trace_id_bytes(&self) -> [u8; 16] {
        self.trace_id
    }

    /// This span's id as 8 bytes.
    pub fn span_id_bytes(&self) -> [u8; 8] {
        self.span_id
    }

    /// The span this one continues (the `traceparent` it was received with), when it is a
    /// [`child`](Self::child) of one.
    pub fn parent_span_id_bytes(&self) -> Option<[u8; 8]> {
        self.parent_span_id
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

/// Random bytes, never all zeros (an invalid id).
fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

/// Exactly `2 * N` lowercase hex digits to bytes.
fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |digit: u8| match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (value(pair[0])? << 4) | value(pair[1])?;
    }
    Some(bytes)
}

fn hex(bytes: &[u8]) -> String {
    // A formatter call per byte cost a few per cent of every service's CPU: ids are written
    // on every message and log line.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_reads_back_as_written() {
        let parent = TraceParent::parse(EXAMPLE).expect("the specification's example");
        assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id(), "00f067aa0ba902b7");
        assert!(parent.sampled());
        assert_eq!(parent.to_string(), EXAMPLE);
        let unsampled = TraceParent::parse(&EXAMPLE.replace("-01", "-00")).expect("valid");
        assert!(!unsampled.sampled());
    }

    #[test]
    fn malformed_headers_are_refused() {
        let bad = [
            "",
            "00",
            // Upper case, wrong lengths, wrong separators.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            // All-zero ids, and the forbidden version.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Not hex at all, of the right length.
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for value in bad {
            assert_eq!(TraceParent::parse(value), None, "{value:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_for_the_fields_it_shares() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        let parent = TraceParent::parse(later).expect("a future version");
        assert_eq!(parent.to_string(), EXAMPLE, "passed on as version 00");
        assert_eq!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_gets_its_own_span() {
        let parent = TraceParent::parse(EXAMPLE).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
        assert_eq!(child.sampled(), parent.sampled());
        assert_eq!(child.parent_span_id_bytes(), Some(parent.span_id_bytes()));
        assert_eq!(parent.parent_span_id_bytes(), None);
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
    }

    #[test]
    fn a_new_trace_is_valid_and_new() {
        let (a, b) = (TraceParent::start(), TraceParent::start());
        assert_eq!(TraceParent::parse(&a.to_string()), Some(a));
        assert_ne!(a.trace_id(), b.trace_id());
        assert!(a.sampled());
        let again = TraceParent::in_trace(&a.trace_id()).expect("a valid trace id");
        assert_eq!(again.trace_id(), a.trace_id());
        assert_ne!(again.span_id(), a.span_id());
        assert_eq!(TraceParent::in_trace("not hex"), None);
        assert_eq!(TraceParent::in_trace(&"0".repeat(32)), None);
    }

    #[test]
    fn nats_headers_carry_it() {
        let parent = TraceParent::start();
        let headers = parent.to_headers();
        assert_eq!(TraceParent::from_headers(Some(&headers)), Some(parent));
        let continued = TraceParent::continue_from(Some(&headers));
        assert_eq!(continued.trace_id(), parent.trace_id());
        assert_ne!(continued.span_id(), parent.span_id());
        let fresh = TraceParent::continue_from(None);
        assert_ne!(fresh.trace_id(), parent.trace_id());
    }
}
