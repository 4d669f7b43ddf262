//! The proxy's session table: every client connection and WebSocket session it carries.
//!
//! It is the drain's closer and counter in proxy mode. Counting is exact and
//! event-driven: an entry leaves the table when its task ends (a guard's `Drop`), and
//! every change bumps a generation that `changed()` waits on, so the drain sees the last
//! session go the moment it goes instead of at the next poll.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::drain::seams::{
    BoxFuture, CloseError, CloseReply, CloseRequest, CountError, SessionCloser, SessionCounter,
    Snapshot,
};

/// Asks one session to close: the code and reason go to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseOrder {
    pub code: u16,
    pub reason: String,
}

/// Close code sent to clients instead of 1000/1001: some clients (Phoenix LiveView, …)
/// stop reconnecting after those.
pub const RESTART_CODE: u16 = 1012;

enum Entry {
    /// A client connection speaking plain HTTP (keep-alive or a request in flight).
    Http,
    /// An upgraded WebSocket session; the sender is taken once it was asked to close.
    WebSocket(Option<oneshot::Sender<CloseOrder>>),
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<u64, Entry>,
    /// WebSocket sessions not yet asked to close.
    open_sessions: u64,
}

/// Shared by the accept loops, the connection tasks and the drain.
pub struct Table {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
    /// Bumped on every insert and removal.
    generation: watch::Sender<u64>,
    /// True from the first close request on: HTTP connections stop keeping alive.
    draining: watch::Sender<bool>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Inner::default()),
            generation: watch::Sender::new(0),
            draining: watch::Sender::new(false),
        }
    }
}

/// Removes its entry from the table when dropped (the connection or session ended).
pub struct Registration {
    table: Arc<Table>,
    pub id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.table.lock();
        if let Some(Entry::WebSocket(Some(_))) = inner.entries.remove(&self.id) {
            inner.open_sessions -= 1;
        }
        drop(inner);
        self.table.bump();
    }
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Entries stay consistent even if a holder panicked: keep going.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn insert(self: &Arc<Self>, entry: Entry) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        if matches!(entry, Entry::WebSocket(_)) {
            inner.open_sessions += 1;
        }
        inner.entries.insert(id, entry);
        drop(inner);
        self.bump();
        Registration {
            table: self.clone(),
            id,
        }
    }

    /// A new client connection (plain HTTP until it upgrades).
    pub fn open_http(self: &Arc<Self>) -> Registration {
        self.insert(Entry::Http)
    }

    /// A new WebSocket session and the receiver of its close order.
    pub fn open_session(self: &Arc<Self>) -> (Registration, oneshot::Receiver<CloseOrder>) {
        let (tx, rx) = oneshot::channel();
        (self.insert(Entry::WebSocket(Some(tx))), rx)
    }

    /// Connections and sessions in the table.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// WebSocket sessions not yet asked to close.
    pub fn open_sessions(&self) -> u64 {
        self.lock().open_sessions
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Fires when draining starts (for HTTP connections to stop keeping alive).
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Asks up to `max` sessions to close, oldest first; returns (asked, still open).
    /// Also starts draining HTTP keep-alives, like admin API v1's first /drain call.
    pub fn close(&self, max: u64, order: &CloseOrder) -> (u64, u64) {
        self.draining
            .send_if_modified(|d| !std::mem::replace(d, true));
        let mut inner = self.lock();
        let mut asked = 0;
        let mut open_sessions = inner.open_sessions;
        for entry in inner.entries.values_mut() {
            if asked == max {
                break;
            }
            if let Entry::WebSocket(slot) = entry
                && let Some(tx) = slot.take()
            {
                open_sessions -= 1;
                // A failed send means the session just ended on its own: not counted.
                if tx.send(order.clone()).is_ok() {
                    asked += 1;
                }
            }
        }
        inner.open_sessions = open_sessions;
        (asked, open_sessions)
    }

    fn snapshot_ids(&self) -> Vec<u64> {
        self.lock().entries.keys().copied().collect()
    }
}

/// The drain's closer in proxy mode. Asking is instant (the close sequences run in the
/// session tasks), so the call never blocks.
pub struct TableCloser(pub Arc<Table>);

