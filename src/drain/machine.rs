//! The drain timeline as a pure state machine (docs/agent.md, "Timeline").
//!
//! No sockets, no sleeps: the caller feeds connection snapshots and admin answers with the
//! current `Instant`, and asks `next(now)` what to do. The async runner does the I/O.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::pacing;
use super::report::{Outcome, Summary, Trigger};
use crate::admin::DrainReply;
use crate::config::{AgentConfig, DurationRange};

/// The knobs of one drain, taken from `AgentConfig`.
#[derive(Debug, Clone)]
pub struct Timings {
    pub settle_min: Duration,
    pub settle_quiet: Duration,
    pub settle_max: Duration,
    pub close_tick: Duration,
    pub close_window: Duration,
    pub poll: Duration,
    pub reconnect_after: DurationRange,
    /// Whether an admin endpoint exists; without one the drain only waits.
    pub has_admin: bool,
}

impl Timings {
    pub fn from_config(cfg: &AgentConfig) -> Self {
        Self {
            settle_min: cfg.settle_min,
            settle_quiet: cfg.settle_quiet,
            settle_max: cfg.settle_max,
            close_tick: cfg.close_tick,
            close_window: cfg.close_window,
            poll: cfg.poll,
            reconnect_after: cfg.reconnect_after,
            has_admin: cfg.admin_url.is_some(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    Serving,
    Settling,
    Closing,
    Waiting,
    Drained,
    DeadlineExceeded,
}

impl Phase {
    /// The value of the `wsdrain_drain_state` gauge.
    pub fn gauge(self) -> i64 {
        self as i64
    }

    pub fn is_done(self) -> bool {
        matches!(self, Phase::Drained | Phase::DeadlineExceeded)
    }
}

/// What the runner should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Count connections again at `until` (or earlier, the runner may poll more often).
    Sleep { until: Instant },
    /// Ask the app to close up to `max` sessions with a hint of `after_ms`, then call
    /// `close_answered`. No other close is asked for until then.
    Close { max: u64, after_ms: u64 },
    /// The drain ended.
    Finished(Summary),
}

/// Longest pause between close attempts while the admin endpoint keeps failing.
const MAX_ADMIN_BACKOFF: Duration = Duration::from_secs(1);
/// Time kept after the close window for clients to finish the close handshake.
const MAX_TAIL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Closing {
    window_start: Instant,
    window_end: Instant,
    next_tick: Instant,
    batches: u64,
    /// Open sessions as the app last reported them (socket count before its first answer).
    estimate: u64,
    /// `max` of the close request in flight.
    asked: u64,
    in_flight: bool,
    failures_in_row: u32,
}

#[derive(Debug, Clone)]
pub struct Drain {
    t: Timings,
    trigger: Trigger,
    phase: Phase,
    started: Instant,
    deadline: Instant,
    /// Socket ids of the last snapshot: an id not in it is a new connection.
    seen: HashSet<u64>,
    last_new: Instant,
    /// `None` until the first successful count: unknown is never taken as zero.
    count: Option<u64>,
    connections_at_start: Option<u64>,
    settle_end: Option<Instant>,
    close_end: Option<Instant>,
    closing: Option<Closing>,
    closes_requested: u64,
    sessions_closed: u64,
    admin_failures: u64,
    summary: Option<Summary>,
}

/// A point-in-time view for /status and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: Phase,
    pub trigger: Trigger,
    pub connections: Option<u64>,
    pub connections_at_start: Option<u64>,
    /// Sessions the app reported open after its last close (None before the first answer).
    pub sessions: Option<u64>,
    pub elapsed_ms: u64,
    pub deadline_in_ms: u64,
    pub closes_requested: u64,
    pub sessions_closed: u64,
    pub admin_failures: u64,
    pub settle_ms: Option<u64>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Drain {
    /// Starts a drain at `now` (the pod is unready from here on). The first `observe` is
    /// the baseline: its sockets are the ones present at the start, not new arrivals.
    pub fn start(t: Timings, trigger: Trigger, now: Instant, deadline: Instant) -> Self {
        Self {
            t,
            trigger,
            phase: Phase::Settling,
            started: now,
            deadline: deadline.max(now),
            seen: HashSet::new(),
            last_new: now,
            count: None,
            connections_at_start: None,
            settle_end: None,
            close_end: None,
            closing: None,
            closes_requested: 0,
            sessions_closed: 0,
            admin_failures: 0,
            summary: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn summary(&self) -> Option<&Summary> {
        self.summary.as_ref()
    }

    /// Moves the deadline earlier (the pod's real deletion deadline became known).
    pub fn shorten_deadline(&mut self, deadline: Instant) {
        if deadline < self.deadline {
            self.deadline = deadline.max(self.started);
        }
    }

    /// Feeds a connection snapshot taken at `now`.
    pub fn observe(&mut self, now: Instant, ids: &[u64]) {
        let current: HashSet<u64> = ids.iter().copied().collect();
        let n = current.len() as u64;
        if self.count.is_none() {
            self.connections_at_start = Some(n);
        } else if current.iter().any(|id| !self.seen.contains(id)) {
            self.last_new = now;
        }
        self.count = Some(n);
        self.seen = current;
    }

    /// Feeds the app's answer to the last `Action::Close` (`None` = the call failed).
    pub fn close_answered(&mut self, now: Instant, reply: Option<DrainReply>) {
        let tick = self.t.close_tick;
        let Some(c) = self.closing.as_mut() else {
            return;
        };
        c.in_flight = false;
        match reply {
            Some(r) => {
                c.failures_in_row = 0;
                c.estimate = r.remaining;
                // The app's numbers are input: never trust more closes than asked for.
                self.sessions_closed = self.sessions_closed.saturating_add(r.closed.min(c.asked));
                if r.remaining == 0 && self.phase == Phase::Closing {
                    self.phase = Phase::Waiting;
                    self.close_end = Some(now);
                }
            }
            None => {
                self.admin_failures += 1;
                c.failures_in_row = c.failures_in_row.saturating_add(1);
                let backoff = tick
                    .saturating_mul(1u32 << c.failures_in_row.min(10))
                    .min(MAX_ADMIN_BACKOFF);
                c.next_tick = now + backoff;
            }
        }
    }

    /// Advances the timeline and says what to do at `now`.
    pub fn next(&mut self, now: Instant) -> Action {
        if let Some(s) = &self.summary {
            return Action::Finished(s.clone());
        }
        if self.phase == Phase::Settling {
            if !self.settled(now) {
                return self.sleep(now, Some(self.settle_wake(now)));
            }
            self.settle_end = Some(now);
            self.phase = if self.t.has_admin && self.count != Some(0) {
                self.closing = Some(self.plan_closing(now));
                Phase::Closing
            } else {
                Phase::Waiting
            };
        }
        if self.count == Some(0) && self.phase != Phase::Serving {
            return self.finish(now, Outcome::Drained);
        }
        if now >= self.deadline {
            return self.finish(now, Outcome::DeadlineExceeded);
        }
        if self.phase == Phase::Closing
            && let Some(action) = self.close_batch(now)
        {
            return action;
        }
        let tick = self
            .closing
            .as_ref()
            .filter(|c| self.phase == Phase::Closing && !c.in_flight)
            .map(|c| c.next_tick);
        self.sleep(now, tick)
    }

    /// Settling is over once no new connection came for `quiet`, after at least `min`
    /// and at most `max`; it never takes more than half the budget so closing keeps time.
    fn settled(&self, now: Instant) -> bool {
        let (min, max) = self.settle_bounds();
        let elapsed = now.saturating_duration_since(self.started);
        elapsed >= max
            || (elapsed >= min
                && now.saturating_duration_since(self.last_new) >= self.t.settle_quiet)
    }

    fn settle_bounds(&self) -> (Duration, Duration) {
        let half = self.deadline.saturating_duration_since(self.started) / 2;
        let max = self.t.settle_max.min(half);
        (self.t.settle_min.min(max), max)
    }

    fn settle_wake(&self, now: Instant) -> Instant {
        let (min, max) = self.settle_bounds();
        let quiet_at = (self.last_new + self.t.settle_quiet).max(self.started + min);
        quiet_at.min(self.started + max).max(now)
    }

    fn plan_closing(&self, now: Instant) -> Closing {
        let left = self.deadline.saturating_duration_since(now);
        let tail = (left / 4).min(MAX_TAIL);
        let window = self.t.close_window.min(left - tail).max(self.t.close_tick);
        Closing {
            window_start: now,
            window_end: now + window,
            next_tick: now,
            batches: 0,
            estimate: self.count.unwrap_or(1),
            asked: 0,
            in_flight: false,
            failures_in_row: 0,
        }
    }

    fn close_batch(&mut self, now: Instant) -> Option<Action> {
        let tick = self.t.close_tick;
        let range = self.t.reconnect_after;
        let c = self.closing.as_mut()?;
        if c.in_flight || now < c.next_tick {
            return None;
        }
        let max = pacing::batch_size(
            c.estimate,
            c.window_end.saturating_duration_since(now),
            tick,
        );
        let after = pacing::hint_delay(
            range,
            now.saturating_duration_since(c.window_start),
            c.window_end.saturating_duration_since(c.window_start),
        );
        c.batches += 1;
        c.in_flight = true;
        c.asked = max;
        c.next_tick = now + tick;
        self.closes_requested = self.closes_requested.saturating_add(max);
        Some(Action::Close {
            max,
            after_ms: ms(after),
        })
    }

    fn sleep(&self, now: Instant, extra: Option<Instant>) -> Action {
        let mut until = (now + self.t.poll).min(self.deadline);
        if let Some(at) = extra {
            until = until.min(at);
        }
        Action::Sleep {
            until: until.max(now),
        }
    }

    fn finish(&mut self, now: Instant, outcome: Outcome) -> Action {
        self.phase = match outcome {
            Outcome::Drained => Phase::Drained,
            Outcome::DeadlineExceeded => Phase::DeadlineExceeded,
        };
        let settle_end = self.settle_end.unwrap_or(now);
        let close_start = self.closing.as_ref().map(|_| settle_end);
        let close_end = self.close_end.unwrap_or(now);
        let summary = Summary {
            outcome,
            trigger: self.trigger,
            duration_ms: ms(now.saturating_duration_since(self.started)),
            budget_ms: ms(self.deadline.saturating_duration_since(self.started)),
            connections_at_start: self.connections_at_start.unwrap_or(0),
            remaining: self.count.unwrap_or(0),
            closes_requested: self.closes_requested,
            sessions_closed: self.sessions_closed,
            admin_failures: self.admin_failures,
            settle_ms: ms(settle_end.saturating_duration_since(self.started)),
            close_ms: close_start
                .map(|s| ms(close_end.saturating_duration_since(s)))
                .unwrap_or(0),
        };
        self.summary = Some(summary.clone());
        Action::Finished(summary)
    }

    pub fn status(&self, now: Instant) -> Status {
        Status {
            state: self.phase,
            trigger: self.trigger,
            connections: self.count,
            connections_at_start: self.connections_at_start,
            sessions: self
                .closing
                .as_ref()
                .filter(|c| c.batches > 0 && !c.in_flight)
                .map(|c| c.estimate),
            elapsed_ms: ms(now.saturating_duration_since(self.started)),
            deadline_in_ms: ms(self.deadline.saturating_duration_since(now)),
            closes_requested: self.closes_requested,
            sessions_closed: self.sessions_closed,
            admin_failures: self.admin_failures,
            settle_ms: self
                .settle_end
                .map(|e| ms(e.saturating_duration_since(self.started))),
        }
    }
}
