//! The Kubernetes API side of the agent against kube's tower-test mock client: the exact
//! requests, the deadline arithmetic, and that every failure leaves the drain timeline
//! as it would be with the API off.

mod common;

use common::kube_api::{self, Api, next, respond};

use std::time::{Duration, Instant, SystemTime};

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};

use wsdrain::drain::report::{Notice, Outcome, Summary, Trigger};
use wsdrain::kube::PodRef;
use wsdrain::kube::{
    Call, Kind, MAX_TERMINATION_MESSAGE, PodLink, kill_instant, termination_message,
    write_termination_message,
};

const NS: &str = "chat";
const POD: &str = "ws-7d9f-abcde";
const UID: &str = "5b0e3c1a-0000-4000-8000-000000000001";
const POD_PATH: &str = "/api/v1/namespaces/chat/pods/ws-7d9f-abcde";

fn pod_ref() -> PodRef {
    PodRef {
        name: POD.into(),
        namespace: NS.into(),
    }
}

fn mock_link(readiness_gate: bool) -> (PodLink, Api) {
    let (client, handle) = kube_api::client();
    let link = PodLink::new(client, pod_ref(), readiness_gate)
        .with_call_timeout(Duration::from_millis(300));
    (link, handle)
}

fn pod_json(deletion: Option<&str>) -> Value {
    let mut meta = json!({ "name": POD, "namespace": NS, "uid": UID, "resourceVersion": "42" });
    if let Some(t) = deletion {
        meta["deletionTimestamp"] = json!(t);
        meta["deletionGracePeriodSeconds"] = json!(5);
    }
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": { "containers": [{ "name": "app", "image": "app" }] } })
}

fn status_json(code: u16, reason: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("mock {code}"), "reason": reason, "code": code })
}

async fn json_body(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn content_type(req: &Request<Body>) -> &str {
    req.headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

fn summary(outcome: Outcome) -> Summary {
    let drained = outcome == Outcome::Drained;
    Summary {
        outcome,
        trigger: Trigger::Prestop,
        duration_ms: if drained { 12_340 } else { 25_000 },
        budget_ms: 25_000,
        connections_at_start: 120,
        remaining: if drained { 0 } else { 7 },
        closes_requested: 120,
        sessions_closed: 113,
        admin_failures: 0,
        vanished: 0,
        settle_ms: 2_000,
        close_ms: 9_800,
    }
}

// ---- reading the pod ------------------------------------------------------------

#[tokio::test]
async fn deletion_time_reads_own_pod() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().to_string(), POD_PATH);
        respond(send, 200, &pod_json(Some("2030-01-02T03:04:05Z")));
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.uri().to_string(), POD_PATH);
        respond(send, 200, &pod_json(None));
    });
    let expected = SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_553_445);
    assert_eq!(link.deletion_time().await, Some(expected));
    assert_eq!(link.deletion_time().await, None);
    assert_eq!(link.failures(), 0);
    server.await.unwrap();
}

#[tokio::test]
async fn every_failure_leaves_the_timeline_unchanged() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        for (code, reason) in [
            (403, "Forbidden"),
            (403, "Forbidden"),
            (404, "NotFound"),
            (500, "InternalError"),
            (503, "ServiceUnavailable"),
            (401, "Unauthorized"),
        ] {
            let (req, send) = next(&mut handle).await;
            assert_eq!(req.uri().to_string(), POD_PATH);
            respond(send, code, &status_json(code, reason));
        }
        // A non-Status body (e.g. from a proxy in between).
        let (_, send) = next(&mut handle).await;
        send.send_response(
            Response::builder()
                .status(502)
                .body(Body::from(b"bad gateway".to_vec()))
                .unwrap(),
        );
        // Timeout: never answer (the client gives up after its call bound).
        let (_, held) = next(&mut handle).await;
        // A broken answer.
        let (_, send) = next(&mut handle).await;
        send.send_response(Response::new(Body::from(b"{not json".to_vec())));
        drop(held);
    });

    // The read at drain start: on every failure it must say "no deletion known", so the
    // drain keeps its own timeout, as with the client off.
    let link = std::sync::Arc::new(link);
    for n in 1..=9u64 {
        let started = Instant::now();
        assert_eq!(wsdrain::kube::kill_time(&link).await, None, "failure {n}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "call {n} not bounded"
        );
        assert_eq!(link.failures(), n);
    }
    for kind in [
        Kind::Forbidden,
        Kind::NotFound,
        Kind::ServerError,
        Kind::Unauthorized,
        Kind::Timeout,
        Kind::Other,
    ] {
        assert!(
            link.failure_logged(Call::GetPod, kind),
            "{kind:?} not logged"
        );
    }
    assert!(!link.failure_logged(Call::PatchStatus, Kind::Forbidden));
    server.await.unwrap();
}

