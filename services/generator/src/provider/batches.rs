//! Anthropic's Message Batches API: `POST /v1/messages/batches` to create a batch, `GET` to
//! retrieve one or list them, and its results, a JSONL file read line by line as it arrives.

use ::http::StatusCode;
use ::http::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use time::OffsetDateTime;

use jetcall::config::{LlmEndpointConfig, Secret};

use super::anthropic::{MessagesResponse, api_error, generation_of};
use super::{Disposition, Generation, LlmError, ProviderSetupError, http};

const API_VERSION: &str = "2023-06-01";

/// The most batches a page of the list holds.
const LIST_PAGE: usize = 100;

/// The most pages of the list read when looking for a batch: 10,000 batches back, far more
/// than a recovery window holds, and an end to an API that says `has_more` for ever.
const MAX_LIST_PAGES: usize = 100;

/// The longest results line kept: one Message of the largest `max_tokens`, escaped, is a few
/// megabytes. A longer line is dropped as unreadable (its job goes to a later batch) rather
/// than held whole, however long the API makes it.
pub const MAX_RESULT_LINE: usize = 32 * 1024 * 1024;

/// A batch as the API describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchInfo {
    pub id: String,
    /// `in_progress`, `canceling` or `ended`.
    pub processing_status: String,
    pub request_counts: RequestCounts,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default)]
    pub results_url: Option<String>,
}

impl BatchInfo {
    pub fn has_ended(&self) -> bool {
        self.processing_status == "ended"
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub processing: u64,
    #[serde(default)]
    pub succeeded: u64,
    #[serde(default)]
    pub errored: u64,
    #[serde(default)]
    pub canceled: u64,
    #[serde(default)]
    pub expired: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.processing + self.succeeded + self.errored + self.canceled + self.expired
    }
}

#[derive(Debug, Deserialize)]
struct BatchList {
    data: Vec<BatchInfo>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// How one request of a batch ended.
#[derive(Debug)]
pub enum BatchResult {
    Succeeded(Generation),
    /// The API's error type (`overloaded_error`, `invalid_request_error`, …) and message.
    Errored {
        error_type: String,
        message: String,
    },
    Canceled,
    Expired,
}

impl BatchResult {
    /// Whether another attempt may succeed: the API's own failures, not the request's.
    pub fn is_retryable_error(error_type: &str) -> bool {
        matches!(
            error_type,
            "overloaded_error" | "api_error" | "rate_limit_error" | "timeout_error"
        )
    }
}

#[derive(Debug, Deserialize)]
struct ResultLine {
    custom_id: String,
    result: WireResult,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireResult {
    Succeeded { message: MessagesResponse },
    Errored { error: WireError },
    Canceled,
    Expired,
}

/// An errored result's error: the documented `{"type": "error", "error": {…}}` envelope, or
/// the bare `{"type": …, "message": …}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireError {
    Envelope { error: ErrorDetail },
    Bare(ErrorDetail),
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// One line of a results file: whose result it is and the result, or why it is unreadable.
pub fn parse_result_line(line: &[u8]) -> Result<(String, BatchResult), String> {
    let line: ResultLine = serde_json::from_slice(line).map_err(|err| err.to_string())?;
    let result = match line.result {
        WireResult::Succeeded { message } => BatchResult::Succeeded(generation_of(message)),
        WireResult::Errored { error } => {
            let detail = match error {
                WireError::Envelope { error } | WireError::Bare(error) => error,
            };
            BatchResult::Errored {
                error_type: detail.kind,
                message: detail.message,
            }
        }
        WireResult::Canceled => BatchResult::Canceled,
        WireResult::Expired => BatchResult::Expired,
    };
    Ok((line.custom_id, result))
}

#[derive(Debug, Clone)]
pub struct BatchesApi {
    client: reqwest::Client,
    base: String,
    /// The API's origin: a `results_url` elsewhere is not sent the key.
    origin: reqwest::Url,
    headers: HeaderMap,
}

impl BatchesApi {
    pub fn new(config: &LlmEndpointConfig, api_key: &Secret) -> Result<Self, ProviderSetupError> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .retry(reqwest::retry::never().max_retries_per_request(0));
        if let Some(path) = &config.tls_ca {
            let pem = std::fs::read(path).map_err(|err| {
                http::TransportError::Ca(format!("reading {}: {err}", path.display()))
            })?;
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(http::TransportError::Client)?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(http::TransportError::Client)?;
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", http::secret_header(api_key.expose())?);
        headers.insert("anthropic-version", HeaderValue::from_static(API_VERSION));
        headers.insert(
            ::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let base = format!(
            "{}/v1/messages/batches",
            config.base_url.trim_end_matches('/')
        );
        let origin = reqwest::Url::parse(&base)
            .map_err(|err| http::TransportError::Url(format!("{base}: {err}")))?;
        Ok(Self {
            client,
            base,
            origin,
            headers,
        })
    }

    /// Creates a batch of `requests`, each `{"custom_id": …, "params": …}` as JSON.
    pub async fn create(&self, requests: Vec<Vec<u8>>) -> Result<BatchInfo, LlmError> {
        let size = requests.iter().map(|r| r.len() + 1).sum::<usize>() + 16;
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(br#"{"requests":["#);
        for (i, request) in requests.into_iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&request);
        }
        body.extend_from_slice(b"]}");
        let sent = self
            .client
            .post(&self.base)
            .headers(self.headers.clone())
            .body(body);
        self.read(sent).await
    }

