//! Who the peers are and what they report.
//!
//! Peers come from the EndpointSlices of `--service` (a kube-runtime reflector keeps
//! them current) or from a static `--peers` list. Every round the fleet loop reads each
//! peer's `GET /status` with a short timeout; a peer that does not answer is skipped.
//! A peer's count is `status.sessions`, else `status.connections`; it is draining when
//! `status.state` is anything but `Serving` (or its endpoint is `terminating`).

use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper::Uri;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use thiserror::Error;

use crate::http1::{self, Endpoint, read_limited};

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// Largest `/status` answer read from a peer.
pub const MAX_STATUS_BYTES: usize = 64 * 1024;
/// Peers read per round at most; the rest are left out (a fleet larger than this
/// still has a good mean from a sample).
pub const MAX_PEERS: usize = 256;

/// A peer agent to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The agent's base URL (`http://10.1.2.3:19901`).
    pub url: Uri,
    /// Its endpoint is `terminating` in the EndpointSlice: draining, whatever it says.
    pub terminating: bool,
}

/// What one peer reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    /// `sessions`, else `connections`; as reported (may be negative: a broken peer).
    pub count: Option<i64>,
    pub draining: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("peer {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("peer {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("peer {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("peer /status: {0}")]
    Body(String),
}

/// `--peers URL,URL`: agent base URLs (`http://host:port`).
pub fn parse_peer_list(list: &str) -> Result<Vec<Uri>, String> {
    let mut out = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let uri: Uri = raw
            .trim_end_matches('/')
            .parse()
            .map_err(|e| format!("'{raw}' is not a URL: {e}"))?;
        Endpoint::parse(&uri).map_err(|e| format!("'{raw}': {e}"))?;
        if uri.authority().and_then(|a| a.port_u16()).is_none() {
            return Err(format!("'{raw}' has no port (the agent's, e.g. :19901)"));
        }
        if !out.contains(&uri) {
            out.push(uri);
        }
    }
    if out.len() > MAX_PEERS {
        return Err(format!("{} peers; at most {MAX_PEERS}", out.len()));
    }
    Ok(out)
}

/// The static list without this agent itself (the lab gives every agent the same list).
pub fn static_peers(urls: &[Uri], own: SocketAddr) -> Vec<Peer> {
    urls.iter()
        .filter(|u| {
            let addr = u
                .authority()
                .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
            addr != Some(own)
        })
        .map(|u| Peer {
            url: u.clone(),
            terminating: false,
        })
        .collect()
}

/// Reads the count and phase out of a peer's `/status` answer.
pub fn parse_status(body: &[u8]) -> Result<PeerStatus, PeerError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| PeerError::Body(format!("not JSON: {e}")))?;
    let status = v
        .get("status")
        .and_then(Value::as_object)
        .ok_or_else(|| PeerError::Body("field `status` missing or not an object".into()))?;
    let state = status
        .get("state")
        .and_then(Value::as_str)
        .ok_or_else(|| PeerError::Body("field `status.state` missing or not a string".into()))?;
    let count = ["sessions", "connections"]
        .iter()
        .find_map(|k| status.get(*k).and_then(count_of));
    Ok(PeerStatus {
        count,
        draining: state != "Serving",
    })
}

/// A JSON number as a count, saturated into i64 (a lie stays a lie, but a finite one).
fn count_of(v: &Value) -> Option<i64> {
    let n = v.as_number()?;
    n.as_i64()
        .or_else(|| n.as_u64().map(|_| i64::MAX))
        // `as` saturates; NaN cannot come out of JSON.
        .or_else(|| n.as_f64().map(|f| f as i64))
}

/// One peer's `GET /status`, bounded by `timeout` and `MAX_STATUS_BYTES`.
pub async fn fetch_status(url: &Uri, timeout: Duration) -> Result<PeerStatus, PeerError> {
    let name = url.to_string();
    match tokio::time::timeout(timeout, fetch(url, &name)).await {
        Ok(r) => r,
        Err(_) => Err(PeerError::Timeout { url: name, timeout }),
    }
}

