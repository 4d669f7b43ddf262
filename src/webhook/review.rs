//! AdmissionReview v1 in, AdmissionReview v1 out. Pure: bytes in, status + bytes out, so
//! it is tested without a server and the server stays a thin shell.

use base64::prelude::{BASE64_STANDARD, Engine as _};
use http::StatusCode;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use super::metrics::Outcome;
use crate::inject::{Decision, InjectSettings, inject_pod};

const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

/// The answer to one POST /mutate, and what to log about it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub outcome: Outcome,
    pub uid: String,
    /// Pod (namespace/name) when known, for the log line.
    pub object: String,
    /// Why it was skipped, ignored or refused; empty when injected.
    pub note: String,
    pub warnings: Vec<String>,
}

/// Answers one AdmissionReview. `settings` is the template; each admitted pod gets a
/// fresh token.
pub fn review(body: &[u8], settings: &InjectSettings) -> Reply {
    let mut raw: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("request body is not JSON: {e}")),
    };
    let api_version = raw.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = raw.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != API_VERSION || kind != KIND {
        return bad_request(format!(
            "expected apiVersion {API_VERSION:?} and kind {KIND:?}, got apiVersion {api_version:?} \
             and kind {kind:?} (list only v1 in admissionReviewVersions)"
        ));
    }
    // The injector works on the pod as sent, so it is moved out before kube's typed
    // decoding, which then has no pod to re-type (nor oldObject, which we never read).
    let pod = raw.pointer_mut("/request/object").map(Value::take);
    if let Some(old) = raw.pointer_mut("/request/oldObject") {
        old.take();
    }
    let review: AdmissionReview<DynamicObject> = match serde_json::from_value(raw) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("invalid AdmissionReview: {e}")),
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return bad_request("AdmissionReview has no request".into()),
    };
    if req.uid.is_empty() {
        return bad_request("AdmissionReview request.uid is empty".into());
    }
    let object = describe(&req, pod.as_ref());

    let ignore = |note: String| {
        let resp = AdmissionResponse::from(&req);
        finish(
            resp,
            Outcome::Ignored,
            &req.uid,
            object.clone(),
            note,
            vec![],
        )
    };
    if !req.kind.group.is_empty() || req.kind.kind != "Pod" {
        return ignore(format!(
            "not a Pod: {}",
            if req.kind.group.is_empty() {
                format!("{}/{}", req.kind.version, req.kind.kind)
            } else {
                format!("{}/{}/{}", req.kind.group, req.kind.version, req.kind.kind)
            }
        ));
    }
    if req.operation != Operation::Create {
        return ignore(format!(
            "operation {:?}, only CREATE is mutated",
            req.operation
        ));
    }
    if let Some(sub) = req.sub_resource.as_deref().filter(|s| !s.is_empty()) {
        return ignore(format!("subresource {sub:?}"));
    }
    let Some(pod) = pod.filter(Value::is_object) else {
        return bad_request_uid(&req.uid, "Pod CREATE without request.object".into());
    };

    let settings = InjectSettings {
        token: InjectSettings::new_token(),
        ..settings.clone()
    };
    let resp = AdmissionResponse::from(&req);
    // Fail open, like failurePolicy Ignore: a bad annotation (or a patch kube cannot
    // encode) must not stop the pod from being created. The warning tells whoever reads
    // admission warnings.
    let error = match inject_pod(&pod, &settings) {
        Ok(Decision::Skip { reason }) => {
            return finish(resp, Outcome::Skipped, &req.uid, object, reason, vec![]);
        }
        Ok(Decision::Patch { patch, warnings }) => match check_applies(&pod, &patch)
            .and_then(|()| resp.clone().with_patch(patch).map_err(|e| e.to_string()))
        {
            Ok(resp) => {
                return finish(
                    resp,
                    Outcome::Injected,
                    &req.uid,
                    object,
                    String::new(),
                    warnings,
                );
            }
            Err(e) => e,
        },
        Err(e) => e.to_string(),
    };
    let note = format!("agent not injected: {error}");
    finish(
        resp,
        Outcome::Error,
        &req.uid,
        object,
        note.clone(),
        vec![format!("wsdrain: {note}")],
    )
}

/// The API server rejects the whole admission when a patch does not apply, whatever the
/// failurePolicy says; so a patch is tried on a copy first, and one that fails is not sent.
fn check_applies(pod: &Value, patch: &json_patch::Patch) -> Result<(), String> {
    json_patch::patch(&mut pod.clone(), patch).map_err(|e| format!("patch does not apply: {e}"))
}

fn describe(req: &AdmissionRequest<DynamicObject>, pod: Option<&Value>) -> String {
    let ns = req.namespace.as_deref().unwrap_or("");
    let meta = pod.and_then(|p| p.get("metadata"));
    let name = [
        Some(req.name.as_str()).filter(|n| !n.is_empty()),
        meta.and_then(|m| m.get("name")).and_then(Value::as_str),
        meta.and_then(|m| m.get("generateName"))
            .and_then(Value::as_str),
    ]
    .into_iter()
    .flatten()
    .next()
    .unwrap_or("");
    format!("{ns}/{name}")
}

