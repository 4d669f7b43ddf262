//! The Rust load client: N WebSocket clients through the ingress, each sending numbered
//! messages and checking the echoes, following the reconnect hint with its own jitter,
//! and writing one record per connection.
//!
//! Loss accounting (docs/lab.md): a message is lost when it was sent and never echoed.
//! After a clean close (a close frame arrived) the server has answered everything it
//! accepted, so the client sends its unanswered messages again on the next connection;
//! after a reset (no close frame: 1006) it cannot know, and they count as lost.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::ingress::POD_HEADER;

/// One WebSocket connection of one client, as the client saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnRecord {
    pub client: usize,
    /// Ingress slot that served it (the `x-lab-pod` response header).
    pub pod: Option<String>,
    pub opened_ms: u64,
    pub ended_ms: u64,
    /// Close code received; `None` when the connection ended without a close frame.
    pub code: Option<u16>,
    pub reason: String,
    /// `reconnect_after_ms` from a JSON close reason.
    pub hint_ms: Option<u64>,
    /// The client ended it (end of the run).
    pub by_client: bool,
    /// Time from the end of this client's previous connection to this one's open.
    pub reconnect_ms: Option<u64>,
    pub sent: u64,
    pub echoed: u64,
    /// Unanswered at the end and never to be answered.
    pub lost: u64,
    /// Unanswered at a clean close, sent again on the next connection.
    pub resent: u64,
    /// A client that does not answer close frames (the `deadline` scenario).
    pub ignores_close: bool,
}

impl ConnRecord {
    /// Ended by the server or network without a close frame (what a client sees as 1006).
    pub fn abnormal(&self) -> bool {
        !self.by_client && self.code.is_none()
    }
}

/// The reconnect delay a close reason asks for: `{"reconnect_after_ms": N}`.
pub fn parse_hint(reason: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(reason).ok()?;
    v.get("reconnect_after_ms")?.as_u64()
}

#[derive(Debug, Clone)]
pub struct ClientOpts {
    pub front: SocketAddr,
    pub interval: Duration,
    pub ignore_close: bool,
}

/// A set of running clients.
pub struct Load {
    epoch: Instant,
    stop: watch::Sender<bool>,
    connected: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<Vec<ConnRecord>>>,
    /// The first client's id; a second load in the same run numbers its clients apart.
    first_id: usize,
}

impl Load {
    pub fn new(epoch: Instant) -> Load {
        Load::numbered_from(epoch, 0)
    }

    pub fn numbered_from(epoch: Instant, first_id: usize) -> Load {
        Load {
            first_id,
            epoch,
            stop: watch::channel(false).0,
            connected: Arc::default(),
            tasks: Vec::new(),
        }
    }

    pub fn add(&mut self, n: usize, opts: &ClientOpts) {
        self.add_spaced(n, opts, Duration::ZERO);
    }

    /// Clients that arrive one by one, `every` apart, as new users keep coming.
    pub fn add_spaced(&mut self, n: usize, opts: &ClientOpts, every: Duration) {
        for i in 0..n {
            let id = self.first_id + self.tasks.len();
            let c = Client {
                id,
                start_after: every * i as u32,
                opts: opts.clone(),
                epoch: self.epoch,
                stop: self.stop.subscribe(),
                connected: self.connected.clone(),
            };
            self.tasks.push(tokio::spawn(c.run()));
        }
    }

    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits until `n` clients are connected at the same time; false after `limit`.
    pub async fn wait_connected(&self, n: usize, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.connected() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Stops every client (each closes with 1000 after collecting its last echoes).
    pub async fn stop(self) -> Vec<ConnRecord> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for t in self.tasks {
            if let Ok(Ok(mut recs)) = tokio::time::timeout(Duration::from_secs(10), t).await {
                all.append(&mut recs);
            }
        }
        all
    }
}

enum End {
    /// A close frame arrived.
    Clean,
    Abnormal,
    Stopped,
}

struct Client {
    id: usize,
    /// Delay before the first connect.
    start_after: Duration,
    opts: ClientOpts,
    epoch: Instant,
    stop: watch::Receiver<bool>,
    connected: Arc<AtomicUsize>,
}

