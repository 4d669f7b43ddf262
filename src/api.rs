//! The agent HTTP API (docs/agent.md, "HTTP API"): probes, hooks, status, metrics.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::drain::report::Trigger;
use crate::drain::runner::Drainer;
use crate::metrics::Metrics;
use crate::net::{Slots, json, text};

pub const TOKEN_HEADER: &str = "X-Wsdrain-Token";

/// Who may trigger a drain.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    pub token: Option<String>,
    /// Besides loopback; empty = anyone.
    pub trigger_from: Vec<IpAddr>,
}

impl Guard {
    fn check<B>(&self, peer: IpAddr, req: &Request<B>) -> Result<(), (StatusCode, &'static str)> {
        let peer = canonical(peer);
        if !self.trigger_from.is_empty()
            && !peer.is_loopback()
            && !self.trigger_from.iter().any(|a| canonical(*a) == peer)
        {
            return Err((
                StatusCode::FORBIDDEN,
                "caller address not allowed to trigger a drain",
            ));
        }
        if let Some(token) = &self.token {
            let given = req.headers().get(TOKEN_HEADER).map(HeaderValue::as_bytes);
            if !given.is_some_and(|g| constant_time_eq(g, token.as_bytes())) {
                return Err((StatusCode::UNAUTHORIZED, "missing or wrong X-Wsdrain-Token"));
            }
        }
        Ok(())
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Compares without an early exit so the token can't be guessed byte by byte from timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

struct State {
    drainer: Drainer,
    metrics: Arc<Metrics>,
    guard: Guard,
}

type Resp = Response<Full<Bytes>>;

/// Most API connections open at once. The kubelet needs a handful (probes, hooks), a
/// metrics scraper and fleet peers one each; past the cap the oldest idle connection
/// makes room (see `net::Slots`), so a flood of idle connections costs bounded memory
/// and file descriptors and never starves `/livez` or a hook.
pub const MAX_CONNECTIONS: usize = 32;

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, drainer: Drainer, metrics: Arc<Metrics>, guard: Guard) {
    let slots = Slots::counted(
        MAX_CONNECTIONS,
        metrics.api_evicted.clone(),
        metrics.api_shed.clone(),
    );
    serve_with(listener, drainer, metrics, guard, slots).await
}

/// `serve` with an explicit connection table (tests read its counters).
pub async fn serve_with(
    listener: TcpListener,
    drainer: Drainer,
    metrics: Arc<Metrics>,
    guard: Guard,
    slots: Arc<Slots>,
) {
    let state = Arc::new(State {
        drainer,
        metrics,
        guard,
    });
    let mut shed_logged = false;
    loop {
        let (stream, peer) = crate::net::accept_or_evict(&listener, &slots).await;
        let Some(slot) = slots.admit() else {
            if !shed_logged {
                tracing::warn!(%peer, max = MAX_CONNECTIONS, "every API connection has a request in flight; shedding new connections");
                shed_logged = true;
            }
            continue;
        };
        let slot = Arc::new(slot);
        let state = state.clone();
        tokio::spawn(async move {
            let in_service = slot.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                let busy = in_service.busy();
                async move {
                    let resp = route(&state, peer, req).await;
                    drop(busy);
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(error = %e, %peer, "api connection ended with an error");
                },
                // Closed to make room for a newer connection: it was idle.
                _ = slot.closed() => {}
            }
        });
    }
}