impl SessionCloser for TableCloser {
    fn close(&self, req: CloseRequest) -> BoxFuture<'_, Result<CloseReply, CloseError>> {
        let code = if matches!(req.code, 1000 | 1001) {
            RESTART_CODE
        } else {
            req.code
        };
        let order = CloseOrder {
            code,
            reason: req.reason,
        };
        let (closed, remaining) = self.0.close(req.max, &order);
        Box::pin(async move { Ok(CloseReply { closed, remaining }) })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// The drain's counter in proxy mode: every connection and session in the table.
pub struct TableCounter(pub Arc<Table>);

impl SessionCounter for TableCounter {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
        let ids = self.0.snapshot_ids();
        Box::pin(async move { Ok(Snapshot { ids }) })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        // Subscribing marks the current generation as seen: interest starts now.
        let mut rx = self.0.generation.subscribe();
        Box::pin(async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// The proxy's table plus a socket counter for the ports it does not proxy. Table ids
/// get the top bit set so they never collide with socket cookies or inodes.
pub struct TableAndSockets {
    pub table: TableCounter,
    pub sockets: Arc<dyn SessionCounter>,
}

const TABLE_ID_TAG: u64 = 1 << 63;

impl SessionCounter for TableAndSockets {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
        Box::pin(async move {
            let mut ids = self.sockets.snapshot().await?.ids;
            ids.extend(
                self.table
                    .0
                    .snapshot_ids()
                    .into_iter()
                    .map(|id| id | TABLE_ID_TAG),
            );
            ids.sort_unstable();
            ids.dedup();
            Ok(Snapshot { ids })
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        // Sockets have no events: they are polled; the table wakes the drain.
        self.table.changed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> CloseOrder {
        CloseOrder {
            code: 1012,
            reason: "r".into(),
        }
    }

    #[tokio::test]
    async fn close_asks_oldest_sessions_first_and_counts_exactly() {
        let table = Arc::new(Table::default());
        let http = table.open_http();
        let (a, mut ra) = table.open_session();
        let (b, mut rb) = table.open_session();
        let (c, rc) = table.open_session();
        drop(rc); // ended on its own before the order came
        assert_eq!(table.open_sessions(), 3);
        assert!(!table.is_draining());

        assert_eq!(table.close(1, &order()), (1, 2));
        assert!(table.is_draining());
        assert_eq!(ra.try_recv().unwrap(), order());
        assert!(rb.try_recv().is_err());
        // c's receiver is gone: not counted as closed.
        assert_eq!(table.close(5, &order()), (1, 0));
        assert_eq!(rb.try_recv().unwrap(), order());

        let counter = TableCounter(table.clone());
        let ids = counter.snapshot().await.unwrap().ids;
        assert_eq!(ids, vec![http.id, a.id, b.id, c.id]);
        drop((http, a, b, c));
        assert!(counter.snapshot().await.unwrap().ids.is_empty());
    }

    #[tokio::test]
    async fn changed_fires_for_a_change_between_call_and_poll() {
        let table = Arc::new(Table::default());
        let counter = TableCounter(table.clone());
        let reg = table.open_http();
        let changed = counter.changed();
        drop(reg);
        tokio::time::timeout(Duration::from_secs(1), changed)
            .await
            .expect("change seen");
    }

    struct Fixed(Vec<u64>);
    impl SessionCounter for Fixed {
        fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
            let ids = self.0.clone();
            Box::pin(async move { Ok(Snapshot { ids }) })
        }
    }

    #[tokio::test]
    async fn table_and_sockets_count_both_without_id_clashes() {
        let table = Arc::new(Table::default());
        let reg = table.open_http();
        let both = TableAndSockets {
            table: TableCounter(table.clone()),
            sockets: Arc::new(Fixed(vec![reg.id, 77])),
        };
        let ids = both.snapshot().await.unwrap().ids;
        assert_eq!(ids.len(), 3, "{ids:?}");
        let changed = both.changed();
        drop(reg);
        tokio::time::timeout(Duration::from_secs(1), changed)
            .await
            .unwrap();
        assert_eq!(both.snapshot().await.unwrap().ids.len(), 2);
    }

    #[tokio::test]
    async fn closer_never_sends_1000_or_1001_to_clients() {
        let table = Arc::new(Table::default());
        let (_reg, mut rx) = table.open_session();
        let closer = TableCloser(table.clone());
        let reply = closer
            .close(CloseRequest {
                max: 1,
                code: 1001,
                reason: "x".into(),
            })
            .await
            .unwrap();
        assert_eq!(
            reply,
            CloseReply {
                closed: 1,
                remaining: 0
            }
        );
        assert_eq!(rx.try_recv().unwrap().code, RESTART_CODE);
    }
}
