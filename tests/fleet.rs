//! Fleet awareness: the EndpointSlice reflector against kube's tower-test mock (exact
//! requests), and the fleet loop against real peer `/status` servers on loopback with a
//! recording closer: rebalance closes (code, hint, pacing, metric), the budget share fed
//! to the drain, and no rebalance during a drain.

mod common;

use common::kube_api::{self, next, respond};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kube::client::Body;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};

use wsdrain::agent::config::PodRef;
use wsdrain::drain::hint::HintTemplate;
use wsdrain::drain::seams::{
    BoxFuture, CloseError, CloseReply, CloseRequest, CountError, SessionCloser, SessionCounter,
    Snapshot,
};
use wsdrain::drain::settings::DelayRange;
use wsdrain::fleet::budget::Budget;
use wsdrain::fleet::peers::{SliceWatch, peers_from_slices};
use wsdrain::fleet::rebalance::Settings;
use wsdrain::fleet::{Closing, DrainView, FleetConfig, Links, Source};
use wsdrain::kube::PodLink;

// ---- EndpointSlices through the reflector ---------------------------------------------

const LIST: &str = "/apis/discovery.k8s.io/v1/namespaces/chat/endpointslices?&labelSelector=kubernetes.io%2Fservice-name%3Dws&limit=500";

fn slice(name: &str, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "chat", "resourceVersion": "11",
                     "labels": {"kubernetes.io/service-name": "ws"}},
        "addressType": "IPv4", "endpoints": endpoints
    })
}

fn ep(ip: &str, pod: &str, ready: bool, terminating: bool) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": ready, "terminating": terminating},
           "targetRef": {"kind": "Pod", "name": pod, "namespace": "chat"}})
}

fn query(uri: &str) -> Vec<String> {
    let mut q: Vec<String> = uri
        .split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    q.sort();
    q
}

/// Polls `f` until it is true (bounded).
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peer_urls(watch: &SliceWatch) -> Vec<(String, bool)> {
    peers_from_slices(&watch.slices(), Some("ws-0"), None, 19901)
        .into_iter()
        .map(|p| (p.url.to_string(), p.terminating))
        .collect()
}

#[tokio::test]
async fn endpoint_slices_of_the_service_are_listed_then_watched() {
    let (client, mut handle) = kube_api::client();
    let watch = SliceWatch::start(client, "chat", "ws");

    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().to_string(), LIST);
    respond(
        send,
        200,
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": "10"},
            "items": [slice("ws-a", json!([
                ep("10.0.0.1", "ws-0", true, false),
                ep("10.0.0.2", "ws-1", true, false),
                ep("10.0.0.3", "ws-2", true, false),
            ]))]
        }),
    );
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::GET);
    let uri = req.uri().to_string();
    assert!(
        uri.starts_with("/apis/discovery.k8s.io/v1/namespaces/chat/endpointslices?"),
        "{uri}"
    );
    assert_eq!(
        query(&uri),
        [
            "allowWatchBookmarks=true",
            "labelSelector=kubernetes.io%2Fservice-name%3Dws",
            "resourceVersion=10",
            "timeoutSeconds=290",
            "watch=true",
        ]
    );
    until("the listed peers", Duration::from_secs(5), || {
        peer_urls(&watch).len() == 2
    })
    .await;
    assert_eq!(
        peer_urls(&watch),
        [
            ("http://10.0.0.2:19901/".to_owned(), false),
            ("http://10.0.0.3:19901/".to_owned(), false)
        ],
        "the own pod (ws-0) is not a peer"
    );
    // A scale-down starts: ws-2 terminates; a scale-up adds a second slice.
    let mut lines = Vec::new();
    for (t, obj) in [
        (
            "MODIFIED",
            slice(
                "ws-a",
                json!([
                    ep("10.0.0.1", "ws-0", true, false),
                    ep("10.0.0.2", "ws-1", true, false),
                    ep("10.0.0.3", "ws-2", false, true),
                ]),
            ),
        ),
        (
            "ADDED",
            slice("ws-b", json!([ep("10.0.0.4", "ws-3", true, false)])),
        ),
    ] {
        lines.extend(serde_json::to_vec(&json!({"type": t, "object": obj})).unwrap());
        lines.push(b'\n');
    }
    send.send_response(Response::new(Body::from(lines)));
    until("the watched changes", Duration::from_secs(5), || {
        peer_urls(&watch).len() == 3
    })
    .await;
    let mut got = peer_urls(&watch);
    got.sort();
    assert_eq!(
        got,
        [
            ("http://10.0.0.2:19901/".to_owned(), false),
            ("http://10.0.0.3:19901/".to_owned(), true),
            ("http://10.0.0.4:19901/".to_owned(), false)
        ]
    );
}