fn finish(
    mut resp: AdmissionResponse,
    outcome: Outcome,
    uid: &str,
    object: String,
    note: String,
    warnings: Vec<String>,
) -> Reply {
    if !warnings.is_empty() {
        resp.warnings = Some(warnings.clone());
    }
    match encode(resp) {
        Ok(body) => Reply {
            status: StatusCode::OK,
            body,
            outcome,
            uid: uid.to_owned(),
            object,
            note,
            warnings,
        },
        Err(e) => Reply {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: format!("encode AdmissionReview: {e}").into_bytes(),
            outcome: Outcome::Error,
            uid: uid.to_owned(),
            object,
            note: format!("encode AdmissionReview: {e}"),
            warnings: vec![],
        },
    }
}

/// Serializes the response review. kube 5 writes `patch` as an array of numbers
/// (kube-rs issue #1781); the API says []byte, which JSON carries as base64, so we
/// rewrite it to what every API server version documents.
fn encode(mut resp: AdmissionResponse) -> Result<Vec<u8>, serde_json::Error> {
    // Take the bytes out first: as a JSON array of numbers they would cost more than
    // the whole rest of the admission.
    let patch = resp.patch.take();
    let mut out = serde_json::to_value(resp.into_review())?;
    if let (Some(patch), Some(response)) = (
        patch,
        out.get_mut("response").and_then(Value::as_object_mut),
    ) {
        response.insert(
            "patch".into(),
            Value::String(BASE64_STANDARD.encode(&patch)),
        );
    }
    serde_json::to_vec(&out)
}

fn bad_request(message: String) -> Reply {
    bad_request_uid("", message)
}

/// 400 with the reason twice: in the body as an AdmissionReview whose status says it
/// (what tooling reads), and as the HTTP status (what the API server logs).
fn bad_request_uid(uid: &str, message: String) -> Reply {
    let mut resp = AdmissionResponse::invalid(&message);
    resp.uid = uid.to_owned();
    resp.result.code = 400;
    let body = encode(resp).unwrap_or_else(|_| message.clone().into_bytes());
    Reply {
        status: StatusCode::BAD_REQUEST,
        body,
        outcome: Outcome::Invalid,
        uid: uid.to_owned(),
        object: String::new(),
        note: message,
        warnings: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InjectSettings {
        InjectSettings {
            namespace_opted_in: true,
            ..InjectSettings::new("example.com/wsdrain:test")
        }
    }

    fn review_of(request: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request,
        }))
        .expect("json")
    }

    fn request(kind: &str, operation: &str, object: Value) -> Value {
        serde_json::json!({
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "p",
            "namespace": "ns",
            "operation": operation,
            "userInfo": {"username": "me"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
        })
    }

    fn body(reply: &Reply) -> Value {
        serde_json::from_slice(&reply.body).expect("reply is JSON")
    }

    #[test]
    fn garbage_and_wrong_types_are_400_with_a_reason() {
        let r = review(b"{nope", &settings());
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.note.contains("not JSON"), "{}", r.note);
        assert_eq!(body(&r)["response"]["status"]["code"], 400);

        let r = review(
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
            &settings(),
        );
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.note.contains("admission.k8s.io/v1beta1"), "{}", r.note);

        let r = review(br#"{"apiVersion":"v1","kind":"Pod"}"#, &settings());
        assert!(r.note.contains("\"Pod\""), "{}", r.note);

        let r = review(
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            &settings(),
        );
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.note.contains("no request"), "{}", r.note);

        let r = review(b"[1,2]", &settings());
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn non_pods_and_non_creates_are_allowed_untouched() {
        let cm =
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        let r = review(&review_of(request("ConfigMap", "CREATE", cm)), &settings());
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.outcome, Outcome::Ignored);
        let b = body(&r);
        assert_eq!(b["response"]["uid"], "u-1");
        assert_eq!(b["response"]["allowed"], true);
        assert!(b["response"].get("patch").is_none());

        let mut del = request("Pod", "DELETE", Value::Null);
        del["oldObject"] =
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        let r = review(&review_of(del), &settings());
        assert_eq!(r.outcome, Outcome::Ignored, "{}", r.note);
        assert!(r.note.contains("Delete"), "{}", r.note);
        assert_eq!(body(&r)["response"]["allowed"], true);
    }

    #[test]
    fn pod_create_without_object_is_400_with_uid() {
        let r = review(
            &review_of(request("Pod", "CREATE", Value::Null)),
            &settings(),
        );
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(body(&r)["response"]["uid"], "u-1");
    }

    #[test]
    fn patch_is_base64_and_patch_type_set() {
        let mut resp = AdmissionResponse::invalid("x");
        resp.allowed = true;
        let op: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}
        ]))
        .expect("patch");
        let out: Value = serde_json::from_slice(
            &encode(resp.with_patch(op).expect("with_patch")).expect("encode"),
        )
        .expect("json");
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        assert_eq!(
            out["response"]["patch"],
            BASE64_STANDARD
                .encode(br#"[{"op":"add","path":"/metadata/labels","value":{"a":"b"}}]"#)
        );
    }
}

