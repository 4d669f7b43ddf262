//! Counting the pod's established TCP connections on the app ports (stub: helper fills in).

use std::net::IpAddr;

use thiserror::Error;

/// Which sockets count: local port in `ports`, and local address `address` when set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub address: Option<IpAddr>,
}

/// One id per established socket (sock_diag cookie, or /proc inode): a new id is a new connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub ids: Vec<u64>,
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
}

/// sock_diag when the kernel allows it, else /proc/net/tcp{,6}.
pub struct Counter {
    filter: Filter,
}

impl Counter {
    pub fn new(filter: Filter) -> Self {
        Self { filter }
    }

    pub fn backend(&self) -> Backend {
        Backend::Proc
    }

    pub fn snapshot(&mut self) -> Result<Snapshot, ConnError> {
        let _ = &self.filter;
        Ok(Snapshot::default())
    }
}
