//! Injection: golden pods through `inject_pod` (patch applied with json-patch, result
//! checked against tests/fixtures/inject/*.out.yaml and parsed as a k8s-openapi Pod),
//! idempotency, and the real `wsdrain inject` binary on multi-document manifests.
//! `UPDATE_GOLDEN=1 cargo test --test inject` rewrites the expected files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use wsdrain::inject::{Decision, InjectSettings, inject_pod};

const TOKEN: &str = "test-token-0123456789";

fn settings(namespace_opted_in: bool, native_sidecars: bool) -> InjectSettings {
    InjectSettings {
        token: TOKEN.into(),
        namespace_opted_in,
        native_sidecars,
        ..InjectSettings::new("ghcr.io/wsdrain/wsdrain:test")
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject")
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs one pod through `inject_pod` and returns what the golden file records.
fn outcome(pod: &Value, s: &InjectSettings) -> Value {
    match inject_pod(pod, s) {
        Err(e) => json!({"error": e.to_string()}),
        Ok(Decision::Skip { reason }) => json!({"skip": reason}),
        Ok(Decision::Patch { patch, warnings }) => {
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch).expect("patch applies");
            if patched.get("kind").is_some() {
                let typed: Pod = serde_json::from_value(patched.clone()).expect("a valid Pod");
                assert_eq!(
                    typed.metadata.annotations.unwrap()["wsdrain.io/status"],
                    "injected"
                );
            }
            // Idempotency: the output, injected again, is left alone.
            match inject_pod(&patched, s) {
                Ok(Decision::Skip { reason }) => assert!(reason.contains("already injected")),
                other => panic!("second injection was not skipped: {other:?}"),
            }
            // Ops and paths only: the values are visible in the patched pod.
            let ops: Vec<String> = patch
                .iter()
                .map(|op| {
                    let v = serde_json::to_value(op).unwrap();
                    format!("{} {}", v["op"].as_str().unwrap(), op.path())
                })
                .collect();
            json!({"warnings": warnings, "patch": ops, "pod": patched})
        }
    }
}

#[test]
fn golden_pods() {
    // (fixture, namespace opted in, cluster has native sidecars)
    let cases = [
        ("basic", false, true),
        ("no-ports", false, true),
        ("named-ports", false, true),
        ("default-container", false, true),
        ("app-container-annotation", false, true),
        ("existing-prestop", false, true),
        ("existing-lifecycle", false, true),
        ("existing-init", false, true),
        ("classic-old-cluster", false, false),
        ("classic-annotation", false, true),
        ("native-annotation-old-cluster", false, false),
        ("escaped-keys", false, true),
        ("no-annotations", false, true),
        ("grace-clamp", false, true),
        ("grace-raise", false, true),
        ("grace-raise-unset", false, true),
        ("grace-too-short", false, true),
        ("opted-out", true, true),
        ("not-opted-in", false, true),
        ("namespace-opted-in", true, true),
        ("already-injected", false, true),
        ("all-annotations", false, true),
        ("readiness-gate-new", false, true),
        ("wrap", false, true),
        ("wrap-no-command", false, true),
        ("bad-annotation", false, true),
        ("template-no-metadata", true, true),
        ("port-clash", false, true),
    ];
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for (name, ns, native) in cases {
        let pod = read_yaml(&fixtures().join(format!("{name}.in.yaml")));
        let got = outcome(&pod, &settings(ns, native));
        let out = fixtures().join(format!("{name}.out.yaml"));
        if update {
            std::fs::write(&out, serde_yaml::to_string(&got).unwrap()).unwrap();
        } else if read_yaml(&out) != got {
            eprintln!("--- {name}: got\n{}", serde_yaml::to_string(&got).unwrap());
            failed.push(name);
        }
    }
    // Every fixture is in the table.
    let listed: Vec<_> = cases.iter().map(|c| format!("{}.in.yaml", c.0)).collect();
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if file.ends_with(".in.yaml") {
            assert!(listed.contains(&file), "{file} is not in the table");
        }
    }
    assert!(
        failed.is_empty(),
        "golden mismatch (UPDATE_GOLDEN=1 to regenerate): {failed:?}"
    );
}

#[test]
fn errors_name_the_field() {
    let pod = read_yaml(&fixtures().join("bad-annotation.in.yaml"));
    let err = inject_pod(&pod, &settings(false, true)).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"metadata.annotations["wsdrain.io/drain-timeout"]: "abc" is not a duration: 'abc' does not start with a number"#
    );
    let not_a_pod =
        json!({"spec": {"containers": "x"}, "metadata": {"labels": {"wsdrain.io/inject": "true"}}});
    assert!(
        inject_pod(&not_a_pod, &settings(false, true))
            .unwrap_err()
            .field
            .contains("spec")
    );
    assert!(inject_pod(&json!(42), &settings(true, true)).is_err());
}

#[test]
fn tokens_end_up_in_hook_and_agent() {
    let pod = read_yaml(&fixtures().join("basic.in.yaml"));
    let s = InjectSettings::new("img");
    let Ok(Decision::Patch { patch, .. }) = inject_pod(&pod, &s) else {
        panic!("not patched")
    };
    let text = serde_json::to_string(&patch).unwrap();
    assert_eq!(text.matches(&s.token).count(), 2, "{text}");
}
