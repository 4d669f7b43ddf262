//! The knobs of a drain, in the core's own terms. The agent builds them from its flags;
//! nothing here knows about flags, HTTP or Kubernetes.

use std::time::Duration;

/// The range the reconnect hint is chosen from, per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayRange {
    pub min: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Bound of the whole drain, from the trigger.
    pub drain_timeout: Duration,
    /// Time the app keeps between the end of the drain and SIGKILL: a known pod deletion
    /// time ends the drain this much earlier.
    pub app_reserve: Duration,
    pub settle_min: Duration,
    pub settle_quiet: Duration,
    pub settle_max: Duration,
    pub close_tick: Duration,
    pub close_window: Duration,
    /// Longest time between two counts.
    pub poll: Duration,
    pub reconnect_after: DelayRange,
}
