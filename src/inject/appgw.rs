//! Azure Application Gateway routing straight to injected pods. The gateway resets
//! every WebSocket whenever its backend pool changes, so draining the pods cannot
//! save those sessions: a stable proxy tier belongs between the two. A pod does not
//! show this (AGIC reads Ingresses, Services and endpoints; it marks no pod), so only
//! `wsdrain inject`, which sees the whole manifest set, can tell: an Ingress of class
//! Application Gateway whose backend Service selects an injected pod template.

use serde_json::Value;

use super::STATUS_ANNOTATION;

const AGIC_CLASS: &str = "azure/application-gateway";
const AGIC_INGRESS_CLASS: &str = "azure-application-gateway";

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn namespace(v: &Value) -> &str {
    text(v, "/metadata/namespace").unwrap_or("")
}

fn is_agic(ingress: &Value) -> bool {
    let annotation = ingress
        .pointer("/metadata/annotations")
        .and_then(|a| a.get("kubernetes.io/ingress.class"))
        .and_then(Value::as_str);
    annotation == Some(AGIC_CLASS)
        || text(ingress, "/spec/ingressClassName") == Some(AGIC_INGRESS_CLASS)
}

/// Names of the Services an Ingress sends traffic to.
fn backends(ingress: &Value) -> Vec<&str> {
    let mut out: Vec<&str> = text(ingress, "/spec/defaultBackend/service/name")
        .into_iter()
        .collect();
    let rules = ingress.pointer("/spec/rules").and_then(Value::as_array);
    for rule in rules.into_iter().flatten() {
        let paths = rule.pointer("/http/paths").and_then(Value::as_array);
        out.extend(
            paths
                .into_iter()
                .flatten()
                .filter_map(|p| text(p, "/backend/service/name")),
        );
    }
    out
}

/// The pod template of a workload (the object itself for a Pod).
fn template(object: &Value) -> Option<&Value> {
    object.pointer(super::cli::template_pointer(text(object, "/kind")?)?)
}

/// One warning per (Ingress, Service, injected workload) found in `objects`.
pub fn warnings(objects: &[&Value]) -> Vec<String> {
    let mut out = Vec::new();
    let of_kind = |kind: &'static str| {
        objects
            .iter()
            .copied()
            .filter(move |o| text(o, "/kind") == Some(kind))
    };
    for ingress in of_kind("Ingress").filter(|i| is_agic(i)) {
        let ns = namespace(ingress);
        for backend in backends(ingress) {
            let services = of_kind("Service")
                .filter(|s| namespace(s) == ns && text(s, "/metadata/name") == Some(backend));
            for service in services {
                let Some(selector) = service.pointer("/spec/selector").and_then(Value::as_object)
                else {
                    continue;
                };
                if selector.is_empty() {
                    continue;
                }
                for workload in objects.iter().filter(|o| namespace(o) == ns) {
                    let Some(tpl) = template(workload) else {
                        continue;
                    };
                    let injected = tpl
                        .pointer("/metadata/annotations")
                        .is_some_and(|a| a.get(STATUS_ANNOTATION).is_some());
                    let labels = tpl.pointer("/metadata/labels");
                    let selected = selector
                        .iter()
                        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
                    if injected && selected {
                        out.push(format!(
                            "Ingress/{} (Azure Application Gateway) routes straight to the pods of {}/{} through Service/{backend}: the gateway resets every WebSocket whenever its backend pool changes, drained or not; put a stable in-cluster proxy tier between them (docs/application-gateway.md)",
                            text(ingress, "/metadata/name").unwrap_or("?"),
                            text(workload, "/kind").unwrap_or("?"),
                            text(workload, "/metadata/name").unwrap_or("?"),
                        ));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn agic_ingress_to_injected_pods_is_found() {
        let ingress = json!({"kind": "Ingress", "metadata": {"name": "web", "namespace": "a",
            "annotations": {"kubernetes.io/ingress.class": AGIC_CLASS}},
            "spec": {"rules": [{"http": {"paths": [{"backend": {"service": {"name": "chat"}}}]}}]}});
        let service = json!({"kind": "Service", "metadata": {"name": "chat", "namespace": "a"},
            "spec": {"selector": {"app": "chat"}}});
        let deployment = |injected: bool, ns: &str| {
            let annotations = if injected {
                json!({STATUS_ANNOTATION: "{}"})
            } else {
                json!({})
            };
            json!({"kind": "Deployment", "metadata": {"name": "chat", "namespace": ns},
                "spec": {"template": {"metadata": {"labels": {"app": "chat", "x": "y"},
                    "annotations": annotations}}}})
        };
        let (yes, no, other_ns) = (
            deployment(true, "a"),
            deployment(false, "a"),
            deployment(true, "b"),
        );
        let found = warnings(&[&ingress, &service, &yes, &no, &other_ns]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("Ingress/web (Azure Application Gateway) routes straight to the pods of Deployment/chat through Service/chat"));

        let mut nginx = ingress.clone();
        nginx["metadata"]["annotations"] = json!({});
        nginx["spec"]["ingressClassName"] = json!("nginx");
        assert!(warnings(&[&nginx, &service, &yes]).is_empty());
        nginx["spec"]["ingressClassName"] = json!(AGIC_INGRESS_CLASS);
        assert_eq!(warnings(&[&nginx, &service, &yes]).len(), 1);
    }
}