#[tokio::test]
async fn connection_refused_is_a_counted_failure() {
    // A real client against a loopback port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let link = PodLink::from_config(config, pod_ref(), true).unwrap();
    assert_eq!(link.deletion_time().await, None);
    link.set_serving(false).await;
    link.publish(&Notice::AdminFailing { error: "x".into() })
        .await;
    // publish reads the pod first for its uid: get, get, event.
    assert_eq!(link.failures(), 4);
    assert!(link.failure_logged(Call::GetPod, Kind::Unreachable));
    assert!(link.failure_logged(Call::PatchStatus, Kind::Unreachable));
    assert!(link.failure_logged(Call::PublishEvent, Kind::Unreachable));
}

// ---- deadline -----------------------------------------------------------------------

#[test]
fn deletion_timestamp_maps_to_the_monotonic_clock() {
    let now = Instant::now();
    let wall = SystemTime::now();
    // kubectl delete --grace-period=12: SIGKILL 12 s from now.
    assert_eq!(
        kill_instant(wall + Duration::from_secs(12), now, wall),
        now + Duration::from_secs(12)
    );
    // Past: before now (the drain machine then ends the drain at once).
    assert!(kill_instant(wall - Duration::from_secs(3), now, wall) <= now);
}

// ---- readiness gate -------------------------------------------------------------------

#[tokio::test]
async fn set_serving_patches_status_condition() {
    let (link, mut handle) = mock_link(true);
    let server = tokio::spawn(async move {
        for (status, reason) in [("True", "Serving"), ("False", "Draining")] {
            let (req, send) = next(&mut handle).await;
            assert_eq!(req.method(), Method::PATCH);
            assert_eq!(req.uri().to_string(), format!("{POD_PATH}/status?"));
            assert_eq!(content_type(&req), "application/strategic-merge-patch+json");
            let mut body = json_body(req).await;
            let cond = &mut body["status"]["conditions"][0];
            let t = cond["lastTransitionTime"].take();
            assert!(t.as_str().unwrap().ends_with('Z'), "{t}");
            assert_eq!(
                body,
                json!({ "status": { "conditions": [{
                    "type": "wsdrain.io/serving",
                    "status": status,
                    "reason": reason,
                    "message": if status == "True" { "wsdrain agent is serving" }
                               else { "wsdrain agent is draining WebSocket connections" },
                    "lastTransitionTime": null,
                }]}})
            );
            respond(send, 200, &pod_json(None));
        }
        // Then a 403: logged, counted.
        let (_, send) = next(&mut handle).await;
        respond(send, 403, &status_json(403, "Forbidden"));
    });
    link.set_serving(true).await;
    link.set_serving(false).await;
    assert_eq!(link.failures(), 0);
    link.set_serving(false).await;
    assert_eq!(link.failures(), 1);
    assert!(link.failure_logged(Call::PatchStatus, Kind::Forbidden));
    server.await.unwrap();
}

#[tokio::test]
async fn set_serving_without_gate_sends_nothing() {
    let (link, mut handle) = mock_link(false);
    link.set_serving(true).await;
    link.set_serving(false).await;
    drop(link);
    assert!(handle.as_mut().next_request().await.is_none());
}

// ---- events ---------------------------------------------------------------------------