    pub async fn retrieve(&self, batch_id: &str) -> Result<BatchInfo, LlmError> {
        let url = format!("{}/{batch_id}", self.base);
        self.read(self.client.get(url).headers(self.headers.clone()))
            .await
    }

    /// Every batch created at or after `since`, newest first.
    pub async fn created_since(&self, since: OffsetDateTime) -> Result<Vec<BatchInfo>, LlmError> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut query = vec![("limit", LIST_PAGE.to_string())];
            query.extend(after.take().map(|last| ("after_id", last)));
            let page: BatchList = self
                .read(
                    self.client
                        .get(&self.base)
                        .query(&query)
                        .headers(self.headers.clone()),
                )
                .await?;
            let older = page.data.iter().any(|batch| batch.created_at < since);
            found.extend(
                page.data
                    .into_iter()
                    .filter(|batch| batch.created_at >= since),
            );
            if older || !page.has_more {
                return Ok(found);
            }
            match page.last_id {
                Some(last) => after = Some(last),
                None => return Ok(found),
            }
        }
        Ok(found)
    }

    /// The results file of an ended batch, to be read chunk by chunk.
    pub async fn results(&self, results_url: &str) -> Result<reqwest::Response, LlmError> {
        let url = self.own_url(results_url)?;
        let answer = self
            .client
            .get(url)
            .headers(self.headers.clone())
            .send()
            .await
            .map_err(connection_error)?;
        if !answer.status().is_success() {
            return Err(failed(answer).await);
        }
        Ok(answer)
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, LlmError> {
        let answer = request.send().await.map_err(connection_error)?;
        if !answer.status().is_success() {
            return Err(failed(answer).await);
        }
        let body = answer.bytes().await.map_err(connection_error)?;
        serde_json::from_slice(&body).map_err(|err| {
            LlmError::new(
                Disposition::Retry { retry_after: None },
                "invalid_response",
                format!("the Message Batches API answered with an unexpected body: {err}"),
            )
        })
    }
}

async fn failed(answer: reqwest::Response) -> LlmError {
    let status =
        StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = answer.headers().clone();
    let body = answer.bytes().await.unwrap_or_default();
    api_error(status, &headers, &body)
}

fn connection_error(err: reqwest::Error) -> LlmError {
    LlmError::new(
        Disposition::Retry { retry_after: None },
        if err.is_timeout() {
            "timeout"
        } else {
            "connection_error"
        },
        err.to_string(),
    )
}

impl BatchesApi {
    /// `url` if it is on the API's own origin (scheme, host and port), which alone is sent
    /// the API key.
    fn own_url(&self, url: &str) -> Result<reqwest::Url, LlmError> {
        reqwest::Url::parse(url)
            .ok()
            .filter(|parsed| parsed.origin() == self.origin.origin())
            .ok_or_else(|| {
                LlmError::new(
                    Disposition::Permanent,
                    "invalid_response",
                    format!(
                        "the batch's results_url `{url}` is not on the API's origin; the key is not sent there"
                    ),
                )
            })
    }
}

/// Splits a stream of chunks into lines without holding more than one line (of at most
/// `max_line` bytes) and one chunk.
#[derive(Debug)]
pub struct Lines {
    partial: Vec<u8>,
    max_line: usize,
    /// The line being read passed `max_line`: it is dropped up to its newline.
    overlong: bool,
}

impl Default for Lines {
    fn default() -> Self {
        Self::with_max(MAX_RESULT_LINE)
    }
}

impl Lines {
    pub fn with_max(max_line: usize) -> Self {
        Self {
            partial: Vec::new(),
            max_line,
            overlong: false,
        }
    }

