//! The gateway's HTTP API, as the CLI uses it: each call answers the gateway's JSON, or one of
//! its `{type, message, field?}` errors, or says which URL could not be reached.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

/// The longest any request but an event stream may take, answer included. A batch of 1,000
/// jobs takes a few seconds at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An error body from the gateway: `{"type", "message", "field"?}`, also a rejected batch
/// job's `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable slug, e.g. `invalid_callback_url`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the connection failed, broke or timed out.
    #[error("could not reach the gateway at {url} (--gateway, JETCALL_GATEWAY): {reason}")]
    Unreachable {
        url: String,
        reason: String,
        /// Whether the connection was never made, so the request was certainly not handled.
        before_sending: bool,
    },
    /// The gateway answered with one of its errors.
    #[error("{body}")]
    Api {
        status: StatusCode,
        body: ErrorBody,
        /// The gateway's `Retry-After`, on a 429 or 503.
        retry_after: Option<Duration>,
    },
    /// Something answered that is not the gateway, or not this version of it.
    #[error(
        "{url} answered {status} with {excerpt:?}, not the gateway's JSON; is --gateway right?"
    )]
    Unexpected {
        url: String,
        status: StatusCode,
        excerpt: String,
    },
    /// JSON, but not in the shape this CLI expects.
    #[error(
        "{url} answered with {what} that this jetcall cannot read ({message}); is it the same version as the gateway?"
    )]
    Unreadable {
        url: String,
        what: &'static str,
        message: String,
    },
}

impl ClientError {
    /// Whether the same request may succeed later: the gateway shed it (`429`), or NATS could
    /// not confirm it (`503`).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Api { status, .. }
                if *status == StatusCode::TOO_MANY_REQUESTS || *status == StatusCode::SERVICE_UNAVAILABLE
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A successful answer: its status and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

/// What opening a job's event stream found.
#[derive(Debug)]
pub enum Events {
    /// `200`: server-sent events follow.
    Stream(Response),
    /// `204`: the final state was already seen (only after `Last-Event-ID`).
    Finished,
}

/// `POST /api/v1/jobs/batch`'s body.
#[derive(Serialize)]
struct Batch<'a> {
    jobs: &'a [&'a Value],
}

#[derive(Debug, Clone)]
pub struct Gateway {
    http: reqwest::Client,
    base: Url,
    api_key: Option<String>,
}

