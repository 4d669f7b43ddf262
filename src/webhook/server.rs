//! HTTPS server: hyper 1 over tokio-rustls. One task per connection; a failed handshake
//! or a misbehaving client ends its own task, never the server.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::metrics::{Metrics, Outcome};
use super::review::{Reply, review};
use crate::inject::InjectSettings;
use crate::net::text;

/// The API server sends one pod per request; 3 MiB is etcd's object limit (1.5 MiB)
/// with room for the AdmissionReview envelope and oldObject.
pub const DEFAULT_BODY_LIMIT: usize = 3 * 1024 * 1024;
/// Handshake and body must each arrive within this; the API server's own webhook
/// timeout is at most 30 s, usually 5 s.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// In-flight requests get this long after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's header-read timer also runs while a keep-alive connection is idle. The API
/// server's Go client keeps idle connections 90 s; closing ours sooner would race its
/// next POST on the same connection (a failed call = a pod without agent), so we outlast
/// it and let the client close first.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Caps what slow or idle clients can hold; the API server needs a handful.
const MAX_CONNECTIONS: usize = 1024;

pub struct App {
    pub settings: InjectSettings,
    pub metrics: Metrics,
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
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = crate::net::accept(&listener) => accepted,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
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
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(route(req, &app).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
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
/// Past the limit we keep reading and discarding up to twice the limit before answering
/// 413, so a client that is still sending sees the answer rather than a reset connection;
/// beyond that (or when Content-Length already says so) we answer at once and close.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, (StatusCode, String)> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes\n"),
        )
    };
    let drain_cap = limit.saturating_mul(2);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > drain_cap as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut body = req.into_body();
        let mut buf = Vec::with_capacity(declared.map_or(0, |n| n.min(limit as u64) as usize));
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("reading request body: {e}\n"),
                )
            })?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if seen > drain_cap {
                break;
            }
            if seen <= limit {
                buf.extend_from_slice(data);
            }
        }
        if seen > limit {
            return Err(too_large());
        }
        Ok(Bytes::from(buf))
    };
    match tokio::time::timeout(IO_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {IO_TIMEOUT:?}\n"),
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
