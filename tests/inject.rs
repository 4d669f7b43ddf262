//! Injection: golden pods through `inject_pod` (patch applied with json-patch, result
//! checked against tests/fixtures/inject/*.out.yaml and parsed as a k8s-openapi Pod),
//! idempotency, and the real `wsdrain inject` binary on multi-document manifests.
//! `UPDATE_GOLDEN=1 cargo test --test inject` rewrites the expected files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use wsdrain::inject::status::{Status, VERSION};
use wsdrain::inject::{Decision, InjectSettings, inject_pod, uninject_pod};

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
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
                let _: Pod = serde_json::from_value(patched.clone()).expect("a valid Pod");
            }
            let status = Status::of(&patched).unwrap().expect("status written");
            let image = pod
                .pointer("/metadata/annotations/wsdrain.io~1image")
                .and_then(Value::as_str)
                .unwrap_or(&s.image);
            assert_eq!(
                (status.version.as_str(), status.image.as_str()),
                (VERSION, image)
            );
            // Idempotency: the output, injected again, is left alone.
            match inject_pod(&patched, s) {
                Ok(Decision::Skip { reason }) => assert!(reason.contains("already injected")),
                other => panic!("second injection was not skipped: {other:?}"),
            }
            // Round trip: uninject gives back the pod exactly (unless it was an update,
            // which gives back the pod before the first injection).
            if Status::of(pod).unwrap().is_none() {
                assert_eq!(&uninject_pod(&patched).unwrap().unwrap(), pod, "uninject");
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
        ("bad-container-port", false, true),
        ("old-version", false, true),
        ("overrides", false, true),
        ("memory-limit-only", false, true),
        ("fleet", false, true),
        ("logger-first", false, true),
        ("proxy", false, true),
        ("proxy-unnamed", false, true),
        ("istio-classic", false, true),
        ("istio-native", false, true),
        ("istio-pending", false, true),
        ("linkerd-classic", false, true),
        ("linkerd-pending", false, true),
    ];
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for (name, ns, native) in cases {
        let pod = read_yaml(&fixtures().join(format!("{name}.in.yaml")));
        let got = outcome(&pod, &settings(ns, native));
        let out = fixtures().join(format!("{name}.out.yaml"));
        if update {
            std::fs::write(&out, serde_norway::to_string(&got).unwrap()).unwrap();
        } else if read_yaml(&out) != got {
            eprintln!(
                "--- {name}: got\n{}",
                serde_norway::to_string(&got).unwrap()
            );
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

/// Every injected golden Pod passes `kubernetes-validate --strict` (1.29 and newest).
#[test]
fn golden_pods_validate_strictly() {
    let mut text = String::new();
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".out.yaml") {
            continue;
        }
        let pod = read_yaml(&path)["pod"].clone();
        if pod.get("kind").is_some() {
            text.push_str("---\n");
            text.push_str(&serde_norway::to_string(&pod).unwrap());
        }
    }
    assert!(text.matches("kind: Pod").count() >= 30, "{text}");
    kubernetes_validate(&text);
}

