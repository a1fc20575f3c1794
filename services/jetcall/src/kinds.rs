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

/// The shortest and longest time a job may be given to start (`ttl`, or `expires_at` from
/// now): shorter could not be told from a clock's skew, longer than any stream keeps a job.
pub const MIN_TTL: std::time::Duration = std::time::Duration::from_secs(1);
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    pub system: String,
    /// Whether the system prompt is marked for the provider's prompt cache (Anthropic's
    /// `cache_control`): the jobs of a kind share it, so after the first call in five minutes
    /// it is read from the cache at a tenth of the input price. The API caches nothing
    /// shorter than its minimum (1,024 to 4,096 tokens, by model) and then charges as usual.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache: bool,
    /// The user message; `{{field}}` is replaced by that field of the job's input.
    pub template: String,
    /// Input fields a job of this kind must have.
    pub required_fields: Vec<String>,
    /// The model; the provider's default when absent.
    #[serde(default)]
    pub model: Option<String>,
    pub max_tokens: u32,
    pub output: OutputSpec,
    /// How long a job of this kind may wait to be started before it expires, when its
    /// submission gives no `ttl` or `expires_at`; never, when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<std::time::Duration>,
    /// The priority of a job of this kind whose submission gives none.
    #[serde(
        default,
        skip_serializing_if = "crate::lanes::Priority::is_interactive"
    )]
    pub priority: crate::lanes::Priority,
}

impl KindSpec {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if let Some(ttl) = self.ttl
            && !(MIN_TTL..=MAX_TTL).contains(&ttl)
        {
            return Err(format!("ttl must be between 1s and 365d, not {ttl:?}"));
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

    /// The user message for `input`, at most `max_bytes` long.
    ///
    /// One pass over the template: each `{{field}}` in it becomes that field's value, and no
    /// value is searched for placeholders, so `{{` in a job's input is only text. (Filled field
    /// after field, a value holding other fields' placeholders multiplied the prompt: 10 KB of
    /// input made hundreds of megabytes.) A placeholder naming no field of the input is left as
    /// written. The length is checked before each piece is added, so an oversized prompt is
    /// never built.
    pub fn render(
        &self,
        input: &Map<String, Value>,
        max_bytes: usize,
    ) -> Result<String, RenderError> {
        let mut prompt = Bounded {
            sink: String::with_capacity(self.template.len().min(max_bytes)),
            written: 0,
            max_bytes,
        };
        self.fill(input, &mut prompt)?;
        Ok(prompt.sink)
    }

    /// Whether [`Self::render`] would make a prompt of `input`, measured without building it
    /// (its length in bytes): what the gateway asks of every job it accepts.
    pub fn check_prompt(
        &self,
        input: &Map<String, Value>,
        max_bytes: usize,
    ) -> Result<usize, RenderError> {
        let mut measure = Bounded {
            sink: Discard,
            written: 0,
            max_bytes,
        };
        self.fill(input, &mut measure)?;
        Ok(measure.written)
    }

    fn fill(&self, input: &Map<String, Value>, out: &mut impl Put) -> Result<(), RenderError> {
        let mut rest = self.template.as_str();
        while let Some(open) = rest.find("{{") {
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                break;
            };
            match input.get(&after[..close]) {
                Some(value) => {
                    out.put(&rest[..open])?;
                    put_value(value, out)?;
                    rest = &after[close + 2..];
                }
                // Not a field: keep its first brace and look again from the next, so that
                // `{{{field}}}` still finds `{{field}}`.
                None => {
                    out.put(&rest[..=open])?;
                    rest = &rest[open + 1..];
                }
            }
        }
        out.put(rest)
    }
}

/// Why a job's prompt was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "the job's input makes a prompt longer than {max_bytes} bytes (generator.max_prompt_bytes)"
    )]
    TooLong { max_bytes: usize },
}

/// Where rendered text goes, piece by piece.
trait Put {
    fn put(&mut self, piece: &str) -> Result<(), RenderError>;
}

impl Put for String {
    fn put(&mut self, piece: &str) -> Result<(), RenderError> {
        self.push_str(piece);
        Ok(())
    }
}

/// Text that is only measured.
struct Discard;

impl Put for Discard {
    fn put(&mut self, _: &str) -> Result<(), RenderError> {
        Ok(())
    }
}

/// A prompt being rendered (or measured), refused as soon as it would pass its bound.
struct Bounded<S> {
    sink: S,
    written: usize,
    max_bytes: usize,
}

impl<S: Put> Put for Bounded<S> {
    fn put(&mut self, piece: &str) -> Result<(), RenderError> {
        if piece.len() > self.max_bytes - self.written {
            return Err(RenderError::TooLong {
                max_bytes: self.max_bytes,
            });
        }
        self.written += piece.len();
        self.sink.put(piece)
    }
}

/// Strings as they are; an object as `key: value` lines, which reads well in a prompt and in
/// the offline writer's output.
pub fn render_value(value: &Value) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = put_value(value, &mut text);
    text
}