async fn fetch(url: &Uri, name: &str) -> Result<PeerStatus, PeerError> {
    let unreachable = |reason: String| PeerError::Unreachable {
        url: name.to_owned(),
        reason,
    };
    let ep = Endpoint::parse(url).map_err(|e| unreachable(e.to_owned()))?;
    let stream = ep.connect().await.map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, _conn) = http1::handshake(stream)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let req = hyper::Request::get(ep.target("/status"))
        .header(HOST, ep.authority.as_str())
        .header(USER_AGENT, "wsdrain-fleet")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| unreachable(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if resp.status() != hyper::StatusCode::OK {
        return Err(PeerError::Status {
            url: name.to_owned(),
            status: resp.status().as_u16(),
        });
    }
    let (body, complete) = read_limited(resp.into_body(), MAX_STATUS_BYTES)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if !complete {
        return Err(PeerError::Body(format!(
            "answer larger than {MAX_STATUS_BYTES} bytes"
        )));
    }
    parse_status(&body)
}

/// The peers in a set of EndpointSlices: every endpoint but this pod's (by target pod
/// name or address), at the agent port. Endpoints neither ready nor terminating (pods
/// starting up) are left out: they hold no sessions yet and close none.
pub fn peers_from_slices(
    slices: &[Arc<EndpointSlice>],
    own_pod: Option<&str>,
    own_ip: Option<IpAddr>,
    agent_port: u16,
) -> Vec<Peer> {
    let mut peers: Vec<Peer> = Vec::new();
    for slice in slices {
        for ep in &slice.endpoints {
            let is_self = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.name.as_deref())
                .is_some_and(|n| Some(n) == own_pod);
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            if is_self || Some(ip) == own_ip {
                continue;
            }
            let cond = ep.conditions.clone().unwrap_or_default();
            let terminating = cond.terminating == Some(true);
            // Absent `ready` means ready (the API's documented default).
            if !terminating && cond.ready == Some(false) {
                continue;
            }
            let Ok(url) = format!("http://{}", SocketAddr::new(ip, agent_port)).parse() else {
                continue;
            };
            if !peers.iter().any(|p| p.url == url) {
                peers.push(Peer { url, terminating });
            }
        }
    }
    peers.truncate(MAX_PEERS);
    peers
}

