//! Counting the pod's established TCP connections on the app ports: the drain's
//! `SessionCounter` when the agent is not in the data path.
//!
//! sock_diag (netlink) is the primary backend: the kernel filters by port and state and
//! it needs no privilege. `/proc/net/tcp{,6}` is the fallback when netlink is not
//! available (e.g. a seccomp profile that blocks it).

pub mod destroyed;
pub mod procfs;
pub mod sockdiag;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use thiserror::Error;

pub use crate::drain::seams::Snapshot;
use crate::drain::seams::{BoxFuture, CountError, SessionCounter};

/// Which sockets count: local port in `ports`, and local address `address` when set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub address: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    SockDiag,
    Proc,
}

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("counting sockets: {0}")]
    Io(#[from] std::io::Error),
    #[error("counting sockets: bad sock_diag reply: {0}")]
    Netlink(String),
}

/// True when a socket's local address `local` is the filter address `want`. IPv4-mapped
/// IPv6 addresses (dual-stack sockets) equal their IPv4 form.
pub fn matches_address(local: IpAddr, want: IpAddr) -> bool {
    local.to_canonical() == want.to_canonical()
}

enum Inner {
    SockDiag(sockdiag::SockDiag),
    Proc,
}

/// sock_diag when the kernel allows it, else /proc/net/tcp{,6}.
pub struct Counter {
    filter: Filter,
    inner: Inner,
}

/// Least time between the starts of two counts that destroy notifications ask for. The
/// spacing is also at least twice the last count's own duration, so even a storm of
/// closes on a pod with 10k connections leaves the agent counting at most half the time,
/// while a lone close (or the last of a small burst) is counted within about a millisecond.
pub const MIN_RECOUNT: Duration = Duration::from_millis(1);
/// The spacing never grows past this, however slow a count was.
pub const MAX_RECOUNT: Duration = Duration::from_millis(50);

/// When the next notification-driven count may start, after one that started at `start`
/// and took `took`.
pub fn recount_at(start: tokio::time::Instant, took: Duration) -> tokio::time::Instant {
    start + (took * 2).clamp(MIN_RECOUNT, MAX_RECOUNT)
}

/// The drain's session counter over sockets: one snapshot at a time, the blocking
/// netlink or /proc read done off the async threads. Ids are sock_diag cookies or /proc
/// inodes (a new id is a new connection).
///
/// With destroy notifications (`event_driven`), `changed()` resolves when a socket on
/// the app ports was destroyed after the last snapshot began, so the drain counts again
/// at once instead of on its next poll.
#[derive(Clone)]
pub struct SocketCounter {
    inner: Arc<Mutex<Counter>>,
    /// Generation of destroy notifications; `None` = poll only.
    destroyed: Option<watch::Receiver<u64>>,
    /// The generation seen when the last snapshot began.
    counted: Arc<AtomicU64>,
    /// The earliest a notification may start the next count (`recount_at` the last one).
    next_recount: Arc<Mutex<tokio::time::Instant>>,
}

impl SocketCounter {
    /// Counts on the drain's poll only.
    pub fn new(counter: Counter) -> Self {
        Self {
            inner: Arc::new(Mutex::new(counter)),
            destroyed: None,
            counted: Arc::new(AtomicU64::new(0)),
            next_recount: Arc::new(Mutex::new(tokio::time::Instant::now())),
        }
    }

    /// Also counts when the kernel reports a destroyed socket on the app ports. Falls
    /// back to the poll (with a log line) when the subscription is refused. Needs a tokio
    /// runtime.
    pub fn event_driven(counter: Counter) -> Self {
        let filter = counter.filter().clone();
        let mut me = Self::new(counter);
        match destroyed::spawn(filter) {
            Ok(rx) => {
                tracing::info!("counting on socket destroy notifications, and on the poll");
                me.destroyed = Some(rx);
            }
            Err(e) => {
                tracing::info!(error = %e, "socket destroy notifications unavailable; counting on the poll only");
            }
        }
        me
    }

    /// Whether destroy notifications drive counts.
    pub fn is_event_driven(&self) -> bool {
        self.destroyed.is_some()
    }
}

