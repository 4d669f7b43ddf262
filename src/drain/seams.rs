//! How the drain talks to the world: a session closer and a session counter.
//!
//! The drain core calls these two traits and nothing else. Implementations live at the
//! edges: the admin API v1 client and the proxy close sessions; sock_diag (with /proc as
//! fallback) and the proxy's session table count them. The rebalancer is one more user
//! of a closer.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use thiserror::Error;

/// A boxed future, so the traits stay object-safe (`Arc<dyn SessionCloser>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Close up to `max` sessions with this close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub max: u64,
    pub code: u16,
    /// The reconnect hint, at most 123 bytes.
    pub reason: String,
}

/// What the closer did: sessions it closed now and sessions still open after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReply {
    pub closed: u64,
    pub remaining: u64,
}

/// A failed close call. `label` is a stable metrics label (`refused`, `timeout`,
/// `http_error`, `bad_body`, `too_large`, …); `message` is for the log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct CloseError {
    pub label: &'static str,
    pub message: String,
}

/// Closes sessions on request: the admin API v1 client, or the proxy itself.
pub trait SessionCloser: Send + Sync {
    /// Close up to `req.max` sessions; how many were closed and how many are left.
    fn close(&self, req: CloseRequest) -> BoxFuture<'_, Result<CloseReply, CloseError>>;
    /// The longest one call may take; the runner also bounds each call by the deadline.
    fn timeout(&self) -> Duration;
}

/// One id per live connection or session, sorted and unique: an id not seen in the
/// previous snapshot is a new arrival.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub ids: Vec<u64>,
}

/// A failed count; the drain keeps the last good one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct CountError(pub String);

/// Counts the pod's connections (sock_diag, /proc) or sessions (the proxy's table).
pub trait SessionCounter: Send + Sync {
    /// The live connections or sessions now.
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>>;

    /// Resolves when the count may have changed since this call was made; the runner
    /// then counts again at once instead of waiting for the next poll. Implementations
    /// must register interest *when called* (not when first polled), so that a change
    /// between the call and the first poll is not missed. Default: never (poll only).
    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
}

/// What the drain reports as it goes, for metrics. Every method has a no-op default;
/// the agent's metrics registry implements it.
pub trait Observer: Send + Sync {
    /// A count succeeded.
    fn counted(&self, _connections: u64) {}
    /// A count failed (the last good one is kept).
    fn count_failed(&self) {}
    /// The timeline is in `phase` now.
    fn phase(&self, _phase: super::machine::Phase) {}
    /// A close request for up to `max` sessions went out.
    fn close_requested(&self, _max: u64) {}
    /// A close request ended: `ok` or the error's label.
    fn close_result(&self, _label: &'static str) {}
    /// The drain ended.
    fn finished(&self, _summary: &super::report::Summary) {}
}

/// An observer that ignores everything (tests, tools).
pub struct NoObserver;

impl Observer for NoObserver {}