/// The EndpointSlices of one Service, kept current by a kube-runtime reflector.
pub struct SliceWatch {
    store: Store<EndpointSlice>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SliceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SliceWatch {
    /// Starts watching the slices labelled `kubernetes.io/service-name=<service>` in
    /// `namespace`. Errors (RBAC: endpointslices list/watch) are logged and retried with
    /// kube's default backoff; meanwhile the store is empty and there are no peers.
    pub fn start(client: kube::Client, namespace: &str, service: &str) -> SliceWatch {
        let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().labels(&format!("{SERVICE_LABEL}={service}"));
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
        let (service, namespace) = (service.to_owned(), namespace.to_owned());
        let task = tokio::spawn(async move {
            let mut stream = pin!(stream);
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) if failing => {
                        tracing::info!(%service, "EndpointSlice watch works again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        tracing::warn!(
                            %service, %namespace, error = %e,
                            "cannot watch the Service's EndpointSlices (RBAC: endpointslices list, watch in discovery.k8s.io); no peers until it works"
                        );
                        failing = true;
                    }
                    Err(e) => tracing::debug!(error = %e, "EndpointSlice watch still failing"),
                }
            }
        });
        SliceWatch { store, task }
    }

    /// The slices as last seen.
    pub fn slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.store.state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn status(v: Value) -> Result<PeerStatus, PeerError> {
        parse_status(v.to_string().as_bytes())
    }

    #[test]
    fn sessions_first_then_connections() {
        let s = status(json!({"status": {"state": "Serving", "connections": 40, "sessions": 38}}));
        assert_eq!(
            s,
            Ok(PeerStatus {
                count: Some(38),
                draining: false
            })
        );
        let s =
            status(json!({"status": {"state": "Serving", "connections": 40, "sessions": null}}));
        assert_eq!(s.unwrap().count, Some(40));
        let s =
            status(json!({"status": {"state": "Closing", "connections": null}, "summary": null}));
        assert_eq!(
            s,
            Ok(PeerStatus {
                count: None,
                draining: true
            })
        );
    }

    #[test]
    fn every_phase_but_serving_is_draining() {
        for state in [
            "Settling",
            "Closing",
            "Waiting",
            "Drained",
            "DeadlineExceeded",
            "Unknown",
        ] {
            let s = status(json!({"status": {"state": state, "connections": 1}})).unwrap();
            assert!(s.draining, "{state}");
        }
    }

    #[test]
    fn lies_stay_finite_and_bad_bodies_name_the_field() {
        let big = status(json!({"status": {"state": "Serving", "sessions": u64::MAX}}));
        assert_eq!(big.unwrap().count, Some(i64::MAX));
        let neg = status(json!({"status": {"state": "Serving", "sessions": -7}}));
        assert_eq!(neg.unwrap().count, Some(-7));
        let float = status(json!({"status": {"state": "Serving", "sessions": 1e300}}));
        assert_eq!(float.unwrap().count, Some(i64::MAX));
        let text = status(json!({"status": {"state": "Serving", "sessions": "12"}}));
        assert_eq!(text.unwrap().count, None);
        let e = status(json!({"status": {"connections": 1}})).unwrap_err();
        assert!(e.to_string().contains("status.state"), "{e}");
        let e = status(json!([1, 2])).unwrap_err();
        assert!(e.to_string().contains("`status`"), "{e}");
        assert!(parse_status(b"<html>").is_err());
    }

    #[test]
    fn peer_lists_are_checked_and_exclude_self() {
        let urls =
            parse_peer_list("http://127.0.0.2:9000, http://127.0.0.3:9000/,http://127.0.0.2:9000")
                .unwrap();
        assert_eq!(urls.len(), 2, "duplicates and trailing slashes folded");
        assert!(
            parse_peer_list("https://x:1")
                .unwrap_err()
                .contains("http://")
        );
        assert!(parse_peer_list("http://x").unwrap_err().contains("no port"));
        assert!(parse_peer_list("http://[bad").is_err());
        assert_eq!(parse_peer_list("").unwrap(), Vec::<Uri>::new());
        let peers = static_peers(&urls, "127.0.0.2:9000".parse().unwrap());
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].url.to_string(), "http://127.0.0.3:9000/");
    }

    fn slice(endpoints: Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "ws-abc", "namespace": "chat"},
                "addressType": "IPv4", "endpoints": endpoints
            }))
            .unwrap(),
        )
    }

    #[test]
    fn slices_give_peers_at_the_agent_port() {
        let s = slice(json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "ws-self"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "terminating": true}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.5"]},
            {"addresses": ["not-an-ip"]},
            {"addresses": ["10.0.0.6"], "conditions": {"ready": true}}
        ]));
        let own_ip = Some("10.0.0.6".parse().unwrap());
        let peers = peers_from_slices(&[s.clone(), s], Some("ws-self"), own_ip, 19901);
        let got: Vec<(String, bool)> = peers
            .iter()
            .map(|p| (p.url.to_string(), p.terminating))
            .collect();
        assert_eq!(
            got,
            vec![
                ("http://10.0.0.2:19901/".to_owned(), false),
                ("http://10.0.0.3:19901/".to_owned(), true),
                ("http://10.0.0.5:19901/".to_owned(), false),
            ]
        );
        let v6 = slice(json!([{"addresses": ["fd00::2"]}]));
        let peers = peers_from_slices(&[v6], None, None, 19901);
        assert_eq!(peers[0].url.to_string(), "http://[fd00::2]:19901/");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(512)))]

        #[test]
        fn any_peer_list_parses_or_names_the_bad_entry(list in "[ -~]{0,200}") {
            match parse_peer_list(&list) {
                Ok(urls) => prop_assert!(urls.iter().all(|u| u.scheme_str() == Some("http"))),
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_status(&body);
        }

        #[test]
        fn counts_round_trip(
            state in prop_oneof![Just("Serving".to_owned()), Just("Closing".to_owned()), "[A-Za-z]{0,12}"],
            sessions in proptest::option::of(any::<i64>()),
            connections in proptest::option::of(any::<i64>()),
        ) {
            let s = status(json!({"status": {"state": state, "sessions": sessions, "connections": connections}})).unwrap();
            prop_assert_eq!(s.count, sessions.or(connections));
            prop_assert_eq!(s.draining, state != "Serving");
        }
    }
}
