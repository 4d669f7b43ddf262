//! Proxy mode: the agent in the data path of the app's public port, for apps without
//! admin API v1 (docs/proxy.md).
//!
//! Each `--proxy LISTEN=UPSTREAM` route accepts HTTP/1.1 on LISTEN and forwards it to the
//! app on UPSTREAM (`http`); upgraded WebSocket sessions are relayed frame-aware
//! (`relay`, `frame`), and the session table (`table`) is the drain's closer and counter:
//! at drain the proxy itself sends each client a Close with the code and reconnect hint
//! and the app a Close 1001, and the hook is released the moment the last session is gone.

pub mod frame;
mod http;
pub mod relay;
pub mod table;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use tokio::net::TcpListener;

pub use relay::Timeouts;
pub use table::{Table, TableAndSockets, TableCloser, TableCounter};

/// One `--proxy LISTEN=UPSTREAM` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
}

impl FromStr for Route {
    type Err = String;

    fn from_str(s: &str) -> Result<Route, String> {
        let example = "expected LISTEN=UPSTREAM, e.g. 0.0.0.0:8080=127.0.0.1:8081";
        let (listen, upstream) = s
            .trim()
            .split_once('=')
            .ok_or_else(|| format!("'{s}': {example}"))?;
        let listen: SocketAddr = listen
            .trim()
            .parse()
            .map_err(|_| format!("'{s}': LISTEN '{listen}' is not an address:port ({example})"))?;
        let upstream: SocketAddr = upstream.trim().parse().map_err(|_| {
            format!("'{s}': UPSTREAM '{upstream}' is not an address:port ({example})")
        })?;
        if upstream.port() == 0 {
            return Err(format!("'{s}': UPSTREAM needs a port"));
        }
        if listen == upstream {
            return Err(format!("'{s}': LISTEN and UPSTREAM are the same address"));
        }
        Ok(Route { listen, upstream })
    }
}

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("--proxy {listen}: cannot listen: {source}")]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
}

/// Counters of what the proxy saw, for logs, /metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    counters: [AtomicU64; 7],
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// WebSocket sessions relayed (both 101s seen).
    pub sessions: u64,
    /// Sessions the drain closed with both Close answers in time.
    pub drained: u64,
    /// Close sequences that ran out of `--close-timeout` (TCP dropped).
    pub close_timeouts: u64,
    /// Sessions ended by a bad frame from the client / from the app.
    pub bad_frames_client: u64,
    pub bad_frames_app: u64,
    /// Sessions ended because a side stopped reading.
    pub stalled: u64,
    /// Requests answered 502 because the app could not be reached.
    pub upstream_errors: u64,
}

impl StatsSnapshot {
    /// (name, value) for each counter, names as in the struct.
    pub fn pairs(&self) -> [(&'static str, u64); 7] {
        [
            ("sessions", self.sessions),
            ("drained", self.drained),
            ("close_timeouts", self.close_timeouts),
            ("bad_frames_client", self.bad_frames_client),
            ("bad_frames_app", self.bad_frames_app),
            ("stalled", self.stalled),
            ("upstream_errors", self.upstream_errors),
        ]
    }
}

impl Stats {
    const SESSIONS: usize = 0;
    const DRAINED: usize = 1;
    const CLOSE_TIMEOUTS: usize = 2;
    const BAD_FRAMES_CLIENT: usize = 3;
    const BAD_FRAMES_APP: usize = 4;
    const STALLED: usize = 5;
    const UPSTREAM_ERRORS: usize = 6;

    fn count(&self, which: usize) {
        self.counters[which].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let c = |i: usize| self.counters[i].load(Ordering::Relaxed);
        StatsSnapshot {
            sessions: c(Self::SESSIONS),
            drained: c(Self::DRAINED),
            close_timeouts: c(Self::CLOSE_TIMEOUTS),
            bad_frames_client: c(Self::BAD_FRAMES_CLIENT),
            bad_frames_app: c(Self::BAD_FRAMES_APP),
            stalled: c(Self::STALLED),
            upstream_errors: c(Self::UPSTREAM_ERRORS),
        }
    }
}

/// What every connection task of the proxy shares.
struct Shared {
    table: Arc<Table>,
    stats: Arc<Stats>,
    timeouts: Timeouts,
}

/// A running proxy: listeners bound, accept loops spawned.
pub struct Proxy {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
}

impl Proxy {
    /// Binds every route's LISTEN address (all or nothing) and starts serving.
    pub async fn start(routes: &[Route], timeouts: Timeouts) -> Result<Proxy, ProxyError> {
        let mut bound = Vec::new();
        for route in routes {
            let bind_error = |source| ProxyError::Bind {
                listen: route.listen,
                source,
            };
            let listener = TcpListener::bind(route.listen).await.map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            bound.push((listener, local, route.upstream));
        }
        let shared = Arc::new(Shared {
            table: Arc::new(Table::default()),
            stats: Arc::new(Stats::default()),
            timeouts,
        });
        let mut local_addrs = Vec::new();
        for (listener, local, upstream) in bound {
            tracing::info!(listen = %local, %upstream, "proxy listening");
            local_addrs.push(local);
            tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        }
        Ok(Proxy {
            shared,
            local_addrs,
        })
    }

    /// The bound listen addresses, in route order (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn table(&self) -> Arc<Table> {
        self.shared.table.clone()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = crate::net::accept(&listener).await;
        let _ = stream.set_nodelay(true);
        tokio::spawn(http::serve(stream, peer, upstream, shared.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_with_errors_that_say_what_is_wrong() {
        let r: Route = "0.0.0.0:8080=127.0.0.1:8081".parse().unwrap();
        assert_eq!(r.listen.port(), 8080);
        assert_eq!(r.upstream.to_string(), "127.0.0.1:8081");
        assert!("[::]:80=[::1]:81".parse::<Route>().is_ok());
        for (bad, says) in [
            ("0.0.0.0:8080", "LISTEN=UPSTREAM"),
            ("8080=127.0.0.1:8081", "LISTEN '8080'"),
            ("0.0.0.0:8080=localhost:1", "UPSTREAM 'localhost:1'"),
            ("0.0.0.0:8080=127.0.0.1:0", "needs a port"),
            ("127.0.0.1:1=127.0.0.1:1", "same address"),
        ] {
            let err = bad.parse::<Route>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