#[tokio::test]
async fn a_forbidden_list_leaves_no_peers_and_is_retried() {
    let (client, mut handle) = kube_api::client();
    let watch = SliceWatch::start(client, "chat", "ws");
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.uri().to_string(), LIST);
    respond(
        send,
        403,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                "reason": "Forbidden", "message": "endpointslices is forbidden"}),
    );
    // The backoff retries the same list; meanwhile there are no peers.
    let (req, send) = next(&mut handle).await;
    assert!(watch.slices().is_empty());
    assert_eq!(req.uri().to_string(), LIST);
    respond(
        send,
        200,
        &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": "12"},
                "items": [slice("ws-a", json!([ep("10.0.0.2", "ws-1", true, false)]))]}),
    );
    until("peers after the retry", Duration::from_secs(5), || {
        peer_urls(&watch).len() == 1
    })
    .await;
}

// ---- the fleet loop against real peers -------------------------------------------------

/// A peer agent's `/status`, changeable while it runs.
struct FakePeer {
    addr: SocketAddr,
    body: Arc<Mutex<Value>>,
    /// `/status` requests answered so far: the rounds of every loop asking it.
    asked: Arc<AtomicUsize>,
}

impl FakePeer {
    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }

    /// Waits until `n` more rounds (of all loops asking) have read this peer.
    async fn rounds(&self, n: usize) {
        let want = self.asked() + n;
        until("rounds of the fleet loop", Duration::from_secs(10), || {
            self.asked() >= want
        })
        .await;
    }
}

