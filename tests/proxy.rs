//! Proxy mode in-process: the proxy between real WebSocket clients (tokio-tungstenite,
//! raw sockets, Python `websockets`, Node `ws`) and apps that have no admin API.

mod common;

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use wsdrain::drain::seams::{CloseRequest, SessionCloser, SessionCounter};
use wsdrain::proxy::{Proxy, Route, TableCloser, TableCounter, Timeouts};

const HINT: &str = r#"{"reconnect_after_ms":1200}"#;

/// What the test app does on each session.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Echo every message.
    Echo,
    /// Stream messages of `fragments` frames of `size` bytes, `gap` between frames.
    Stream {
        fragments: usize,
        size: usize,
        gap: Duration,
    },
    /// Send one fragment of a message, then nothing for a long time.
    StallMidMessage,
    /// Write bytes that are no WebSocket frame right after the handshake.
    Garbage,
}

/// An app no one drains: tokio-tungstenite server, records the close codes it receives.
struct App {
    addr: SocketAddr,
    closes: Arc<Mutex<Vec<u16>>>,
}

async fn start_app(behaviour: Behaviour) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let seen = closes.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(serve_app(stream, behaviour, seen));
        }
    });
    App { addr, closes }
}

async fn serve_app(stream: TcpStream, behaviour: Behaviour, closes: Arc<Mutex<Vec<u16>>>) {
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let record = |msg: &Message| {
        if let Message::Close(frame) = msg {
            let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
            closes.lock().unwrap().push(code);
        }
    };
    match behaviour {
        Behaviour::Echo => {
            while let Some(Ok(msg)) = rx.next().await {
                record(&msg);
                if msg.is_text() || msg.is_binary() {
                    let _ = tx.send(msg).await;
                } else if msg.is_close() {
                    let _ = tx.flush().await;
                }
            }
        }
        Behaviour::Stream {
            fragments,
            size,
            gap,
        } => {
            let writer = async move {
                for n in 0u64.. {
                    for i in 0..fragments {
                        let op = if i == 0 {
                            OpCode::Data(Data::Binary)
                        } else {
                            OpCode::Data(Data::Continue)
                        };
                        let payload = vec![(n % 251) as u8; size];
                        let frame = Frame::message(payload, op, i + 1 == fragments);
                        if tx.send(Message::Frame(frame)).await.is_err() {
                            return tx;
                        }
                        tokio::time::sleep(gap).await;
                    }
                }
                tx
            };
            let reader = async {
                while let Some(Ok(msg)) = rx.next().await {
                    record(&msg);
                }
            };
            tokio::select! {
                _ = writer => {}
                _ = reader => {}
            }
        }
        Behaviour::StallMidMessage => {
            let frame = Frame::message(vec![1u8; 100], OpCode::Data(Data::Text), false);
            let _ = tx.send(Message::Frame(frame)).await;
            while let Some(Ok(msg)) = rx.next().await {
                record(&msg);
            }
        }
        Behaviour::Garbage => {
            let mut ws = tx.reunite(rx).unwrap();
            let _ = ws.get_mut().write_all(&[0x83, 0x00, 0xFF]).await;
            while let Some(Ok(msg)) = ws.next().await {
                record(&msg);
            }
        }
    }
}

fn timeouts(boundary_wait: Duration) -> Timeouts {
    Timeouts {
        boundary_wait,
        close_timeout: Duration::from_secs(3),
        write_stall: Duration::from_millis(500),
    }
}

async fn start_proxy(app: SocketAddr, t: Timeouts) -> (Proxy, SocketAddr) {
    let route = Route {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: app,
    };
    let proxy = Proxy::start(&[route], t).await.unwrap();
    let addr = proxy.local_addrs()[0];
    (proxy, addr)
}

async fn close(proxy: &Proxy, max: u64) -> (u64, u64) {
    let reply = TableCloser(proxy.table())
        .close(CloseRequest {
            max,
            code: 1012,
            reason: HINT.into(),
        })
        .await
        .unwrap();
    (reply.closed, reply.remaining)
}