async fn expect_event(handle: &mut Api, type_: &str, reason: &str, note_has: &[&str]) {
    let (req, send) = next(handle).await;
    assert_eq!(req.method(), Method::POST);
    assert_eq!(
        req.uri().to_string(),
        "/apis/events.k8s.io/v1/namespaces/chat/events?"
    );
    assert_eq!(content_type(&req), "application/json");
    let body = json_body(req).await;
    assert_eq!(body["apiVersion"], "events.k8s.io/v1");
    assert_eq!(body["kind"], "Event");
    assert_eq!(body["type"], type_);
    assert_eq!(body["reason"], reason);
    assert_eq!(body["action"], "Drain");
    assert_eq!(body["reportingController"], "wsdrain.io/agent");
    assert_eq!(body["reportingInstance"], POD);
    assert_eq!(body["metadata"]["namespace"], NS);
    assert!(body["eventTime"].is_string());
    assert_eq!(
        body["regarding"],
        json!({ "apiVersion": "v1", "kind": "Pod", "name": POD, "namespace": NS, "uid": UID })
    );
    let note = body["note"].as_str().unwrap();
    for part in note_has {
        assert!(note.contains(part), "{note:?} lacks {part:?}");
    }
    respond(send, 201, &body);
}

#[tokio::test]
async fn publish_sends_one_event_per_notice() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        // The first event needs the pod's uid (kubectl describe matches on it).
        let (req, send) = next(&mut handle).await;
        assert_eq!(
            (req.method(), req.uri().to_string()),
            (&Method::GET, POD_PATH.into())
        );
        respond(send, 200, &pod_json(None));
        expect_event(
            &mut handle,
            "Normal",
            "DrainStarted",
            &["preStop hook", "120 connections", "25.0s"],
        )
        .await;
        expect_event(
            &mut handle,
            "Normal",
            "DrainCompleted",
            &["12.3s", "113 sessions closed", "120 connections at start"],
        )
        .await;
        expect_event(
            &mut handle,
            "Warning",
            "DrainDeadlineExceeded",
            &["7 connections remaining"],
        )
        .await;
        expect_event(
            &mut handle,
            "Warning",
            "AdminEndpointFailing",
            &["connection refused"],
        )
        .await;
    });
    link.publish(&Notice::Started {
        trigger: Trigger::Prestop,
        connections: 120,
        budget_ms: 25_000,
    })
    .await;
    link.publish(&Notice::Finished(summary(Outcome::Drained)))
        .await;
    link.publish(&Notice::Finished(summary(Outcome::DeadlineExceeded)))
        .await;
    link.publish(&Notice::AdminFailing {
        error: "connection refused".into(),
    })
    .await;
    assert_eq!(link.failures(), 0);
    server.await.unwrap();
}

#[tokio::test]
async fn event_failure_is_counted_and_note_is_bounded() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        respond(send, 200, &pod_json(None));
        let (req, send) = next(&mut handle).await;
        let body = json_body(req).await;
        assert!(body["note"].as_str().unwrap().len() <= 1024);
        respond(send, 403, &status_json(403, "Forbidden"));
    });
    link.publish(&Notice::AdminFailing {
        error: "é".repeat(5000),
    })
    .await;
    assert_eq!(link.failures(), 1);
    assert!(link.failure_logged(Call::PublishEvent, Kind::Forbidden));
    server.await.unwrap();
}

// ---- watch ----------------------------------------------------------------------------

fn watch_lines(events: &[(&str, Value)]) -> Body {
    let mut out = Vec::new();
    for (t, obj) in events {
        out.extend(serde_json::to_vec(&json!({ "type": t, "object": obj })).unwrap());
        out.push(b'\n');
    }
    Body::from(out)
}

fn pod_list(items: &[Value]) -> Value {
    json!({ "apiVersion": "v1", "kind": "PodList",
            "metadata": { "resourceVersion": "100" }, "items": items })
}

/// The first request of kube-runtime's watcher: a list of the own pod only.
fn assert_own_pod_list(uri: &str) {
    assert!(uri.starts_with("/api/v1/namespaces/chat/pods?"), "{uri}");
    assert!(!uri.contains("watch=true"), "{uri}");
    assert!(
        uri.contains("fieldSelector=metadata.name%3Dws-7d9f-abcde"),
        "{uri}"
    );
}

/// The watch that follows the list: own pod, from the list's resourceVersion.
fn assert_own_pod_watch(uri: &str) {
    for q in [
        "watch=true",
        "fieldSelector=metadata.name%3Dws-7d9f-abcde",
        "resourceVersion=100",
        "timeoutSeconds=290",
    ] {
        assert!(uri.contains(q), "{uri} lacks {q}");
    }
}