async fn fake_peer(body: Value) -> FakePeer {
    let listener = tokio::net::TcpListener::bind((common::pod_ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(Mutex::new(body));
    let served = body.clone();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = served.clone();
            let asked = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    asked.fetch_add(1, Ordering::SeqCst);
                    let body = body.lock().unwrap().to_string();
                    async move {
                        assert_eq!(req.uri().path(), "/status");
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    FakePeer { addr, body, asked }
}

fn serving(sessions: i64) -> Value {
    json!({"status": {"state": "Serving", "connections": sessions.saturating_add(1), "sessions": sessions}, "summary": null})
}

fn closing() -> Value {
    json!({"status": {"state": "Closing", "connections": 40, "sessions": 40, "elapsed_ms": 1200}, "summary": null})
}

#[derive(Default)]
struct Drain {
    draining: AtomicBool,
    rates: Mutex<Vec<Option<f64>>>,
}

impl DrainView for Drain {
    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    fn set_close_rate(&self, per_second: Option<f64>) {
        self.rates.lock().unwrap().push(per_second);
    }
    /// What the agent's drain asks with the default settings: 1012 and the default hint.
    fn close_request(&self, max: u64, after_ms: u64) -> CloseRequest {
        CloseRequest {
            max,
            code: 1012,
            reason: HintTemplate::default().render(after_ms).unwrap(),
        }
    }
}

/// Counts `open` sessions; closing removes them.
struct App {
    open: Mutex<u64>,
    closes: Mutex<Vec<(Instant, CloseRequest)>>,
}

impl SessionCloser for App {
    fn close(&self, req: CloseRequest) -> BoxFuture<'_, Result<CloseReply, CloseError>> {
        let mut open = self.open.lock().unwrap();
        let closed = req.max.min(*open);
        *open -= closed;
        self.closes.lock().unwrap().push((Instant::now(), req));
        let remaining = *open;
        Box::pin(async move { Ok(CloseReply { closed, remaining }) })
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}

impl SessionCounter for App {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
        let n = *self.open.lock().unwrap();
        Box::pin(async move {
            Ok(Snapshot {
                ids: (0..n).collect(),
            })
        })
    }
}

struct Setup {
    drain: Arc<Drain>,
    app: Arc<App>,
    closes_metric: Counter,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const WINDOW: Duration = Duration::from_millis(1000);
const TICK: Duration = Duration::from_millis(100);

fn start(peers: &[&FakePeer], own: u64, rebalance: bool, budget: Option<f64>) -> Setup {
    start_with(peers, own, rebalance, budget, None)
}

fn start_with(
    peers: &[&FakePeer],
    own: u64,
    rebalance: bool,
    budget: Option<f64>,
    kube: Option<Arc<PodLink>>,
) -> Setup {
    let own_addr: SocketAddr = (common::pod_ip(), 19901).into();
    // Our own URL is in the list, as the lab gives every agent the same list, and an
    // unreachable peer too.
    let mut urls: Vec<String> = peers.iter().map(|p| format!("http://{}", p.addr)).collect();
    urls.push(format!("http://{own_addr}"));
    urls.push(format!("http://{}:1", common::pod_ip()));
    let drain = Arc::new(Drain::default());
    let app = Arc::new(App {
        open: Mutex::new(own),
        closes: Mutex::default(),
    });
    let closes_metric = Counter::default();
    let cfg = FleetConfig {
        source: Source::Static(wsdrain::fleet::peers::parse_peer_list(&urls.join(",")).unwrap()),
        interval: Duration::from_millis(200),
        rebalance: rebalance.then_some(Settings {
            window: WINDOW,
            warmup: Duration::from_millis(300),
            ..Settings::default()
        }),
        budget: budget.map(|b| Budget::new(b).unwrap()),
    };
    let links = Links {
        drain: drain.clone(),
        counter: app.clone(),
        closing: Some(Closing {
            closer: app.clone(),
            reconnect_after: DelayRange {
                min: Duration::ZERO,
                max: Duration::from_secs(2),
            },
            tick: TICK,
        }),
        rebalance_closes: closes_metric.clone(),
        kube,
        own_addr,
        own_ip: None,
    };
    let task = tokio::spawn(wsdrain::fleet::run(cfg, links));
    Setup {
        drain,
        app,
        closes_metric,
        task,
    }
}

fn hint_ms(reason: &str) -> u64 {
    let v: Value = serde_json::from_str(reason).unwrap();
    v["reconnect_after_ms"].as_u64().unwrap()
}

#[tokio::test]
async fn an_overloaded_pod_closes_its_excess_paced_with_1012_and_a_growing_hint() {
    // After a scale-up: this pod 90, an old peer 90, two new ones 0: mean 45.
    let (a, b, c) = (
        fake_peer(serving(90)).await,
        fake_peer(serving(0)).await,
        fake_peer(serving(0)).await,
    );
    let s = start(&[&a, &b, &c], 90, true, None);
    until("the rebalance to finish", Duration::from_secs(5), || {
        *s.app.open.lock().unwrap() == 45
    })
    .await;
    let closes = s.app.closes.lock().unwrap().clone();
    assert!(closes.iter().all(|(_, r)| r.code == 1012), "{closes:?}");
    assert_eq!(closes.iter().map(|(_, r)| r.max).sum::<u64>(), 45);
    // Paced: one batch per tick over the window, not one burst.
    assert!(closes.len() >= 9, "{} batches", closes.len());
    let span = closes.last().unwrap().0 - closes[0].0;
    // (The upper bound only says it does not drag on; a busy machine delays ticks.)
    assert!(
        span >= WINDOW - 2 * TICK && span <= 2 * WINDOW,
        "closes spread over {span:?}"
    );
    let hints: Vec<u64> = closes.iter().map(|(_, r)| hint_ms(&r.reason)).collect();
    assert!(hints.windows(2).all(|w| w[0] <= w[1]), "{hints:?}");
    assert!(hints[0] < 300 && *hints.last().unwrap() > 1500, "{hints:?}");
    assert_eq!(s.closes_metric.get(), 45);
    // Cooldown: the old peer is still at 90, but this pod closes nothing more.
    a.rounds(4).await;
    assert_eq!(s.app.closes.lock().unwrap().len(), closes.len());
}

#[tokio::test]
async fn a_balanced_fleet_and_a_draining_pod_close_nothing() {
    let (a, b) = (fake_peer(serving(50)).await, fake_peer(serving(48)).await);
    let balanced = start(&[&a, &b], 54, true, None);
    let draining = start(&[&a, &b], 300, true, None);
    draining.drain.draining.store(true, Ordering::SeqCst);
    // Past the peers' warm-up (300 ms at 200 ms a round), for both loops.
    a.rounds(8).await;
    assert!(balanced.app.closes.lock().unwrap().is_empty());
    assert!(draining.app.closes.lock().unwrap().is_empty());
    // Peers that lie (negative, huge) do not make a pod close more than the honest mean.
    *a.body.lock().unwrap() = serving(-1000);
    *b.body.lock().unwrap() = serving(i64::MAX);
    b.rounds(6).await;
    assert!(balanced.app.closes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_drain_stops_a_running_rebalance() {
    let a = fake_peer(serving(0)).await;
    let s = start(&[&a], 200, true, None);
    until("the rebalance to begin", Duration::from_secs(3), || {
        !s.app.closes.lock().unwrap().is_empty()
    })
    .await;
    s.drain.draining.store(true, Ordering::SeqCst);
    let n = s.app.closes.lock().unwrap().len();
    a.rounds(3).await;
    assert!(
        s.app.closes.lock().unwrap().len() <= n + 1,
        "closes went on during the drain"
    );
    assert!(*s.app.open.lock().unwrap() > 100, "the drain takes over");
}

#[tokio::test]
async fn draining_pods_share_the_fleet_close_budget() {
    let (a, b, c) = (
        fake_peer(closing()).await,
        fake_peer(serving(10)).await,
        fake_peer(serving(10)).await,
    );
    let s = start(&[&a, &b, &c], 40, false, Some(60.0));
    until(
        "the share with one other draining pod",
        Duration::from_secs(3),
        || s.drain.rates.lock().unwrap().last() == Some(&Some(30.0)),
    )
    .await;
    // This pod drains too, and a third pod starts draining: 60 / 3.
    s.drain.draining.store(true, Ordering::SeqCst);
    *b.body.lock().unwrap() = closing();
    until(
        "the share with two other draining pods",
        Duration::from_secs(3),
        || s.drain.rates.lock().unwrap().last() == Some(&Some(20.0)),
    )
    .await;
    // One finished (still draining as far as the budget goes: `Drained`), one went away
    // (its answer is unusable: skipped): the share grows again.
    *a.body.lock().unwrap() = json!({"status": {"state": "Drained"}});
    *b.body.lock().unwrap() = Value::Null;
    until(
        "the share once the others are done",
        Duration::from_secs(3),
        || s.drain.rates.lock().unwrap().last() == Some(&Some(30.0)),
    )
    .await;
}

#[tokio::test]
async fn a_rebalance_publishes_a_rebalanced_event_and_counts_its_closes() {
    let (client, mut handle) = kube_api::client();
    let pod = PodRef {
        name: "ws-0".into(),
        namespace: "chat".into(),
    };
    let link = PodLink::new(client, pod, false).with_call_timeout(Duration::from_millis(500));
    let a = fake_peer(serving(10)).await;
    let s = start_with(&[&a], 60, true, None, Some(Arc::new(link)));
    // The Event's uid lookup, then the Event, once the window is over.
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().to_string(), "/api/v1/namespaces/chat/pods/ws-0");
    respond(
        send,
        200,
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "ws-0", "namespace": "chat", "uid": "u-1"}}),
    );
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::POST);
    assert_eq!(
        req.uri().to_string(),
        "/apis/events.k8s.io/v1/namespaces/chat/events?"
    );
    let bytes = http_body_util::BodyExt::collect(req.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["reason"], "Rebalanced");
    assert_eq!(body["type"], "Normal");
    assert_eq!(body["action"], "Rebalance");
    assert_eq!(body["regarding"]["uid"], "u-1");
    let note = body["note"].as_str().unwrap();
    // 60 here, 10 on the peer: mean 35, 25 closed.
    assert!(note.contains("Closed 25 of 25"), "{note}");
    assert!(note.contains("fleet mean of 35"), "{note}");
    respond(send, 201, &body);
    assert_eq!(s.closes_metric.get(), 25);
    assert_eq!(*s.app.open.lock().unwrap(), 35);
}

