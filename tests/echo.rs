//! The real `wsdrain echo` process: sessions, admin API v1, keep-alive after drain,
//! SIGTERM, and clients no one here wrote (Python `websockets`, Node `ws`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const HINT: &str = r#"{"reconnect_after_ms":1200}"#;

fn start_echo(extra: &[&str]) -> common::EchoApp {
    common::EchoApp::start(common::pod_ip(), extra)
}

/// Blocking HTTP/1.1 POST with a body; returns (status, body).
fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

fn drain(admin: SocketAddr, max: u64, code: u16, reason: &str) -> Value {
    let (status, body) = post(
        admin,
        "/drain",
        &json!({"max": max, "code": code, "reason": reason}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn open_count(admin: SocketAddr) -> u64 {
    let (status, body) = common::http("GET", admin, "/connections", &[]);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["open"].as_u64().unwrap()
}

/// Polls /connections until it equals `want` (bounded); returns the last value.
fn wait_open_count(admin: SocketAddr, want: u64) -> u64 {
    let mut n = open_count(admin);
    for _ in 0..200 {
        if n == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
        n = open_count(admin);
    }
    n
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and checks one echo round trip.
async fn ws_client(public: SocketAddr, i: usize) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{public}/chat/{i}"))
        .await
        .unwrap();
    let text = format!("hello {i}");
    ws.send(Message::text(text.clone())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, Message::text(text));
    ws
}

/// What a client saw within `limit`: a close frame, the stream ending without one, an
/// error, or nothing at all.
#[derive(Debug, PartialEq)]
enum Seen {
    Close(Option<CloseFrame>),
    EndWithoutClose,
    Error(String),
    Nothing,
}

async fn next_event(mut ws: Ws, limit: Duration) -> (Ws, Seen) {
    let seen = loop {
        match tokio::time::timeout(limit, ws.next()).await {
            Err(_) => break Seen::Nothing,
            Ok(None) => break Seen::EndWithoutClose,
            Ok(Some(Err(e))) => break Seen::Error(e.to_string()),
            Ok(Some(Ok(Message::Close(frame)))) => break Seen::Close(frame),
            Ok(Some(Ok(_))) => continue,
        }
    };
    (ws, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_exactly_max_with_code_and_reason() {
    let echo = start_echo(&[]);
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push(ws_client(echo.public, i).await);
    }
    let admin = echo.admin;
    assert_eq!(
        tokio::task::spawn_blocking(move || wait_open_count(admin, 50))
            .await
            .unwrap(),
        50
    );

    let reply = tokio::task::spawn_blocking(move || drain(admin, 20, 1012, HINT))
        .await
        .unwrap();
    assert_eq!(reply, json!({"closed": 20, "remaining": 30}));
    let open = tokio::task::spawn_blocking(move || open_count(admin))
        .await
        .unwrap();
    assert_eq!(open, 30);

    // Every client looks for a close frame; the 30 left open see nothing in 2 s.
    let watching: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(next_event(ws, Duration::from_secs(2))))
        .collect();
    let mut closed = 0;
    let mut still_open = Vec::new();
    for w in watching {
        let (ws, seen) = w.await.unwrap();
        match seen {
            Seen::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 1012);
                assert_eq!(frame.reason.as_str(), HINT);
                closed += 1;
            }
            Seen::Nothing => still_open.push(ws),
            other => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(closed, 20);
    assert_eq!(still_open.len(), 30);
    // The survivors still echo.
    for (i, ws) in still_open.iter_mut().enumerate() {
        ws.send(Message::text(format!("again {i}"))).await.unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(msg, Message::text(format!("again {i}")));
    }

    // max larger than what is open closes the rest; max 0 closes nothing.
    let reply = tokio::task::spawn_blocking(move || {
        let zero = drain(admin, 0, 1001, "");
        let rest = drain(admin, 1000, 4000, "bye");
        (zero, rest)
    })
    .await
    .unwrap();
    assert_eq!(reply.0, json!({"closed": 0, "remaining": 30}));
    assert_eq!(reply.1, json!({"closed": 30, "remaining": 0}));
    for ws in still_open {
        let (_, seen) = next_event(ws, Duration::from_secs(5)).await;
        let Seen::Close(Some(frame)) = seen else {
            panic!("{seen:?}")
        };
        assert_eq!(u16::from(frame.code), 4000);
        assert_eq!(frame.reason.as_str(), "bye");
    }
    drop(echo);
}

#[test]
fn bad_drain_bodies_get_400_naming_the_field() {
    let echo = start_echo(&[]);
    let long = "r".repeat(124);
    let cases = [
        ("not json".to_owned(), "body"),
        (r#"{"code":1012,"reason":"x"}"#.to_owned(), "max"),
        (r#"{"max":-1,"code":1012,"reason":"x"}"#.to_owned(), "max"),
        (r#"{"max":1,"code":999,"reason":"x"}"#.to_owned(), "code"),
        (r#"{"max":1,"code":5000,"reason":"x"}"#.to_owned(), "code"),
        (r#"{"max":1,"code":1005,"reason":"x"}"#.to_owned(), "code"),
        (r#"{"max":1,"code":1012}"#.to_owned(), "reason"),
        (
            format!(r#"{{"max":1,"code":1012,"reason":"{long}"}}"#),
            "reason",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post(echo.admin, "/drain", &body);
        assert_eq!(status, 400, "{body} -> {answer}");
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["field"], field, "{body} -> {answer}");
        assert!(v["error"].as_str().unwrap().starts_with(field), "{answer}");
    }
    // Oversized bodies are refused without parsing.
    let (status, _) = post(echo.admin, "/drain", &" ".repeat(100_000));
    assert_eq!(status, 413);
    // Unknown paths and wrong methods.
    assert_eq!(common::http("GET", echo.admin, "/nope", &[]).0, 404);
    assert_eq!(common::http("GET", echo.admin, "/drain", &[]).0, 405);
    // Bad requests did not start draining: keep-alive is still on.
    let (status, _) = common::http("GET", echo.public, "/healthz", &[]);
    assert_eq!(status, 200);
}

#[test]
fn admin_on_a_non_loopback_address_is_refused() {
    let ip = common::pod_ip();
    let public = SocketAddr::new(ip, common::free_port(ip));
    let mut echo = common::Proc::spawn(
        "echo",
        Command::new(common::wsdrain_bin())
            .args([
                "echo",
                "--listen",
                &public.to_string(),
                "--admin",
                "0.0.0.0:18081",
            ])
            .stderr(Stdio::piped()),
    );
    let status = echo
        .wait_timeout(Duration::from_secs(10))
        .expect("echo should refuse to start");
    assert!(!status.success());
    let mut err = String::new();
    echo.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("0.0.0.0:18081") && err.contains("not a loopback address"),
        "{err}"
    );
}

/// Sends a GET on an open keep-alive connection and returns the response head.
fn get_keepalive(s: &mut TcpStream, path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nHost: echo\r\n\r\n").unwrap();
    // /healthz answers "ok\n" with a Content-Length: read until the body is in.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    for _ in 0..100 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed early: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if buf.ends_with(b"ok\n") {
            break;
        }
    }
    String::from_utf8(buf).unwrap().to_ascii_lowercase()
}

#[test]
fn after_first_drain_idle_keepalives_are_closed() {
    let echo = start_echo(&[]);
    let mut idle = TcpStream::connect(echo.public).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = get_keepalive(&mut idle, "/healthz");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    // Keep-alive works before the drain: a second request on the same connection.
    let head = get_keepalive(&mut idle, "/healthz");
    assert!(head.starts_with("http/1.1 200"), "{head}");

    assert_eq!(
        drain(echo.admin, 0, 1012, HINT),
        json!({"closed":0,"remaining":0})
    );

    // The idle connection is closed by the server (EOF, or a reset).
    let start = Instant::now();
    let mut rest = [0u8; 64];
    match idle.read(&mut rest) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected data: {:?}", &rest[..n]),
        Err(e) => assert!(
            e.kind() == std::io::ErrorKind::ConnectionReset,
            "not closed: {e}"
        ),
    }
    assert!(start.elapsed() < Duration::from_secs(9));

    // A new connection gets its answer with `Connection: close`, then EOF.
    let mut fresh = TcpStream::connect(echo.public).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = get_keepalive(&mut fresh, "/healthz");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(fresh.read(&mut rest).unwrap_or(0), 0);
}

/// Runs a client script, drains its connections through the admin API once it is READY
/// and returns its JSON report.
fn run_client_script(
    program: &str,
    script: &str,
    extra: &[&str],
    echo: &common::EchoApp,
    count: u64,
) -> Value {
    let mut cmd = Command::new(program);
    cmd.arg(common::repo_path(script))
        .arg(format!("ws://{}/", echo.public))
        .arg(count.to_string())
        .arg("10")
        .args(extra)
        .stdout(Stdio::piped());
    let mut client = common::Proc::spawn(script, &mut cmd);
    let stdout = client.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(ready, "READY");
    assert_eq!(wait_open_count(echo.admin, count), count);
    let reply = drain(echo.admin, count, 1012, HINT);
    assert_eq!(reply["closed"], count);
    let report = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let status = client.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.success());
    serde_json::from_str(&report).unwrap_or_else(|e| panic!("{e}: {report}"))
}

fn assert_got_hint(report: &Value, count: u64) {
    assert_eq!(report["opened"], count, "{report}");
    assert_eq!(report["still_open"], 0, "{report}");
    assert_eq!(report["errors"], json!([]), "{report}");
    let closes = report["closes"].as_array().unwrap();
    assert_eq!(closes.len() as u64, count, "{report}");
    for c in closes {
        assert_eq!(c["code"], 1012, "{report}");
        assert_eq!(c["reason"], HINT, "{report}");
        assert!(c["at_ms"].as_u64().is_some(), "{report}");
    }
}

#[test]
fn python_websockets_client_gets_code_and_hint() {
    let echo = start_echo(&[]);
    let python = common::venv_python();
    let report = run_client_script(
        python.to_str().unwrap(),
        "tests/clients/ws_client.py",
        &[],
        &echo,
        5,
    );
    assert_got_hint(&report, 5);
}

#[test]
fn node_ws_client_gets_code_and_hint() {
    let echo = start_echo(&[]);
    let report = run_client_script("node", "tests/clients/ws_client.js", &[], &echo, 5);
    assert_got_hint(&report, 5);
}

#[test]
fn clients_that_ignore_closes_are_dropped_after_the_close_timeout() {
    let echo = start_echo(&["--close-timeout", "1s"]);
    let python = common::venv_python();
    for (program, script) in [
        (python.to_str().unwrap(), "tests/clients/ws_client.py"),
        ("node", "tests/clients/ws_client.js"),
    ] {
        let report = run_client_script(program, script, &["ignore-close"], &echo, 3);
        // The clients saw the close frame but never answered it: the app dropped the TCP
        // connection about a second later.
        assert_got_hint(&report, 3);
        for c in report["closes"].as_array().unwrap() {
            assert!(c["at_ms"].as_u64().unwrap() >= 900, "{script}: {report}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_at_once_and_clients_see_an_abnormal_close() {
    let mut echo = start_echo(&[]);
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(ws_client(echo.public, i).await);
    }
    common::signal(echo.proc.pid(), nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let status = echo.proc.wait_timeout(Duration::from_secs(5));
        (status, echo)
    })
    .await
    .unwrap();
    assert!(status.0.is_some(), "echo did not exit on SIGTERM");
    for ws in clients {
        let (_, seen) = next_event(ws, Duration::from_secs(5)).await;
        assert!(
            matches!(seen, Seen::EndWithoutClose | Seen::Error(_)),
            "expected an abnormal close, got {seen:?}"
        );
    }
}
