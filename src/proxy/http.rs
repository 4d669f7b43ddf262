//! HTTP/1.1 on a proxy listener, with hyper on both sides.
//!
//! Ordinary requests go to the app over one keep-alive upstream connection per client
//! connection (bodies streamed, chunked or not; hyper handles pipelining by serving one
//! request at a time). A WebSocket upgrade gets an upstream connection of its own; once
//! the app answered 101 and hyper sent that 101 on to the client, both sockets are taken
//! back from hyper and handed to the relay. From the first close request on, responses
//! carry `Connection: close` and idle keep-alive connections are closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::relay::{self, Ending, Peer, Side};
use super::{Shared, Stats};
use crate::net::{header_tokens, is_websocket_upgrade, text};

type Body = Either<Incoming, Full<Bytes>>;

/// Bound on connecting to the app (it is on loopback: a slow connect means it is gone).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Slow or silent clients (slowloris) are dropped after this long without full headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One client connection: its keep-alive upstream connection and where it came from.
struct Conn {
    peer: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    pooled: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
}

/// Serves one accepted client connection until it closes.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
) {
    let _registration = shared.table.open_http();
    // Marks the current value as seen: only a drain that starts later fires `changed`.
    let mut drain_started = shared.table.draining();
    let conn = Arc::new(Conn {
        peer,
        upstream,
        shared,
        pooled: tokio::sync::Mutex::new(None),
    });
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let served = builder
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(served);
    let result = tokio::select! {
        res = served.as_mut() => res,
        // Open when draining starts: close it if idle, or right after the request in
        // flight. (Connections opened later get `Connection: close` on their response.)
        Ok(()) = drain_started.changed() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "proxy client connection error");
    }
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let mut resp = if is_websocket_upgrade(req.headers()) {
            self.upgrade(req).await
        } else {
            self.forward(req).await
        };
        if self.shared.table.is_draining() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// An ordinary request over this connection's keep-alive upstream connection.
    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        let req = self.upstream_request(req, false);
        let mut pooled = self.pooled.lock().await;
        let reusable = match pooled.take() {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reusable {
            Some(s) => s,
            None => match self.connect().await {
                Ok(s) => s,
                Err(resp) => return resp,
            },
        };
        let result = sender.send_request(req).await;
        if !sender.is_closed() {
            *pooled = Some(sender);
        }
        match result {
            Ok(resp) => downstream_response(resp, false),
            Err(e) => self.bad_gateway(&format!("request failed: {e}")),
        }
    }

    /// A WebSocket upgrade: forwarded on its own upstream connection; after both 101s
    /// the session is registered and relayed.
    async fn upgrade(&self, mut req: Request<Incoming>) -> Response<Body> {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _body) = self.upstream_request(req, true).into_parts();
        let upstream_req = Request::from_parts(parts, Empty::<Bytes>::new());
        let stream = match self.dial().await {
            Ok(s) => s,
            Err(msg) => return self.bad_gateway(&msg),
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(e) => return self.bad_gateway(&format!("handshake failed: {e}")),
            };
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut resp = match sender.send_request(upstream_req).await {
            Ok(r) => r,
            Err(e) => return self.bad_gateway(&format!("upgrade request failed: {e}")),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The app refused the upgrade: its answer goes to the client as it is.
            return downstream_response(resp, false);
        }
        let extensions = resp
            .headers()
            .get(header::SEC_WEBSOCKET_EXTENSIONS)
            .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty());
        let app_upgrade = hyper::upgrade::on(&mut resp);
        // Registered before the 101 goes out, so the count never dips to zero between
        // the connection and its session.
        let (registration, order) = self.shared.table.open_session();
        let shared = self.shared.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            let id = registration.id;
            let (client, app) = tokio::join!(take_socket(client_upgrade), take_socket(app_upgrade));
            drop(sender);
            let (client, app) = match (client, app) {
                (Ok(c), Ok(a)) => (c, a),
                (c, a) => {
                    let error = c.err().or(a.err()).unwrap_or_default();
                    tracing::debug!(session = id, %peer, %error, "upgrade did not complete");
                    return;
                }
            };
            shared.stats.count(Stats::SESSIONS);
            tracing::debug!(session = id, %peer, extensions, "session opened");
            let ending = relay::run(client, app, extensions, order, shared.timeouts).await;
            report(&shared.stats, id, peer, &ending);
            drop(registration);
        });
        downstream_response(resp, true)
    }

    /// The client's request, made fit for the app: hop-by-hop headers dropped (the
    /// upgrade pair kept for a WebSocket), origin-form target, X-Forwarded-For appended.
    fn upstream_request(&self, req: Request<Incoming>, upgrade: bool) -> Request<Incoming> {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(pq) = parts.uri.path_and_query()
            && let Ok(uri) = Uri::try_from(pq.as_str())
        {
            parts.uri = uri;
        }
        let ip = self.peer.ip().to_canonical().to_string();
        let xff = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert("x-forwarded-for", v);
        }
        Request::from_parts(parts, body)
    }

    async fn dial(&self) -> Result<TcpStream, String> {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.upstream)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(format!("cannot connect: {e}")),
            Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
        }
    }

    /// A new keep-alive upstream connection, or the 502 to answer instead.
    async fn connect(&self) -> Result<SendRequest<Incoming>, Response<Body>> {
        let stream = self.dial().await.map_err(|m| self.bad_gateway(&m))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.bad_gateway(&format!("handshake failed: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn bad_gateway(&self, why: &str) -> Response<Body> {
        self.shared.stats.count(Stats::UPSTREAM_ERRORS);
        tracing::warn!(upstream = %self.upstream, peer = %self.peer, error = why, "app unreachable: 502");
        text(
            StatusCode::BAD_GATEWAY,
            "wsdrain proxy: the app did not answer\n",
        )
        .map(Either::Right)
    }
}

/// The app's response, made fit for the client (hop-by-hop headers dropped).
fn downstream_response(resp: Response<Incoming>, upgrade: bool) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    Response::from_parts(parts, Either::Left(body))
}