#[tokio::test]
async fn wait_for_deletion_watches_own_pod_and_retries() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        // First list refused (no "pods list"), the retry works, then the watch.
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), Method::GET);
        let uri = req.uri().to_string();
        assert_own_pod_list(&uri);
        respond(send, 403, &status_json(403, "Forbidden"));
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.uri().to_string(), uri, "the same list again");
        respond(send, 200, &pod_list(&[pod_json(None)]));
        let (req, send) = next(&mut handle).await;
        assert_own_pod_watch(&req.uri().to_string());
        send.send_response(Response::new(watch_lines(&[(
            "MODIFIED",
            pod_json(Some("2030-01-02T03:04:05Z")),
        )])));
    });
    let t = tokio::time::timeout(Duration::from_secs(10), link.wait_for_deletion())
        .await
        .expect("wait_for_deletion did not resolve");
    assert_eq!(
        t,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_553_445)
    );
    assert_eq!(link.failures(), 1);
    assert!(link.failure_logged(Call::WatchPod, Kind::Forbidden));
    server.await.unwrap();
}

/// A pod already being deleted when the agent starts is seen in the first list.
#[tokio::test]
async fn wait_for_deletion_sees_a_deletion_that_happened_before() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_own_pod_list(&req.uri().to_string());
        respond(
            send,
            200,
            &pod_list(&[pod_json(Some("2030-01-02T03:04:05Z"))]),
        );
    });
    let t = tokio::time::timeout(Duration::from_secs(10), link.wait_for_deletion())
        .await
        .expect("wait_for_deletion did not resolve");
    assert_eq!(
        t,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_553_445)
    );
    server.await.unwrap();
}

#[tokio::test]
async fn wait_for_deletion_rewatches_after_a_normal_end() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        // A watch that ends (server timeout) without a deletion, then a forced deletion.
        let (req, send) = next(&mut handle).await;
        assert_own_pod_list(&req.uri().to_string());
        respond(send, 200, &pod_list(&[pod_json(None)]));
        let (req, send) = next(&mut handle).await;
        let uri = req.uri().to_string();
        assert_own_pod_watch(&uri);
        send.send_response(Response::new(watch_lines(&[("ADDED", pod_json(None))])));
        let (req, send) = next(&mut handle).await;
        let again = req.uri().to_string();
        assert!(again.contains("watch=true"), "watches again: {again}");
        send.send_response(Response::new(watch_lines(&[("DELETED", pod_json(None))])));
    });
    let before = SystemTime::now();
    let t = tokio::time::timeout(Duration::from_secs(10), link.wait_for_deletion())
        .await
        .expect("wait_for_deletion did not resolve");
    assert!(t >= before);
    assert_eq!(link.failures(), 0);
    server.await.unwrap();
}

#[tokio::test]
async fn wait_for_deletion_never_resolves_without_api() {
    let (link, mut handle) = mock_link(false);
    let server = tokio::spawn(async move {
        while let Some((_, send)) = handle.as_mut().next_request().await {
            respond(send, 500, &status_json(500, "InternalError"));
        }
    });
    let r = tokio::time::timeout(Duration::from_millis(1500), link.wait_for_deletion()).await;
    assert!(r.is_err());
    assert!(link.failures() >= 1);
    drop(link);
    server.await.unwrap();
}

// ---- termination message -----------------------------------------------------------------

#[test]
fn termination_message_written_on_both_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("termination-log");
    std::fs::write(
        &path,
        "old content that is longer than nothing\n".repeat(200),
    )
    .unwrap();

    write_termination_message(&path, &summary(Outcome::Drained)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.starts_with("wsdrain: drained in 12.3s"), "{text}");
    assert!(text.contains("120 connections at start"));

    write_termination_message(&path, &summary(Outcome::DeadlineExceeded)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(
        text.starts_with("wsdrain: deadline exceeded after 25.0s with 7 connections remaining"),
        "{text}"
    );
    assert!(text.len() < MAX_TERMINATION_MESSAGE);

    let mut huge = summary(Outcome::DeadlineExceeded);
    huge.remaining = u64::MAX;
    huge.connections_at_start = u64::MAX;
    huge.closes_requested = u64::MAX;
    huge.sessions_closed = u64::MAX;
    huge.duration_ms = u64::MAX;
    assert!(termination_message(&huge).len() < MAX_TERMINATION_MESSAGE);

    // An unwritable path is an error, not a panic.
    assert!(write_termination_message(&dir.path().join("no/such/dir"), &huge).is_err());
    // Outside Kubernetes nobody made the file: the agent does not create it.
    let absent = dir.path().join("absent");
    assert!(write_termination_message(&absent, &huge).is_err());
    assert!(!absent.exists());
}