/// Answers one request. Bodies are never read, so any body type will do.
async fn route<B>(state: &State, peer: SocketAddr, req: Request<B>) -> Resp {
    let path = req.uri().path();
    let method = req.method().clone();
    match (path, &method) {
        ("/livez", &Method::GET) => text(StatusCode::OK, "ok\n"),
        ("/readyz", &Method::GET) => {
            if state.drainer.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ok\n")
            }
        }
        ("/prestop", &Method::GET | &Method::POST) => {
            if let Err((code, msg)) = state.guard.check(peer.ip(), &req) {
                return refused(code, msg, peer);
            }
            let summary = state.drainer.drain(Trigger::Prestop).await;
            json(StatusCode::OK, &json!(summary))
        }
        ("/drain", &Method::POST) => {
            if let Err((code, msg)) = state.guard.check(peer.ip(), &req) {
                return refused(code, msg, peer);
            }
            let wait = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "wait=true" || kv == "wait=1"));
            if wait {
                let summary = state.drainer.drain(Trigger::Api).await;
                json(StatusCode::OK, &json!(summary))
            } else {
                state.drainer.start(Trigger::Api);
                json(StatusCode::ACCEPTED, &status_json(state).await)
            }
        }
        ("/status", &Method::GET) => json(StatusCode::OK, &status_json(state).await),
        ("/metrics", &Method::GET) => {
            // While serving this counts now; while draining the runner counts.
            state.drainer.count().await;
            let mut resp = text(StatusCode::OK, "");
            *resp.body_mut() = Full::new(Bytes::from(state.metrics.encode()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        ("/livez" | "/readyz" | "/status" | "/metrics", _) | ("/prestop" | "/drain", _) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn status_json(state: &State) -> serde_json::Value {
    state.drainer.count().await;
    let status = state.drainer.status();
    let mut value = json!(status);
    // For peers and people: when the drain started, as wall-clock time (RFC 3339).
    value["draining_since"] = match status.trigger {
        Some(_) => {
            let since = std::time::SystemTime::now()
                .checked_sub(Duration::from_millis(status.elapsed_ms))
                .and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok());
            json!(since.map(|t| t.to_string()))
        }
        None => serde_json::Value::Null,
    };
    json!({
        "status": value,
        "summary": state.drainer.summary(),
    })
}

fn refused(code: StatusCode, msg: &'static str, peer: SocketAddr) -> Resp {
    tracing::warn!(%peer, status = code.as_u16(), "drain trigger refused: {msg}");
    json(code, &json!({ "error": msg }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::Settings;
    use crate::drain::hint::{DEFAULT_TEMPLATE, HintTemplate};
    use crate::drain::runner::Parts;
    use crate::drain::seams::{BoxFuture, CountError, NoObserver, SessionCounter, Snapshot};
    use crate::drain::settings::DelayRange;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    /// A pod with no connections.
    struct Empty;

    impl SessionCounter for Empty {
        fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
            Box::pin(async { Ok(Snapshot::default()) })
        }
    }

    fn state(token: Option<&str>) -> State {
        let ms = Duration::from_millis;
        let settings = Settings {
            drain_timeout: ms(500),
            app_reserve: ms(0),
            settle_min: ms(0),
            settle_quiet: ms(0),
            settle_max: ms(0),
            close_tick: ms(10),
            close_window: ms(100),
            poll: ms(10),
            reconnect_after: DelayRange {
                min: ms(0),
                max: ms(0),
            },
        };
        let parts = Parts {
            counter: Arc::new(Empty),
            closer: None,
            close_code: 1012,
            hint: HintTemplate::parse(DEFAULT_TEMPLATE).unwrap(),
            observer: Arc::new(NoObserver),
        };
        State {
            drainer: Drainer::new(settings, parts),
            metrics: Arc::new(Metrics::new()),
            guard: Guard {
                token: token.map(str::to_owned),
                trigger_from: vec!["10.0.0.1".parse().unwrap()],
            },
        }
    }

    fn method() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::GET),
            Just(Method::POST),
            Just(Method::PUT),
            Just(Method::DELETE),
            Just(Method::HEAD),
            Just(Method::OPTIONS),
            "[A-Z]{1,12}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("/livez".to_owned()),
            Just("/readyz".to_owned()),
            Just("/prestop".to_owned()),
            Just("/drain?wait=true&x".to_owned()),
            Just("/status".to_owned()),
            Just("/metrics".to_owned()),
            "/[ -~]{0,60}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

        /// Any method, path and headers, from anywhere: an answer (never a panic), and
        /// never a drain without the token.
        #[test]
        fn any_request_gets_an_answer_and_triggers_need_the_token(
            method in method(),
            path in path(),
            headers in proptest::collection::vec(("[a-zA-Z][a-zA-Z0-9-]{0,20}", "[ -~]{0,40}"), 0..8),
            peer_v4 in any::<[u8; 4]>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let st = state(Some("secret-token"));
            let mut req = Request::builder().method(method);
            if let Ok(uri) = path.parse::<hyper::Uri>() {
                req = req.uri(uri);
            }
            for (k, v) in &headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let Ok(req) = req.body(()) else {
                return Ok(());
            };
            let peer = SocketAddr::from((peer_v4, 40000));
            let resp = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), route(&st, peer, req)).await
            });
            let resp = resp.expect("every request is answered");
            prop_assert!(
                [200, 202, 401, 403, 404, 405, 503].contains(&resp.status().as_u16()),
                "status {}", resp.status()
            );
            prop_assert!(!st.drainer.is_draining(), "a drain started without the token");
        }
    }

    /// Raw bytes over a real socket, then a probe: the server answers or closes, and
    /// keeps serving.
    #[tokio::test]
    async fn garbage_bytes_on_the_wire_do_not_stop_the_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state(Some("t"));
        tokio::spawn(serve(
            listener,
            st.drainer.clone(),
            st.metrics.clone(),
            st.guard.clone(),
        ));
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(
            crate::proptest_cases(48),
        ));
        let inputs = proptest::collection::vec(any::<u8>(), 0..2048);
        for _ in 0..48 {
            let bytes = inputs.new_tree(&mut runner).unwrap().current();
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(12), s.read_to_end(&mut out)).await;
        }
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(!st.drainer.is_draining());
    }

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn mapped_addresses_are_v4() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