/// Takes the raw socket back from hyper, with the bytes hyper read past the handshake.
async fn take_socket(on: OnUpgrade) -> Result<Peer, String> {
    let upgraded: Upgraded = on.await.map_err(|e| e.to_string())?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| "upgraded connection is not a TCP stream".to_owned())?;
    Ok(Peer {
        stream: parts.io.into_inner(),
        early: parts.read_buf,
    })
}

fn report(stats: &Stats, id: u64, peer: SocketAddr, ending: &Ending) {
    match ending {
        Ending::Relayed => tracing::debug!(session = id, %peer, "session ended"),
        Ending::Drained => {
            stats.count(Stats::DRAINED);
            tracing::debug!(session = id, %peer, "session drained");
        }
        Ending::CloseTimeout => {
            stats.count(Stats::CLOSE_TIMEOUTS);
            tracing::info!(session = id, %peer, "close not answered in time: TCP dropped");
        }
        Ending::BadFrame(side, e) => {
            stats.count(match side {
                Side::Client => Stats::BAD_FRAMES_CLIENT,
                Side::App => Stats::BAD_FRAMES_APP,
            });
            tracing::warn!(session = id, %peer, from = side.name(), error = %e, "bad WebSocket frame: session closed (1002 to its sender)");
        }
        Ending::Stalled(side) => {
            stats.count(Stats::STALLED);
            tracing::warn!(session = id, %peer, side = side.name(), "side stopped reading: session closed");
        }
    }
}

/// Drops the headers that belong to one hop (RFC 9110 §7.6.1), including those the
/// Connection header names; with `upgrade`, `Connection: upgrade` and `Upgrade` stay.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = header_tokens(headers, &header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if upgrade && let Some(v) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_the_upgrade_pair_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Secret"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("k"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::SEC_WEBSOCKET_KEY).is_some());
        strip_hop_by_hop(&mut plain, false);
        assert!(plain.get(header::CONNECTION).is_none() && plain.get(header::UPGRADE).is_none());
    }

    #[test]
    fn upgrade_detection_reads_token_lists() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(is_websocket_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_websocket_upgrade(&h));
    }
}
