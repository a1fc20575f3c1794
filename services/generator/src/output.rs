//! Turning a model's text into a job result, as the kind's output type says.

use serde_json::{Map, Value};

use jetcall::kinds::OutputSpec;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    #[error("the model answered with empty text")]
    Empty,
    #[error("the model's answer is not a JSON object: {0}")]
    NotJson(String),
    #[error("the model's JSON answer lacks `{0}`")]
    MissingKey(String),
    #[error("the model's JSON answer has `{key}` = {found}, not one of {allowed:?}")]
    NotAllowed {
        key: String,
        found: String,
        allowed: Vec<String>,
    },
}

pub fn to_result(spec: &OutputSpec, text: &str) -> Result<Value, OutputError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(OutputError::Empty);
    }
    match spec {
        OutputSpec::Text { field } => {
            let mut result = Map::new();
            result.insert(field.clone(), Value::String(text.to_owned()));
            Ok(Value::Object(result))
        }
        OutputSpec::Json { required, one_of } => {
            let object: Map<String, Value> = serde_json::from_str(strip_fence(text))
                .map_err(|err| OutputError::NotJson(err.to_string()))?;
            if let Some(missing) = required
                .iter()
                .find(|key| !object.contains_key(key.as_str()))
            {
                return Err(OutputError::MissingKey(missing.clone()));
            }
            for (key, allowed) in one_of {
                let Some(found) = object.get(key) else {
                    continue;
                };
                if !found
                    .as_str()
                    .is_some_and(|found| allowed.iter().any(|a| a == found))
                {
                    return Err(OutputError::NotAllowed {
                        key: key.clone(),
                        found: found.to_string(),
                        allowed: allowed.clone(),
                    });
                }
            }
            Ok(Value::Object(object))
        }
    }
}

/// Models often wrap JSON in a Markdown fence despite being asked not to.
fn strip_fence(text: &str) -> &str {
    let Some(inner) = text.strip_prefix("```") else {
        return text;
    };
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_is_stored_under_its_field() {
        let spec = OutputSpec::Text {
            field: "description".into(),
        };
        assert_eq!(to_result(&spec, " Hi \n"), Ok(json!({"description": "Hi"})));
        assert_eq!(to_result(&spec, "  "), Err(OutputError::Empty));
    }

    #[test]
    fn json_must_be_an_object_with_the_required_keys() {
        let spec = OutputSpec::Json {
            required: vec!["decision".into()],
            one_of: [(
                "decision".to_owned(),
                vec!["approve".into(), "reject".into()],
            )]
            .into(),
        };
        assert_eq!(
            to_result(&spec, "```json\n{\"decision\": \"approve\"}\n```"),
            Ok(json!({"decision": "approve"}))
        );
        assert_eq!(
            to_result(&spec, "{}"),
            Err(OutputError::MissingKey("decision".into()))
        );
        assert!(matches!(
            to_result(&spec, "approve"),
            Err(OutputError::NotJson(_))
        ));
        assert!(matches!(
            to_result(&spec, r#"{"decision": "maybe"}"#),
            Err(OutputError::NotAllowed { .. })
        ));
    }
}
