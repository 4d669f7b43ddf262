//! Which Kubernetes Event a drain notice becomes (reason, type, note).

use kube::runtime::events::{Event, EventType};

use super::termination::{secs, trigger_name, truncate};
use crate::drain::report::{Notice, Outcome};

/// `action` of every event: what the agent was doing to the pod.
pub const ACTION: &str = "Drain";
/// Reasons of the Events that end a drain; the webhook counts drains by them.
pub const DRAIN_COMPLETED: &str = "DrainCompleted";
pub const DRAIN_DEADLINE_EXCEEDED: &str = "DrainDeadlineExceeded";
/// Event notes are limited to 1 KiB by the API server.
const MAX_NOTE: usize = 1024;

/// The Event for a notice. Every notice maps to one.
pub fn event_for(notice: &Notice) -> Event {
    let (type_, reason, note) = match notice {
        Notice::Started {
            trigger,
            connections,
            budget_ms,
        } => (
            EventType::Normal,
            "DrainStarted",
            format!(
                "Drain started by {} with {connections} connections open; budget {}",
                trigger_name(*trigger),
                secs(*budget_ms)
            ),
        ),
        Notice::Finished(s) => match s.outcome {
            Outcome::Drained if s.vanished > 0 => (
                EventType::Warning,
                "ConnectionsVanished",
                format!(
                    "Connections reached zero in {}, but {} of {} vanished without a close (the app died or they were reset; their clients saw no close frame); {} sessions closed",
                    secs(s.duration_ms),
                    s.vanished,
                    s.connections_at_start,
                    s.sessions_closed
                ),
            ),
            Outcome::Drained => (
                EventType::Normal,
                DRAIN_COMPLETED,
                format!(
                    "Drained in {}: {} sessions closed, {} connections at start",
                    secs(s.duration_ms),
                    s.sessions_closed,
                    s.connections_at_start
                ),
            ),
            Outcome::DeadlineExceeded => (
                EventType::Warning,
                DRAIN_DEADLINE_EXCEEDED,
                format!(
                    "Deadline passed after {} with {} connections remaining ({} at start, {} sessions closed, {} vanished without a close)",
                    secs(s.duration_ms),
                    s.remaining,
                    s.connections_at_start,
                    s.sessions_closed,
                    s.vanished
                ),
            ),
        },
        Notice::AdminFailing { error } => (
            EventType::Warning,
            "AdminEndpointFailing",
            format!("App admin endpoint failing, waiting for clients to leave instead: {error}"),
        ),
    };
    Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, MAX_NOTE)),
        action: ACTION.into(),
        secondary: None,
    }
}