// ---- manifests -----------------------------------------------------------------------------

/// A pod as the injector leaves it with the readiness gate on (the shape the agent patches).
const GATED_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: ws
  namespace: my-namespace
  labels: {wsdrain.io/inject: "true"}
  annotations: {wsdrain.io/readiness-gate: "true"}
spec:
  serviceAccountName: my-app
  terminationGracePeriodSeconds: 30
  readinessGates:
    - conditionType: wsdrain.io/serving
  containers:
    - name: app
      image: example/ws:1
      ports: [{containerPort: 8080}]
"#;

#[test]
fn manifests_pass_strict_validation() {
    common::kubernetes_validate(&common::repo_path("deploy/rbac-app.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let pod = dir.path().join("pod.yaml");
    std::fs::write(&pod, GATED_POD).unwrap();
    common::kubernetes_validate(&pod);
}

// ---- wiring into the drain runner ------------------------------------------------------------

#[tokio::test]
async fn kill_time_maps_deletion_to_instant() {
    use k8s_openapi::jiff::Timestamp;
    let (link, mut handle) = mock_link(false);
    let in_12s = Timestamp::from_second(Timestamp::now().as_second() + 12)
        .unwrap()
        .to_string();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle).await;
        respond(send, 200, &pod_json(Some(&in_12s)));
        let (_, send) = next(&mut handle).await;
        respond(send, 200, &pod_json(None));
        let (_, send) = next(&mut handle).await;
        respond(send, 403, &status_json(403, "Forbidden"));
    });
    let before = Instant::now();
    let d = wsdrain::kube::kill_time(&link)
        .await
        .expect("SIGKILL time from deletionTimestamp");
    // 12 s, with the timestamp's one-second resolution.
    let left = d.duration_since(before);
    assert!(
        left > Duration::from_secs(10) && left <= Duration::from_secs(13),
        "{left:?}"
    );
    assert_eq!(wsdrain::kube::kill_time(&link).await, None);
    assert_eq!(wsdrain::kube::kill_time(&link).await, None);
    server.await.unwrap();
}

#[tokio::test]
async fn follow_notices_unreadies_then_publishes() {
    let (link, mut handle) = mock_link(true);
    let (tx, rx) = tokio::sync::broadcast::channel(8);
    let follower = tokio::spawn(wsdrain::kube::follow_notices(std::sync::Arc::new(link), rx));
    tx.send(Notice::Started {
        trigger: Trigger::Api,
        connections: 3,
        budget_ms: 25_000,
    })
    .unwrap();
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::PATCH);
    let body = json_body(req).await;
    assert_eq!(body["status"]["conditions"][0]["status"], "False");
    respond(send, 200, &pod_json(None));
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::GET);
    respond(send, 200, &pod_json(None));
    expect_event(
        &mut handle,
        "Normal",
        "DrainStarted",
        &["POST /drain", "3 connections"],
    )
    .await;
    tx.send(Notice::Finished(summary(Outcome::Drained)))
        .unwrap();
    expect_event(&mut handle, "Normal", "DrainCompleted", &["12.3s"]).await;
    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("follower did not end")
        .unwrap();
}

#[tokio::test]
async fn connect_is_bounded() {
    // Here there is no cluster: an error (no config) or a client (a kubeconfig exists),
    // but never a start-up that waits on the API.
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), PodLink::connect(pod_ref(), false)).await;
    assert!(r.is_ok(), "connect took longer than 3s");
    assert!(started.elapsed() < Duration::from_secs(3));
    if let Ok(Err(e)) = r {
        assert!(!e.to_string().is_empty());
    }
}

#[tokio::test]
async fn true_after_false_is_never_sent() {
    let (link, mut handle) = mock_link(true);
    let server = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        let body = json_body(req).await;
        assert_eq!(body["status"]["conditions"][0]["status"], "False");
        respond(send, 200, &pod_json(None));
        handle
    });
    assert!(link.set_serving(false).await);
    // A retrying "serving" task that comes late must not re-add a draining pod.
    assert!(link.set_serving(true).await);
    let mut handle = server.await.unwrap();
    drop(link);
    assert!(
        handle.as_mut().next_request().await.is_none(),
        "True sent after False"
    );
}