    /// Feeds `chunk`, calling `each` with every complete line (without its newline); a line
    /// longer than the most kept is given as an empty line, which no reader takes.
    pub fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(&[u8])) {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if self.overlong {
                each(&[]);
                self.overlong = false;
            } else if self.partial.is_empty() && end <= self.max_line {
                each(&rest[..end]);
            } else if self.partial.len() + end <= self.max_line {
                self.partial.extend_from_slice(&rest[..end]);
                each(&self.partial);
            } else {
                each(&[]);
            }
            self.partial.clear();
            rest = &rest[end + 1..];
        }
        if self.overlong || self.partial.len() + rest.len() > self.max_line {
            self.partial = Vec::new();
            self.overlong = true;
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    /// The last line, if the file did not end with a newline.
    pub fn finish(self) -> Option<Vec<u8>> {
        if self.overlong {
            return Some(Vec::new());
        }
        (!self.partial.is_empty()).then_some(self.partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_come_out_whole() {
        let mut lines = Lines::default();
        let mut seen = Vec::new();
        for chunk in [&b"{\"a\":1}\n{\"b\""[..], b":2}\n", b"{\"c\":3}"] {
            lines.feed(chunk, |line| {
                seen.push(String::from_utf8_lossy(line).into_owned())
            });
        }
        assert_eq!(seen, ["{\"a\":1}", "{\"b\":2}"]);
        assert_eq!(lines.finish().as_deref(), Some(&b"{\"c\":3}"[..]));
    }

    #[test]
    fn a_line_longer_than_the_most_kept_is_dropped_not_held() {
        let mut lines = Lines::with_max(8);
        let mut seen = Vec::new();
        let mut keep = |line: &[u8]| seen.push(String::from_utf8_lossy(line).into_owned());
        lines.feed(b"short\n0123456789", &mut keep);
        assert!(lines.partial.is_empty(), "the long line is not kept");
        lines.feed(b"0123456789\nok\n", &mut keep);
        lines.feed(b"toolong-in-one\n", &mut keep);
        lines.feed(b"1234", &mut keep);
        lines.feed(b"56789", &mut keep);
        assert_eq!(seen, ["short", "", "ok", ""]);
        assert_eq!(
            lines.finish(),
            Some(Vec::new()),
            "an unfinished long line is unreadable"
        );
    }

    #[test]
    fn results_are_fetched_from_the_api_s_own_origin_only() {
        let config = LlmEndpointConfig {
            base_url: "https://api.anthropic.com".into(),
            ..LlmEndpointConfig::anthropic()
        };
        let api = BatchesApi::new(&config, &Secret::new("sk-ant-test")).expect("client");
        assert!(
            api.own_url("https://api.anthropic.com/v1/messages/batches/msgbatch_1/results")
                .is_ok()
        );
        for elsewhere in [
            "https://evil.example/v1/messages/batches/msgbatch_1/results",
            "http://api.anthropic.com/v1/messages/batches/msgbatch_1/results",
            "https://api.anthropic.com:8443/results",
            "https://api.anthropic.com.evil.example/results",
            "not a url",
        ] {
            let err = api.own_url(elsewhere).expect_err(elsewhere);
            assert_eq!(err.disposition, Disposition::Permanent, "{elsewhere}");
        }
    }

    #[test]
    fn every_documented_result_type_is_read() {
        let succeeded = br#"{"custom_id":"job-1","result":{"type":"succeeded","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":2,"cache_creation_input_tokens":0,"cache_read_input_tokens":5}}}}"#;
        let (id, result) = parse_result_line(succeeded).expect("succeeded");
        assert_eq!(id, "job-1");
        let BatchResult::Succeeded(generation) = result else {
            panic!("{result:?}")
        };
        assert_eq!(generation.text, "Hello");
        assert_eq!(generation.usage.cache_read_input_tokens, 5);
        let errored = br#"{"custom_id":"job-2","result":{"type":"errored","error":{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}}}"#;
        match parse_result_line(errored).expect("errored").1 {
            BatchResult::Errored { error_type, .. } => assert_eq!(error_type, "overloaded_error"),
            other => panic!("{other:?}"),
        }
        let canceled = br#"{"custom_id":"job-3","result":{"type":"canceled"}}"#;
        assert!(matches!(
            parse_result_line(canceled).expect("canceled").1,
            BatchResult::Canceled
        ));
        let expired = br#"{"custom_id":"job-4","result":{"type":"expired"}}"#;
        assert!(matches!(
            parse_result_line(expired).expect("expired").1,
            BatchResult::Expired
        ));
        assert!(parse_result_line(b"not json").is_err());
    }
}