#[test]
fn the_rebalance_metric_is_exposed() {
    let text = wsdrain::metrics::Metrics::new().encode();
    assert!(text.contains("wsdrain_rebalance_closes_total 0"), "{text}");
}

// ---- the worked autoscaling example ------------------------------------------------------

fn example(name: &str) -> Vec<serde_norway::Value> {
    let path = common::repo_path(&format!("deploy/examples/autoscaling/{name}"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| <serde_norway::Value as serde::Deserialize>::deserialize(d).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [serde_norway::Value], k: &str) -> &'a serde_norway::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(k))
        .unwrap_or_else(|| panic!("no {k}"))
}

#[test]
fn the_autoscaling_example_validates_and_fits_together() {
    for f in [
        "app.yaml",
        "rbac.yaml",
        "hpa.yaml",
        "prometheus-adapter.yaml",
    ] {
        common::kubernetes_validate(&common::repo_path(&format!(
            "deploy/examples/autoscaling/{f}"
        )));
    }
    let app = example("app.yaml");
    let pod = &kind(&app, "Deployment")["spec"]["template"];
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["wsdrain.io/rebalance"].as_str(), Some("true"));
    assert_eq!(ann["wsdrain.io/service"].as_str(), Some("chat"));
    assert!(ann["wsdrain.io/fleet-close-rate"].as_str().is_some());
    assert_eq!(
        pod["metadata"]["labels"]["wsdrain.io/inject"].as_str(),
        Some("true")
    );
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();

    let hpa = example("hpa.yaml");
    let hpa = kind(&hpa, "HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"].as_str(), Some("autoscaling/v2"));
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(metric["type"].as_str(), Some("Pods"));
    assert_eq!(
        metric["pods"]["metric"]["name"].as_str(),
        Some("wsdrain_connections")
    );
    let window = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        window >= grace,
        "scale-down window {window}s < a drain ({grace}s)"
    );

    let adapter = example("prometheus-adapter.yaml");
    let rules: serde_norway::Value = serde_norway::from_str(
        kind(&adapter, "ConfigMap")["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let rule = &rules["rules"][0];
    assert!(
        rule["seriesQuery"]
            .as_str()
            .unwrap()
            .contains("wsdrain_connections")
    );
    assert_eq!(rule["name"]["as"].as_str(), Some("wsdrain_connections"));

    let rbac = example("rbac.yaml");
    let rules = kind(&rbac, "Role")["rules"].as_sequence().unwrap();
    assert!(rules.iter().any(|r| {
        r["resources"][0].as_str() == Some("endpointslices")
            && r["verbs"].as_sequence().unwrap().len() == 2
    }));

    let keda = example("keda-scaledobject.yaml");
    let so = kind(&keda, "ScaledObject");
    assert_eq!(so["spec"]["scaleTargetRef"]["name"].as_str(), Some("chat"));
    assert!(
        so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
            ["stabilizationWindowSeconds"]
            .as_u64()
            .unwrap()
            >= grace
    );
    assert!(
        so["spec"]["triggers"][0]["metadata"]["query"]
            .as_str()
            .unwrap()
            .contains("wsdrain_connections")
    );
}