/// Bounded fuzzing of the parser of outside bytes: whatever arrives, `review` answers 200
/// or 400 with JSON, echoes the uid it could read, and a patch it returns applies.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/admission/pod-create.json");

    fn settings() -> InjectSettings {
        InjectSettings {
            namespace_opted_in: true,
            ..InjectSettings::new("example.com/wsdrain:test")
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[ -~]{0,12}".prop_map(Value::String),
            "\\PC{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z/.~-]{1,10}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The fields of the fixture a mutation may replace or remove.
    fn field() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "/apiVersion",
            "/kind",
            "/request",
            "/request/uid",
            "/request/kind",
            "/request/kind/kind",
            "/request/kind/group",
            "/request/resource",
            "/request/operation",
            "/request/subResource",
            "/request/name",
            "/request/namespace",
            "/request/userInfo",
            "/request/object",
            "/request/object/metadata",
            "/request/object/metadata/annotations",
            "/request/object/metadata/labels",
            "/request/object/spec",
            "/request/object/spec/containers",
            "/request/object/spec/containers/0",
            "/request/object/spec/containers/0/ports",
            "/request/object/spec/terminationGracePeriodSeconds",
            "/request/oldObject",
            "/request/dryRun",
            "/request/options",
        ])
    }

    /// What every answer must satisfy, whatever the input.
    fn check_answer(reply: &Reply, sent: Option<&Value>) -> Result<(), TestCaseError> {
        prop_assert!(
            reply.status == StatusCode::OK || reply.status == StatusCode::BAD_REQUEST,
            "status {}",
            reply.status
        );
        let out: Value = serde_json::from_slice(&reply.body)
            .map_err(|e| TestCaseError::fail(format!("answer not JSON: {e}")))?;
        prop_assert_eq!(&out["apiVersion"], "admission.k8s.io/v1");
        prop_assert_eq!(&out["kind"], "AdmissionReview");
        if reply.status == StatusCode::BAD_REQUEST {
            prop_assert!(!reply.note.is_empty(), "a 400 says why");
            return Ok(());
        }
        let Some(sent) = sent else {
            return Ok(());
        };
        prop_assert_eq!(&out["response"]["uid"], &sent["request"]["uid"]);
        prop_assert_eq!(&out["response"]["allowed"], true);
        if let Some(patch) = out["response"]["patch"].as_str() {
            let bytes = BASE64_STANDARD
                .decode(patch)
                .map_err(|e| TestCaseError::fail(format!("patch not base64: {e}")))?;
            let patch: json_patch::Patch = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("patch not JSON Patch: {e}")))?;
            let mut pod = sent["request"]["object"].clone();
            json_patch::patch(&mut pod, &patch)
                .map_err(|e| TestCaseError::fail(format!("patch does not apply: {e}")))?;
        }
        Ok(())
    }

    proptest! {
        // 256 cases in `make test`; `PROPTEST_CASES=100000` runs longer (fuzzing).
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

        #[test]
        fn arbitrary_bytes_get_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            check_answer(&review(&bytes, &settings()), None)?;
        }

        #[test]
        fn arbitrary_json_gets_an_answer(value in json_value()) {
            let bytes = serde_json::to_vec(&value).expect("json");
            check_answer(&review(&bytes, &settings()), None)?;
        }

        #[test]
        fn a_real_review_with_fields_replaced_or_removed_gets_an_answer(
            edits in prop::collection::vec((field(), prop::option::of(json_value())), 1..4)
        ) {
            let mut sent: Value = serde_json::from_str(FIXTURE).expect("fixture");
            for (path, value) in edits {
                let (parent, key) = path.rsplit_once('/').expect("pointer");
                let Some(parent) = sent.pointer_mut(parent) else { continue };
                match (parent, value) {
                    (Value::Object(map), Some(v)) => { map.insert(key.to_owned(), v); }
                    (Value::Object(map), None) => { map.remove(key); }
                    (Value::Array(items), v) => {
                        if let Some(i) = key.parse::<usize>().ok().filter(|&i| i < items.len()) {
                            match v {
                                Some(v) => items[i] = v,
                                None => { items.remove(i); }
                            }
                        }
                    }
                    _ => {}
                }
            }
            let bytes = serde_json::to_vec(&sent).expect("json");
            let reply = review(&bytes, &settings());
            // A uid the server could not read is not echoed; otherwise it must be.
            let readable_uid = sent["request"]["uid"].as_str().is_some_and(|u| !u.is_empty());
            check_answer(&reply, readable_uid.then_some(&sent))?;
        }
    }

    /// The probe's inputs: nesting far past serde_json's recursion limit, and a body of
    /// one huge string, are refused with a reason instead of overflowing the stack.
    #[test]
    fn deep_nesting_and_huge_strings_are_refused_with_a_reason() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let reply = review(deep.as_bytes(), &settings());
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.note.contains("not JSON"), "{}", reply.note);

        let huge = format!("\"{}\"", "x".repeat(3 * 1024 * 1024));
        let reply = review(huge.as_bytes(), &settings());
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.note.len() < 1024, "message stays short");
    }
}
