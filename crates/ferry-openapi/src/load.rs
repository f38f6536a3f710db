//! Reading the document and preparing the copy that the schema validators resolve against.

use std::path::Path;

use serde_json::{Map, Value};

use crate::SpecError;

pub(crate) fn read_document(path: &Path) -> Result<Value, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_document(&text).map_err(|message| SpecError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// JSON is valid YAML, but the JSON parser is several times faster and gives
/// better error positions, so a document that looks like JSON goes there first.
pub(crate) fn parse_document(text: &str) -> Result<Value, String> {
    if text.trim_start().starts_with('{') {
        if let Ok(v) = serde_json::from_str(text) {
            return Ok(v);
        }
    }
    match serde_yaml_ng::from_str::<Value>(text) {
        Ok(v) => Ok(v),
        // Deserialising straight into `serde_json::Value` rejects non-string
        // mapping keys (an unquoted `200:` status is an integer in YAML); the
        // detour through the YAML value model stringifies them instead.
        Err(direct) => {
            let yaml: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
            yaml_to_json(yaml).map_err(|e| format!("{e} (direct parse: {direct})"))
        }
    }
}

fn yaml_to_json(v: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| format!("number {n} has no JSON representation"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .map(yaml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = Map::with_capacity(m.len());
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    Y::Null => "null".to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

/// Keys whose children are names chosen by the document author, not keywords:
/// a property called `examples` must survive the stripping below.
const NAME_MAPS: &[&str] = &["properties", "patternProperties", "$defs", "definitions"];

/// OpenAPI `example`/`examples` are annotations, but Morpheus's point at files
/// next to the original sources (`../components/examples/x.json`) that are not
/// shipped with the bundle. A schema compiler that walks every `$ref` it sees
/// would try to fetch them, so the copy the validators see has none.
pub(crate) fn strip_examples(v: &mut Value) {
    strip(v, false);
}

fn strip(v: &mut Value, names: bool) {
    match v {
        Value::Object(map) => {
            if !names {
                map.remove("example");
                map.remove("examples");
            }
            for (k, child) in map.iter_mut() {
                strip(child, !names && NAME_MAPS.contains(&k.as_str()));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| strip(c, false)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integer_keys_become_strings() {
        let v = parse_document("responses:\n  200:\n    description: ok\n").unwrap();
        assert_eq!(v, json!({"responses": {"200": {"description": "ok"}}}));
    }

    #[test]
    fn strips_annotations_but_not_property_names() {
        let mut v = json!({
            "example": 1,
            "schema": {
                "type": "object",
                "examples": [{"a": 1}],
                "properties": {"examples": {"type": "string", "example": "x"}}
            },
            "content": {"application/json": {"examples": {"a": {"$ref": "../x.json"}}}}
        });
        strip_examples(&mut v);
        assert_eq!(
            v,
            json!({
                "schema": {"type": "object", "properties": {"examples": {"type": "string"}}},
                "content": {"application/json": {}}
            })
        );
    }
}
