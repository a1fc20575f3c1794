//! Job kinds: what a kind needs in its input and how it is put to the model.
//!
//! The gateway uses a kind's required fields to refuse incomplete jobs up front; the generator
//! uses its prompt and output type. Both read the same `[kinds.<name>]` configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What the model is expected to answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum OutputSpec {
    /// Plain text, stored in the result under `field`.
    Text { field: String },
    /// A JSON object that must carry every key in `required`, and, for each key in `one_of`,
    /// one of the strings listed there; stored as the result itself.
    Json {
        required: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        one_of: BTreeMap<String, Vec<String>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    pub system: String,
    /// The user message; `{{field}}` is replaced by that field of the job's input.
    pub template: String,
    /// Input fields a job of this kind must have.
    pub required_fields: Vec<String>,
    /// The model; the provider's default when absent.
    #[serde(default)]
    pub model: Option<String>,
    pub max_tokens: u32,
    pub output: OutputSpec,
}

impl KindSpec {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        for field in &self.required_fields {
            if !self.template.contains(&format!("{{{{{field}}}}}")) {
                return Err(format!(
                    "required field `{field}` does not appear in the template as {{{{{field}}}}}"
                ));
            }
        }
        Ok(())
    }

    /// The names of the required fields `input` lacks or leaves empty.
    pub fn missing_fields(&self, input: &Map<String, Value>) -> Vec<&str> {
        self.required_fields
            .iter()
            .filter(|field| match input.get(field.as_str()) {
                None | Some(Value::Null) => true,
                Some(Value::String(text)) => text.trim().is_empty(),
                Some(Value::Object(map)) => map.is_empty(),
                Some(Value::Array(items)) => items.is_empty(),
                Some(_) => false,
            })
            .map(String::as_str)
            .collect()
    }

    /// The user message for `input`.
    pub fn render(&self, input: &Map<String, Value>) -> String {
        let mut text = self.template.clone();
        for (field, value) in input {
            let placeholder = format!("{{{{{field}}}}}");
            if text.contains(&placeholder) {
                text = text.replace(&placeholder, &render_value(value));
            }
        }
        text
    }
}

/// Strings as they are; an object as `key: value` lines, which reads well in a prompt and in
/// the offline writer's output.
pub fn render_value(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| format!("- {}: {}", key.replace('_', " "), render_value(value)))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Array(items) => items
            .iter()
            .map(render_value)
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

pub fn builtin_kinds() -> BTreeMap<String, KindSpec> {
    let product_description = KindSpec {
        system: "You are a senior e-commerce copywriter for an Indian electronics retailer. \
                 You write accurate, vivid product descriptions that help shoppers decide. \
                 Never invent specifications that are not given."
            .into(),
        template:
            "Write a product description for {{product_name}} (catalogue id {{product_id}}).\n\n\
                   Specifications:\n{{specs}}\n\n\
                   Write 120 to 180 words in two short paragraphs: open with the main benefit, \
                   then cover the specifications that matter most. Answer with the description \
                   only."
                .into(),
        required_fields: vec!["product_id".into(), "product_name".into(), "specs".into()],
        model: None,
        max_tokens: 1024,
        output: OutputSpec::Text {
            field: "description".into(),
        },
    };
    let return_analysis = KindSpec {
        system: "You review product return requests for an online retailer. Decide fairly and \
                 explain briefly. Answer with a single JSON object and nothing else."
            .into(),
        template: "Order: {{order_id}}\nReason given: {{reason}}\nCustomer message: \
                   {{customer_message}}\n\nAnswer with JSON: {\"decision\": \"approve\" | \
                   \"reject\" | \"inspect\", \"reason\": \"...\", \"customer_reply\": \"...\"}"
            .into(),
        required_fields: vec![
            "order_id".into(),
            "reason".into(),
            "customer_message".into(),
        ],
        model: None,
        max_tokens: 1024,
        output: OutputSpec::Json {
            required: vec!["decision".into(), "reason".into(), "customer_reply".into()],
            one_of: BTreeMap::from([(
                "decision".to_owned(),
                vec!["approve".into(), "reject".into(), "inspect".into()],
            )]),
        },
    };
    BTreeMap::from([
        ("product-description".to_owned(), product_description),
        ("return-analysis".to_owned(), return_analysis),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn builtin_kinds_are_valid() {
        for (name, spec) in builtin_kinds() {
            assert_eq!(spec.validate(), Ok(()), "{name}");
        }
    }

    #[test]
    fn render_fills_every_placeholder_and_lists_object_specs() {
        let spec = &builtin_kinds()["product-description"];
        let text = spec.render(&input(json!({
            "product_id": "PROD-AC15",
            "product_name": "LG AC",
            "specs": {"energy_rating": "5 Star"}
        })));
        assert!(text.contains("LG AC (catalogue id PROD-AC15)"), "{text}");
        assert!(text.contains("- energy rating: 5 Star"), "{text}");
        assert!(!text.contains("{{"), "{text}");
    }

    #[test]
    fn missing_fields_counts_blank_values_as_missing() {
        let spec = &builtin_kinds()["product-description"];
        let missing = spec.missing_fields(&input(json!({"product_id": " ", "specs": {}})));
        assert_eq!(missing, vec!["product_id", "product_name", "specs"]);
    }

    #[test]
    fn a_required_field_missing_from_the_template_is_a_config_error() {
        let mut spec = builtin_kinds()["product-description"].clone();
        spec.required_fields.push("colour".into());
        assert!(spec.validate().unwrap_err().contains("colour"));
    }
}
