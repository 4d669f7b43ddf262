//! `wsdrain echo`: the reference WebSocket app implementing admin API v1.
//!
//! It is what tests and the lab drain, and the worked example of the contract
//! (docs/admin-api.md). The public port echoes WebSocket messages on any path and answers
//! `GET /healthz`; the admin port (loopback only) closes sessions on request. SIGTERM
//! makes it exit at once with its sockets open, like most apps do: that abrupt end is
//! exactly what wsdrain exists to prevent, so the lab needs it.

mod admin_api;
mod sessions;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use sessions::Sessions;

use crate::net::text;

#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    /// Public WebSocket (and plain HTTP) address.
    #[arg(long, env = "ECHO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin API v1 address; must be a loopback address.
    #[arg(long, env = "ECHO_ADMIN", default_value = "127.0.0.1:8081")]
    pub admin: SocketAddr,
    /// Serve no admin API at all, like most apps (proxy mode drains those).
    #[arg(long, env = "ECHO_NO_ADMIN")]
    pub no_admin: bool,
    /// How long a drained session waits for the client's close frame before the TCP
    /// connection is dropped.
    #[arg(long, env = "ECHO_CLOSE_TIMEOUT", default_value = "3s", value_parser = crate::units::parse_duration)]
    pub close_timeout: Duration,
    /// Largest WebSocket message accepted, in bytes.
    #[arg(long, env = "ECHO_MAX_MESSAGE", default_value_t = 1 << 20)]
    pub max_message: usize,
}

/// State shared by the public server, the sessions and the admin API.
pub(crate) struct App {
    sessions: Sessions,
    /// Becomes true on the first /drain: from then on no idle HTTP keep-alives.
    draining: watch::Sender<bool>,
    close_timeout: Duration,
    ws_config: WebSocketConfig,
}

impl App {
    fn start_draining(&self) {
        self.draining
            .send_if_modified(|d| !std::mem::replace(d, true));
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}

pub async fn run(args: EchoArgs) -> anyhow::Result<ExitCode> {
    // The admin API can close every session: never expose it beyond the pod.
    if !args.admin.ip().is_loopback() {
        anyhow::bail!(
            "--admin {} is not a loopback address: the admin API may only listen on 127.0.0.0/8 or ::1",
            args.admin
        );
    }
    let public = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    let admin = if args.no_admin {
        None
    } else {
        Some(
            TcpListener::bind(args.admin)
                .await
                .with_context(|| format!("cannot listen on --admin {}", args.admin))?,
        )
    };

    let app = Arc::new(App {
        sessions: Sessions::default(),
        draining: watch::Sender::new(false),
        close_timeout: args.close_timeout,
        // Small read buffers: 5k idle sessions must not cost 128 KiB each.
        ws_config: WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(args.max_message))
            .max_frame_size(Some(args.max_message)),
    });
    let admin_addr = admin.as_ref().map(|_| args.admin.to_string());
    tracing::info!(listen = %args.listen, admin = admin_addr, "echo app listening");

    let termination =
        crate::signals::Termination::install().context("cannot install signal handlers")?;
    let signal = tokio::select! {
        _ = accept_loop(public, app.clone(), serve_public) => "accept loop ended",
        _ = async {
            match admin {
                Some(admin) => accept_loop(admin, app.clone(), serve_admin).await,
                None => std::future::pending().await,
            }
        } => "accept loop ended",
        sig = termination.first() => crate::signals::name(sig),
    };
    // Deliberately no graceful close: returning drops every socket without a close frame,
    // so clients see 1006. This is the behaviour wsdrain is there to fix.
    tracing::warn!(
        signal,
        dropped_sessions = app.sessions.open_count(),
        "exiting at once; open WebSocket sessions are dropped without a close frame"
    );
    Ok(ExitCode::SUCCESS)
}

/// Accepts forever; a failed accept (e.g. out of file descriptors under load) is logged
/// and retried after a short pause instead of ending the server.
async fn accept_loop<F, Fut>(listener: TcpListener, app: Arc<App>, serve: F)
where
    F: Fn(TcpStream, Arc<App>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, _) = crate::net::accept(&listener).await;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, app.clone()));
    }
}

async fn serve_admin(stream: TcpStream, app: Arc<App>) {
    let svc = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(admin_api::handle(req, app).await) }
    });
    if let Err(err) = http1_builder()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(error = %err, "admin connection error");
    }
}

async fn serve_public(stream: TcpStream, app: Arc<App>) {
    // Marks the current value as seen: only a drain that starts later fires `changed`.
    let mut drain_started = app.draining.subscribe();
    let svc = {
        let app = app.clone();
        service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(public_request(req, app)) }
        })
    };
    let conn = http1_builder()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        // A connection open when draining starts: close it if idle, or right after the
        // request in flight. (Not done for connections opened later: hyper would close a
        // fresh one before reading its request; those get `Connection: close` instead.)
        Ok(()) = drain_started.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "public connection error");
    }
}

fn public_request(req: Request<Incoming>, app: Arc<App>) -> Response<Full<Bytes>> {
    let mut resp = if req.method() == Method::GET && crate::net::is_websocket_upgrade(req.headers())
    {
        upgrade(req, app.clone())
    } else if req.method() == Method::GET && req.uri().path() == "/healthz" {
        text(StatusCode::OK, "ok\n")
    } else {
        text(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket echo: connect with a WebSocket client (GET /healthz for health)\n",
        )
    };
    if app.is_draining() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Answers the RFC 6455 handshake with 101 and hands the upgraded socket to a session.
fn upgrade(mut req: Request<Incoming>, app: Arc<App>) -> Response<Full<Bytes>> {
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if !version_ok {
        let mut resp = text(StatusCode::UPGRADE_REQUIRED, "only WebSocket version 13\n");
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(app.ws_config),
                )
                .await;
                app.sessions.serve(ws, app.close_timeout).await;
            }
            Err(err) => tracing::debug!(error = %err, "upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

/// Slow or silent clients (slowloris) are dropped after 10 s without complete headers.
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
}