fn put_value(value: &Value, out: &mut impl Put) -> Result<(), RenderError> {
    match value {
        Value::String(text) => out.put(text),
        Value::Object(map) => {
            for (n, (key, value)) in map.iter().enumerate() {
                out.put(if n == 0 { "- " } else { "\n- " })?;
                for (i, word) in key.split('_').enumerate() {
                    if i > 0 {
                        out.put(" ")?;
                    }
                    out.put(word)?;
                }
                out.put(": ")?;
                put_value(value, out)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.put(", ")?;
                }
                put_value(item, out)?;
            }
            Ok(())
        }
        other => out.put(&other.to_string()),
    }
}

pub fn builtin_kinds() -> BTreeMap<String, KindSpec> {
    let product_description = KindSpec {
        system: "You are a senior e-commerce copywriter for an Indian electronics retailer. \
                 You write accurate, vivid product descriptions that help shoppers decide. \
                 Never invent specifications that are not given."
            .into(),
        // Far below the shortest prompt the API will cache.
        cache: false,
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
        ttl: None,
        priority: crate::lanes::Priority::Interactive,
    };
    let return_analysis = KindSpec {
        system: "You review product return requests for an online retailer. Decide fairly and \
                 explain briefly. Answer with a single JSON object and nothing else."
            .into(),
        cache: false,
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
        ttl: None,
        priority: crate::lanes::Priority::Interactive,
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

    fn render(spec: &KindSpec, input: &Map<String, Value>) -> String {
        spec.render(input, usize::MAX).expect("no bound")
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
        let text = render(
            spec,
            &input(json!({
            "product_id": "PROD-AC15",
            "product_name": "LG AC",
            "specs": {"energy_rating": "5 Star"}
            })),
        );
        assert!(text.contains("LG AC (catalogue id PROD-AC15)"), "{text}");
        assert!(text.contains("- energy rating: 5 Star"), "{text}");
        assert!(!text.contains("{{"), "{text}");
    }

    #[test]
    fn a_value_holding_another_fields_placeholder_stays_literal() {
        let spec = &builtin_kinds()["product-description"];
        let text = render(
            spec,
            &input(json!({
                "product_id": "{{specs}}",
                "product_name": "{{product_id}} AC",
                "specs": "{{product_name}}"
            })),
        );
        assert!(
            text.contains("for {{product_id}} AC (catalogue id {{specs}})"),
            "{text}"
        );
        assert!(
            text.contains("Specifications:\n{{product_name}}\n"),
            "{text}"
        );
    }

    #[test]
    fn a_template_bomb_renders_to_the_size_of_its_input() {
        let spec = &builtin_kinds()["product-description"];
        let bomb = input(json!({
            "product_id": "{{product_name}}".repeat(50),
            "product_name": "{{specs}}".repeat(50),
            "specs": "x".repeat(50)
        }));
        let values: usize = bomb.values().filter_map(Value::as_str).map(str::len).sum();
        let text = render(spec, &bomb);
        assert!(text.len() <= spec.template.len() + values, "{}", text.len());
    }

    #[test]
    fn a_prompt_over_its_bound_is_refused_and_one_at_it_is_made() {
        let spec = &builtin_kinds()["product-description"];
        let job = input(json!({"product_id": "P", "product_name": "N", "specs": "S"}));
        let full = render(spec, &job);
        assert_eq!(spec.render(&job, full.len()), Ok(full.clone()));
        assert_eq!(
            spec.render(&job, full.len() - 1),
            Err(RenderError::TooLong {
                max_bytes: full.len() - 1
            })
        );
        let huge =
            input(json!({"product_id": "P", "product_name": "N", "specs": "x".repeat(10_000)}));
        let refused = spec.render(&huge, 1024).expect_err("over the bound");
        assert!(refused.to_string().contains("generator.max_prompt_bytes"));
    }

    #[test]
    fn placeholders_that_name_no_field_are_left_as_written() {
        let spec = KindSpec {
            template: "{{a}} {{missing}} {{{a}}} {{b".into(),
            ..builtin_kinds()["product-description"].clone()
        };
        let text = render(&spec, &input(json!({"a": "A"})));
        assert_eq!(text, "A {{missing}} {A} {{b");
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

    #[test]
    fn a_value_renders_as_text_and_the_measure_agrees_with_the_prompt() {
        let spec = KindSpec {
            template: "Name: {{name}}\nSpecs:\n{{specs}}\nTags: {{tags}} ({{price}})".into(),
            ..builtin_kinds()["product-description"].clone()
        };
        let input = json!({
            "name": "LG AC",
            "specs": {"cooling_capacity": "1.5 Ton", "star_rating": 5},
            "tags": ["inverter", "split"],
            "price": 38990.5,
        });
        let input = input.as_object().expect("an object");
        let prompt = spec.render(input, usize::MAX).expect("rendered");
        assert_eq!(
            prompt,
            "Name: LG AC\nSpecs:\n- cooling capacity: 1.5 Ton\n- star rating: 5\nTags: inverter, split (38990.5)"
        );
        for max_bytes in [prompt.len() - 1, prompt.len(), prompt.len() + 1] {
            assert_eq!(
                spec.check_prompt(input, max_bytes).is_ok(),
                spec.render(input, max_bytes).is_ok(),
                "at {max_bytes} bytes"
            );
        }
        assert!(spec.check_prompt(input, prompt.len()).is_ok());
        assert!(spec.check_prompt(input, prompt.len() - 1).is_err());
    }
}
