//! `wsdrain webhook` as a real process, spoken to over real TLS by a hyper client that
//! trusts only the test's own CA.

mod common;

use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Proc;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SerialNumber};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

const IMAGE: &str = "registry.test/wsdrain:under-test";

/// A test CA that signs serving certificates.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("ca");
        Pki {
            issuer: Issuer::new(params, key),
            ca_pem: ca.pem(),
        }
    }

    /// (cert PEM, key PEM) for `sans`, with a chosen serial so rotations are visible.
    fn leaf(&self, sans: &[String], serial: u64) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(sans.to_vec()).expect("params");
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> RootCertStore {
        roots_from_pem(self.ca_pem.as_bytes())
    }
}

fn roots_from_pem(pem: &[u8]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.expect("CA PEM")).expect("add root");
    }
    roots
}

fn connector(roots: RootCertStore) -> TlsConnector {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

struct Webhook {
    _proc: Proc,
    addr: SocketAddr,
    roots: RootCertStore,
}

impl Webhook {
    /// Starts the webhook with certificate files in `dir` signed by `pki`.
    fn with_files(pki: &Pki, dir: &Path, extra: &[&str]) -> (Webhook, Vec<u8>) {
        let ip = common::pod_ip();
        let (cert, key) = pki.leaf(&[ip.to_string(), "localhost".into()], 1);
        std::fs::write(dir.join("tls.crt"), &cert).expect("write cert");
        std::fs::write(dir.join("tls.key"), &key).expect("write key");
        let first_der = CertificateDer::from_pem_slice(cert.as_bytes())
            .expect("der")
            .to_vec();
        let cert_arg = dir.join("tls.crt");
        let key_arg = dir.join("tls.key");
        let mut args = vec![
            "--cert",
            cert_arg.to_str().expect("utf8"),
            "--key",
            key_arg.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        let (proc, addr) = spawn(ip, &args, Stdio::null());
        (
            Webhook {
                _proc: proc,
                addr,
                roots: pki.roots(),
            },
            first_der,
        )
    }

    async fn get(&self, path: &str) -> Answer {
        call(self.addr, self.roots.clone(), "GET", path, Vec::new()).await
    }

    /// Polls /metrics until a line equal to `line` shows up (bounded by `limit`).
    async fn wait_for_metric(&self, line: &str, limit: Duration) {
        let end = Instant::now() + limit;
        loop {
            let metrics = self.get("/metrics").await.text();
            if metrics.lines().any(|l| l == line) {
                return;
            }
            assert!(
                Instant::now() < end,
                "no `{line}` within {limit:?}:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, body: Vec<u8>) -> Answer {
        call(self.addr, self.roots.clone(), "POST", "/mutate", body).await
    }
}

fn spawn(ip: IpAddr, args: &[&str], stdout: Stdio) -> (Proc, SocketAddr) {
    let addr = SocketAddr::new(ip, common::free_port(ip));
    let listen = addr.to_string();
    let mut cmd = Command::new(common::wsdrain_bin());
    cmd.args(["--log-format", "text", "webhook", "--listen", &listen])
        .args(["--image", IMAGE])
        .args(args)
        .env("RUST_LOG", "wsdrain=debug")
        // No cluster here: `auto` must fall back without waiting on a real API server.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(stdout);
    if !args.contains(&"--native-sidecars") {
        cmd.args(["--native-sidecars", "true"]);
    }
    let proc = Proc::spawn("webhook", &mut cmd);
    common::wait_listening(addr, Duration::from_secs(20));
    (proc, addr)
}

struct Answer {
    status: u16,
    body: Vec<u8>,
    peer_cert: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// TCP connect + TLS handshake. One CI run saw a single "connection reset" during the
/// handshake that ~25 local runs (some beside other test binaries) never reproduced; a
/// reset is retried twice and printed, so it stays visible without failing the run on a
/// one-off. Any other error, or three resets in a row, fails the test.
async fn tls_connect(
    addr: SocketAddr,
    roots: RootCertStore,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::from(addr.ip());
        match connector(roots.clone()).connect(name, tcp).await {
            Ok(tls) => return tls,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && attempt < 3 => {
                eprintln!(
                    "webhook test: TLS handshake to {addr} reset (attempt {attempt}); retrying"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("TLS handshake to {addr}: {e:?}"),
        }
    }
}

/// One request on a fresh TLS connection (so every call sees the certificate served now).
async fn call(
    addr: SocketAddr,
    roots: RootCertStore,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Answer {
    let tls = tls_connect(addr, roots).await;
    let peer_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .to_vec();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Answer {
        status,
        body,
        peer_cert,
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let path = common::repo_path("tests/fixtures/admission").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn b64decode(s: &str) -> Vec<u8> {
    use base64::prelude::{BASE64_STANDARD, Engine as _};
    BASE64_STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not base64 ({e}): {s}"))
}

fn all_containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod["spec"][k].as_array())
        .flatten()
        .collect()
}

#[tokio::test]
async fn pod_create_gets_a_patch_that_adds_the_agent() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (wh, _) = Webhook::with_files(&pki, dir.path(), &[]);

    let request = fixture("pod-create.json");
    let answer = wh.post(request.clone()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let review = answer.json();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let resp = &review["response"];
    assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch", "{resp}");
    let patch_b64 = resp["patch"].as_str().expect("patch is a base64 string");
    let patch: json_patch::Patch =
        serde_json::from_slice(&b64decode(patch_b64)).expect("patch is RFC 6902 JSON");

    let mut pod =
        serde_json::from_slice::<Value>(&request).expect("fixture")["request"]["object"].take();
    json_patch::patch(&mut pod, &patch).expect("patch applies to the pod");
    let agent = all_containers(&pod)
        .into_iter()
        .find(|c| c["image"] == IMAGE)
        .unwrap_or_else(|| panic!("no container with image {IMAGE} in {pod:#}"));
    assert_eq!(agent["name"], "wsdrain");
    assert!(
        pod["metadata"]["annotations"]["wsdrain.io/status"].is_string(),
        "status annotation written: {pod:#}"
    );

    // The fixture asks for a 60 s drain in a 30 s grace period: the injector must say so.
    let warnings = resp["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("60s"))),
        "a warning states the numbers: {warnings:?}"
    );

    // Two admissions of the same pod get different tokens.
    let again = wh.post(request).await.json();
    assert_ne!(
        again["response"]["patch"], resp["patch"],
        "fresh token per pod"
    );

    let metrics = wh.get("/metrics").await.text();
    assert!(
        metrics.contains("wsdrain_webhook_admissions_total{result=\"injected\"} 2"),
        "{metrics}"
    );
}

/// Agent container of a patched pod, and whether it sits in initContainers.
async fn injected_agent(wh: &Webhook) -> (Value, bool) {
    let request = fixture("pod-create.json");
    let resp = wh.post(request.clone()).await.json()["response"].take();
    let patch: json_patch::Patch =
        serde_json::from_slice(&b64decode(resp["patch"].as_str().expect("patch"))).expect("patch");
    let mut pod =
        serde_json::from_slice::<Value>(&request).expect("fixture")["request"]["object"].take();
    json_patch::patch(&mut pod, &patch).expect("applies");
    let find = |key: &str| {
        pod["spec"][key]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "wsdrain").cloned())
    };
    match (find("initContainers"), find("containers")) {
        (Some(agent), None) => (agent, true),
        (None, Some(agent)) => (agent, false),
        other => panic!("expected exactly one agent container: {other:?}"),
    }
}

#[tokio::test]
async fn native_sidecars_flag_decides_where_the_agent_goes() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (classic, _) = Webhook::with_files(&pki, dir.path(), &["--native-sidecars", "false"]);
    let (agent, in_init) = injected_agent(&classic).await;
    assert!(!in_init, "classic sidecar: {agent}");

    let dir = tempfile::tempdir().expect("tempdir");
    let (native, _) = Webhook::with_files(&pki, dir.path(), &["--native-sidecars", "true"]);
    let (agent, in_init) = injected_agent(&native).await;
    assert!(in_init, "native sidecar: {agent}");
    assert_eq!(agent["restartPolicy"], "Always", "{agent}");

    // `auto` without a reachable API server can't know the version: classic sidecars work
    // on every cluster, a native one would hang pods on clusters older than 1.29.
    let dir = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let (auto, _) = Webhook::with_files(&pki, dir.path(), &["--native-sidecars", "auto"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "auto must not stall start-up"
    );
    let (agent, in_init) = injected_agent(&auto).await;
    assert!(!in_init, "classic sidecar without a known version: {agent}");
}

/// `kubectl kustomize` of a directory under deploy/: every object it renders.
fn render(dir: &str) -> (String, Vec<Value>) {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(common::repo_path(dir))
        .output()
        .expect("run kubectl kustomize (kubectl is needed for the deploy tests)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let docs = serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("yaml"))
        .collect();
    (text, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// The webhook container of an overlay's Deployment: (args, env name/value pairs).
fn shipped_webhook_container(overlay: &str) -> (Vec<String>, Vec<(String, String)>) {
    let (_, docs) = render(overlay);
    let deployment = find(&docs, "Deployment", "wsdrain-webhook");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect();
    let env = container["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    (args, env)
}

#[test]
fn both_overlays_render_and_validate_strictly() {
    let dir = tempfile::tempdir().expect("tempdir");
    for overlay in [
        "deploy",
        "deploy/overlays/cert-manager",
        "deploy/overlays/self-managed",
    ] {
        let (text, _) = render(overlay);
        let path = dir.path().join(overlay.replace('/', "-") + ".yaml");
        std::fs::write(&path, text).expect("write");
        common::kubernetes_validate(&path);
    }
    let (_, plain) = render("deploy");
    let (_, cm) = render("deploy/overlays/cert-manager");
    assert_eq!(
        plain, cm,
        "`kubectl apply -k deploy/` is the cert-manager install"
    );
    assert_eq!(
        find(&cm, "MutatingWebhookConfiguration", "wsdrain")["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "wsdrain/wsdrain-webhook"
    );

    let (_, sm) = render("deploy/overlays/self-managed");
    assert!(
        sm.iter().all(|d| !d["apiVersion"]
            .as_str()
            .unwrap_or("")
            .starts_with("cert-manager.io")),
        "no cert-manager objects"
    );
    let config = find(&sm, "MutatingWebhookConfiguration", "wsdrain");
    assert!(config["metadata"]["annotations"].is_null(), "{config}");
    let container =
        &find(&sm, "Deployment", "wsdrain-webhook")["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["args"]
            .as_array()
            .expect("args")
            .contains(&Value::from("--self-managed")),
        "{container}"
    );
    assert!(
        container["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "WSDRAIN_WEBHOOK_IDENTITY"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "{container}"
    );
    // RBAC names exactly the objects the flags' defaults name, and nothing wider.
    let role = find(&sm, "Role", "wsdrain-webhook-certificates");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["wsdrain-webhook-tls"], "verbs": ["get", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["wsdrain-webhook"], "verbs": ["get", "update"]},
        ])
    );
    assert_eq!(
        find(&sm, "ClusterRole", "wsdrain-webhook-ca-bundle")["rules"],
        serde_json::json!([
            {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"], "resourceNames": ["wsdrain"], "verbs": ["get", "patch"]},
        ])
    );
    find(&sm, "Secret", "wsdrain-webhook-tls");
    find(&sm, "Lease", "wsdrain-webhook");
}

#[tokio::test]
async fn the_shipped_deployment_starts_and_injects_the_image_it_names() {
    let (args, mut env) = shipped_webhook_container("deploy/overlays/cert-manager");
    // Pin an image no default could produce: the manifest's env name must be the one the
    // webhook reads (a mirror or a pinned tag is set exactly there).
    let image = "registry.test/mirror/wsdrain:pinned";
    let named = env
        .iter_mut()
        .find(|(_, v)| v.starts_with("ghcr.io/wsdrain/wsdrain"))
        .expect("the Deployment sets the injected image in an env var");
    named.1 = image.to_owned();
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ip = common::pod_ip();
    let (cert, key) = pki.leaf(&[ip.to_string()], 7);
    std::fs::write(dir.path().join("tls.crt"), cert).expect("cert");
    std::fs::write(dir.path().join("tls.key"), key).expect("key");
    let addr = SocketAddr::new(ip, common::free_port(ip));
    // Same flags and env as in the cluster, with local paths and a loopback address.
    let args: Vec<String> = args
        .into_iter()
        .map(|a| match a.as_str() {
            "/tls/tls.crt" | "/tls/tls.key" => dir
                .path()
                .join(a.trim_start_matches("/tls/"))
                .display()
                .to_string(),
            "0.0.0.0:8443" => addr.to_string(),
            _ => a,
        })
        .collect();
    let mut cmd = Command::new(common::wsdrain_bin());
    cmd.args(&args)
        .envs(env)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Proc::spawn("webhook", &mut cmd);
    common::wait_listening(addr, Duration::from_secs(20));
    let wh = Webhook {
        _proc: proc,
        addr,
        roots: pki.roots(),
    };
    assert_eq!(wh.get("/healthz").await.status, 200);
    let (agent, _) = injected_agent(&wh).await;
    assert_eq!(agent["image"], image, "{agent}");
}

#[tokio::test]
async fn already_injected_delete_and_non_pods_are_allowed_without_patch() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (wh, _) = Webhook::with_files(&pki, dir.path(), &[]);

    for (name, uid) in [
        (
            "pod-create-injected.json",
            "0df28fbd-5f5f-4c8e-9a6a-d3c3d0f1a2b3",
        ),
        ("pod-delete.json", "a3c1e9b2-8f4d-4e6a-b1c2-d3e4f5a6b7c8"),
        (
            "configmap-create.json",
            "c0ffee00-1234-4abc-8def-0123456789ab",
        ),
    ] {
        let answer = wh.post(fixture(name)).await;
        assert_eq!(answer.status, 200, "{name}: {}", answer.text());
        let resp = &answer.json()["response"];
        assert_eq!(resp["uid"], uid, "{name}");
        assert_eq!(resp["allowed"], true, "{name}");
        assert!(resp.get("patch").is_none(), "{name}: {resp}");
        assert!(resp.get("patchType").is_none(), "{name}: {resp}");
    }

    let metrics = wh.get("/metrics").await.text();
    assert!(
        metrics.contains("wsdrain_webhook_admissions_total{result=\"skipped\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wsdrain_webhook_admissions_total{result=\"ignored\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_server_lives_on() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (wh, _) = Webhook::with_files(&pki, dir.path(), &[]);

    let garbage = wh.post(b"\x00\x01 not json at all".to_vec()).await;
    assert_eq!(garbage.status, 400);
    assert!(garbage.text().contains("not JSON"), "{}", garbage.text());

    let mut v1beta1: Value = serde_json::from_slice(&fixture("pod-create.json")).expect("json");
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let wrong = wh.post(serde_json::to_vec(&v1beta1).expect("json")).await;
    assert_eq!(wrong.status, 400);
    assert!(
        wrong.text().contains("admission.k8s.io/v1beta1"),
        "{}",
        wrong.text()
    );

    let mut kind = v1beta1;
    kind["apiVersion"] = "admission.k8s.io/v1".into();
    kind["kind"] = "ConversionReview".into();
    let wrong = wh.post(serde_json::to_vec(&kind).expect("json")).await;
    assert_eq!(wrong.status, 400);
    assert!(
        wrong.text().contains("ConversionReview"),
        "{}",
        wrong.text()
    );

    // Just over the limit: read (and dropped) to the end, then 413 on a clean exchange.
    let huge = wh.post(vec![b' '; 3 * 1024 * 1024 + 1]).await;
    assert_eq!(huge.status, 413, "{}", huge.text());

    // Declared far too large up front: refused before any body byte is read.
    let tcp = tokio::net::TcpStream::connect(wh.addr)
        .await
        .expect("connect");
    let mut tls = connector(wh.roots.clone())
        .connect(ServerName::from(wh.addr.ip()), tcp)
        .await
        .expect("tls");
    tls.write_all(
        b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut head))
        .await
        .expect("answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // Chunked, no Content-Length: the limit is enforced while reading.
    let tcp = tokio::net::TcpStream::connect(wh.addr)
        .await
        .expect("connect");
    let mut tls = connector(wh.roots.clone())
        .connect(ServerName::from(wh.addr.ip()), tcp)
        .await
        .expect("tls");
    tls.write_all(b"POST /mutate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .expect("write");
    let chunk = [b'{'; 64 * 1024];
    for _ in 0..49 {
        tls.write_all(b"10000\r\n").await.expect("write");
        tls.write_all(&chunk).await.expect("write");
        tls.write_all(b"\r\n").await.expect("write");
    }
    tls.write_all(b"0\r\n\r\n").await.expect("write");
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut head))
        .await
        .expect("answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // Not TLS at all, then a TLS client that hangs up mid-handshake.
    let mut plain = tokio::net::TcpStream::connect(wh.addr)
        .await
        .expect("connect");
    let _ = plain
        .write_all(b"POST /mutate HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    drop(plain);
    let mut half = tokio::net::TcpStream::connect(wh.addr)
        .await
        .expect("connect");
    let _ = half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
    drop(half);

    assert_eq!(wh.get("/healthz").await.status, 200);
    assert_eq!(wh.get("/nope").await.status, 404);
    assert_eq!(wh.get("/mutate").await.status, 405);
    let metrics = wh.get("/metrics").await.text();
    assert!(
        metrics.contains("wsdrain_webhook_admissions_total{result=\"invalid\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wsdrain_webhook_admission_duration_seconds_count 6"),
        "{metrics}"
    );
}

/// Reads from `tls` until the blank line after a response head; returns the head.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(tls: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match tls.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                other => panic!(
                    "connection ended before a response head ({other:?}): {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("response head within 5 s");
    String::from_utf8_lossy(&head).into_owned()
}

/// Issue 12: a client that announces an oversized body with `Expect: 100-continue` waits
/// before sending it; it must get 413 at once, not `100 Continue` nor a closed connection.
#[tokio::test]
async fn expect_continue_with_an_oversized_body_gets_413_before_sending_it() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (wh, _) = Webhook::with_files(&pki, dir.path(), &["--max-body", "100000"]);

    for length in [100_001u64, 100_000_000] {
        let mut tls = tls_connect(wh.addr, wh.roots.clone()).await;
        let head = format!(
            "POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        );
        tls.write_all(head.as_bytes()).await.expect("write");
        let answer = read_head(&mut tls).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{length}: {answer}");
    }

    // Within the limit, the same client is told to go on and gets its admission.
    let body = fixture("pod-create.json");
    let mut tls = tls_connect(wh.addr, wh.roots.clone()).await;
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.expect("write");
    let answer = read_head(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 100"), "{answer}");
    tls.write_all(&body).await.expect("write body");
    let answer = read_head(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// One admission on a fresh connection, timed from TCP connect to the full answer.
async fn timed_admission(wh: &Webhook) -> Result<(Answer, Duration), Duration> {
    let start = Instant::now();
    match tokio::time::timeout(Duration::from_secs(30), wh.post(fixture("pod-create.json"))).await {
        Ok(answer) => Ok((answer, start.elapsed())),
        Err(_) => Err(start.elapsed()),
    }
}

/// Issue 12: 1024 idle TLS connections held every connection slot, so /healthz and
/// admissions waited ~119 s for a keep-alive timeout; half-sent ClientHellos delayed a
/// request past the API server's 5 s timeout. A fresh caller must be answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_and_half_sent_hellos_do_not_lock_out_a_fresh_admission() {
    use futures_util::StreamExt;
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (wh, _) = Webhook::with_files(&pki, dir.path(), &[]);

    // 1024 completed handshakes that never send a request (bounded: 32 at a time).
    let idle: Vec<_> = futures_util::stream::iter(0..1024)
        .map(|_| tls_connect(wh.addr, wh.roots.clone()))
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(idle.len(), 1024);
    let (answer, took) = timed_admission(&wh)
        .await
        .unwrap_or_else(|t| panic!("no answer within {t:?} beside 1024 idle TLS connections"));
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        took < Duration::from_secs(1),
        "admission took {took:?} beside 1024 idle TLS connections"
    );

    // 1100 clients that send the first bytes of a ClientHello and then nothing.
    let mut half = Vec::with_capacity(1100);
    for _ in 0..1100 {
        let mut tcp = tokio::net::TcpStream::connect(wh.addr)
            .await
            .expect("connect");
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .expect("write");
        half.push(tcp);
    }
    let (answer, took) = timed_admission(&wh)
        .await
        .unwrap_or_else(|t| panic!("no answer within {t:?} beside 1100 half-sent ClientHellos"));
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        took < Duration::from_secs(1),
        "admission took {took:?} beside 1100 half-sent ClientHellos"
    );

    let metrics = wh.get("/metrics").await.text();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
    };
    assert!(value("wsdrain_webhook_connections ") <= 1024.0, "{metrics}");
    // The table was full: places were made by closing the quietest connections (some
    // half-sent hellos left on their own through the handshake timeout).
    assert!(
        value("wsdrain_webhook_connection_evictions_total ") >= 1.0,
        "{metrics}"
    );
    drop((idle, half));
}

#[tokio::test]
async fn rotated_certificate_is_served_without_restart_and_a_bad_one_is_not() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (wh, first) = Webhook::with_files(&pki, dir.path(), &["--cert-poll", "200ms"]);
    assert_eq!(wh.get("/healthz").await.peer_cert, first);

    // A half-written rotation: garbage cert. The old certificate stays in service.
    std::fs::write(
        dir.path().join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    )
    .expect("write");
    wh.wait_for_metric(
        "wsdrain_webhook_certificate_reloads_total{result=\"rejected\"} 1",
        Duration::from_secs(10),
    )
    .await;
    let during = wh.get("/healthz").await;
    assert_eq!(during.status, 200);
    assert_eq!(
        during.peer_cert, first,
        "bad files must not replace the cert"
    );

    // cert-manager's rotation: new key, new serial, another name, same files.
    let (cert, key) = pki.leaf(&[wh.addr.ip().to_string(), "rotated.test".into()], 2);
    std::fs::write(dir.path().join("tls.key"), &key).expect("write key");
    std::fs::write(dir.path().join("tls.crt"), &cert).expect("write cert");
    let want = CertificateDer::from_pem_slice(cert.as_bytes())
        .expect("der")
        .to_vec();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now = wh.get("/healthz").await;
        assert_eq!(now.status, 200);
        if now.peer_cert == want {
            break;
        }
        assert_eq!(
            now.peer_cert, first,
            "served neither the old nor the new cert"
        );
        assert!(
            Instant::now() < end,
            "new certificate not served after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn self_signed_prints_a_ca_bundle_that_clients_can_use() {
    let ip = common::pod_ip();
    let ip_s = ip.to_string();
    let (mut proc, addr) = spawn(
        ip,
        &["--self-signed", "--san", &ip_s, "--san", "localhost"],
        Stdio::piped(),
    );
    let stdout = proc.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a line on stdout");
    let bundle = line
        .trim()
        .strip_prefix("caBundle: ")
        .unwrap_or_else(|| panic!("expected `caBundle: ...`, got {line:?}"));
    let roots = roots_from_pem(&b64decode(bundle));

    let health = call(addr, roots.clone(), "GET", "/healthz", Vec::new()).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.text(), "ok\n");
    let review = call(addr, roots, "POST", "/mutate", fixture("pod-create.json")).await;
    assert_eq!(review.status, 200, "{}", review.text());
    assert_eq!(
        review.json()["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );

    // An idle keep-alive connection (as the API server keeps) must not hold up SIGTERM.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = connector(roots_from_pem(&b64decode(bundle)))
        .connect(ServerName::from(ip), tcp)
        .await
        .expect("tls");
    let (mut idle, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http1");
    let conn = tokio::spawn(conn);
    let req = http::Request::get("/healthz")
        .header(http::header::HOST, "x")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(
        idle.send_request(req).await.expect("response").status(),
        200
    );

    // SIGTERM: a clean, prompt exit.
    common::signal(proc.pid(), nix::sys::signal::Signal::SIGTERM);
    let status = proc
        .wait_timeout(Duration::from_secs(3))
        .expect("exits promptly after SIGTERM despite an idle keep-alive connection");
    let _ = conn.await;
    assert!(status.success(), "{status:?}");
}

#[test]
fn missing_or_bad_certificate_files_fail_at_start_with_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bad.crt"), "garbage").expect("write");
    std::fs::write(dir.path().join("bad.key"), "garbage").expect("write");
    for (cert, key) in [("missing.crt", "missing.key"), ("bad.crt", "bad.key")] {
        let out = Command::new(common::wsdrain_bin())
            .args([
                "webhook",
                "--listen",
                "127.0.0.1:0",
                "--native-sidecars",
                "false",
            ])
            .arg("--cert")
            .arg(dir.path().join(cert))
            .arg("--key")
            .arg(dir.path().join(key))
            .output()
            .expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--cert/--key"), "{err}");
    }
}

// ---- --self-managed against kube's tower-test mock API ----------------------------------

mod self_managed {
    use crate::common::kube_api::{self, Api, next, respond};
    use std::time::{Duration, SystemTime};

    use base64::prelude::{BASE64_STANDARD, Engine as _};
    use http::{Method, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use serde_json::{Value, json};
    use tower_test::mock::SendResponse;
    use wsdrain::webhook::pki::{self, Material};
    use wsdrain::webhook::self_managed::{Manager, Names, Round};

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/wsdrain/leases/wsdrain-webhook";
    const SECRET: &str = "/api/v1/namespaces/wsdrain/secrets/wsdrain-webhook-tls";
    const CONFIG: &str =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wsdrain";

    fn manager(identity: &str) -> (Manager, Api) {
        let (client, handle) = kube_api::client();
        let names = Names {
            namespace: "wsdrain".into(),
            secret: "wsdrain-webhook-tls".into(),
            lease: "wsdrain-webhook".into(),
            webhook_config: "wsdrain".into(),
            identity: identity.into(),
            sans: sans(),
        };
        (Manager::new(client, names), handle)
    }

    /// The serving certificate's names, the same in stored material and in the flags.
    fn sans() -> Vec<String> {
        vec!["wsdrain-webhook.wsdrain.svc".into()]
    }

    /// A new CA and serving certificate, as a first start at `now` makes them.
    fn fresh_material(now: SystemTime) -> Material {
        pki::renew(
            &Material::default(),
            pki::plan(&Material::default(), &sans(), now),
            &sans(),
            now,
        )
        .expect("material")
    }

    /// The webhook configuration read with `current` in both webhooks, then the patch
    /// that puts `bundle` into both (test-guarded), answered as applied.
    async fn expect_bundle_update(api: &mut Api, current: Option<&str>, bundle: &str) {
        let (_, send) = expect(api, Method::GET, CONFIG).await;
        respond(send, 200, &config([current, current]));
        let (patch, send) = expect(api, Method::PATCH, CONFIG).await;
        assert_eq!(
            patch,
            bundle_patch(
                &[0, 1],
                &["pod-label.inject.wsdrain.io", "namespace.inject.wsdrain.io"],
                bundle
            )
        );
        respond(send, 200, &config([Some(bundle), Some(bundle)]));
    }

    /// The lease read (held by `holder`, renewed at `renewed`) and this replica's write of
    /// it, answered as applied; returns what was written.
    async fn lease_exchange(api: &mut Api, holder: Option<&str>, renewed: SystemTime) -> Value {
        let (_, send) = expect(api, Method::GET, LEASE).await;
        respond(send, 200, &lease(holder, renewed));
        let (put, send) = expect(api, Method::PUT, LEASE).await;
        respond(send, 200, &put);
        put
    }

    /// Once the manager is gone, the mock API received nothing more.
    async fn no_more_requests(mut api: Api, manager: Manager, why: &str) {
        drop(manager);
        assert!(api.as_mut().next_request().await.is_none(), "{why}");
    }

    /// The next request must be `method path`; returns its JSON body (Null if none).
    async fn expect(
        handle: &mut Api,
        method: Method,
        path: &str,
    ) -> (Value, SendResponse<Response<Body>>) {
        let (req, send) = next(handle).await;
        assert_eq!(
            (req.method(), req.uri().path()),
            (&method, path),
            "{}",
            req.uri()
        );
        let content_type = req
            .headers()
            .get("content-type")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let query = req.uri().query().unwrap_or("").to_owned();
        let bytes = req.into_body().collect().await.expect("body").to_bytes();
        let mut body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        if method == Method::PATCH {
            body = json!({"contentType": content_type, "query": query, "patch": body});
        }
        (body, send)
    }

    fn lease(holder: Option<&str>, renewed: SystemTime) -> Value {
        let mut spec = json!({});
        if let Some(holder) = holder {
            let t = k8s_openapi::jiff::Timestamp::try_from(renewed).expect("time");
            spec = json!({"holderIdentity": holder, "leaseDurationSeconds": 30,
                          "renewTime": t.to_string(), "leaseTransitions": 1});
        }
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "wsdrain-webhook", "namespace": "wsdrain", "resourceVersion": "1"},
               "spec": spec})
    }

    fn secret(material: &Material) -> Value {
        let data: serde_json::Map<String, Value> = material
            .to_secret_data()
            .into_iter()
            .filter(|(_, v)| !v.0.is_empty())
            .map(|(k, v)| (k, Value::String(BASE64_STANDARD.encode(&v.0))))
            .collect();
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": "wsdrain-webhook-tls", "namespace": "wsdrain", "resourceVersion": "5"},
               "data": data})
    }

    fn material_of(secret: &Value) -> Material {
        let data: std::collections::BTreeMap<String, k8s_openapi::ByteString> =
            serde_json::from_value(secret["data"].clone()).expect("data");
        Material::from_secret_data(Some(&data))
    }

    fn config(bundles: [Option<&str>; 2]) -> Value {
        let webhook = |name: &str, bundle: Option<&str>| {
            let mut client_config = json!({"service": {"name": "wsdrain-webhook", "namespace": "wsdrain", "path": "/mutate", "port": 443}});
            if let Some(b) = bundle {
                client_config["caBundle"] = json!(BASE64_STANDARD.encode(b));
            }
            json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
                   "clientConfig": client_config})
        };
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
               "metadata": {"name": "wsdrain", "resourceVersion": "9"},
               "webhooks": [webhook("pod-label.inject.wsdrain.io", bundles[0]),
                            webhook("namespace.inject.wsdrain.io", bundles[1])]})
    }

    fn bundle_patch(indexes: &[usize], names: &[&str], bundle: &str) -> Value {
        let ops: Vec<Value> = indexes
            .iter()
            .zip(names)
            .flat_map(|(i, name)| {
                [
                    json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": name}),
                    json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                           "value": BASE64_STANDARD.encode(bundle)}),
                ]
            })
            .collect();
        json!({"contentType": "application/json-patch+json",
               "query": "&fieldManager=wsdrain-webhook", "patch": ops})
    }

    fn ders(pem: &str) -> Vec<Vec<u8>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.expect("PEM").to_vec())
            .collect()
    }

    async fn round(manager: &mut Manager, now: SystemTime) -> Round {
        tokio::time::timeout(Duration::from_secs(10), manager.round(now))
            .await
            .expect("round ends")
            .expect("round succeeds")
    }

    #[tokio::test]
    async fn first_replica_takes_the_lease_writes_the_secret_and_sets_the_ca_bundle() {
        wsdrain::webhook::tls::install_ring();
        let (mut manager, mut api) = manager("webhook-a");
        let now = SystemTime::now();
        let server = tokio::spawn(async move {
            let put = lease_exchange(&mut api, None, now).await;
            assert_eq!(put["metadata"]["resourceVersion"], "1", "compare-and-swap");
            assert_eq!(put["spec"]["holderIdentity"], "webhook-a");
            assert_eq!(put["spec"]["leaseDurationSeconds"], 30);
            assert_eq!(put["spec"]["leaseTransitions"], 1);
            assert!(put["spec"]["renewTime"].is_string() && put["spec"]["acquireTime"].is_string());

            let (_, send) = expect(&mut api, Method::GET, SECRET).await;
            respond(send, 200, &secret(&Material::default()));
            let (put, send) = expect(&mut api, Method::PUT, SECRET).await;
            assert_eq!(put["metadata"]["resourceVersion"], "5", "compare-and-swap");
            let written = material_of(&put);
            respond(send, 200, &put);

            expect_bundle_update(&mut api, None, &written.ca_bundle).await;
            written
        });
        let round = round(&mut manager, now).await;
        let written = server.await.expect("mock server");
        assert!(round.leader);
        assert_eq!(round.material, written, "serves what it wrote");
        // A serving certificate signed by the CA the bundle names.
        assert!(
            wsdrain::webhook::tls::certified_key(
                written.tls_cert.as_bytes(),
                written.tls_key.as_bytes()
            )
            .is_ok()
        );
        assert_eq!(ders(&written.tls_cert)[1], ders(&written.ca_bundle)[0]);
        assert!(!written.ca_key.is_empty());
    }

    #[tokio::test]
    async fn second_replica_follows_serves_the_secret_and_writes_nothing() {
        wsdrain::webhook::tls::install_ring();
        let now = SystemTime::now();
        let stored = fresh_material(now);
        let (mut manager, mut api) = manager("webhook-b");
        let served = stored.clone();
        let server = tokio::spawn(async move {
            let (_, send) = expect(&mut api, Method::GET, LEASE).await;
            respond(
                send,
                200,
                &lease(Some("webhook-a"), now - Duration::from_secs(5)),
            );
            let (_, send) = expect(&mut api, Method::GET, SECRET).await;
            respond(send, 200, &secret(&served));
            api
        });
        let round = round(&mut manager, now).await;
        let api = server.await.expect("mock server");
        assert!(!round.leader);
        assert_eq!(round.material, stored);
        no_more_requests(api, manager, "a follower writes nothing").await;
    }

    #[tokio::test]
    async fn a_lost_race_for_the_lease_means_following() {
        wsdrain::webhook::tls::install_ring();
        let now = SystemTime::now();
        let (mut manager, mut api) = manager("webhook-b");
        let server = tokio::spawn(async move {
            let (_, send) = expect(&mut api, Method::GET, LEASE).await;
            // Expired: webhook-a stopped renewing 31 s ago.
            respond(
                send,
                200,
                &lease(Some("webhook-a"), now - Duration::from_secs(31)),
            );
            let (put, send) = expect(&mut api, Method::PUT, LEASE).await;
            assert_eq!(put["spec"]["holderIdentity"], "webhook-b");
            assert_eq!(put["spec"]["leaseTransitions"], 2);
            respond(
                send,
                409,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "Conflict", "code": 409, "message": "modified"}),
            );
            let (_, send) = expect(&mut api, Method::GET, SECRET).await;
            respond(send, 200, &secret(&Material::default()));
            api
        });
        let round = round(&mut manager, now).await;
        let api = server.await.expect("mock server");
        assert!(!round.leader);
        no_more_requests(api, manager, "no writes after a lost race").await;
    }

    #[tokio::test]
    async fn leader_rotates_the_ca_before_expiry_and_keeps_the_old_one_in_the_bundle() {
        wsdrain::webhook::tls::install_ring();
        let t0 = SystemTime::now();
        let stored = fresh_material(t0);
        // A day into the CA's renewal window, with a serving certificate issued ten days
        // ago (so still usable).
        let now = t0 + pki::CA_LIFETIME - pki::CA_RENEW_BEFORE + Duration::from_secs(86_400);
        let leaf_only = pki::Plan {
            new_ca: false,
            new_leaf: true,
            reason: "test",
        };
        let stored = pki::renew(
            &stored,
            leaf_only,
            &sans(),
            now - Duration::from_secs(10 * 86_400),
        )
        .expect("leaf");
        let (mut manager, mut api) = manager("webhook-a");
        let old = stored.clone();
        let server = tokio::spawn(async move {
            let put =
                lease_exchange(&mut api, Some("webhook-a"), now - Duration::from_secs(10)).await;
            assert_eq!(put["spec"]["holderIdentity"], "webhook-a");
            assert_eq!(
                put["spec"]["leaseTransitions"], 1,
                "a renewal is no transition"
            );
            let (_, send) = expect(&mut api, Method::GET, SECRET).await;
            respond(send, 200, &secret(&old));
            let (put, send) = expect(&mut api, Method::PUT, SECRET).await;
            let written = material_of(&put);
            respond(send, 200, &put);
            expect_bundle_update(&mut api, Some(&old.ca_bundle), &written.ca_bundle).await;
            written
        });
        let round = round(&mut manager, now).await;
        let written = server.await.expect("mock server");
        assert!(round.leader);
        let bundle = ders(&written.ca_bundle);
        assert_eq!(bundle.len(), 2, "new CA and the old one");
        assert_eq!(
            bundle[1],
            ders(&stored.ca_bundle)[0],
            "old CA still trusted"
        );
        assert_eq!(
            written.tls_cert, stored.tls_cert,
            "serving certificate kept until the new CA propagated"
        );
    }

    #[tokio::test]
    async fn leader_with_current_certificates_only_renews_the_lease() {
        wsdrain::webhook::tls::install_ring();
        let now = SystemTime::now();
        let stored = fresh_material(now);
        let (mut manager, mut api) = manager("webhook-a");
        let current = stored.clone();
        let server = tokio::spawn(async move {
            lease_exchange(&mut api, Some("webhook-a"), now - Duration::from_secs(10)).await;
            let (_, send) = expect(&mut api, Method::GET, SECRET).await;
            respond(send, 200, &secret(&current));
            let (_, send) = expect(&mut api, Method::GET, CONFIG).await;
            respond(
                send,
                200,
                &config([Some(&current.ca_bundle), Some(&current.ca_bundle)]),
            );
            api
        });
        let round = round(&mut manager, now).await;
        let api = server.await.expect("mock server");
        assert!(round.leader);
        assert_eq!(round.material, stored);
        no_more_requests(api, manager, "nothing to write").await;
    }
}