#[test]
fn errors_name_the_field() {
    let pod = read_yaml(&fixtures().join("bad-annotation.in.yaml"));
    let err = inject_pod(&pod, &settings(false, true)).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"metadata.annotations["wsdrain.io/drain-timeout"]: "abc" is not a duration: expected number at 0"#
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
fn invalid_container_ports_are_refused_naming_the_field() {
    for (bad, list) in [
        (json!(70000), "containers"),
        (json!(-1), "containers"),
        (json!(0), "containers"),
        (json!("8080"), "containers"),
        (json!(70000), "initContainers"),
    ] {
        let mut pod = read_yaml(&fixtures().join("basic.in.yaml"));
        let c = json!({"name": "side", "image": "x", "ports": [{"containerPort": bad}]});
        match list {
            "containers" => pod["spec"]["containers"][0]["ports"][0]["containerPort"] = bad.clone(),
            _ => pod["spec"]["initContainers"] = json!([c]),
        }
        let err = inject_pod(&pod, &settings(false, true)).unwrap_err();
        assert_eq!(
            err.field,
            format!("spec.{list}[0].ports[0].containerPort"),
            "{bad}"
        );
        assert!(
            err.reason.contains("is not a port number (1-65535)"),
            "{err}"
        );
    }
}

/// A 1 MB annotation value is not copied whole into errors and warnings.
#[test]
fn oversized_values_are_truncated_in_messages() {
    let huge = "9".repeat(1 << 20);
    let mut pod = read_yaml(&fixtures().join("basic.in.yaml"));
    pod["metadata"]["annotations"]["wsdrain.io/drain-timeout"] = json!(format!("{huge}x"));
    let err = inject_pod(&pod, &settings(false, true))
        .unwrap_err()
        .to_string();
    assert!(err.len() < 1024, "{} bytes", err.len());
    assert!(
        err.contains(&format!("({} bytes)", huge.len() + 1)),
        "{err}"
    );

    let mut pod = read_yaml(&fixtures().join("basic.in.yaml"));
    pod["metadata"]["annotations"][format!("wsdrain.io/{huge}")] = json!("x");
    pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = json!(huge);
    let Ok(Decision::Patch { warnings, .. }) = inject_pod(&pod, &settings(false, true)) else {
        panic!("not patched")
    };
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    for w in warnings {
        assert!(w.len() < 1024 && w.contains("bytes)"), "{} bytes", w.len());
    }
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

fn run_inject(input: &[u8], extra: &[&str], envs: &[(&str, &str)]) -> (String, String) {
    let args: Vec<&str> = ["inject", "-f", "-"].iter().chain(extra).copied().collect();
    let (ok, stdout, stderr) = run_wsdrain_with(&args, input, envs);
    assert!(ok, "inject failed: {stderr}");
    (stdout, stderr)
}

fn docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

/// kubernetes-validate --strict on YAML text (see `common::kubernetes_validate`).
fn kubernetes_validate(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.yaml");
    std::fs::write(&file, text).unwrap();
    common::kubernetes_validate(&file);
}

#[test]
fn cli_injects_only_pod_templates() {
    let input = std::fs::read_to_string(fixtures().join("cli-workloads.yaml")).unwrap();
    let (out, err) = run_inject(
        input.as_bytes(),
        &["--image", "ghcr.io/wsdrain/wsdrain:test"],
        &[("WSDRAIN_INJECT_TOKEN", TOKEN)],
    );
    assert!(err.contains("Deployment/echo: injected"), "{err}");
    assert!(err.contains("CronJob/nightly: injected"), "{err}");

    // The ConfigMap and the Service come out as written, byte for byte.
    let tail = &input[input.find("# Not a workload").unwrap()..];
    assert!(out.ends_with(tail), "{out}");

    let (before, after) = (docs(&input), docs(&out));
    assert_eq!(before.len(), 4);
    assert_eq!(after.len(), 4);
    for (i, tpl) in [
        (0, "/spec/template"),
        (1, "/spec/jobTemplate/spec/template"),
    ] {
        let mut b = before[i].clone();
        let a = &after[i];
        // Outside the template nothing changed.
        *b.pointer_mut(tpl).unwrap() = a.pointer(tpl).unwrap().clone();
        assert_eq!(&b, a);
        // The template is what inject_pod makes of it.
        let expected = outcome(before[i].pointer(tpl).unwrap(), &settings(false, true));
        assert_eq!(a.pointer(tpl).unwrap(), &expected["pod"]);
        assert_eq!(
            a.pointer(&format!("{tpl}/spec/initContainers/0/name"))
                .unwrap(),
            "wsdrain"
        );
    }
    kubernetes_validate(&out);

    // Idempotent: the output goes through unchanged.
    let (again, err) = run_inject(
        out.as_bytes(),
        &["--image", "ghcr.io/wsdrain/wsdrain:test"],
        &[],
    );
    assert_eq!(again, out);
    assert!(err.contains("already injected"), "{err}");

    // Another image: the agent is updated, not skipped.
    let (updated, err) = run_inject(
        out.as_bytes(),
        &["--image", "ghcr.io/wsdrain/wsdrain:next"],
        &[("WSDRAIN_INJECT_TOKEN", TOKEN)],
    );
    assert!(
        err.contains("Deployment/echo: warning: updated the agent injected by wsdrain"),
        "{err}"
    );
    let agent = docs(&updated)[0]
        .pointer("/spec/template/spec/initContainers/0")
        .unwrap()
        .clone();
    assert_eq!(agent["image"], "ghcr.io/wsdrain/wsdrain:next");
    assert_eq!(
        docs(&updated)[0]
            .pointer("/spec/template/spec/initContainers")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

fn run_wsdrain(args: &[&str], input: &[u8]) -> (bool, String, String) {
    run_wsdrain_with(args, input, &[])
}

/// Runs `wsdrain ARGS` with `input` on stdin: (success, stdout, stderr).
fn run_wsdrain_with(args: &[&str], input: &[u8], envs: &[(&str, &str)]) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsdrain"))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Depth 100k took 16.7 s (quadratic) before "recursion limit exceeded".
#[test]
fn cli_refuses_deep_nesting_early() {
    let deep = format!(
        "kind: Pod\nmetadata: {{name: x}}\nspec: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let started = std::time::Instant::now();
    let (ok, out, err) = run_wsdrain(&["inject", "-f", "-"], deep.as_bytes());
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("document 1") && err.contains("nested more than 128 levels"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A BOM gave "more than one document"; `<<: *anchor` was not applied, so the pod was
/// skipped for lack of ports. Both as kubectl reads them.
#[test]
fn cli_reads_bom_and_merge_keys() {
    let basic = std::fs::read(fixtures().join("basic.in.yaml")).unwrap();
    let mut bom = "\u{feff}".as_bytes().to_vec();
    bom.extend_from_slice(&basic);
    let (ok, out, err) = run_wsdrain(&["inject", "-f", "-"], &bom);
    assert!(ok, "{err}");
    assert!(err.contains("Pod/echo: injected"), "{err}");
    assert!(!out.starts_with('\u{feff}'));

    let merged = "apiVersion: apps/v1
kind: Deployment
metadata: {name: merged}
spec:
  selector: {matchLabels: {app: m}}
  template:
    metadata:
      labels: {app: m, wsdrain.io/inject: \"true\"}
    spec:
      containers:
      - &logger
        name: logger
        image: example/logger:1
        ports: [{name: ws, containerPort: 8080}]
      - <<: *logger
        name: app
        image: example/app:1
";
    let (ok, out, err) = run_wsdrain(&["inject", "-f", "-"], merged.as_bytes());
    assert!(ok, "{err}");
    assert!(err.contains("Deployment/merged: injected"), "{err}");
    let doc = &docs(&out)[0];
    let app = doc.pointer("/spec/template/spec/containers/1").unwrap();
    assert_eq!(app["image"], "example/app:1");
    assert_eq!(app["ports"][0]["containerPort"], 8080);
    assert!(app.get("<<").is_none());
    kubernetes_validate(&out);
}

/// `kind: List` (what `kubectl get -o yaml` prints), a directory read recursively, and
/// `uninject` giving back what went in.
#[test]
fn cli_lists_directories_and_uninject_round_trip() {
    let input = std::fs::read_to_string(fixtures().join("cli-workloads.yaml")).unwrap();
    let items: Vec<Value> = docs(&input);
    let list =
        serde_norway::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
            .unwrap();
    let image = "ghcr.io/wsdrain/wsdrain:test";
    let (ok, out, err) = run_wsdrain(&["inject", "--image", image, "-f", "-"], list.as_bytes());
    assert!(ok, "{err}");
    assert!(
        err.contains("List/items[0] Deployment/echo: injected"),
        "{err}"
    );
    assert!(
        err.contains("List/items[1] CronJob/nightly: injected"),
        "{err}"
    );
    let injected = &docs(&out)[0];
    assert_eq!(
        injected
            .pointer("/items/0/spec/template/spec/initContainers/0/name")
            .unwrap(),
        "wsdrain"
    );
    assert_eq!(injected["items"][2], items[2], "the ConfigMap is untouched");
    kubernetes_validate(&out);
    let (ok, back, err) = run_wsdrain(&["uninject", "-f", "-"], out.as_bytes());
    assert!(ok, "{err}");
    assert_eq!(docs(&back)[0]["items"], json!(items));

    // A directory: files below it, sorted, recursively; other files ignored.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("a.yaml"), &input).unwrap();
    std::fs::write(
        dir.path().join("sub/b.yml"),
        std::fs::read(fixtures().join("basic.in.yaml")).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "kind: Pod\n").unwrap();
    let path = dir.path().to_str().unwrap();
    let (ok, out, err) = run_wsdrain(&["inject", "--image", image, "-f", path], b"");
    assert!(ok, "{err}");
    assert_eq!(err.matches(": injected").count(), 3, "{err}");
    let injected = docs(&out);
    assert_eq!(injected.len(), 5);
    kubernetes_validate(&out);

    // uninject restores every document; untouched ones byte for byte.
    let file = dir.path().join("sub/injected.yaml");
    std::fs::write(&file, &out).unwrap();
    let (ok, back, err) = run_wsdrain(&["uninject", "-f", file.to_str().unwrap()], b"");
    assert!(ok, "{err}");
    assert_eq!(err.matches(": uninjected").count(), 3, "{err}");
    let mut original = docs(&input);
    original.extend(docs(
        &std::fs::read_to_string(fixtures().join("basic.in.yaml")).unwrap(),
    ));
    assert_eq!(docs(&back), original);
    assert!(back.contains(&input[input.find("# Not a workload").unwrap()..]));
}

/// `wsdrain inject` sees the whole manifest set: an Application Gateway Ingress whose
/// Service selects an injected workload gets a warning (a pod alone cannot show it).
#[test]
fn cli_warns_when_application_gateway_routes_to_injected_pods() {
    let mut input = std::fs::read_to_string(fixtures().join("cli-workloads.yaml")).unwrap();
    input.push_str(
        "---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: public
  namespace: web
  annotations:
    kubernetes.io/ingress.class: azure/application-gateway
spec:
  rules:
  - http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: echo
            port:
              number: 80
",
    );
    assert!(input.contains("kind: Service\nmetadata:\n  name: echo\n  namespace: web"));
    let (ok, _, err) = run_wsdrain(&["inject", "-f", "-"], input.as_bytes());
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: Ingress/public (Azure Application Gateway) routes straight to the pods of Deployment/echo through Service/echo"),
        "{err}"
    );
}

#[test]
fn cli_flags_and_random_tokens() {
    let input = std::fs::read_to_string(fixtures().join("cli-workloads.yaml")).unwrap();
    let (out, _) = run_inject(
        input.as_bytes(),
        &[
            "--native-sidecars",
            "false",
            "--image",
            "registry.example/wsdrain:9",
        ],
        &[],
    );
    let d = docs(&out);
    let agent = d[0].pointer("/spec/template/spec/containers/1").unwrap();
    assert_eq!(agent["name"], "wsdrain");
    assert_eq!(agent["image"], "registry.example/wsdrain:9");
    let token = |doc: &Value, tpl: &str| {
        doc.pointer(&format!(
            "{tpl}/spec/containers/0/lifecycle/preStop/httpGet/httpHeaders/0/value"
        ))
        .and_then(Value::as_str)
        .unwrap()
        .to_string()
    };
    let (t1, t2) = (
        token(&d[0], "/spec/template"),
        token(&d[1], "/spec/jobTemplate/spec/template"),
    );
    assert_eq!(t1.len(), 32);
    assert_ne!(t1, t2, "one token per pod template");

    // Namespace opt-in flag: a pod without the label is injected only with it.
    let pod = std::fs::read(fixtures().join("namespace-opted-in.in.yaml")).unwrap();
    let (out, err) = run_inject(&pod, &[], &[]);
    assert!(err.contains("not opted in"), "{err}");
    assert_eq!(out.as_bytes(), &pod[..]);
    let (out, _) = run_inject(&pod, &["--namespace-opted-in"], &[]);
    assert!(out.contains("wsdrain.io/status: '{\"version\""), "{out}");
}

#[test]
fn cli_fails_on_bad_annotation_naming_the_object() {
    let pod = std::fs::read(fixtures().join("bad-annotation.in.yaml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsdrain"))
        .args(["inject", "-f"])
        .arg(fixtures().join("bad-annotation.in.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Pod/bad") && err.contains("wsdrain.io/drain-timeout"),
        "{err}"
    );
    assert!(!pod.is_empty());
}

#[test]
fn sidecar_yaml_is_what_inject_produces() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("sidecar.yaml")).unwrap();
    let token = shipped
        .lines()
        .skip_while(|l| !l.contains("X-Wsdrain-Token"))
        .find_map(|l| l.trim().strip_prefix("value: "))
        .expect("a token in sidecar.yaml")
        .to_string();
    let source = std::fs::read(fixtures().join("sidecar-source.yaml")).unwrap();
    let (out, _) = run_inject(&source, &[], &[("WSDRAIN_INJECT_TOKEN", &token)]);
    let (header, body) = shipped.split_once("\n---\n").expect("header, then ---");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(root.join("sidecar.yaml"), format!("{header}\n---\n{out}")).unwrap();
        return;
    }
    assert_eq!(body, out, "regenerate sidecar.yaml (UPDATE_GOLDEN=1)");
}

/// Expands `$(VAR)` the way the kubelet does, from `vars`.
fn kubelet_expand(s: &str, vars: &[(String, String)]) -> String {
    vars.iter().fold(s.to_owned(), |acc, (k, v)| {
        acc.replace(&format!("$({k})"), v)
    })
}

/// The env a container gets: literal values, downward-API fields filled with test values.
fn container_env(container: &Value, ip: &str) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_owned();
        let value = match e["value"].as_str() {
            Some(v) => kubelet_expand(v, &vars),
            None => match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "echo-7d9f".into(),
                Some("metadata.namespace") => "web".into(),
                Some("status.podIP" | "status.hostIP") => ip.into(),
                other => panic!("unexpected env source {other:?} in {e}"),
            },
        };
        vars.push((name, value));
    }
    vars
}

fn golden_pod(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("golden");
    let doc: Value = serde_norway::from_str(&text).expect("yaml");
    doc["pod"].clone()
}

/// The injected agent's env and args, run by the real binary: every name and value must be
/// one the agent accepts (golden files alone would not notice a misspelt env var).
#[test]
fn injected_agent_settings_start_the_real_agent() {
    let pod = golden_pod("all-annotations.out.yaml");
    let agent = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
        .find(|c| c["name"] == "wsdrain")
        .expect("agent container");
    let ip = common::pod_ip();
    let api = std::net::SocketAddr::new(ip, common::free_port(ip));
    let env = container_env(agent, &ip.to_string());
    let token = env
        .iter()
        .find(|(k, _)| k == "WSDRAIN_TOKEN")
        .map(|(_, v)| v.clone())
        .expect("token env");
    let args: Vec<&str> = agent["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    let mut cmd = Command::new(common::wsdrain_bin());
    cmd.args(&args)
        .env_clear()
        .envs(env)
        // Only what a laptop lacks: no API server, no /dev/termination-log, a free port.
        .env("WSDRAIN_NO_KUBE", "true")
        .env("WSDRAIN_TERMINATION_LOG", "")
        .env("WSDRAIN_LISTEN", api.to_string())
        .stderr(Stdio::null());
    let mut agent_proc = common::Proc::spawn("agent", &mut cmd);
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(api).is_err() {
        if let Some(status) = agent_proc.child.try_wait().expect("wait") {
            panic!("the agent refused the injected settings: {status}");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "agent never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(common::http("GET", api, "/readyz", &[]).0, 200);
    // The token the hook carries is the one the agent checks.
    assert_eq!(common::http("POST", api, "/drain", &[]).0, 401);
    let header = ("X-Wsdrain-Token", token.as_str());
    assert_eq!(common::http("POST", api, "/drain", &[header]).0, 202);
}

/// Wrap mode's rewritten command, run by the real binary with a harmless app.
#[test]
fn injected_wrap_command_runs_the_real_wrapper() {
    let pod = golden_pod("wrap.out.yaml");
    let app = &pod["spec"]["containers"][0];
    let ip = common::pod_ip();
    let env = container_env(app, &ip.to_string());
    let command: Vec<String> = app["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|a| kubelet_expand(a.as_str().expect("arg"), &env))
        .collect();
    assert_eq!(command[0], "/wsdrain-bin/wsdrain");
    let sep = command.iter().position(|a| a == "--").expect("--");
    let listen = std::net::SocketAddr::new(ip, common::free_port(ip)).to_string();
    let out = Command::new(common::wsdrain_bin())
        .args(&command[1..sep])
        .args(["--", "sh", "-c", "exit 7"])
        .env("WSDRAIN_NO_KUBE", "true")
        .env("WSDRAIN_TERMINATION_LOG", "")
        .env("WSDRAIN_LISTEN", listen)
        .output()
        .expect("run wrap");
    // 7 is the app's own exit code: wrap accepted every flag and ran the app.
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn container() -> impl Strategy<Value = Value> {
        let port = (
            prop_oneof![Just(None), "[a-z]{1,6}".prop_map(Some)],
            prop_oneof![1u32..65536, Just(0), Just(70000), Just(19901), Just(8080)],
            prop::sample::select(vec!["TCP", "UDP"]),
        )
            .prop_map(|(name, port, proto)| {
                let mut p = json!({"containerPort": port, "protocol": proto});
                if let Some(n) = name {
                    p["name"] = json!(n);
                }
                p
            });
        (
            prop::sample::select(vec!["app", "web", "logger", "istio-proxy", "linkerd-proxy"]),
            prop::collection::vec(port, 0..3),
            any::<bool>(),
        )
            .prop_map(|(name, ports, prestop)| {
                let mut c = json!({"name": name, "image": "example/x:1", "ports": ports});
                if prestop {
                    c["lifecycle"] = json!({"preStop": {"exec": {"command": ["sleep", "1"]}}});
                }
                c
            })
    }

    fn pod() -> impl Strategy<Value = Value> {
        let annotation = prop::sample::select(vec![
            ("wsdrain.io/mode", "proxy"),
            ("wsdrain.io/mode", "wrap"),
            ("wsdrain.io/sidecar", "classic"),
            ("wsdrain.io/grace", "raise"),
            ("wsdrain.io/drain-timeout", "1m30s"),
            ("wsdrain.io/readiness-gate", "true"),
            ("wsdrain.io/ports", "8080"),
            ("wsdrain.io/memory-limit", "8Mi"),
            ("wsdrain.io/rebalance", "true"),
            ("linkerd.io/inject", "enabled"),
            ("sidecar.istio.io/inject", "true"),
            ("kubectl.kubernetes.io/default-container", "web"),
        ]);
        (
            prop::collection::vec(container(), 1..4),
            prop::collection::vec(annotation, 0..4),
            prop_oneof![Just(None), (0i64..120).prop_map(Some)],
            any::<bool>(),
        )
            .prop_map(|(containers, annotations, grace, command)| {
                let mut containers = containers;
                if command {
                    containers[0]["command"] = json!(["/app", "serve"]);
                }
                let annotations: serde_json::Map<String, Value> = annotations
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                let mut pod = json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "p", "labels": {"wsdrain.io/inject": "true"},
                                 "annotations": annotations},
                    "spec": {"containers": containers}
                });
                if let Some(g) = grace {
                    pod["spec"]["terminationGracePeriodSeconds"] = json!(g);
                }
                pod
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(wsdrain::proptest_cases(256)))]

        /// Whatever the pod: a decision or an error naming a field, never a panic; a
        /// patch applies, is idempotent, and uninject gives the pod back exactly.
        #[test]
        fn inject_then_uninject_is_the_identity(pod in pod()) {
            let s = settings(false, true);
            match inject_pod(&pod, &s) {
                Err(e) => prop_assert!(!e.field.is_empty()),
                Ok(Decision::Skip { .. }) => {}
                Ok(Decision::Patch { patch, .. }) => {
                    let mut patched = pod.clone();
                    json_patch::patch(&mut patched, &patch).unwrap();
                    let again = inject_pod(&patched, &s).unwrap();
                    prop_assert!(matches!(again, Decision::Skip { .. }), "{again:?}");
                    prop_assert_eq!(uninject_pod(&patched).unwrap().unwrap(), pod);
                }
            }
        }
    }
}
