//! The JSON Schemas of a job's input as this gateway checks it (`submission::check_input`):
//! each configured kind's required fields, and the shape every value must have. They go into
//! `/openapi.json`, so a client (or a fuzzer) can tell from the document alone which bodies
//! are taken, instead of learning it from `422`s.

use serde_json::{Value, json};

use jetcall::Config;
use jetcall::signing::SigningKey;

use crate::submission::MAX_FIELD_CHARS;

/// Text without the control characters `check_value` refuses (all of Unicode's `Cc` but tab,
/// line feed and carriage return).
const NO_CONTROL_CHARACTERS: &str =
    "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$";

/// The schemas to add to the document's components, by name.
pub fn components(config: &Config) -> Vec<(&'static str, Value)> {
    let text =
        json!({"type": "string", "maxLength": MAX_FIELD_CHARS, "pattern": NO_CONTROL_CHARACTERS});
    let scalar = json!({"anyOf": [
        {"$ref": "#/components/schemas/InputText"},
        {"type": ["number", "boolean", "null"]}
    ]});
    let value = json!({
        "description": "An input value: text, a number, a boolean, or a flat list or object of them",
        "anyOf": [
            {"$ref": "#/components/schemas/InputScalar"},
            {"type": "array", "items": {"$ref": "#/components/schemas/InputScalar"}},
            {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/InputScalar"}}
        ]
    });
    let required = json!({
        "description": "A required input value: as `InputValue`, and not blank, null or empty",
        "anyOf": [
            {"allOf": [{"$ref": "#/components/schemas/InputText"}, {"pattern": "\\S"}]},
            {"type": ["number", "boolean"]},
            {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/InputScalar"}},
            {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/components/schemas/InputScalar"}}
        ]
    });
    vec![
        ("InputText", text),
        ("InputScalar", scalar),
        ("InputValue", value),
        ("RequiredInputValue", required),
        ("SigningSecret", signing_secret()),
        ("KindInput", kind_inputs(config)),
    ]
}

/// `input` by `kind`: one alternative per configured kind, naming its required fields.
fn kind_inputs(config: &Config) -> Value {
    let alternatives: Vec<Value> = config
        .kinds
        .iter()
        .map(|(kind, spec)| {
            let properties: serde_json::Map<String, Value> = spec
                .required_fields
                .iter()
                .map(|field| {
                    (
                        field.clone(),
                        json!({"$ref": "#/components/schemas/RequiredInputValue"}),
                    )
                })
                .collect();
            json!({
                "properties": {
                    "kind": {"const": kind},
                    "input": {
                        "type": "object",
                        "required": spec.required_fields,
                        "properties": properties,
                        "additionalProperties": {"$ref": "#/components/schemas/InputValue"}
                    }
                }
            })
        })
        .collect();
    json!({
        "description": "What each kind requires of `input`: the kind's fields, none of them blank",
        "oneOf": alternatives
    })
}

/// A `whsec_<base64>` secret (or bare base64) of at least `SigningKey::MIN_BYTES` bytes, in
/// base64's canonical form, which is the only form the decoder takes.
fn signing_secret() -> Value {
    let groups = SigningKey::MIN_BYTES.div_ceil(3);
    let pattern = format!(
        "^(whsec_)?(?:[A-Za-z0-9+/]{{4}}){{{groups},}}(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{{2}}[AEIMQUYcgkosw048]=)?$"
    );
    json!({
        "type": "string",
        "description": "A Standard Webhooks secret: `whsec_` and the base64 of at least 24 random bytes",
        "pattern": pattern
    })
}

/// The body of `POST /api/v1/jobs`, `SubmitJob`, with `input` held to what its kind requires.
/// A gateway without `callback.secrets_key` cannot keep a job's own secret, so there the body
/// has no `signing_secret`.
pub fn constrain_submit_job(schema: &mut Value, config: &Config) {
    schema["allOf"] = json!([{"$ref": "#/components/schemas/KindInput"}]);
    if config.callback.secrets_key.is_none() {
        if let Some(properties) = schema["properties"].as_object_mut() {
            properties.remove("signing_secret");
        }
        return;
    }
    schema["properties"]["signing_secret"] = json!({
        "description": schema["properties"]["signing_secret"]["description"],
        "anyOf": [{"$ref": "#/components/schemas/SigningSecret"}, {"type": "null"}]
    });
}

/// The article's body, `GenerateDescription`: its fields are the `product-description` kind's
/// input, so each required one is held to `RequiredInputValue`.
pub fn constrain_generate_description(schema: &mut Value, config: &Config) {
    let Some(spec) = config.kinds.get("product-description") else {
        return;
    };
    for field in ["product_id", "product_name", "specs"] {
        let description = schema["properties"][field]["description"].clone();
        let shape = if spec
            .required_fields
            .iter()
            .any(|required| required == field)
        {
            "RequiredInputValue"
        } else {
            "InputValue"
        };
        let mut constrained = json!({"$ref": format!("#/components/schemas/{shape}")});
        if field != "specs" {
            constrained = json!({"allOf": [constrained, {"type": "string"}]});
        }
        if !description.is_null() {
            constrained["description"] = description;
        }
        schema["properties"][field] = constrained;
    }
}