// ---- wsdrain_drains_total from the agents' Events, against the mock API --------------------

mod drain_events {
    use crate::common::kube_api;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use http::{Method, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio_util::sync::CancellationToken;
    use wsdrain::webhook::metrics::Metrics;

    fn event(uid: &str, reason: &str, pod: &str, series: Option<i32>) -> Value {
        let mut e = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{pod}.{uid}"), "namespace": "chat", "uid": uid, "resourceVersion": "1"},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": "chat", "name": pod},
            "reason": reason, "type": "Normal", "action": "Drain",
            "reportingComponent": "wsdrain.io/agent", "reportingInstance": pod,
            "eventTime": "2026-01-01T00:00:00.000000Z",
        });
        if let Some(count) = series {
            e["series"] =
                json!({"count": count, "lastObservedTime": "2026-01-01T00:00:10.000000Z"});
        }
        e
    }

    fn counted(metrics: &Metrics, workload: &str, outcome: &str) -> Option<u64> {
        let prefix = format!(
            "wsdrain_drains_total{{namespace=\"chat\",workload=\"{workload}\",outcome=\"{outcome}\"}} "
        );
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
    }

    #[tokio::test]
    async fn finished_drains_are_counted_by_workload_and_outcome_after_the_baseline() {
        let (client, mut handle) = kube_api::client();
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let counting = tokio::spawn(wsdrain::webhook::drains::count(
            client,
            metrics.clone(),
            stop.clone(),
        ));

        // The initial list: cluster-wide, only the agents' Events. A baseline.
        let (req, send) = handle.as_mut().next_request().await.expect("list");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/api/v1/events");
        assert_eq!(
            req.uri().query(),
            Some("&fieldSelector=reportingComponent%3Dwsdrain.io%2Fagent&limit=500")
        );
        let list = json!({"apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": "100"},
                          "items": [event("old", "DrainCompleted", "ws-7d9f6c5b8d-x2x9z", None)]});
        send.send_response(Response::new(Body::from(
            serde_json::to_vec(&list).expect("json"),
        )));

        // The watch from there on.
        let (req, send) = handle.as_mut().next_request().await.expect("watch");
        assert_eq!(req.uri().path(), "/api/v1/events");
        assert_eq!(
            req.uri().query(),
            Some(
                "&watch=true&timeoutSeconds=290&fieldSelector=reportingComponent%3Dwsdrain.io%2Fagent\
                 &allowWatchBookmarks=true&resourceVersion=100"
            )
        );
        let lines: Vec<u8> = [
            json!({"type": "ADDED", "object": event("a", "DrainCompleted", "ws-7d9f6c5b8d-x2x9z", None)}),
            json!({"type": "ADDED", "object": event("b", "DrainCompleted", "ws-7d9f6c5b8d-b4n6q", None)}),
            json!({"type": "ADDED", "object": event("c", "DrainStarted", "ws-7d9f6c5b8d-b4n6q", None)}),
            json!({"type": "ADDED", "object": event("d", "DrainDeadlineExceeded", "db-0", Some(2))}),
            json!({"type": "MODIFIED", "object": event("d", "DrainDeadlineExceeded", "db-0", Some(3))}),
            json!({"type": "MODIFIED", "object": event("a", "DrainCompleted", "ws-7d9f6c5b8d-x2x9z", None)}),
        ]
        .iter()
        .flat_map(|v| {
            let mut line = serde_json::to_vec(v).expect("json");
            line.push(b'\n');
            line
        })
        .collect();
        send.send_response(Response::new(Body::from(lines)));

        let end = Instant::now() + Duration::from_secs(5);
        while counted(&metrics, "db", "deadline_exceeded") != Some(3) {
            assert!(
                Instant::now() < end,
                "not counted within 5 s:\n{}",
                metrics.encode()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            counted(&metrics, "ws", "drained"),
            Some(2),
            "{}",
            metrics.encode()
        );
        assert!(!metrics.encode().contains("outcome=\"started\""));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), counting)
            .await
            .expect("stops")
            .expect("task");
    }
}