impl SessionCounter for SocketCounter {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
        let inner = self.inner.clone();
        if let Some(rx) = &self.destroyed {
            // Notifications from here on may not be in this snapshot: they count as new.
            self.counted.store(*rx.borrow(), Ordering::SeqCst);
        }
        let started = tokio::time::Instant::now();
        *lock(&self.next_recount) = recount_at(started, Duration::ZERO);
        let next_recount = self.next_recount.clone();
        Box::pin(async move {
            let counted = tokio::task::spawn_blocking(move || {
                // A poisoned lock only means a panicked count; the counter itself is fine.
                let mut c = lock(&inner);
                c.snapshot()
            })
            .await;
            *lock(&next_recount) = recount_at(started, started.elapsed());
            match counted {
                Ok(Ok(snap)) => Ok(snap),
                Ok(Err(e)) => Err(CountError(e.to_string())),
                Err(e) => Err(CountError(format!("counting task failed: {e}"))),
            }
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        let Some(mut rx) = self.destroyed.clone() else {
            return Box::pin(std::future::pending());
        };
        let since = self.counted.load(Ordering::SeqCst);
        Box::pin(async move {
            if rx.wait_for(|g| *g != since).await.is_err() {
                // The watcher ended (its socket failed): the poll carries on alone.
                std::future::pending::<()>().await;
            }
            let earliest = *lock(&self.next_recount);
            tokio::time::sleep_until(earliest).await;
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Counter {
    /// Probes sock_diag once with a real snapshot; falls back to /proc if that fails.
    pub fn new(filter: Filter) -> Self {
        let probe = sockdiag::SockDiag::open().and_then(|mut s| s.snapshot(&filter).map(|_| s));
        let inner = match probe {
            Ok(s) => {
                tracing::info!(backend = "sock_diag", ports = ?filter.ports, address = ?filter.address, "counting connections");
                Inner::SockDiag(s)
            }
            Err(e) => {
                tracing::info!(backend = "proc", error = %e, ports = ?filter.ports, address = ?filter.address, "sock_diag unavailable, counting connections from /proc/net/tcp");
                Inner::Proc
            }
        };
        Self { filter, inner }
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::SockDiag(_) => Backend::SockDiag,
            Inner::Proc => Backend::Proc,
        }
    }

    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Current established sockets. If sock_diag fails, switches to /proc for good (one
    /// warning) — ids then change space once, so callers that track ids should treat a
    /// change of `backend()` as a reset.
    pub fn snapshot(&mut self) -> Result<Snapshot, ConnError> {
        if let Inner::SockDiag(s) = &mut self.inner {
            match s.snapshot(&self.filter) {
                Ok(snap) => return Ok(snap),
                Err(e) => {
                    tracing::warn!(error = %e, "sock_diag failed, falling back to /proc/net/tcp");
                    self.inner = Inner::Proc;
                }
            }
        }
        procfs::snapshot(&self.filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A socket on the app port destroyed after a snapshot wakes `changed()` without
    /// waiting for a poll; sockets on other ports do not.
    #[tokio::test]
    async fn destroy_notifications_wake_the_counter() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let app = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let other = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let port = app.local_addr().unwrap().port();
        let client = tokio::net::TcpStream::connect((ip, port)).await.unwrap();
        let (server, _) = app.accept().await.unwrap();
        let o_client = tokio::net::TcpStream::connect(other.local_addr().unwrap())
            .await
            .unwrap();
        let (o_server, _) = other.accept().await.unwrap();

        let filter = Filter {
            ports: vec![port],
            address: Some(ip),
        };
        let counter = SocketCounter::event_driven(Counter::new(filter));
        assert!(
            counter.is_event_driven(),
            "sock_diag destroy groups must be joinable unprivileged"
        );
        assert_eq!(counter.snapshot().await.unwrap().ids.len(), 1);

        // Another port's socket going away is not a change of our count.
        let changed = counter.changed();
        drop((o_client, o_server));
        let woke = tokio::time::timeout(Duration::from_millis(300), changed).await;
        assert!(woke.is_err(), "woken by a socket on another port");

        let changed = counter.changed();
        drop((client, server));
        tokio::time::timeout(Duration::from_secs(2), changed)
            .await
            .expect("no wake-up after the app socket was destroyed");
        assert_eq!(counter.snapshot().await.unwrap().ids.len(), 0);
    }

    #[test]
    fn recounts_are_spaced_by_twice_the_last_count_within_bounds() {
        let t = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(recount_at(t, Duration::from_micros(150)), t + MIN_RECOUNT);
        assert_eq!(recount_at(t, ms(8)), t + ms(16));
        assert_eq!(recount_at(t, Duration::from_secs(1)), t + MAX_RECOUNT);
    }

    /// Poll-only counters never wake on their own.
    #[tokio::test]
    async fn poll_only_counter_never_wakes() {
        let filter = Filter {
            ports: vec![1],
            address: None,
        };
        let counter = SocketCounter::new(Counter::new(filter));
        assert!(!counter.is_event_driven());
        let woke = tokio::time::timeout(Duration::from_millis(50), counter.changed()).await;
        assert!(woke.is_err());
    }
}
