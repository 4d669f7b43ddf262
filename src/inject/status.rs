//! The `wsdrain.io/status` annotation: which injector wrote the pod, with what image,
//! what it added, and the JSON Patch that undoes it (like `sidecar.istio.io/status`).
//! The undo patch is computed from the pod before and after injection, so `uninject`
//! restores the original exactly; `test` operations make it refuse a pod whose added
//! containers were renamed or reordered since.

use json_patch::{Patch, PatchOperation, TestOperation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{InjectError, STATUS_ANNOTATION, clip};

/// Version written into the status; a different one means "update the agent".
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Status {
    pub version: String,
    pub image: String,
    pub containers: Vec<String>,
    pub init_containers: Vec<String>,
    pub volumes: Vec<String>,
    /// Turns the injected pod back into the original.
    pub undo: Patch,
}

fn field() -> String {
    super::options::field(STATUS_ANNOTATION)
}

impl Status {
    /// Describes the change from `original` to `injected` (which carries a status
    /// annotation of any value, so the undo removes it too).
    pub fn new(image: &str, original: &Value, injected: &Value) -> Status {
        let mut undo = Vec::new();
        // Removals shift array indexes: each test reads the pod as it is at that step.
        let mut step = injected.clone();
        for op in json_patch::diff(injected, original).0 {
            if let PatchOperation::Remove(r) = &op {
                // A named element, or a whole list of them (a list we created).
                let removed = step.pointer(r.path.as_str());
                let named = match removed {
                    Some(Value::Array(items)) => items
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (format!("{}/{i}/name", r.path), v))
                        .collect(),
                    Some(v) => vec![(format!("{}/name", r.path), v)],
                    None => vec![],
                };
                for (path, v) in named {
                    let (Some(name), Ok(path)) = (
                        v.get("name").and_then(Value::as_str),
                        json_patch::jsonptr::PointerBuf::parse(path),
                    ) else {
                        continue;
                    };
                    undo.push(PatchOperation::Test(TestOperation {
                        path,
                        value: Value::String(name.to_string()),
                    }));
                }
            }
            // The diff applies by construction; a failure only weakens the next test.
            let _ = json_patch::patch(&mut step, std::slice::from_ref(&op));
            undo.push(op);
        }
        let added = |list: &str| -> Vec<String> {
            let names = |pod: &Value| -> Vec<String> {
                pod.pointer(&format!("/spec/{list}"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            };
            let before = names(original);
            names(injected)
                .into_iter()
                .filter(|n| !before.contains(n))
                .collect()
        };
        Status {
            version: VERSION.to_string(),
            image: image.to_string(),
            containers: added("containers"),
            init_containers: added("initContainers"),
            volumes: added("volumes"),
            undo: Patch(undo),
        }
    }

    /// The status of an injected pod; `Ok(None)` when the pod was not injected.
    pub fn of(pod: &Value) -> Result<Option<Status>, InjectError> {
        let Some(raw) = pod.pointer(&format!(
            "/metadata/annotations/{}",
            super::escape_token(STATUS_ANNOTATION)
        )) else {
            return Ok(None);
        };
        let text = raw
            .as_str()
            .ok_or_else(|| InjectError::new(field(), "is not a string"))?;
        serde_json::from_str(text).map(Some).map_err(|e| {
            InjectError::new(
                field(),
                format!(
                    "{} is not a status this injector can read ({e}); it was written by an older wsdrain: \
                     remove the wsdrain containers by hand or inject the original manifest again",
                    super::shown(text)
                ),
            )
        })
    }

    pub fn to_annotation(&self) -> String {
        // Serializing plain strings and a Patch cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The pod as it was before injection.
    pub fn undo(&self, pod: &Value) -> Result<Value, InjectError> {
        let mut original = pod.clone();
        json_patch::patch(&mut original, &self.undo).map_err(|e| {
            InjectError::new(
                field(),
                clip(&format!(
                    "the pod changed since injection, the undo record no longer applies: {e}"
                )),
            )
        })?;
        Ok(original)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn undo_restores_and_checks_names() {
        let original =
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}});
        let injected = json!({
            "metadata": {"name": "p", "annotations": {STATUS_ANNOTATION: ""}},
            "spec": {"containers": [{"name": "app", "lifecycle": {"preStop": {}}}],
                     "initContainers": [{"name": "wsdrain"}]}
        });
        let s = Status::new("img", &original, &injected);
        assert_eq!(s.init_containers, ["wsdrain"]);
        assert!(s.containers.is_empty());
        assert_eq!(s.undo(&injected).unwrap(), original);

        let mut moved = injected.clone();
        moved["spec"]["initContainers"][0]["name"] = json!("other");
        let err = s.undo(&moved).unwrap_err();
        assert!(err.reason.contains("changed since injection"), "{err}");

        let mut annotated = injected.clone();
        annotated["metadata"]["annotations"][STATUS_ANNOTATION] = json!(s.to_annotation());
        assert_eq!(Status::of(&annotated).unwrap(), Some(s));
        assert_eq!(Status::of(&original).unwrap(), None);
        annotated["metadata"]["annotations"][STATUS_ANNOTATION] = json!("injected");
        assert!(
            Status::of(&annotated)
                .unwrap_err()
                .reason
                .contains("older wsdrain")
        );
    }
}
