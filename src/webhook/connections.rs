//! The connection table: at most `cap` connections at once. When it is full, a new
//! connection evicts the one that has been quiet longest (in a TLS handshake, between
//! requests, or sending a request slowly), so idle or stalled clients can never lock the
//! API server out: the newest caller is always served.
//!
//! Pure bookkeeping with the time passed in; the server owns the sockets and closes a
//! connection when its eviction token fires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Entry {
    /// Last sign of progress: accepted, handshake done, request started, response ready.
    active_at: Instant,
    evict: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    cap: usize,
    next_id: u64,
    entries: HashMap<u64, Entry>,
}

/// Shared by the accept loop and every connection task.
#[derive(Debug, Clone)]
pub struct Connections {
    inner: Arc<Mutex<Inner>>,
}

/// One admitted connection. Dropping it frees its place in the table.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    evict: CancellationToken,
    table: Connections,
}

impl Connections {
    pub fn new(cap: usize) -> Connections {
        Connections {
            inner: Arc::new(Mutex::new(Inner {
                cap: cap.max(1),
                next_id: 0,
                entries: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The table stays consistent between statements; a panic elsewhere cannot tear it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection. When the table is full, the quietest connection's token is
    /// cancelled and it leaves the table at once (its task closes the socket); returns
    /// whether one was evicted.
    pub fn admit(&self, now: Instant) -> (Slot, bool) {
        let mut inner = self.lock();
        let mut evicted = false;
        while inner.entries.len() >= inner.cap {
            let Some(quietest) = inner
                .entries
                .iter()
                .min_by_key(|(id, e)| (e.active_at, **id))
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some(entry) = inner.entries.remove(&quietest) {
                entry.evict.cancel();
                evicted = true;
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let evict = CancellationToken::new();
        inner.entries.insert(
            id,
            Entry {
                active_at: now,
                evict: evict.clone(),
            },
        );
        drop(inner);
        let slot = Slot {
            id,
            evict,
            table: self.clone(),
        };
        (slot, evicted)
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Slot {
    /// Records progress, which moves this connection to the back of the eviction line.
    pub fn touch(&self, now: Instant) {
        if let Some(entry) = self.table.lock().entries.get_mut(&self.id) {
            entry.active_at = now;
        }
    }

    /// Fires when a newer connection needed this one's place.
    pub fn evicted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.evict.cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().entries.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn full_table_evicts_the_quietest_and_admits_the_newcomer() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let table = Connections::new(3);
        let (a, ea) = table.admit(at(0));
        let (b, _) = table.admit(at(1));
        let (c, _) = table.admit(at(2));
        assert!(!ea);
        assert_eq!(table.len(), 3);

        // `a` made progress after `b`: `b` is now the quietest.
        a.touch(at(10));
        let (d, evicted) = table.admit(at(11));
        assert!(evicted);
        assert!(b.evict.is_cancelled(), "quietest goes");
        assert!(!a.evict.is_cancelled() && !c.evict.is_cancelled());
        assert_eq!(table.len(), 3);

        // An evicted slot dropping later does not free someone else's place.
        drop(b);
        assert_eq!(table.len(), 3);
        let (_e, evicted) = table.admit(at(12));
        assert!(evicted);
        assert!(c.evict.is_cancelled());
        assert!(!d.evict.is_cancelled());
    }

    #[test]
    fn dropping_a_slot_frees_its_place() {
        let now = Instant::now();
        let table = Connections::new(2);
        let (a, _) = table.admit(now);
        let (_b, _) = table.admit(now);
        drop(a);
        assert_eq!(table.len(), 1);
        let (_c, evicted) = table.admit(now);
        assert!(!evicted);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn same_instant_evicts_the_oldest_admitted() {
        let now = Instant::now();
        let table = Connections::new(2);
        let (a, _) = table.admit(now);
        let (b, _) = table.admit(now);
        let (_c, _) = table.admit(now);
        assert!(a.evict.is_cancelled());
        assert!(!b.evict.is_cancelled());
    }
}
