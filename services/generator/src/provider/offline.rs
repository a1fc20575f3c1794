//! A deterministic template writer, so the demo and the tests run with no API key.

use serde_json::{Map, Value};

use jetcall::events::Usage;
use jetcall::kinds::{OutputSpec, render_value};

use super::{Generation, GenerationRequest};

pub const MODEL: &str = "jetcall-offline";

#[derive(Debug, Clone, Copy, Default)]
pub struct Offline;

impl Offline {
    pub fn generate(&self, request: GenerationRequest<'_>) -> Generation {
        let text = match &request.spec.output {
            OutputSpec::Text { .. } => describe(request.input),
            OutputSpec::Json { required, .. } => answer_json(required, request.input),
        };
        let usage = Usage {
            input_tokens: count_words(request.prompt),
            output_tokens: count_words(&text),
            ..Usage::default()
        };
        Generation {
            text,
            model: MODEL.into(),
            usage,
            slow_down: None,
        }
    }
}

fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn field(input: &Map<String, Value>, name: &str) -> Option<String> {
    input
        .get(name)
        .map(render_value)
        .filter(|text| !text.trim().is_empty())
}

fn describe(input: &Map<String, Value>) -> String {
    let name = field(input, "product_name")
        .or_else(|| field(input, "title"))
        .unwrap_or_else(|| "this product".into());
    let specs = match input.get("specs") {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(key, value)| format!("{} {}", key.replace('_', " "), render_value(value)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => render_value(other),
        None => String::new(),
    };
    let mut text = format!("Beat the heat with the {name}, built for everyday comfort and value.");
    if !specs.trim().is_empty() {
        text.push_str(&format!(" Highlights: {specs}."));
    }
    text.push_str(
        " (Written by Jetcall's offline template writer; set ANTHROPIC_API_KEY for Claude.)",
    );
    text
}

fn answer_json(required: &[String], input: &Map<String, Value>) -> String {
    let mut answer = Map::new();
    for key in required {
        let value = match key.as_str() {
            // A person should look before money moves: the cautious choice of the three.
            "decision" => "inspect".to_owned(),
            "customer_reply" => "Thank you for your message. We will inspect the item and get back to you within two working days.".to_owned(),
            "reason" => field(input, "reason").map_or_else(
                || "Needs a human review.".to_owned(),
                |reason| format!("The customer reports: {reason}. Needs a human review."),
            ),
            other => format!("offline answer for `{other}`"),
        };
        answer.insert(key.clone(), Value::String(value));
    }
    Value::Object(answer).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetcall::kinds::builtin_kinds;
    use serde_json::json;

    #[test]
    fn product_descriptions_name_the_product_and_its_specs() {
        let kinds = builtin_kinds();
        let input = json!({"product_id": "PROD-AC15", "product_name": "LG 1.5 Ton AC", "specs": {"energy_rating": "5 Star"}});
        let out = Offline.generate(GenerationRequest {
            spec: &kinds["product-description"],
            input: input.as_object().expect("object"),
            prompt: "Write a product description for LG 1.5 Ton AC",
        });
        assert!(
            out.text.starts_with("Beat the heat with the LG 1.5 Ton AC"),
            "{}",
            out.text
        );
        assert!(out.text.contains("energy rating 5 Star"), "{}", out.text);
        assert_eq!(out.model, MODEL);
        assert!(out.usage.input_tokens > 0 && out.usage.output_tokens > 0);
    }

    #[test]
    fn json_kinds_get_every_required_key() {
        let kinds = builtin_kinds();
        let input =
            json!({"order_id": "O-1", "reason": "damaged", "customer_message": "box crushed"});
        let out = Offline.generate(GenerationRequest {
            spec: &kinds["return-analysis"],
            input: input.as_object().expect("object"),
            prompt: "Order: O-1",
        });
        let answer: Value = serde_json::from_str(&out.text).expect("JSON");
        assert_eq!(answer["decision"], "inspect");
        assert!(answer["customer_reply"].is_string());
    }
}
