//! What a drain tells the outside world: its outcome, and notices along the way
//! (consumed by logs, metrics, Kubernetes Events and the termination message).

use serde::Serialize;

/// What started the drain. Later triggers join the running drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `GET|POST /prestop` (the kubelet's httpGet hook or `wsdrain prestop`).
    Prestop,
    /// `POST /drain` (maintenance).
    Api,
    /// SIGTERM/SIGINT to the agent (or to `wsdrain wrap`).
    Signal,
    /// The own pod got a deletionTimestamp (Kubernetes API watch).
    PodDeletion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// The connection count reached zero.
    Drained,
    /// The deadline passed with connections still open.
    DeadlineExceeded,
}

/// The drain's end, as answered to hooks and shown in /status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub outcome: Outcome,
    pub trigger: Trigger,
    /// Time from the trigger to the end.
    pub duration_ms: u64,
    /// The drain budget it had (trigger to deadline).
    pub budget_ms: u64,
    pub connections_at_start: u64,
    /// Connections still open at the end (0 when Drained).
    pub remaining: u64,
    /// Sum of `max` over all close requests sent to the app.
    pub closes_requested: u64,
    /// Sum of `closed` the app reported.
    pub sessions_closed: u64,
    pub admin_failures: u64,
    /// Connections that went away without a close requested for them, or while the
    /// closer was failing: an app that died, resets, clients leaving on their own.
    /// Their clients most likely saw 1006, not the close code.
    pub vanished: u64,
    pub settle_ms: u64,
    pub close_ms: u64,
}

/// Things worth telling operators while a drain runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    Started {
        trigger: Trigger,
        connections: u64,
        budget_ms: u64,
    },
    /// First failure of the admin endpoint in this drain (later ones are only counted).
    AdminFailing {
        error: String,
    },
    Finished(Summary),
}
