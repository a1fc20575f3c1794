//! A job's status document for people: the summary `jetcall status` prints, and the one line
//! per change `jetcall watch` prints.

use jetcall::status::{DeliveryAttempt, Status};
use jetcall::view::JobView;
use serde_json::Value;

use crate::output::{count, excerpt, time};

/// `label  value` lines: where the job is, its times, attempts, usage, result or error, and
/// its last delivery attempt.
pub fn summary(doc: &JobView) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("job", doc.job_id.to_string()),
        ("status", doc.status.as_str().to_owned()),
        ("kind", doc.kind.to_string()),
    ];
    // Whose job it is: worth saying to an operator's key, which sees every tenant's.
    if let Some(tenant) = &doc.tenant {
        rows.push(("tenant", tenant.clone()));
    }
    rows.push(("created", time(doc.created_at)));
    rows.push(("updated", time(doc.updated_at)));
    if let Some(finished) = doc.finished_at {
        rows.push(("finished", time(finished)));
    }
    rows.push((
        "generation",
        count(doc.generation_attempts, "attempt", "attempts"),
    ));
    if let Some(batch_id) = &doc.batch_id {
        rows.push(("batch", batch_id.clone()));
    }
    if let Some(model) = &doc.model {
        rows.push(("model", model.clone()));
    }
    if let Some(usage) = doc.usage {
        rows.push((
            "usage",
            format!(
                "{} input + {} output tokens",
                usage.input_tokens, usage.output_tokens
            ),
        ));
    }
    if let Some(result) = &doc.result {
        rows.push(("result", excerpt(&result_text(result), 100)));
    }
    if let Some(error) = &doc.error {
        rows.push(("error", format!("{}: {}", error.kind, error.message)));
    }
    rows.push(("callback", doc.callback_url.clone()));
    if let Some(last) = doc.deliveries.last() {
        let round = if doc.delivery_round > 0 {
            format!(", {} this round", doc.attempts_this_round())
        } else {
            String::new()
        };
        rows.push((
            "deliveries",
            format!(
                "{}{round}",
                count(doc.deliveries.len() as u64, "attempt", "attempts")
            ),
        ));
        rows.push(("last attempt", attempt(last)));
    }
    if let Some(delivered) = doc.delivered_at {
        rows.push(("delivered", time(delivered)));
    }
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:<width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line for a change: `time  id  status  what happened`.
pub fn change(doc: &JobView) -> String {
    let detail = match (doc.status, doc.deliveries.last()) {
        (Status::Accepted, _) => doc.kind.to_string(),
        (Status::Generating, _) => format!("generation attempt {}", doc.generation_attempts),
        (Status::Batched, _) => match &doc.batch_id {
            Some(batch_id) => format!("in Message Batch {batch_id}"),
            None => "gathered for a Message Batch".into(),
        },
        (Status::Delivered, _) => format!(
            "after {}",
            count(doc.attempts_this_round() as u64, "attempt", "attempts")
        ),
        (_, Some(last)) => format!(
            "delivery attempt {}: {}",
            doc.attempts_this_round(),
            attempt(last)
        ),
        (Status::Failed, None) => doc
            .error
            .as_ref()
            .map(|error| format!("{}: {}", error.kind, error.message))
            .unwrap_or_default(),
        (_, None) => doc.model.clone().unwrap_or_default(),
    };
    format!(
        "{}  {}  {:<13}  {}",
        time(doc.updated_at),
        doc.job_id,
        doc.status.as_str(),
        excerpt(&detail, 120)
    )
    .trim_end()
    .to_owned()
}

