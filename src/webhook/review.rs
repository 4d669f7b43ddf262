//! AdmissionReview v1 in, AdmissionReview v1 out. Pure: bytes in, status + bytes out, so
//! it is tested without a server and the server stays a thin shell.

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
    match inject_pod(&pod, &settings) {
        Ok(Decision::Skip { reason }) => {
            finish(resp, Outcome::Skipped, &req.uid, object, reason, vec![])
        }
        Ok(Decision::Patch { patch, warnings }) => match resp.clone().with_patch(patch) {
            Ok(resp) => finish(
                resp,
                Outcome::Injected,
                &req.uid,
                object,
                String::new(),
                warnings,
            ),
            Err(e) => {
                let note = format!("agent not injected: {e}");
                finish(
                    resp,
                    Outcome::Error,
                    &req.uid,
                    object,
                    note.clone(),
                    vec![format!("wsdrain: {note}")],
                )
            }
        },
        // Fail open, like failurePolicy Ignore: a bad annotation must not stop the pod
        // from being created. The warning tells whoever reads admission warnings.
        Err(e) => {
            let note = format!("agent not injected: {e}");
            finish(
                resp,
                Outcome::Error,
                &req.uid,
                object,
                note.clone(),
                vec![format!("wsdrain: {note}")],
            )
        }
    }
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
        response.insert("patch".into(), Value::String(base64(&patch)));
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

/// Standard base64 with padding (RFC 4648 §4); small enough not to need a crate.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |n: u32, shift: u32| ALPHABET[(n >> shift & 63) as usize];
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    let chunks = data.chunks_exact(3);
    let rest = chunks.remainder();
    for c in chunks {
        let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), sextet(n, 6), sextet(n, 0)]);
    }
    match *rest {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), b'=', b'=']);
        }
        [a, b] => {
            let n = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), sextet(n, 6), b'=']);
        }
        _ => {}
    }
    // Only ASCII from ALPHABET and '=' went in.
    String::from_utf8(out).unwrap_or_default()
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
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
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
            base64(br#"[{"op":"add","path":"/metadata/labels","value":{"a":"b"}}]"#)
        );
    }
}
