//! The termination message: one line in `/dev/termination-log`, shown by
//! `kubectl describe pod` under the agent container's last state. Needs no RBAC.

use std::io::Write;
use std::path::Path;

use crate::drain::report::{Outcome, Summary, Trigger};

/// The kubelet keeps at most 4096 bytes per container.
pub const MAX_TERMINATION_MESSAGE: usize = 4096;

/// `12345` ms → `12.3s`.
pub(crate) fn secs(ms: u64) -> String {
    format!("{}.{}s", ms / 1000, ms % 1000 / 100)
}

pub(crate) fn trigger_name(t: Trigger) -> &'static str {
    match t {
        Trigger::Prestop => "preStop hook",
        Trigger::Api => "POST /drain",
        Trigger::Signal => "SIGTERM",
        Trigger::PodDeletion => "pod deletion",
    }
}

/// The one-line drain summary (no newline), at most `MAX_TERMINATION_MESSAGE - 1` bytes.
pub fn termination_message(s: &Summary) -> String {
    let head = match s.outcome {
        Outcome::Drained if s.vanished > 0 => format!(
            "wsdrain: connections gone in {} but {} vanished without a close (app died or reset)",
            secs(s.duration_ms),
            s.vanished
        ),
        Outcome::Drained => format!("wsdrain: drained in {}", secs(s.duration_ms)),
        Outcome::DeadlineExceeded => format!(
            "wsdrain: deadline exceeded after {} with {} connections remaining",
            secs(s.duration_ms),
            s.remaining
        ),
    };
    let line = format!(
        "{head} (budget {}, started by {}): {} connections at start, {} sessions closed of {} requested, {} admin failures, {} vanished, settle {}, close {}",
        secs(s.budget_ms),
        trigger_name(s.trigger),
        s.connections_at_start,
        s.sessions_closed,
        s.closes_requested,
        s.admin_failures,
        s.vanished,
        secs(s.settle_ms),
        secs(s.close_ms),
    );
    truncate(line, MAX_TERMINATION_MESSAGE - 1)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Replaces the file's content with the summary line. The kubelet creates and mounts the
/// file; the agent only overwrites an existing one, so outside Kubernetes (wrap under
/// systemd, a manual run as root) it never creates `/dev/termination-log`.
pub fn write_termination_message(path: &Path, summary: &Summary) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    let mut line = termination_message(summary);
    line.push('\n');
    f.write_all(line.as_bytes())?;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundary() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 5), "abc");
    }

    #[test]
    fn vanished_connections_are_not_a_clean_drain() {
        let s = Summary {
            outcome: Outcome::Drained,
            trigger: Trigger::Prestop,
            duration_ms: 4_000,
            budget_ms: 25_000,
            connections_at_start: 200,
            remaining: 0,
            closes_requested: 70,
            sessions_closed: 70,
            admin_failures: 3,
            vanished: 130,
            settle_ms: 2_000,
            close_ms: 2_000,
        };
        let line = termination_message(&s);
        assert!(line.contains("130 vanished without a close"), "{line}");
        assert!(!line.contains("drained in"), "{line}");
        let event = super::super::event_for(&crate::drain::Notice::Finished(s));
        assert_eq!(event.reason, "ConnectionsVanished");
        assert_eq!(event.type_, kube::runtime::events::EventType::Warning);
    }

    #[test]
    fn seconds_with_one_decimal() {
        assert_eq!(secs(12_345), "12.3s");
        assert_eq!(secs(0), "0.0s");
    }
}