/// `2026-11-29T10:00:05Z HTTP 500 (timeout: …) in 15 ms`.
fn attempt(attempt: &DeliveryAttempt) -> String {
    let mut text = time(attempt.at);
    if let Some(code) = attempt.status_code {
        text.push_str(&format!(" HTTP {code}"));
    }
    match (&attempt.error_kind, &attempt.error) {
        (Some(kind), Some(error)) => text.push_str(&format!(" {kind}: {}", excerpt(error, 80))),
        (Some(kind), None) => text.push_str(&format!(" {kind}")),
        (None, Some(error)) => text.push_str(&format!(" {}", excerpt(error, 80))),
        (None, None) => {}
    }
    text.push_str(&format!(" in {} ms", attempt.duration_ms));
    text
}

/// A result as text: a string as it is, anything else as JSON.
fn result_text(result: &Value) -> String {
    match result {
        Value::String(text) => text.clone(),
        Value::Object(fields) if fields.len() == 1 => fields
            .values()
            .next()
            .and_then(Value::as_str)
            .map_or_else(|| result.to_string(), str::to_owned),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(extra: Value) -> JobView {
        let mut doc = json!({
            "status": "accepted",
            "job_id": "JOB-1",
            "kind": "product-description",
            "input": {"product_id": "P-1"},
            "callback_url": "http://127.0.0.1:9/hook",
            "request_digest": "d",
            "created_at": "2026-11-29T10:00:00Z",
            "updated_at": "2026-11-29T10:00:01Z",
            "generation_attempts": 0,
            "delivery_round": 0
        });
        if let (Value::Object(doc), Value::Object(extra)) = (&mut doc, extra) {
            doc.extend(extra);
        }
        serde_json::from_value(doc).expect("a status document")
    }

    #[test]
    fn a_change_line_says_what_happened() {
        assert_eq!(
            change(&doc(json!({}))),
            "2026-11-29T10:00:01Z  JOB-1  accepted       product-description"
        );
        let retrying = doc(json!({
            "status": "completed",
            "deliveries": [{"at": "2026-11-29T10:00:02Z", "duration_ms": 15, "status_code": 500,
                            "error_kind": "http_status", "error": "answered 500", "round": 0}]
        }));
        assert_eq!(
            change(&retrying),
            "2026-11-29T10:00:01Z  JOB-1  completed      delivery attempt 1: 2026-11-29T10:00:02Z HTTP 500 http_status: answered 500 in 15 ms"
        );
    }

    #[test]
    fn a_batched_job_names_its_batch() {
        let batched = doc(json!({"status": "batched", "batch_id": "msgbatch_01"}));
        assert!(change(&batched).ends_with("in Message Batch msgbatch_01"));
        assert!(summary(&batched).contains("msgbatch_01"));
        let gathered = doc(json!({"status": "batched"}));
        assert!(change(&gathered).ends_with("gathered for a Message Batch"));
    }

    #[test]
    fn the_summary_names_the_tenant_when_the_api_has_keys() {
        let text = summary(&doc(json!({"tenant": "catalogue"})));
        assert!(
            text.lines()
                .any(|line| line.starts_with("tenant ") && line.ends_with(" catalogue")),
            "{text}"
        );
        assert!(!summary(&doc(json!({}))).contains("tenant"));
    }

    #[test]
    fn the_summary_shows_usage_result_and_the_last_attempt() {
        let delivered = doc(json!({
            "status": "delivered",
            "generation_attempts": 1,
            "model": "claude-sonnet-4-5",
            "usage": {"input_tokens": 120, "output_tokens": 340},
            "result": {"description": "Beat the heat."},
            "deliveries": [{"at": "2026-11-29T10:00:02Z", "duration_ms": 9, "status_code": 200, "round": 0}],
            "delivered_at": "2026-11-29T10:00:02Z"
        }));
        let text = summary(&delivered);
        assert!(
            text.starts_with("job           JOB-1\nstatus        delivered\n"),
            "{text}"
        );
        assert!(
            text.contains("usage         120 input + 340 output tokens"),
            "{text}"
        );
        assert!(text.contains("result        Beat the heat."), "{text}");
        assert!(
            text.contains("last attempt  2026-11-29T10:00:02Z HTTP 200 in 9 ms"),
            "{text}"
        );
    }
}
