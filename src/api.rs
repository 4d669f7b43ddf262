//! The agent HTTP API (docs/agent.md, "HTTP API"): probes, hooks, status, metrics.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;

use crate::drain::report::Trigger;
use crate::drain::runner::Drainer;
use crate::metrics::Metrics;
use crate::net::{json, text};

pub const TOKEN_HEADER: &str = "X-Wsdrain-Token";

/// Who may trigger a drain.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    pub token: Option<String>,
    /// Besides loopback; empty = anyone.
    pub trigger_from: Vec<IpAddr>,
}

impl Guard {
    fn check(
        &self,
        peer: IpAddr,
        req: &Request<Incoming>,
    ) -> Result<(), (StatusCode, &'static str)> {
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
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct State {
    drainer: Drainer,
    metrics: Arc<Metrics>,
    guard: Guard,
}

type Resp = Response<Full<Bytes>>;

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, drainer: Drainer, metrics: Arc<Metrics>, guard: Guard) {
    let state = Arc::new(State {
        drainer,
        metrics,
        guard,
    });
    loop {
        let (stream, peer) = crate::net::accept(&listener).await;
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, peer, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "api connection ended with an error");
            }
        });
    }
}

async fn route(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Resp {
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
    json!({
        "status": state.drainer.status(),
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
