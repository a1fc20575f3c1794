//! The webhook body a caller receives, built from a finished job.
//!
//! Compatible with the article's receiver: `job_id`, `status` and, for product descriptions,
//! `product_id` and `description` sit at the top level beside the generic `result`.

use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;

use crate::events::{JobFinished, Outcome};

/// The stable `webhook-id` of a job's delivery: the same on every retry and after a restart
/// of the callback service, so receivers can use it as their idempotency key.
pub fn webhook_id(job: &JobFinished) -> String {
    format!("msg_{}", job.job_id)
}

pub fn payload(job: &JobFinished) -> Value {
    let finished_at = job.finished_at.format(&Rfc3339).unwrap_or_default();
    let mut body = Map::new();
    let (event_type, status) = match &job.outcome {
        Outcome::Completed { .. } => ("job.completed", "completed"),
        Outcome::Failed { .. } => ("job.failed", "failed"),
        Outcome::Cancelled { .. } => ("job.cancelled", "cancelled"),
        Outcome::Expired { .. } => ("job.expired", "expired"),
    };
    body.insert("type".into(), event_type.into());
    body.insert("job_id".into(), json!(job.job_id));
    body.insert("status".into(), status.into());
    body.insert("kind".into(), json!(job.kind));
    if let Some(product_id) = job.input.get("product_id") {
        body.insert("product_id".into(), product_id.clone());
    }
    match &job.outcome {
        Outcome::Completed {
            result,
            model,
            usage,
            cost,
        } => {
            if let Some(description) = result.get("description").filter(|d| d.is_string()) {
                body.insert("description".into(), description.clone());
            }
            body.insert("result".into(), result.clone());
            body.insert("model".into(), model.as_str().into());
            body.insert("usage".into(), json!(usage));
            if let Some(cost) = cost {
                body.insert("cost".into(), json!(cost));
            }
            body.insert("completed_at".into(), finished_at.into());
        }
        Outcome::Failed { error, usage, cost } => {
            body.insert("error".into(), json!(error));
            if let Some(usage) = usage {
                body.insert("usage".into(), json!(usage));
            }
            if let Some(cost) = cost {
                body.insert("cost".into(), json!(cost));
            }
            body.insert("failed_at".into(), finished_at.into());
        }
        Outcome::Cancelled { .. } => {
            body.insert("cancelled_at".into(), finished_at.into());
        }
        Outcome::Expired { .. } => {
            body.insert("expired_at".into(), finished_at.into());
        }
    }
    if !job.metadata.is_empty() {
        body.insert("metadata".into(), Value::Object(job.metadata.clone()));
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{Cost, Currency, Usage};
    use crate::events::JobError;
    use crate::job::{JobId, Kind};
    use time::macros::datetime;

    fn finished(outcome: Outcome) -> JobFinished {
        JobFinished {
            job_id: JobId::parse("JOB-771").expect("valid"),
            kind: Kind::product_description(),
            outcome,
            input: json!({"product_id": "PROD-AC15", "product_name": "AC"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            callback_url: crate::allowlist::CallbackUrl::parse("http://localhost/cb")
                .expect("a callback URL"),
            metadata: Map::new(),
            finished_at: datetime!(2026-11-29 10:00:00 UTC),
            tenant: Some("shopmax".into()),
        }
    }

    #[test]
    fn completed_payload_keeps_the_article_fields_at_the_top() {
        let body = payload(&finished(Outcome::Completed {
            result: json!({"description": "Beat the heat"}),
            model: "offline".into(),
            usage: Usage {
                input_tokens: 3,
                output_tokens: 5,
                cache_creation_input_tokens: 7,
                cache_read_input_tokens: 11,
            },
            cost: Some(Cost {
                microdollars: 123,
                currency: Currency::Usd,
            }),
        }));
        assert_eq!(
            body,
            json!({
                "type": "job.completed", "job_id": "JOB-771", "status": "completed",
                "kind": "product-description", "product_id": "PROD-AC15",
                "description": "Beat the heat", "result": {"description": "Beat the heat"},
                "model": "offline",
                "usage": {"input_tokens": 3, "output_tokens": 5,
                          "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11},
                "cost": {"microdollars": 123, "currency": "USD"},
                "completed_at": "2026-11-29T10:00:00Z"
            })
        );
    }

    #[test]
    fn failed_payload_carries_the_error() {
        let body = payload(&finished(Outcome::Failed {
            error: JobError {
                kind: "llm_error".into(),
                message: "boom".into(),
            },
            usage: None,
            cost: None,
        }));
        assert_eq!(body["type"], "job.failed");
        assert_eq!(body["status"], "failed");
        assert_eq!(
            body["error"],
            json!({"type": "llm_error", "message": "boom"})
        );
        assert!(body.get("description").is_none());
        assert!(body.get("usage").is_none(), "no answer, no usage");
        assert!(body.get("cost").is_none());
    }

    #[test]
    fn withdrawn_jobs_say_so_and_when_and_nothing_of_who() {
        let error = Some(JobError {
            kind: "cancelled".into(),
            message: "cancelled by API key `ops` before it was generated".into(),
        });
        let body = payload(&finished(Outcome::Cancelled { error }));
        assert_eq!(
            body,
            json!({
                "type": "job.cancelled", "job_id": "JOB-771", "status": "cancelled",
                "kind": "product-description", "product_id": "PROD-AC15",
                "cancelled_at": "2026-11-29T10:00:00Z"
            })
        );
        let body = payload(&finished(Outcome::Expired { error: None }));
        assert_eq!(
            (&body["type"], &body["status"], &body["expired_at"]),
            (
                &json!("job.expired"),
                &json!("expired"),
                &json!("2026-11-29T10:00:00Z")
            )
        );
    }

    #[test]
    fn a_failed_job_that_was_charged_says_what_it_cost() {
        let usage = Usage {
            input_tokens: 40,
            output_tokens: 60,
            ..Usage::default()
        };
        let body = payload(&finished(Outcome::Failed {
            error: JobError {
                kind: "invalid_output".into(),
                message: "not JSON (the model was asked twice)".into(),
            },
            usage: Some(usage),
            cost: Some(Cost {
                microdollars: 1_020,
                currency: Currency::Usd,
            }),
        }));
        assert_eq!(body["usage"]["output_tokens"], 60);
        assert_eq!(
            body["cost"],
            json!({"microdollars": 1020, "currency": "USD"})
        );
    }
}