/// Waits (bounded) until `cond` holds.
async fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn echo_client(proxy: SocketAddr, i: usize) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{proxy}/chat/{i}"))
        .await
        .unwrap();
    let text = format!("hello {i}");
    ws.send(Message::text(text.clone())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, Message::text(text));
    ws
}

/// A session the trouble elsewhere must not touch still gets its echo.
async fn assert_still_echoed(ws: &mut Ws) {
    ws.send(Message::text("still here")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("still here"));
}

/// The close frame a client got (code, reason), reading past any data first; then
/// reads on so tungstenite sends its answer, until the server ends the TCP connection.
async fn close_seen(ws: &mut Ws) -> (u16, String) {
    let seen = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                break (u16::from(f.code), f.reason.to_string());
            }
            Ok(Some(Ok(Message::Close(None)))) => break (1005, String::new()),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while ws.next().await.is_some() {}
    })
    .await;
    assert!(
        end.is_ok(),
        "the proxy ends the TCP connection after the close handshake"
    );
    seen
}

/// `wsdrain echo` without its admin API, on a loopback address of its own.
struct NoAdminEcho {
    _proc: common::Proc,
    public: SocketAddr,
}

fn start_echo_without_admin() -> NoAdminEcho {
    let ip = common::pod_ip();
    let public = SocketAddr::new(ip, common::free_port(ip));
    let mut cmd = std::process::Command::new(common::wsdrain_bin());
    cmd.args([
        "echo",
        "--no-admin",
        "--listen",
        &public.to_string(),
        "--log-format",
        "text",
    ]);
    if std::env::var_os("WSDRAIN_TEST_LOGS").is_none() {
        cmd.stderr(std::process::Stdio::null());
    }
    let proc = common::Proc::spawn("echo", &mut cmd);
    common::wait_listening(public, Duration::from_secs(10));
    NoAdminEcho {
        _proc: proc,
        public,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_close_reaches_both_sides_and_counts_reach_zero_exactly() {
    let app = start_app(Behaviour::Echo).await;
    let (proxy, addr) = start_proxy(app.addr, timeouts(Duration::from_secs(1))).await;
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push(echo_client(addr, i).await);
    }
    let table = proxy.table();
    wait_for("30 sessions", Duration::from_secs(5), || {
        table.open_sessions() == 30
    })
    .await;

    assert_eq!(close(&proxy, 10).await, (10, 20));
    let mut closed = 0;
    for ws in clients.iter_mut().take(10) {
        assert_eq!(close_seen(ws).await, (1012, HINT.to_owned()));
        closed += 1;
    }
    assert_eq!(closed, 10);
    // The sessions not asked still echo.
    for (i, ws) in clients.iter_mut().enumerate().skip(10) {
        ws.send(Message::text(format!("again {i}"))).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(format!("again {i}")));
    }

    // The counter wakes when the table changes and reads zero once the last is gone.
    let counter = TableCounter(proxy.table());
    assert_eq!(close(&proxy, 100).await, (20, 0));
    for ws in clients.iter_mut().skip(10) {
        assert_eq!(close_seen(ws).await, (1012, HINT.to_owned()));
    }
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let changed = counter.changed();
        if counter.snapshot().await.unwrap().ids.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "table never emptied");
        let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
    }
    let codes = app.closes.lock().unwrap().clone();
    assert_eq!(
        codes,
        vec![1001; 30],
        "the app sees a Close 1001 on every session"
    );
    let stats = proxy.stats().snapshot();
    assert_eq!(
        (stats.sessions, stats.drained, stats.close_timeouts),
        (30, 30, 0),
        "{stats:?}"
    );
}

