//! Socket and response helpers shared by the three servers (agent API, echo app,
//! webhook): answers, a bounded accept, and a capped connection table.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, UPGRADE};
use hyper::{Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};

pub type Reply = Response<Full<Bytes>>;

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The comma-separated tokens of every `name` header, trimmed (`Connection: keep-alive,
/// Upgrade` gives `keep-alive` and `Upgrade`).
pub fn header_tokens<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// `Connection: upgrade` and `Upgrade: websocket`, in any case and among other tokens.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has =
        |name, token: &str| header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token));
    has(&CONNECTION, "upgrade") && has(&UPGRADE, "websocket")
}

/// Pause after the first failed accept; doubled per failure in a row up to `MAX_ACCEPT_PAUSE`.
const MIN_ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// The next connection. Accept errors (usually EMFILE: out of file descriptors) back off
/// exponentially up to 1 s instead of spinning, and are logged once per episode; the
/// server lives on.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    accept_with(listener, None).await
}

/// Like `accept`, for a server with a connection table: when the process is out of file
/// descriptors (EMFILE/ENFILE), the oldest idle connection is closed so that the next
/// accept can succeed, instead of waiting for an idle connection to time out while
/// probes queue behind it.
pub async fn accept_or_evict(listener: &TcpListener, slots: &Slots) -> (TcpStream, SocketAddr) {
    accept_with(listener, Some(slots)).await
}

async fn accept_with(listener: &TcpListener, slots: Option<&Slots>) -> (TcpStream, SocketAddr) {
    let mut pause = MIN_ACCEPT_PAUSE;
    let mut failures = 0u64;
    loop {
        match listener.accept().await {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(failures, "accept works again");
                }
                return conn;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, "accept failed; backing off until it works again");
                }
                failures += 1;
                let out_of_fds = matches!(
                    e.raw_os_error(),
                    Some(code) if code == nix::errno::Errno::EMFILE as i32
                        || code == nix::errno::Errno::ENFILE as i32
                );
                if out_of_fds && slots.is_some_and(Slots::evict_oldest_idle) {
                    // The evicted connection's task closes its socket when it next runs.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_ACCEPT_PAUSE);
            }
        }
    }
}

/// A capped table of a server's open connections. At the cap, a new connection takes
/// the place of the oldest *idle* one (no request being handled: waiting for its first
/// request or between keep-alive requests), which is closed. Connections with a request
/// in flight (a waiting preStop hook) are never closed; if every slot is busy the new
/// connection is shed at once. A flood of idle connections can thus hold at most `cap`
/// connections (bounded memory and file descriptors), and a fresh probe or hook always
/// gets in.
pub struct Slots {
    cap: usize,
    table: Mutex<Table>,
    /// Shared with the metrics registry when the server exports them.
    evicted: Counter,
    shed: Counter,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// By age: the smallest id is the oldest connection.
    live: BTreeMap<u64, Entry>,
}

struct Entry {
    in_flight: u32,
    close: CancellationToken,
}

/// One admitted connection; frees its slot when dropped.
pub struct Slot {
    id: u64,
    slots: Arc<Slots>,
    close: CancellationToken,
}

/// Marks a request in flight on a slot until dropped.
pub struct Busy {
    id: u64,
    slots: Arc<Slots>,
}

impl Slots {
    pub fn new(cap: usize) -> Arc<Slots> {
        Slots::counted(cap, Counter::default(), Counter::default())
    }

    /// A table that counts its evictions and sheddings into these (exported) counters.
    pub fn counted(cap: usize, evicted: Counter, shed: Counter) -> Arc<Slots> {
        Arc::new(Slots {
            cap: cap.max(1),
            table: Mutex::new(Table::default()),
            evicted,
            shed,
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the oldest connection without a request in flight; false if there is none.
    pub fn evict_oldest_idle(&self) -> bool {
        Self::evict(&mut self.table(), &self.evicted)
    }

    fn evict(t: &mut Table, evicted: &Counter) -> bool {
        let oldest_idle = t
            .live
            .iter()
            .find(|(_, e)| e.in_flight == 0)
            .map(|(id, _)| *id);
        match oldest_idle.and_then(|id| t.live.remove(&id)) {
            Some(victim) => {
                victim.close.cancel();
                evicted.inc();
                true
            }
            None => false,
        }
    }

    /// A slot for a new connection, closing the oldest idle one at the cap; `None` when
    /// every slot has a request in flight (shed the new connection).
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut t = self.table();
        if t.live.len() >= self.cap && !Self::evict(&mut t, &self.evicted) {
            self.shed.inc();
            return None;
        }
        let id = t.next_id;
        t.next_id += 1;
        let close = CancellationToken::new();
        t.live.insert(
            id,
            Entry {
                in_flight: 0,
                close: close.clone(),
            },
        );
        Some(Slot {
            id,
            slots: self.clone(),
            close,
        })
    }

    /// Open connections.
    pub fn live(&self) -> usize {
        self.table().live.len()
    }

    /// Idle connections closed to make room, so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.get()
    }

    /// New connections refused because every slot was busy, so far.
    pub fn shed(&self) -> u64 {
        self.shed.get()
    }
}

impl Slot {
    /// Resolves when the table closed this connection to make room.
    pub async fn closed(&self) {
        self.close.cancelled().await
    }

    /// Marks a request in flight until the guard drops.
    pub fn busy(&self) -> Busy {
        if let Some(e) = self.slots.table().live.get_mut(&self.id) {
            e.in_flight += 1;
        }
        Busy {
            id: self.id,
            slots: self.slots.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().live.remove(&self.id);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = self.slots.table().live.get_mut(&self.id) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let slots = Slots::new(3);
        let a = slots.admit().unwrap();
        let b = slots.admit().unwrap();
        let c = slots.admit().unwrap();
        let _hook = a.busy();
        // a has a request in flight, so b (the oldest idle) goes.
        let d = slots.admit().unwrap();
        assert!(b.close.is_cancelled());
        assert!(!a.close.is_cancelled());
        assert_eq!((slots.live(), slots.evicted()), (3, 1));
        drop(b);
        assert_eq!(slots.live(), 3, "an evicted slot is already gone");
        drop((c, d));
        assert_eq!(slots.live(), 1);
    }

    #[test]
    fn all_busy_sheds_the_new_connection() {
        let slots = Slots::new(2);
        let a = slots.admit().unwrap();
        let b = slots.admit().unwrap();
        let (_ba, bb) = (a.busy(), b.busy());
        assert!(slots.admit().is_none());
        assert_eq!(slots.shed(), 1);
        drop(bb);
        let _c = slots.admit().unwrap();
        assert!(b.close.is_cancelled());
    }

    #[test]
    fn a_flood_never_holds_more_than_the_cap() {
        let slots = Slots::new(64);
        let mut open = Vec::new();
        for _ in 0..2000 {
            open.push(slots.admit().unwrap());
            open.retain(|s| !s.close.is_cancelled());
            assert!(slots.live() <= 64);
        }
        assert_eq!(open.len(), 64);
        assert_eq!(slots.evicted(), 2000 - 64);
    }
}