fn jitter(max_ms: u64) -> Duration {
    Duration::from_millis(rand::random_range(0..=max_ms))
}

impl Client {
    fn ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn run(mut self) -> Vec<ConnRecord> {
        let mut records = Vec::new();
        let mut seq = 0u64;
        let mut resend: Vec<u64> = Vec::new();
        let mut down_since: Option<Instant> = None;
        let mut attempt = 0u32;
        let url = format!("ws://{}/", self.opts.front);
        tokio::select! {
            _ = tokio::time::sleep(self.start_after) => {}
            _ = self.stop.changed() => {}
        }
        while !*self.stop.borrow() {
            let mut rec = ConnRecord {
                client: self.id,
                ignores_close: self.opts.ignore_close,
                ..Default::default()
            };
            let end = if self.opts.ignore_close {
                self.ignoring_session(&mut rec, down_since).await
            } else {
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio_tungstenite::connect_async(url.as_str()),
                )
                .await
                {
                    Ok(Ok((ws, resp))) => {
                        rec.pod = pod_of(&resp);
                        rec.opened_ms = self.ms();
                        rec.reconnect_ms = down_since.map(|d| d.elapsed().as_millis() as u64);
                        Some(self.session(ws, &mut rec, &mut seq, &mut resend).await)
                    }
                    _ => None,
                }
            };
            let delay = match end {
                None => {
                    // Connect failed: back off exponentially (capped), with jitter.
                    attempt += 1;
                    let base = 100u64 << attempt.min(4);
                    Duration::from_millis(base) + jitter(100)
                }
                Some(end) => {
                    attempt = 0;
                    // Sessions note the moment the close frame arrived; the rest end now.
                    if rec.ended_ms == 0 {
                        rec.ended_ms = self.ms();
                    }
                    down_since = Some(Instant::now());
                    let hint = rec.hint_ms;
                    records.push(rec);
                    match (end, hint) {
                        (End::Stopped, _) => break,
                        (End::Clean, Some(ms)) => Duration::from_millis(ms) + jitter(100),
                        (End::Clean, None) => jitter(1000),
                        (End::Abnormal, _) => Duration::from_millis(100) + jitter(100),
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.changed() => {}
            }
        }
        // A client between connections still owes what a clean close left unanswered.
        if !resend.is_empty() && !self.opts.ignore_close {
            records.extend(self.deliver_resends(&url, &mut resend, down_since).await);
        }
        // What could not be delivered even then was never answered.
        if let Some(last) = records.last_mut() {
            last.lost += resend.len() as u64;
        }
        records
    }

    async fn session<S>(
        &mut self,
        mut ws: tokio_tungstenite::WebSocketStream<S>,
        rec: &mut ConnRecord,
        seq: &mut u64,
        resend: &mut Vec<u64>,
    ) -> End
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.connected.fetch_add(1, Ordering::Relaxed);
        let mut outstanding = BTreeSet::new();
        let first = jitter(self.opts.interval.as_millis() as u64);
        let mut tick =
            tokio::time::interval_at((Instant::now() + first).into(), self.opts.interval);
        let end = loop {
            tokio::select! {
                _ = tick.tick() => {
                    let s = resend.pop().unwrap_or_else(|| { *seq += 1; *seq });
                    if ws.send(Message::text(format!("{}:{s}", self.id))).await.is_err() {
                        outstanding.insert(s);
                        break End::Abnormal;
                    }
                    outstanding.insert(s);
                    rec.sent += 1;
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(s) = parse_seq(&t) && outstanding.remove(&s) {
                            rec.echoed += 1;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        rec.ended_ms = self.ms();
                        if let Some(f) = frame {
                            rec.code = Some(u16::from(f.code));
                            rec.reason = f.reason.to_string();
                            rec.hint_ms = parse_hint(&rec.reason);
                        } else {
                            rec.code = Some(1005);
                        }
                        // Let the library answer the close, briefly.
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            while ws.next().await.is_some() {}
                        }).await;
                        break End::Clean;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break End::Abnormal,
                },
                _ = self.stop.changed() => {
                    self.wind_up(&mut ws, rec, &mut outstanding, resend).await;
                    break End::Stopped;
                }
            }
        };
        self.connected.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Clean => {
                rec.resent = outstanding.len() as u64;
                resend.extend(outstanding.iter().rev());
            }
            End::Abnormal | End::Stopped => rec.lost = outstanding.len() as u64,
        }
        end
    }

    /// The end of the run on an open connection: sends what waits for a resend, collects
    /// the last echoes (bounded), then closes with 1000. Only messages the service never
    /// answers stay in `outstanding`.
    async fn wind_up<S>(
        &self,
        ws: &mut tokio_tungstenite::WebSocketStream<S>,
        rec: &mut ConnRecord,
        outstanding: &mut BTreeSet<u64>,
        resend: &mut Vec<u64>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        while let Some(s) = resend.pop() {
            if ws
                .send(Message::text(format!("{}:{s}", self.id)))
                .await
                .is_err()
            {
                resend.push(s);
                break;
            }
            outstanding.insert(s);
            rec.sent += 1;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while !outstanding.is_empty() {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(s) = parse_seq(&t)
                            && outstanding.remove(&s)
                        {
                            rec.echoed += 1;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
        })
        .await;
        let close = ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        rec.by_client = true;
    }

    /// The run ended while this client waited to reconnect after a clean close: it
    /// connects once more to deliver the messages that close left unanswered, so the run's
    /// end is not mistaken for a loss. `None` when it cannot connect.
    async fn deliver_resends(
        &mut self,
        url: &str,
        resend: &mut Vec<u64>,
        down_since: Option<Instant>,
    ) -> Option<ConnRecord> {
        let connect = tokio_tungstenite::connect_async(url);
        let (mut ws, resp) = tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .ok()?
            .ok()?;
        let mut rec = ConnRecord {
            client: self.id,
            pod: pod_of(&resp),
            opened_ms: self.ms(),
            reconnect_ms: down_since.map(|d| d.elapsed().as_millis() as u64),
            ..Default::default()
        };
        let mut outstanding = BTreeSet::new();
        self.wind_up(&mut ws, &mut rec, &mut outstanding, resend)
            .await;
        rec.ended_ms = self.ms();
        rec.lost = outstanding.len() as u64;
        Some(rec)
    }

    /// A client that opens a WebSocket and then never answers anything, not even a
    /// close frame; it leaves only when the server drops the TCP connection.
    async fn ignoring_session(
        &mut self,
        rec: &mut ConnRecord,
        down_since: Option<Instant>,
    ) -> Option<End> {
        let addr = self.opts.front;
        let connect = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let req = format!(
                "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                if s.read(&mut byte).await? == 0 {
                    return Err(std::io::Error::other("closed during handshake"));
                }
                head.push(byte[0]);
            }
            Ok::<_, std::io::Error>((s, String::from_utf8_lossy(&head).into_owned()))
        };
        let (mut s, head) = match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok((s, head))) if head.starts_with("HTTP/1.1 101") => (s, head),
            _ => return None,
        };
        rec.pod = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(POD_HEADER)
                .then(|| v.trim().to_owned())
        });
        rec.opened_ms = self.ms();
        rec.reconnect_ms = down_since.map(|d| d.elapsed().as_millis() as u64);
        self.connected.fetch_add(1, Ordering::Relaxed);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            tokio::select! {
                n = s.read(&mut chunk) => match n {
                    Ok(0) | Err(_) => break End::Clean,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some((code, reason)) = find_close(&buf) {
                            rec.code = Some(code);
                            rec.reason = reason;
                            rec.hint_ms = parse_hint(&rec.reason);
                        }
                        if buf.len() > 65536 { buf.clear(); }
                    }
                },
                _ = self.stop.changed() => { rec.by_client = true; break End::Stopped; }
            }
        };
        self.connected.fetch_sub(1, Ordering::Relaxed);
        Some(end)
    }
}