impl Gateway {
    /// A client of the gateway at `base` (`http` or `https`; a path prefix is kept).
    pub fn new(base: Url, api_key: Option<String>) -> Result<Self, String> {
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(format!("--gateway must be an http(s) URL, not `{base}`"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("jetcall-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| format!("cannot start an HTTP client: {err}"))?;
        Ok(Self {
            http,
            base,
            api_key: api_key.filter(|key| !key.trim().is_empty()),
        })
    }

    /// An answer's body as `T`, the shape of `what` (`a job listing`).
    pub fn read<T: DeserializeOwned>(
        &self,
        body: Value,
        what: &'static str,
    ) -> Result<T, ClientError> {
        serde_json::from_value(body).map_err(|err| ClientError::Unreadable {
            url: self.base.to_string(),
            what,
            message: err.to_string(),
        })
    }

    /// `POST /api/v1/jobs`.
    pub async fn submit(&self, job: &Value) -> Result<Answer, ClientError> {
        let request = self.http.post(self.url(&["api", "v1", "jobs"])).json(job);
        self.answer(request).await
    }

    /// `POST /api/v1/jobs/batch`.
    pub async fn submit_batch(&self, jobs: &[&Value]) -> Result<Answer, ClientError> {
        let request = self
            .http
            .post(self.url(&["api", "v1", "jobs", "batch"]))
            .json(&Batch { jobs });
        self.answer(request).await
    }

    /// `POST /api/v1/jobs/cancel`: up to 1,000 ids.
    pub async fn cancel(&self, job_ids: &[String]) -> Result<Answer, ClientError> {
        let request = self
            .http
            .post(self.url(&["api", "v1", "jobs", "cancel"]))
            .json(&serde_json::json!({ "job_ids": job_ids }));
        self.answer(request).await
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<Answer, ClientError> {
        let request = self.http.get(self.url(&["api", "v1", "jobs", id]));
        self.answer(request).await
    }

    /// `GET /api/v1/budget`, of `tenant` when given.
    pub async fn budget(&self, tenant: Option<&str>) -> Result<Answer, ClientError> {
        let query: Vec<(&str, &str)> = tenant
            .map(|tenant| ("tenant", tenant))
            .into_iter()
            .collect();
        let request = self
            .http
            .get(self.url(&["api", "v1", "budget"]))
            .query(&query);
        self.answer(request).await
    }

    /// `GET /api/v1/jobs?status=&kind=&limit=`, with only the filters given.
    pub async fn list(
        &self,
        status: Option<&str>,
        kind: Option<&str>,
        limit: Option<u16>,
    ) -> Result<Answer, ClientError> {
        let limit = limit.map(|limit| limit.to_string());
        let query: Vec<(&str, &str)> = [
            ("status", status),
            ("kind", kind),
            ("limit", limit.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect();
        let request = self
            .http
            .get(self.url(&["api", "v1", "jobs"]))
            .query(&query);
        self.answer(request).await
    }

    /// `POST /api/v1/jobs/{id}/redeliver`.
    pub async fn redeliver(&self, id: &str) -> Result<Answer, ClientError> {
        let request = self
            .http
            .post(self.url(&["api", "v1", "jobs", id, "redeliver"]));
        self.answer(request).await
    }

    /// `POST /api/v1/deliveries/redeliver?since=&until=` (RFC 3339 times).
    pub async fn redeliver_window(
        &self,
        since: &str,
        until: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let mut query = vec![("since", since)];
        query.extend(until.map(|until| ("until", until)));
        let request = self
            .http
            .post(self.url(&["api", "v1", "deliveries", "redeliver"]))
            .query(&query);
        self.answer(request).await
    }

    /// `GET /api/v1/jobs/{id}/events`, resuming after `last_event_id` when given. The answer
    /// has no overall timeout: the stream lasts as long as the job is on its way.
    pub async fn events(
        &self,
        id: &str,
        last_event_id: Option<&str>,
    ) -> Result<Events, ClientError> {
        let mut request = self
            .http
            .get(self.url(&["api", "v1", "jobs", id, "events"]))
            .header("accept", "text/event-stream");
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last);
        }
        let response = self.send(request).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(Events::Finished);
        }
        Ok(Events::Stream(response))
    }

    /// The base URL followed by `segments`, each percent-encoded as a path segment, so a
    /// job id is never read as a path.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends with the API key, and turns an error status into the gateway's error.
    async fn send(&self, mut request: RequestBuilder) -> Result<Response, ClientError> {
        if let Some(key) = &self.api_key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let response = request.send().await.map_err(|err| self.unreachable(&err))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let url = response.url().to_string();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| jetcall::retry::parse_retry_after(value, SystemTime::now()));
        let text = response
            .text()
            .await
            .map_err(|err| self.unreachable(&err))?;
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => Err(ClientError::Api {
                status,
                body,
                retry_after,
            }),
            Err(_) => Err(ClientError::Unexpected {
                url,
                status,
                excerpt: excerpt(&text),
            }),
        }
    }

    /// Sends, then reads the whole JSON answer.
    async fn answer(&self, request: RequestBuilder) -> Result<Answer, ClientError> {
        let response = self.send(request.timeout(REQUEST_TIMEOUT)).await?;
        let status = response.status();
        let url = response.url().to_string();
        let text = response
            .text()
            .await
            .map_err(|err| self.unreachable(&err))?;
        match serde_json::from_str(&text) {
            Ok(body) => Ok(Answer { status, body }),
            Err(_) => Err(ClientError::Unexpected {
                url,
                status,
                excerpt: excerpt(&text),
            }),
        }
    }

    fn unreachable(&self, err: &reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            url: self.base.to_string(),
            reason: reason(err),
            before_sending: err.is_connect(),
        }
    }
}

/// An error's causes, without reqwest's own sentence (which repeats the URL).
fn reason(err: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    if err.is_timeout() {
        causes.insert(0, "timed out".into());
    }
    // A wrapper's message often repeats its cause's; say each thing once.
    causes.dedup_by(|later, earlier| earlier.contains(later.as_str()));
    if causes.is_empty() {
        err.to_string()
    } else {
        causes.join(": ")
    }
}

fn excerpt(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 120 {
        line.chars().take(120).chain("…".chars()).collect()
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(base: &str) -> Gateway {
        Gateway::new(Url::parse(base).expect("url"), None).expect("gateway")
    }

    #[test]
    fn paths_are_appended_to_the_base_and_ids_are_encoded() {
        let plain = gateway("http://127.0.0.1:8080");
        assert_eq!(
            plain.url(&["api", "v1", "jobs", "JOB-1"]).as_str(),
            "http://127.0.0.1:8080/api/v1/jobs/JOB-1"
        );
        let prefixed = gateway("https://example.test/jetcall/");
        assert_eq!(
            prefixed.url(&["api", "v1", "jobs", "a/b?c"]).as_str(),
            "https://example.test/jetcall/api/v1/jobs/a%2Fb%3Fc"
        );
    }

    #[test]
    fn only_http_gateways_are_accepted() {
        assert!(Gateway::new(Url::parse("nats://127.0.0.1:4222").expect("url"), None).is_err());
        assert!(Gateway::new(Url::parse("mailto:ops@example.test").expect("url"), None).is_err());
    }

    #[test]
    fn an_api_error_reads_as_its_type_and_message() {
        let err = ClientError::Api {
            status: StatusCode::CONFLICT,
            body: ErrorBody {
                kind: "not_undeliverable".into(),
                message: "job J is accepted".into(),
                field: None,
            },
            retry_after: None,
        };
        assert_eq!(err.to_string(), "not_undeliverable: job J is accepted");
        assert!(!err.is_transient());
    }
}
