//! Server-sent events (the `text/event-stream` format of the HTML standard), parsed as bytes
//! arrive: feed each chunk of the body, take the events it completes.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `event:`, or `message` when the event names none.
    pub event: String,
    /// The last `id:` seen so far in the stream, as `Last-Event-ID` would send it.
    pub id: Option<String>,
    /// The `data:` lines, joined with newlines.
    pub data: String,
}

#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of a line not yet ended.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`, so a `\n` opening this one ends no line.
    after_cr: bool,
    event: Option<String>,
    data: String,
    /// Whether a `data:` line was seen for the event being built (its data may be empty).
    has_data: bool,
    last_id: Option<String>,
}

impl Parser {
    /// Feeds bytes of the body; returns every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        for &byte in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    let line = std::mem::take(&mut self.line);
                    events.extend(self.line_ended(&String::from_utf8_lossy(&line)));
                }
                _ => self.line.push(byte),
            }
        }
        events
    }

    fn line_ended(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None; // A comment, such as a keep-alive.
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            _ => {} // `retry` and unknown fields: nothing the CLI uses.
        }
        None
    }

    fn dispatch(&mut self) -> Option<Event> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(Event {
            event: event
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "message".into()),
            id: self.last_id.clone(),
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, id: Option<&str>, data: &str) -> Event {
        Event {
            event: name.into(),
            id: id.map(Into::into),
            data: data.into(),
        }
    }

    #[test]
    fn events_are_parsed_whatever_the_chunking() {
        let stream = b": keep-alive\n\nevent: status\nid: 4\ndata: {\"status\":\"accepted\"}\n\nevent:removed\r\nid:9\r\ndata: gone\r\n\r\n";
        let expected = vec![
            event("status", Some("4"), "{\"status\":\"accepted\"}"),
            event("removed", Some("9"), "gone"),
        ];
        for size in 1..stream.len() {
            let mut parser = Parser::default();
            let events: Vec<Event> = stream.chunks(size).flat_map(|c| parser.push(c)).collect();
            assert_eq!(events, expected, "chunks of {size} bytes");
        }
    }

    #[test]
    fn data_lines_join_and_lone_carriage_returns_end_lines() {
        let mut parser = Parser::default();
        let events = parser.push(b"data: one\rdata:two\r\rdata\n\n");
        assert_eq!(
            events,
            vec![
                event("message", None, "one\ntwo"),
                event("message", None, "")
            ]
        );
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_but_its_id_is_kept() {
        let mut parser = Parser::default();
        assert!(parser.push(b"event: status\nid: 7\n\n").is_empty());
        let events = parser.push(b"data: x\n\n");
        assert_eq!(events, vec![event("message", Some("7"), "x")]);
    }

    #[test]
    fn an_unfinished_event_is_held_back() {
        let mut parser = Parser::default();
        assert!(parser.push(b"event: status\ndata: {}\n").is_empty());
        assert_eq!(parser.push(b"\n"), vec![event("status", None, "{}")]);
    }
}