/// The ingress slot that served a WebSocket handshake (the `x-lab-pod` header).
fn pod_of<B>(resp: &http::Response<B>) -> Option<String> {
    resp.headers()
        .get(POD_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn parse_seq(text: &str) -> Option<u64> {
    text.rsplit_once(':')?.1.parse().ok()
}

/// Finds a close frame among unmasked server frames in `buf`: (code, reason).
fn find_close(buf: &[u8]) -> Option<(u16, String)> {
    let mut i = 0;
    while i + 2 <= buf.len() {
        let opcode = buf[i] & 0x0f;
        let (len, header) = match buf[i + 1] & 0x7f {
            126 => (
                u16::from_be_bytes([*buf.get(i + 2)?, *buf.get(i + 3)?]) as usize,
                4,
            ),
            127 => return None,
            n => (n as usize, 2),
        };
        let payload = buf.get(i + header..i + header + len)?;
        if opcode == 0x8 {
            let code = match payload {
                [a, b, ..] => u16::from_be_bytes([*a, *b]),
                _ => 1005,
            };
            let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
            return Some((code, reason));
        }
        i += header + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_is_read_from_json_reason() {
        assert_eq!(parse_hint(r#"{"reconnect_after_ms":1200}"#), Some(1200));
        assert_eq!(parse_hint("going away"), None);
        assert_eq!(parse_hint(r#"{"other":1}"#), None);
    }

    #[test]
    fn finds_close_frame_after_data() {
        let mut buf = vec![0x81, 3, b'a', b'b', b'c'];
        let reason = br#"{"reconnect_after_ms":5}"#;
        buf.push(0x88);
        buf.push((2 + reason.len()) as u8);
        buf.extend_from_slice(&1012u16.to_be_bytes());
        buf.extend_from_slice(reason);
        let (code, r) = find_close(&buf).unwrap();
        assert_eq!(code, 1012);
        assert_eq!(parse_hint(&r), Some(5));
        assert_eq!(find_close(&buf[..6]), None);
    }

    #[test]
    fn abnormal_means_no_close_frame_and_not_ours() {
        let mut r = ConnRecord::default();
        assert!(r.abnormal());
        r.code = Some(1012);
        assert!(!r.abnormal());
        r.code = None;
        r.by_client = true;
        assert!(!r.abnormal());
    }

    /// A server whose first connection swallows one message and closes with a long
    /// reconnect hint; `second` says whether it accepts again, echoing everything.
    async fn close_once_then(second: bool) -> (SocketAddr, tokio::sync::oneshot::Receiver<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            // Swallow the first message, as a server closing mid-flight does.
            let _ = ws.next().await;
            let reason = r#"{"reconnect_after_ms":60000}"#;
            let close = CloseFrame {
                code: CloseCode::Restart,
                reason: reason.into(),
            };
            ws.close(Some(close)).await.unwrap();
            while ws.next().await.is_some() {}
            let _ = closed.send(());
            if !second {
                return;
            }
            let (s, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() && ws.send(m).await.is_err() {
                    break;
                }
            }
        });
        (addr, closed_rx)
    }

    async fn stop_while_waiting_to_resend(second: bool) -> Vec<ConnRecord> {
        let (front, closed) = close_once_then(second).await;
        let mut load = Load::new(Instant::now());
        let opts = ClientOpts {
            front,
            interval: Duration::from_millis(20),
            ignore_close: false,
        };
        load.add(1, &opts);
        closed.await.unwrap();
        // The client now waits 60 s to reconnect; the run ends first.
        load.stop().await
    }

    #[tokio::test]
    async fn the_end_of_the_run_delivers_what_waits_for_a_resend() {
        let records = stop_while_waiting_to_resend(true).await;
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0].code, Some(1012));
        assert_eq!(records[0].resent, 1, "{records:?}");
        assert!(
            records[1].by_client && records[1].echoed == 1,
            "{records:?}"
        );
        assert_eq!(
            records.iter().map(|r| r.lost).sum::<u64>(),
            0,
            "{records:?}"
        );
    }

    #[tokio::test]
    async fn what_cannot_be_delivered_at_the_end_is_lost() {
        let records = stop_while_waiting_to_resend(false).await;
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].resent, 1);
        assert_eq!(records[0].lost, 1, "{records:?}");
    }
}
