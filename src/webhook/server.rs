//! HTTPS server: hyper 1 over tokio-rustls. One task per connection; a failed handshake
//! or a misbehaving client ends its own task, never the server.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::connections::{Connections, Slot};
use super::metrics::{Metrics, Outcome};
use super::review::{Reply, review};
use crate::inject::InjectSettings;
use crate::net::text;

/// The API server sends one pod per request; 3 MiB is etcd's object limit (1.5 MiB)
/// with room for the AdmissionReview envelope and oldObject.
pub const DEFAULT_BODY_LIMIT: usize = 3 * 1024 * 1024;
/// The API server's handshake takes milliseconds and its whole call is given 5 s
/// (`timeoutSeconds`); a handshake still going after this is a stalled or hostile client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// The body must arrive within this once the headers are in.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// In-flight requests get this long after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's header-read timer also runs while a keep-alive connection is idle. The API
/// server's Go client keeps idle connections 90 s; closing ours sooner would race its
/// next POST on the same connection (a failed call = a pod without agent), so we outlast
/// it and let the client close first. Under pressure the connection table closes idle
/// connections sooner (quietest first), so this bound never locks anyone out.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections held at once; the API server needs a handful. A connection beyond this
/// evicts the quietest one instead of waiting.
pub const MAX_CONNECTIONS: usize = 1024;

pub struct App {
    pub settings: InjectSettings,
    pub metrics: Arc<Metrics>,
    pub body_limit: usize,
}

type Body = Full<Bytes>;

/// Serves until `stop` fires, then lets in-flight requests finish (bounded).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<App>,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let connections = Connections::new(MAX_CONNECTIONS);
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = crate::net::accept(&listener) => accepted,
        };
        let _ = tcp.set_nodelay(true);
        let (slot, evicted) = connections.admit(Instant::now());
        if evicted {
            app.metrics.connection_evicted();
        }
        app.metrics.set_connections(connections.len());
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        let table = connections.clone();
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            tokio::select! {
                () = slot.evicted() => tracing::debug!(%peer, "connection evicted: the table was full and it was the quietest"),
                () = serve_connection(acceptor, tcp, peer, app.clone(), slot.clone(), watcher) => {}
            }
            drop(slot);
            app.metrics.set_connections(table.len());
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    app: Arc<App>,
    slot: Arc<Slot>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    slot.touch(Instant::now());
    let service = service_fn(move |req| {
        let app = app.clone();
        let slot = slot.clone();
        async move {
            slot.touch(Instant::now());
            let resp = route(req, &app).await;
            slot.touch(Instant::now());
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn route(req: Request<Incoming>, app: &App) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/mutate") => mutate(req, app).await,
        (_, "/mutate") => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            r
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, app.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn mutate(req: Request<Incoming>, app: &App) -> Response<Body> {
    let start = Instant::now();
    let reply = match read_body(req, app.body_limit).await {
        Ok(body) => review(&body, &app.settings),
        Err((status, message)) => Reply {
            status,
            body: message.clone().into_bytes(),
            outcome: Outcome::Invalid,
            uid: String::new(),
            object: String::new(),
            note: message,
            warnings: vec![],
        },
    };
    app.metrics
        .record(reply.outcome, start.elapsed().as_secs_f64());
    log(&reply, start.elapsed());
    let json = reply.status == StatusCode::OK || reply.body.first() == Some(&b'{');
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() = reply.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(if json {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        }),
    );
    resp
}

/// The whole body, bounded in size and time; the error is the answer to send.
///
/// A Content-Length over the limit is refused before any body byte is read, so hyper
/// never sends `100 Continue`: a client that sent `Expect: 100-continue` sends nothing
/// and reads the 413. A client that sends its body anyway has it read and dropped, up to
/// another `limit` bytes, so it sees the answer rather than a reset connection. A body
/// without a length (chunked) is cut off at the limit by `Limited`, then the connection
/// closes after the 413.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, (StatusCode, String)> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes\n"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > limit as u64) {
        let waits_for_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits_for_continue && declared <= (limit as u64).saturating_mul(2) {
            let mut body = req.into_body();
            let discard = async { while let Some(Ok(_)) = body.frame().await {} };
            let _ = tokio::time::timeout(BODY_TIMEOUT, discard).await;
        }
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), limit).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            format!("reading request body: {e}\n"),
        )),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {BODY_TIMEOUT:?}\n"),
        )),
    }
}

fn log(reply: &Reply, took: Duration) {
    let us = took.as_micros() as u64;
    let (uid, object, note) = (&reply.uid, &reply.object, &reply.note);
    match reply.outcome {
        Outcome::Injected => {
            tracing::info!(%uid, %object, warnings = ?reply.warnings, took_us = us, "agent injected")
        }
        Outcome::Skipped => {
            tracing::info!(%uid, %object, reason = %note, took_us = us, "injection skipped")
        }
        Outcome::Ignored => {
            tracing::debug!(%uid, %object, reason = %note, took_us = us, "request ignored")
        }
        Outcome::Error => {
            tracing::error!(%uid, %object, error = %note, took_us = us, "injection failed; pod allowed unchanged")
        }
        Outcome::Invalid => {
            tracing::warn!(%uid, status = reply.status.as_u16(), error = %note, "bad admission request")
        }
    }
}