/// A raw WebSocket client: handshake by hand, then every frame as it arrived.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct RawFrame {
    fin: bool,
    opcode: OpCode,
    payload: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /raw HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        buf.drain(..head_end);
        Raw { stream, buf }
    }

    /// The next frame, `None` at end of stream.
    async fn frame(&mut self) -> Option<RawFrame> {
        loop {
            let mut cur = Cursor::new(&self.buf);
            if let Some((h, len)) = FrameHeader::parse(&mut cur).unwrap() {
                let start = cur.position() as usize;
                if self.buf.len() >= start + len as usize {
                    let payload = self.buf[start..start + len as usize].to_vec();
                    self.buf.drain(..start + len as usize);
                    return Some(RawFrame {
                        fin: h.is_final,
                        opcode: h.opcode,
                        payload,
                    });
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames up to the Close; returns the frames before it and the close code.
    async fn until_close(&mut self) -> (Vec<RawFrame>, Option<u16>) {
        let mut frames = Vec::new();
        while let Some(f) = self.frame().await {
            if f.opcode
                == OpCode::Control(
                    tokio_tungstenite::tungstenite::protocol::frame::coding::Control::Close,
                )
            {
                let code = (f.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                return (frames, code);
            }
            frames.push(f);
        }
        (frames, None)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

fn masked_text(text: &str) -> Vec<u8> {
    let mut f = Frame::message(
        Bytes::copy_from_slice(text.as_bytes()),
        OpCode::Data(Data::Text),
        true,
    );
    f.header_mut().mask = Some([1, 2, 3, 4]);
    let mut out = Vec::new();
    f.format(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_the_end_of_a_fragmented_message() {
    // 6 fragments of 20 KB, 30 ms apart: a message takes ~180 ms, far below the wait.
    let app = start_app(Behaviour::Stream {
        fragments: 6,
        size: 20_000,
        gap: Duration::from_millis(30),
    })
    .await;
    let (proxy, addr) = start_proxy(app.addr, timeouts(Duration::from_secs(2))).await;
    let mut raws = Vec::new();
    for _ in 0..4 {
        raws.push(Raw::connect(addr).await);
    }
    let table = proxy.table();
    wait_for("4 sessions", Duration::from_secs(5), || {
        table.open_sessions() == 4
    })
    .await;
    // Mid-stream: some sessions are surely inside a message now.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(close(&proxy, 4).await, (4, 0));
    for mut raw in raws {
        let (frames, code) = raw.until_close().await;
        assert_eq!(code, Some(1012));
        let last = frames.last().expect("data before the close");
        assert!(last.fin, "the Close came inside a message");
        // Whole messages only: every message has all 6 fragments of 20 KB.
        assert_eq!(frames.len() % 6, 0, "{} frames", frames.len());
        assert!(frames.iter().all(|f| f.payload.len() == 20_000));
        raw.send(&{
            let mut f = Frame::close(None);
            f.header_mut().mask = Some([9, 9, 9, 9]);
            let mut out = Vec::new();
            f.format(&mut out).unwrap();
            out
        })
        .await;
        assert!(
            raw.frame().await.is_none(),
            "TCP ends after the close handshake"
        );
    }
    wait_for("app closes", Duration::from_secs(5), || {
        app.closes.lock().unwrap().len() == 4
    })
    .await;
    assert_eq!(app.closes.lock().unwrap().clone(), vec![1001; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_message_gets_the_close_between_frames_after_the_boundary_wait() {
    let app = start_app(Behaviour::StallMidMessage).await;
    let (proxy, addr) = start_proxy(app.addr, timeouts(Duration::from_millis(200))).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .unwrap();
    let table = proxy.table();
    wait_for("1 session", Duration::from_secs(5), || {
        table.open_sessions() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the first fragment is through
    let asked = Instant::now();
    close(&proxy, 1).await;
    // tungstenite accepts a Close inside a fragmented message (§5.4): no protocol error.
    assert_eq!(close_seen(&mut ws).await, (1012, HINT.to_owned()));
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    wait_for("app close", Duration::from_secs(5), || {
        app.closes.lock().unwrap().len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_session_with_1002_to_the_sender() {
    let app = start_app(Behaviour::Echo).await;
    let (proxy, addr) = start_proxy(app.addr, timeouts(Duration::from_secs(1))).await;
    let mut good = echo_client(addr, 0).await;

    // An unmasked client frame, then a reserved opcode: each gets 1002, app gets 1001.
    let unmasked = [0x81u8, 0x02, b'h', b'i'];
    let reserved = [0x83u8, 0x80, 0, 0, 0, 0];
    for bad in [&unmasked[..], &reserved[..]] {
        let mut raw = Raw::connect(addr).await;
        raw.send(&masked_text("fine")).await;
        let echo = raw.frame().await.unwrap();
        assert_eq!(echo.payload, b"fine");
        raw.send(bad).await;
        let (_, code) = raw.until_close().await;
        assert_eq!(code, Some(1002));
        assert!(
            raw.frame().await.is_none(),
            "TCP ends after a protocol error"
        );
    }
    // A frame cut short by the end of the stream: counted, the app's side ends at once.
    let mut raw = Raw::connect(addr).await;
    let whole = masked_text("a frame the client never finishes");
    raw.send(&whole[..whole.len() - 5]).await;
    raw.stream.shutdown().await.unwrap();
    assert!(raw.frame().await.is_none());
    let stats = proxy.stats();
    wait_for("truncated frame counted", Duration::from_secs(5), || {
        stats.snapshot().bad_frames_client == 3
    })
    .await;

    // Garbage right behind the handshake, in the same packet as the request.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(&[0x8F, 0x80, b'g', b'a', b'r']);
    stream.write_all(&request).await.unwrap();
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        all.ends_with(&[0x88, 0x10, 0x03, 0xEA])
            || all.windows(4).any(|w| w == [0x88, 0x10, 0x03, 0xEA]),
        "Close 1002 expected: {all:?}"
    );

    let stats = proxy.stats();
    wait_for("4 bad frames counted", Duration::from_secs(5), || {
        stats.snapshot().bad_frames_client == 4
    })
    .await;
    wait_for("app closes", Duration::from_secs(5), || {
        app.closes.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(app.closes.lock().unwrap().clone(), vec![1001; 3]);

    // The good session never noticed.
    assert_still_echoed(&mut good).await;

    // Garbage from the app: the client gets 1011, the app 1002.
    let bad_app = start_app(Behaviour::Garbage).await;
    let (proxy2, addr2) = start_proxy(bad_app.addr, timeouts(Duration::from_secs(1))).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr2}/"))
        .await
        .unwrap();
    assert_eq!(close_seen(&mut ws).await.0, 1011);
    wait_for("app close", Duration::from_secs(5), || {
        bad_app.closes.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(bad_app.closes.lock().unwrap().clone(), vec![1002]);
    let stats = proxy2.stats();
    wait_for("1 bad app frame counted", Duration::from_secs(5), || {
        stats.snapshot().bad_frames_app == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_only_its_own_session() {
    let app = start_app(Behaviour::Stream {
        fragments: 1,
        size: 64 * 1024,
        gap: Duration::ZERO,
    })
    .await;
    let (proxy, addr) = start_proxy(app.addr, timeouts(Duration::from_secs(1))).await;
    // Never reads: the kernel buffers fill, then the proxy's write stalls.
    let _sleeper = Raw::connect(addr).await;
    let mut reader = Raw::connect(addr).await;
    let proxy_stats = proxy.stats();
    let read_some = async {
        while proxy_stats.snapshot().stalled == 0 {
            assert!(reader.frame().await.is_some());
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_some)
        .await
        .expect("stall detected");
    // The reading client still gets data.
    for _ in 0..5 {
        assert_eq!(reader.frame().await.unwrap().payload.len(), 64 * 1024);
    }
    wait_for("stalled session gone", Duration::from_secs(10), || {
        proxy.table().len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_forwarded_with_keep_alive_then_connection_close_when_draining() {
    let echo = start_echo_without_admin();
    let (proxy, addr) = start_proxy(echo.public, timeouts(Duration::from_secs(1))).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let get = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    for _ in 0..3 {
        s.write_all(get.as_bytes()).await.unwrap();
        let head = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.to_lowercase().contains("connection: close"), "{head}");
    }
    assert_eq!(proxy.table().len(), 1, "one keep-alive connection");
    close(&proxy, 0).await; // draining starts: the idle keep-alive is closed
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    fresh.write_all(get.as_bytes()).await.unwrap();
    let head = read_response(&mut fresh).await;
    assert!(head.to_lowercase().contains("connection: close"), "{head}");
    wait_for("table empty", Duration::from_secs(5), || {
        proxy.table().is_empty()
    })
    .await;
}

/// Reads one response head plus its Content-Length body.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(b[0]);
        if buf.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    head
}

/// Runs a client script against the proxy, closes every session once it is READY and
/// returns its JSON report.
async fn client_script_through_proxy(program: &str, script: &str) -> Value {
    let echo = start_echo_without_admin();
    let (proxy, addr) = start_proxy(echo.public, timeouts(Duration::from_secs(1))).await;
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(common::repo_path(script))
        .args([format!("ws://{addr}/"), "20".into(), "10".into()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::time::timeout(Duration::from_secs(30), lines.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "READY");
    let table = proxy.table();
    wait_for("20 sessions", Duration::from_secs(5), || {
        table.open_sessions() == 20
    })
    .await;
    assert_eq!(close(&proxy, 20).await, (20, 0));
    line.clear();
    tokio::time::timeout(Duration::from_secs(30), lines.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let report: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(report["opened"], 20, "{report}");
    assert_eq!(report["still_open"], 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    for c in report["closes"].as_array().unwrap() {
        assert_eq!(c["code"], 1012, "{report}");
        assert_eq!(c["reason"], HINT, "{report}");
    }
    assert_eq!(report["closes"].as_array().unwrap().len(), 20);
    wait_for("table empty", Duration::from_secs(5), || {
        proxy.table().is_empty()
    })
    .await;
    assert_eq!(proxy.stats().snapshot().drained, 20);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_clients_get_code_and_hint_through_the_proxy() {
    let python = common::venv_python();
    client_script_through_proxy(python.to_str().unwrap(), "tests/clients/ws_client.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_clients_get_code_and_hint_through_the_proxy() {
    client_script_through_proxy("node", "tests/clients/ws_client.js").await;
}

/// `tests/clients/proxy_app.py` (Python `websockets` server, no admin API) on a loopback
/// address of its own; its stdout carries one JSON line per ended session.
struct PyApp {
    proc: common::Proc,
    addr: SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
}

fn start_python_app() -> PyApp {
    use std::io::BufRead;
    let ip = common::pod_ip();
    let addr = SocketAddr::new(ip, common::free_port(ip));
    let mut cmd = std::process::Command::new(common::venv_python());
    cmd.arg(common::repo_path("tests/clients/proxy_app.py"))
        .args([ip.to_string(), addr.port().to_string()])
        .stdout(std::process::Stdio::piped());
    let mut proc = common::Proc::spawn("proxy_app.py", &mut cmd);
    let stdout = proc.child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(20)).unwrap(),
        "LISTENING"
    );
    PyApp { proc, addr, lines }
}

impl PyApp {
    /// The next `n` ended sessions: (close code the app received, unix time).
    fn ended(&self, n: usize, limit: Duration) -> Vec<(u64, f64)> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while out.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!("only {} of {n} sessions ended: {out:?}", out.len());
            };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            out.push((v["code"].as_u64().unwrap(), v["t"].as_f64().unwrap()));
        }
        out
    }
}

/// A client script started against `url`; `ready()` waits for READY, `report()` for the
/// JSON line.
struct Script {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Script {
    fn start(program: &str, script: &str, url: &str, count: usize, timeout_s: u32) -> Script {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(program)
            .arg(common::repo_path(script))
            .args([url.to_owned(), count.to_string(), timeout_s.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} {script}: {e}"));
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Script { child, lines }
    }

    async fn ready(&mut self) {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("READY in time")
            .unwrap();
        assert_eq!(line.as_deref(), Some("READY"));
    }

    async fn report(mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("report in time")
            .unwrap()
            .expect("a report line");
        let _ = self.child.wait().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

/// Every client closed with 1012 and a JSON reconnect hint; no errors, no bad messages.
fn assert_clean_1012(report: &Value, count: u64) {
    assert_eq!(report["opened"], count, "{report}");
    assert_eq!(report["still_open"], 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["bad_messages"].as_u64().unwrap_or(0), 0, "{report}");
    let closes = report["closes"].as_array().unwrap();
    assert_eq!(closes.len() as u64, count, "{report}");
    for c in closes {
        assert_eq!(c["code"], 1012, "{report}");
        let hint: Value = serde_json::from_str(c["reason"].as_str().unwrap()).unwrap();
        assert!(hint["reconnect_after_ms"].is_u64(), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_app_streaming_compressed_fragments_is_closed_at_message_boundaries() {
    let app = start_python_app();
    let (proxy, addr) = start_proxy(app.addr, timeouts(Duration::from_secs(1))).await;
    let mut streams = Script::start(
        common::venv_python().to_str().unwrap(),
        "tests/clients/stream_client.py",
        &format!("ws://{addr}/stream"),
        10,
        20,
    );
    streams.ready().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(close(&proxy, 10).await, (10, 0));
    let report = streams.report().await;
    assert_clean_1012(&report, 10);
    assert!(report["messages"].as_u64().unwrap() >= 10, "{report}");
    let ended = app.ended(10, Duration::from_secs(10));
    assert!(ended.iter().all(|(code, _)| *code == 1001), "{ended:?}");
    let stats = proxy.stats();
    wait_for("all drained", Duration::from_secs(5), || {
        stats.snapshot().drained == 10
    })
    .await;
    let (status, body) =
        tokio::task::spawn_blocking(move || common::http("GET", addr, "/healthz", &[]))
            .await
            .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    drop(app.proc);
}

/// The issue's acceptance run: an app nobody here wrote (Python `websockets`, no admin
/// API) behind `wsdrain agent --proxy`; 300 clients (Python and Node echo, Python
/// streaming large fragmented messages) all get 1012 with the hint, paced over the close
/// window; the app sees a Close on every session; no protocol errors; the hook answers
/// within 350 ms of the last close; plain HTTP is answered by the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_proxy_drains_an_app_nobody_here_wrote() {
    const WINDOW_S: f64 = 3.0;
    let app = start_python_app();
    let ip = app.addr.ip();
    let listen = SocketAddr::new(ip, common::free_port(ip));
    let api = SocketAddr::new(ip, common::free_port(ip));
    let mut cmd = std::process::Command::new(common::wsdrain_bin());
    cmd.arg("agent")
        .args(["--proxy", &format!("{listen}={}", app.addr)])
        .args(["--listen", &api.to_string(), "--address", &ip.to_string()])
        .args(["--no-kube", "--termination-log", "", "--log-format", "text"])
        .args([
            "--settle-min",
            "300ms",
            "--settle-quiet",
            "200ms",
            "--settle-max",
            "2s",
        ])
        .args(["--close-window", "3s", "--drain-timeout", "20s"]);
    if std::env::var_os("WSDRAIN_TEST_LOGS").is_none() {
        cmd.stderr(std::process::Stdio::null());
    }
    let _agent = common::Proc::spawn("agent", &mut cmd);
    common::wait_listening(listen, Duration::from_secs(10));
    common::wait_listening(api, Duration::from_secs(10));

    let (status, body) =
        tokio::task::spawn_blocking(move || common::http("GET", listen, "/healthz", &[]))
            .await
            .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "plain HTTP through the proxy"
    );

    let python = common::venv_python();
    let python = python.to_str().unwrap();
    let mut scripts = [
        (
            Script::start(
                python,
                "tests/clients/ws_client.py",
                &format!("ws://{listen}/echo"),
                120,
                30,
            ),
            120,
        ),
        (
            Script::start(
                "node",
                "tests/clients/ws_client.js",
                &format!("ws://{listen}/echo"),
                120,
                30,
            ),
            120,
        ),
        (
            Script::start(
                python,
                "tests/clients/stream_client.py",
                &format!("ws://{listen}/stream"),
                60,
                30,
            ),
            60,
        ),
    ];
    for (s, _) in scripts.iter_mut() {
        s.ready().await;
    }

    let hook = tokio::task::spawn_blocking(move || {
        let (status, body) = common::http("GET", api, "/prestop", &[]);
        (status, body, std::time::SystemTime::now())
    });
    let mut reports = Vec::new();
    for (s, n) in scripts {
        reports.push((s.report().await, n));
    }
    let (status, body, hook_at) = hook.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let summary: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(summary["outcome"], "Drained", "{summary}");

    let mut at_ms = Vec::new();
    for (report, n) in &reports {
        assert_clean_1012(report, *n);
        at_ms.extend(
            report["closes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["at_ms"].as_u64().unwrap()),
        );
    }
    assert!(
        reports[2].0["messages"].as_u64().unwrap() > 60,
        "the streams ran: {}",
        reports[2].0
    );
    // Paced: the closes spread over most of the window, not all at once.
    at_ms.sort_unstable();
    let spread = (at_ms[at_ms.len() - 1] - at_ms[0]) as f64 / 1000.0;
    assert!(
        spread >= WINDOW_S * 0.5,
        "closes spread over {spread:.2}s only"
    );

    let ended = app.ended(300, Duration::from_secs(10));
    let not_1001: Vec<_> = ended.iter().filter(|(code, _)| *code != 1001).collect();
    assert!(
        not_1001.is_empty(),
        "the app must see Close 1001 on every session: {not_1001:?}"
    );
    let last_close = ended.iter().map(|(_, t)| *t).fold(f64::MIN, f64::max);
    let hook_s = hook_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let lag = hook_s - last_close;
    println!(
        "closes spread over {spread:.2}s; hook answered {:.0} ms after the last close",
        lag * 1e3
    );
    assert!(lag <= 0.35, "hook answered {lag:.3}s after the last close");

    let (_, metrics) =
        tokio::task::spawn_blocking(move || common::http("GET", api, "/metrics", &[]))
            .await
            .unwrap();
    for zero in [
        "bad_frames_client",
        "bad_frames_app",
        "close_timeouts",
        "stalled",
        "upstream_errors",
    ] {
        let line = format!("wsdrain_proxy_events{{event=\"{zero}\"}} 0");
        assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    }
    drop(app.proc);
}

/// Random bytes after the handshake from 40 clients (seeded, so a failure replays): each
/// session ends, nothing hangs or panics, and an honest session keeps echoing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_from_clients_ends_only_those_sessions() {
    use rand::{Rng, SeedableRng};
    let app = start_app(Behaviour::Echo).await;
    let (proxy, addr) = start_proxy(app.addr, timeouts(Duration::from_secs(1))).await;
    let mut good = echo_client(addr, 0).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let len = rng.random_range(1..300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw::connect(addr).await;
            raw.send(&bytes).await;
            // Either a Close (1002) arrives and the TCP ends, or random bytes happened to
            // form a valid frame prefix and the proxy waits for the rest: then our FIN
            // ends the session.
            let _ = raw.stream.shutdown().await;
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), raw.stream.read_to_end(&mut rest))
                .await
                .expect("the proxy ends every garbage session")
                .ok();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let table = proxy.table();
    wait_for(
        "only the good session left",
        Duration::from_secs(10),
        || table.len() == 1,
    )
    .await;
    assert_still_echoed(&mut good).await;
}
