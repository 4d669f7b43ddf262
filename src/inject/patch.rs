//! Collects RFC 6902 `add`/`replace` operations with RFC 6901-escaped paths.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::Value;

use super::{InjectError, escape_token};

/// A JSON Pointer built from unescaped tokens.
pub fn pointer(tokens: &[&str]) -> String {
    tokens
        .iter()
        .map(|t| format!("/{}", escape_token(t)))
        .collect()
}

#[derive(Default, Clone)]
pub struct Ops(Vec<(Op, String, Value)>);

#[derive(Clone, Copy)]
enum Op {
    Add,
    Replace,
    Remove,
}

impl Ops {
    pub fn add(&mut self, path: &[&str], value: Value) {
        self.0.push((Op::Add, pointer(path), value));
    }

    pub fn replace(&mut self, path: &[&str], value: Value) {
        self.0.push((Op::Replace, pointer(path), value));
    }

    pub fn remove(&mut self, path: &[&str]) {
        self.0.push((Op::Remove, pointer(path), Value::Null));
    }

    /// Appends to the array at `path` with `/-`, or creates it when absent.
    pub fn push(&mut self, path: &[&str], exists: bool, value: Value) {
        if exists {
            let mut p = path.to_vec();
            p.push("-");
            self.add(&p, value);
        } else {
            self.add(path, Value::Array(vec![value]));
        }
    }

    /// Sets `key` in the object at `path`, creating the object when absent.
    pub fn set(&mut self, path: &[&str], exists: bool, key: &str, value: Value) {
        if exists {
            let mut p = path.to_vec();
            p.push(key);
            self.add(&p, value);
        } else {
            let mut obj = serde_json::Map::new();
            obj.insert(key.to_string(), value);
            self.add(path, Value::Object(obj));
        }
    }

    pub fn into_patch(self) -> Result<Patch, InjectError> {
        self.0
            .into_iter()
            .map(|(op, path, value)| {
                let path = PointerBuf::parse(path.as_str())
                    .map_err(|e| InjectError::new(path.clone(), format!("bad pointer: {e}")))?;
                Ok(match op {
                    Op::Add => PatchOperation::Add(AddOperation { path, value }),
                    Op::Replace => PatchOperation::Replace(ReplaceOperation { path, value }),
                    Op::Remove => PatchOperation::Remove(RemoveOperation { path }),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arrays_created_or_appended_and_keys_escaped() {
        let mut ops = Ops::default();
        ops.push(&["spec", "containers"], true, json!({"name": "a"}));
        ops.push(
            &["spec", "readinessGates"],
            false,
            json!({"conditionType": "x"}),
        );
        ops.set(
            &["metadata", "annotations"],
            true,
            "wsdrain.io/status",
            json!("injected"),
        );
        ops.set(&["metadata", "labels"], false, "a~b", json!("1"));
        let patch = serde_json::to_value(ops.into_patch().unwrap()).unwrap();
        let paths: Vec<&str> = patch
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "/spec/containers/-",
                "/spec/readinessGates",
                "/metadata/annotations/wsdrain.io~1status",
                "/metadata/labels"
            ]
        );
    }
}
