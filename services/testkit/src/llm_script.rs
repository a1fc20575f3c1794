//! What the fake LLM servers share: a script of answers, a repeating cycle, a default delay
//! and text, the accepted key, and a record of every request with the status it got.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Version};
use axum::response::Response;
use serde_json::Value;

/// One scripted answer, used once, before the default behaviour resumes.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// An API error with the documented body for `status`, e.g. 429 or 529.
    Error {
        status: u16,
        retry_after: Option<u64>,
    },
    /// As `Error`, with these headers as sent, unchecked: a provider's `retry-after` or
    /// rate-limit headers at their most hostile (`inf`, `1e400`, a day).
    ErrorWithHeaders {
        status: u16,
        headers: Vec<(&'static str, String)>,
    },
    /// A normal answer whose text is this.
    Text(String),
    /// Wait this long before answering normally.
    Delay(Duration),
}

/// What the server saw of one request, and the status it answered with.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub headers: HeaderMap,
    pub body: Value,
    /// When the request arrived, on the server's clock.
    pub at: Instant,
    /// When its answer was made; `None` while it is being made.
    pub answered_at: Option<Instant>,
    /// 0 while the answer is still being made.
    pub status: u16,
    /// The `retry-after` seconds the answer carried.
    pub retry_after: Option<u64>,
    pub version: Version,
}

impl Recorded {
    /// The first line of the user message: which job a request was for.
    pub fn prompt(&self) -> String {
        first_user_line(&self.body)
    }
}

/// The first line of the first user message (OpenAI puts the system prompt before it).
pub fn first_user_line(body: &Value) -> String {
    let content = body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().find(|m| m["role"] == "user"))
        .map_or(&Value::Null, |message| &message["content"]);
    let text = match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|block| block["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    };
    text.lines().next().unwrap_or_default().to_owned()
}

/// Adds `headers` to `response`; a value a header cannot hold is left out.
pub(crate) fn add_headers(response: &mut Response, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(value) = axum::http::HeaderValue::try_from(value) {
            response.headers_mut().insert(name, value);
        }
    }
}

/// How to answer a request that passed validation, after any delay has been waited out.
#[derive(Debug)]
pub(crate) enum Answer {
    Error {
        status: u16,
        retry_after: Option<u64>,
        /// Sent after the error's own headers, replacing any of the same name.
        headers: Vec<(&'static str, String)>,
    },
    /// The text to answer with; `None` for the server's default text.
    Text(Option<String>),
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<Scripted>,
    /// Repeats over the requests the script does not answer; `None` is a normal answer.
    cycle: Vec<Option<Scripted>>,
    answered: usize,
    requests: Vec<Recorded>,
    delay: Duration,
    reply: Option<String>,
    accepted_key: Option<String>,
}

#[derive(Debug)]
pub struct LlmScript(Mutex<State>);

impl LlmScript {
    /// `accepted_key`: the only key accepted, or `None` for a server that needs none.
    pub(crate) fn new(accepted_key: Option<&str>) -> Self {
        Self(Mutex::new(State {
            accepted_key: accepted_key.map(str::to_owned),
            ..State::default()
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn push(&self, scripted: Scripted) {
        self.lock().script.push_back(scripted);
    }

    /// A delay before every default answer.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The text of every default answer; by default it quotes the first line of the prompt.
    pub fn set_reply(&self, text: impl Into<String>) {
        self.lock().reply = Some(text.into());
    }

    /// A pattern of answers repeated over every request the script does not take, e.g. three
    /// errors in ten for a flaky API.
    pub fn set_cycle(&self, cycle: Vec<Option<Scripted>>) {
        self.lock().cycle = cycle;
    }

    /// The only key accepted; others get 401, as after a key rotation.
    pub fn set_accepted_key(&self, key: impl Into<String>) {
        self.lock().accepted_key = Some(key.into());
    }

    /// Every request so far, in the order they arrived.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// How many requests each prompt got (its first line, which names the job): the calls
    /// a job was paid for.
    pub fn calls_per_prompt(&self) -> BTreeMap<String, usize> {
        let mut calls = BTreeMap::new();
        for request in &self.lock().requests {
            *calls.entry(request.prompt()).or_insert(0) += 1;
        }
        calls
    }

    /// The most requests whose prompt's first line starts with `prefix` that were being
    /// answered at once: what a caller's concurrency cap let through.
    pub fn most_at_once(&self, prefix: &str) -> usize {
        let mut changes: Vec<(Instant, i32)> = Vec::new();
        for request in self.lock().requests.iter() {
            if request.prompt().starts_with(prefix) {
                changes.push((request.at, 1));
                if let Some(answered) = request.answered_at {
                    changes.push((answered, -1));
                }
            }
        }
        // An answer and an arrival at the same instant: the answer first.
        changes.sort();
        let (mut now, mut most) = (0, 0);
        for (_, change) in changes {
            now += change;
            most = most.max(now);
        }
        usize::try_from(most).unwrap_or_default()
    }

    /// Requests received so far, including those still being answered.
    pub fn calls(&self) -> usize {
        self.lock().requests.len()
    }

    pub(crate) fn accepted_key(&self) -> Option<String> {
        self.lock().accepted_key.clone()
    }

    /// Records a request on arrival, so a call still hanging is counted; returns its place.
    pub(crate) fn arrive(&self, version: Version, headers: &HeaderMap, body: &Value) -> usize {
        let mut state = self.lock();
        state.requests.push(Recorded {
            headers: headers.clone(),
            body: body.clone(),
            at: Instant::now(),
            answered_at: None,
            status: 0,
            retry_after: None,
            version,
        });
        state.requests.len() - 1
    }

    /// Notes the answer the request at `index` got.
    pub(crate) fn answered(&self, index: usize, response: &Response) {
        if let Some(recorded) = self.lock().requests.get_mut(index) {
            recorded.status = response.status().as_u16();
            recorded.answered_at = Some(Instant::now());
            recorded.retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok());
        }
    }

    /// The next answer: the script's, else the cycle's, else the default after the delay.
    pub(crate) async fn next(&self) -> Answer {
        let (scripted, delay, reply) = {
            let mut state = self.lock();
            let scripted = match state.script.pop_front() {
                Some(scripted) => Some(scripted),
                None if state.cycle.is_empty() => None,
                None => {
                    let step = state.cycle[state.answered % state.cycle.len()].clone();
                    state.answered += 1;
                    step
                }
            };
            (scripted, state.delay, state.reply.clone())
        };
        match scripted {
            Some(Scripted::Error {
                status,
                retry_after,
            }) => Answer::Error {
                status,
                retry_after,
                headers: Vec::new(),
            },
            Some(Scripted::ErrorWithHeaders { status, headers }) => Answer::Error {
                status,
                retry_after: None,
                headers,
            },
            Some(Scripted::Text(text)) => Answer::Text(Some(text)),
            Some(Scripted::Delay(extra)) => {
                tokio::time::sleep(extra).await;
                Answer::Text(reply)
            }
            None => {
                tokio::time::sleep(delay).await;
                Answer::Text(reply)
            }
        }
    }
}
