//! Counting the pod's established TCP connections on the app ports: the drain's
//! `SessionCounter` when the agent is not in the data path.
//!
//! sock_diag (netlink) is the primary backend: the kernel filters by port and state and
//! it needs no privilege. `/proc/net/tcp{,6}` is the fallback when netlink is not
//! available (e.g. a seccomp profile that blocks it).

pub mod procfs;
pub mod sockdiag;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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

/// The drain's session counter over sockets: one snapshot at a time, the blocking
/// netlink or /proc read done off the async threads. Ids are sock_diag cookies or /proc
/// inodes (a new id is a new connection).
#[derive(Clone)]
pub struct SocketCounter {
    inner: Arc<Mutex<Counter>>,
}

impl SocketCounter {
    pub fn new(counter: Counter) -> Self {
        Self {
            inner: Arc::new(Mutex::new(counter)),
        }
    }
}

impl SessionCounter for SocketCounter {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let counted = tokio::task::spawn_blocking(move || {
                // A poisoned lock only means a panicked count; the counter itself is fine.
                let mut c = inner.lock().unwrap_or_else(|p| p.into_inner());
                c.snapshot()
            })
            .await;
            match counted {
                Ok(Ok(snap)) => Ok(snap),
                Ok(Err(e)) => Err(CountError(e.to_string())),
                Err(e) => Err(CountError(format!("counting task failed: {e}"))),
            }
        })
    }
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
