//! The admin API client against tiny misbehaving HTTP servers on loopback, and against
//! the real `wsdrain echo` process.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wsdrain::admin::{AdminClient, AdminError, DrainReply, DrainRequest, MAX_REPLY_BYTES};

const TIMEOUT: Duration = Duration::from_millis(500);

fn request() -> DrainRequest {
    DrainRequest {
        max: 7,
        code: 1012,
        reason: r#"{"reconnect_after_ms":1200}"#.to_owned(),
    }
}

fn client(addr: SocketAddr) -> AdminClient {
    AdminClient::new(format!("http://{addr}").parse().unwrap(), TIMEOUT)
}

/// Reads one HTTP request (head + Content-Length body), bounded in size; returns it.
async fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..64 {
        let Ok(n) = s.read(&mut chunk).await else {
            break;
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// What a misbehaving server does after reading the request.
#[derive(Clone)]
enum Behaviour {
    /// Writes these raw bytes, then closes.
    Raw(Vec<u8>),
    /// Never answers.
    Silent,
    /// Closes without answering.
    Hangup,
    /// Starts a chunked body of `n` bytes and then never finishes it.
    EndlessChunks(usize),
}

/// Starts a raw HTTP server on a fresh loopback address; every request it reads is sent
/// to the returned channel.
async fn server(behaviour: Behaviour) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind(SocketAddr::new(common::pod_ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let behaviour = behaviour.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let req = read_request(&mut s).await;
                let _ = tx.send(req);
                match behaviour {
                    Behaviour::Raw(bytes) => {
                        let _ = s.write_all(&bytes).await;
                        let _ = s.shutdown().await;
                    }
                    Behaviour::Silent => tokio::time::sleep(Duration::from_secs(30)).await,
                    Behaviour::Hangup => drop(s),
                    Behaviour::EndlessChunks(n) => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                            .await;
                        let piece = vec![b'['; 1024];
                        for _ in 0..n / 1024 {
                            let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
                            c.extend_from_slice(&piece);
                            c.extend_from_slice(b"\r\n");
                            if s.write_all(&c).await.is_err() {
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn ok_json(body: &str) -> Behaviour {
    Behaviour::Raw(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[tokio::test]
async fn good_server_gets_the_request_and_its_reply_is_parsed() {
    let (addr, mut seen) = server(ok_json(r#"{"closed":7,"remaining":93}"#)).await;
    let reply = client(addr).drain(&request()).await.unwrap();
    assert_eq!(
        reply,
        DrainReply {
            closed: 7,
            remaining: 93
        }
    );
    let req = seen.recv().await.unwrap();
    assert!(req.starts_with("POST /drain HTTP/1.1\r\n"), "{req}");
    let body = req.split_once("\r\n\r\n").unwrap().1;
    let sent: DrainRequest = serde_json::from_str(body).unwrap();
    assert_eq!(sent, request());

    let (addr, mut seen) = server(ok_json(r#"{"open":42,"extra":"ignored"}"#)).await;
    assert_eq!(client(addr).connections().await.unwrap(), 42);
    assert!(
        seen.recv()
            .await
            .unwrap()
            .starts_with("GET /connections HTTP/1.1\r\n")
    );

    // A path prefix in the base URL is kept.
    let (addr, mut seen) = server(ok_json(r#"{"open":1}"#)).await;
    let c = AdminClient::new(format!("http://{addr}/admin/").parse().unwrap(), TIMEOUT);
    assert_eq!(c.connections().await.unwrap(), 1);
    assert!(
        seen.recv()
            .await
            .unwrap()
            .starts_with("GET /admin/connections ")
    );
}

#[tokio::test]
async fn refused() {
    let ip = common::pod_ip();
    let addr = SocketAddr::new(ip, common::free_port(ip));
    let err = client(addr).connections().await.unwrap_err();
    assert!(matches!(err, AdminError::Connect { .. }), "{err:?}");
    assert_eq!(err.result_label(), "refused");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn slow_server_times_out_within_the_timeout() {
    let (addr, _seen) = server(Behaviour::Silent).await;
    let start = Instant::now();
    let err = client(addr).drain(&request()).await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, AdminError::Timeout { .. }), "{err:?}");
    assert_eq!(err.result_label(), "timeout");
    assert!(took >= TIMEOUT, "returned early: {took:?}");
    assert!(took < TIMEOUT + Duration::from_secs(3), "took {took:?}");

    // A body that starts but never ends is a timeout too.
    let (addr, _seen) = server(Behaviour::EndlessChunks(1024)).await;
    let err = client(addr).connections().await.unwrap_err();
    assert!(matches!(err, AdminError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn error_status_carries_status_and_excerpt() {
    let body = "boom: database on fire\n".repeat(100);
    let raw = format!(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (addr, _seen) = server(Behaviour::Raw(raw.into_bytes())).await;
    let err = client(addr).drain(&request()).await.unwrap_err();
    let AdminError::Status {
        status, excerpt, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 500);
    assert!(excerpt.starts_with("boom: database on fire"), "{excerpt}");
    assert!(excerpt.len() < 300, "excerpt not short: {}", excerpt.len());
    assert_eq!(err.result_label(), "http_error");
    assert!(err.to_string().contains("500"), "{err}");
}

#[tokio::test]
async fn hangup_and_broken_http_are_http_errors() {
    let (addr, _seen) = server(Behaviour::Hangup).await;
    let err = client(addr).connections().await.unwrap_err();
    assert!(matches!(err, AdminError::Http { .. }), "{err:?}");
    assert_eq!(err.result_label(), "http_error");

    let (addr, _seen) = server(Behaviour::Raw(b"SMTP ready\r\n\r\n".to_vec())).await;
    let err = client(addr).connections().await.unwrap_err();
    assert!(matches!(err, AdminError::Http { .. }), "{err:?}");
}

#[tokio::test]
async fn garbage_body_is_bad_body() {
    for body in ["<html>oops</html>", "", "[1,2]", "\"open\""] {
        let (addr, _seen) = server(ok_json(body)).await;
        let err = client(addr).connections().await.unwrap_err();
        assert!(matches!(err, AdminError::NotJson { .. }), "{body}: {err:?}");
        assert_eq!(err.result_label(), "bad_body");
    }
}

#[tokio::test]
async fn missing_or_mistyped_field_is_named() {
    let cases = [
        (r#"{"closed":3}"#, "remaining"),
        (r#"{"remaining":3}"#, "closed"),
        (r#"{"closed":"3","remaining":1}"#, "closed"),
        (r#"{"closed":3,"remaining":-1}"#, "remaining"),
        (r#"{"closed":3.5,"remaining":1}"#, "closed"),
    ];
    for (body, want) in cases {
        let (addr, _seen) = server(ok_json(body)).await;
        let err = client(addr).drain(&request()).await.unwrap_err();
        let AdminError::BadField { field, .. } = &err else {
            panic!("{body}: {err:?}")
        };
        assert_eq!(*field, want, "{body}");
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(err.result_label(), "bad_body");
    }
    let (addr, _seen) = server(ok_json(r#"{"opne":3}"#)).await;
    let err = client(addr).connections().await.unwrap_err();
    assert!(
        matches!(err, AdminError::BadField { field: "open", .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn huge_body_is_too_large() {
    // Declared up front.
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{{\"open\":1",
        100 * 1024 * 1024
    );
    let (addr, _seen) = server(Behaviour::Raw(raw.into_bytes())).await;
    let err = client(addr).connections().await.unwrap_err();
    assert!(matches!(err, AdminError::TooLarge { .. }), "{err:?}");
    assert_eq!(err.result_label(), "too_large");

    // Streamed without a length and never finished: we must stop reading past the
    // limit and answer at once, not wait for the timeout.
    let (addr, _seen) = server(Behaviour::EndlessChunks(MAX_REPLY_BYTES * 2)).await;
    let start = Instant::now();
    let err = client(addr).connections().await.unwrap_err();
    assert!(matches!(err, AdminError::TooLarge { .. }), "{err:?}");
    assert!(start.elapsed() < TIMEOUT, "took {:?}", start.elapsed());
}

#[tokio::test]
async fn bad_base_url_is_refused_not_a_panic() {
    let c = AdminClient::new("https://127.0.0.1:1".parse().unwrap(), TIMEOUT);
    let err = c.connections().await.unwrap_err();
    assert!(matches!(err, AdminError::BadUrl { .. }), "{err:?}");
    assert_eq!(err.result_label(), "refused");
}

#[tokio::test]
async fn against_the_real_echo_app() {
    let ip = common::pod_ip();
    let public = SocketAddr::new(ip, common::free_port(ip));
    let admin = SocketAddr::new(ip, common::free_port(ip));
    let _echo = common::Proc::spawn(
        "echo",
        Command::new(common::wsdrain_bin()).args([
            "echo",
            "--listen",
            &public.to_string(),
            "--admin",
            &admin.to_string(),
        ]),
    );
    common::wait_listening(admin, Duration::from_secs(10));
    let c = AdminClient::new(
        format!("http://{admin}").parse().unwrap(),
        Duration::from_secs(2),
    );
    assert_eq!(c.connections().await.unwrap(), 0);

    // Two real sessions.
    let url = format!("ws://{public}/");
    let (_a, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let (_b, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let mut open = 0;
    for _ in 0..100 {
        open = c.connections().await.unwrap();
        if open == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 2);
    let reply = c.drain(&request()).await.unwrap();
    assert_eq!(
        reply,
        DrainReply {
            closed: 2,
            remaining: 0
        }
    );

    // The app refuses a close code no client accepts: a 400 naming the field.
    let bad = DrainRequest {
        code: 1006,
        ..request()
    };
    let err = c.drain(&bad).await.unwrap_err();
    let AdminError::Status {
        status, excerpt, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 400);
    assert!(excerpt.contains("code"), "{excerpt}");
}
