//! The drain timeline as a pure state machine (docs/agent.md, "Timeline").
//!
//! No sockets, no sleeps: the caller feeds events (a trigger, a connection snapshot, a
//! close answer, the pod's deletion time, a fleet close rate) with the current `Instant`,
//! and asks `next(now)` what to do. The async runner does the I/O. Every source of a
//! deadline is an event here, and this machine alone decides the deadline.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::pacing;
use super::report::{Outcome, Summary, Trigger};
use super::seams::CloseReply;
use super::settings::Settings;

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
    pub const ALL: [Phase; 6] = [
        Phase::Serving,
        Phase::Settling,
        Phase::Closing,
        Phase::Waiting,
        Phase::Drained,
        Phase::DeadlineExceeded,
    ];

    /// The value of the `wsdrain_drain_state` gauge.
    pub fn gauge(self) -> i64 {
        self as i64
    }

    /// The `phase` label of the `wsdrain_drain_phase` state set.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Settling => "settling",
            Phase::Closing => "closing",
            Phase::Waiting => "waiting",
            Phase::Drained => "drained",
            Phase::DeadlineExceeded => "deadline_exceeded",
        }
    }

    pub fn is_done(self) -> bool {
        matches!(self, Phase::Drained | Phase::DeadlineExceeded)
    }
}

/// Which input set the deadline in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineSource {
    /// Trigger + drain timeout.
    Timeout,
    /// The pod's deletion time (SIGKILL) minus the app reserve.
    PodDeletion,
}

/// What the runner should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Count again at `until`, or earlier when the counter says the count changed.
    Sleep { until: Instant },
    /// Close up to `max` sessions with a hint of `after_ms`, then call `close_answered`.
    /// No other close is asked for until then.
    Close { max: u64, after_ms: u64 },
    /// The drain ended (or none is running: `Idle`).
    Finished(Summary),
    /// Serving: nothing to do until a trigger.
    Idle,
}

/// Longest pause between close attempts while the closer keeps failing.
const MAX_CLOSE_BACKOFF: Duration = Duration::from_secs(1);
/// Time kept after the close window for clients to finish the close handshake.
const MAX_TAIL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Closing {
    window_start: Instant,
    /// End of the configured window (before any stretching by a close rate).
    nominal_end: Instant,
    window_end: Instant,
    next_tick: Instant,
    batches: u64,
    /// Open sessions as the closer last reported them (socket count before its first answer).
    estimate: u64,
    /// `max` of the close request in flight.
    asked: u64,
    in_flight: bool,
    failures_in_row: u32,
    /// The close rate in force, unless the deadline overrides it.
    rate: Option<f64>,
    /// The window the hint grows over, fixed at the first batch: re-fitting the window
    /// later (a close rate, a node too busy to keep the tick) must not make the hint
    /// fall back or jump, which would bunch the reconnects.
    hint_window: Option<Duration>,
}

/// One drain, from its trigger on.
#[derive(Debug, Clone)]
struct Run {
    trigger: Trigger,
    started: Instant,
    deadline: Instant,
    deadline_source: DeadlineSource,
    connections_at_start: Option<u64>,
    settle_end: Option<Instant>,
    close_end: Option<Instant>,
    closing: Option<Closing>,
    closes_requested: u64,
    sessions_closed: u64,
    close_failures: u64,
    rate_yielded: bool,
    /// Closes requested that no departure has used up yet (see `observe`).
    close_credit: u64,
    /// Connections that went away without a close requested for them.
    vanished: u64,
    summary: Option<Summary>,
}

/// The agent's whole life as one timeline: Serving until a trigger, then one drain.
#[derive(Debug, Clone)]
pub struct Timeline {
    s: Settings,
    /// Whether a closer exists; without one the drain only waits.
    can_close: bool,
    phase: Phase,
    /// Ids of the last snapshot: an id not in it is a new connection.
    seen: HashSet<u64>,
    /// `None` until a successful count (since the trigger, once draining): unknown is
    /// never taken as zero.
    count: Option<u64>,
    last_new: Option<Instant>,
    /// SIGKILL time of the pod, once its deletion is known.
    kill_at: Option<Instant>,
    /// Sessions per second this pod may close (fleet budget); `None` = no budget.
    close_rate: Option<f64>,
    run: Option<Run>,
}

/// A point-in-time view for /status, metrics and peers.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: Phase,
    pub trigger: Option<Trigger>,
    pub connections: Option<u64>,
    pub connections_at_start: Option<u64>,
    /// Sessions the closer reported open after its last close (None before an answer).
    pub sessions: Option<u64>,
    /// Time since the trigger (0 while serving).
    pub elapsed_ms: u64,
    pub deadline_in_ms: Option<u64>,
    pub deadline_source: Option<DeadlineSource>,
    pub closes_requested: u64,
    pub sessions_closed: u64,
    pub admin_failures: u64,
    /// Connections that went away without a close requested for them (see `observe`).
    pub vanished: u64,
    pub settle_ms: Option<u64>,
    pub close_rate: Option<f64>,
    /// The fleet close budget could not finish before the deadline and was exceeded.
    pub close_rate_yielded: bool,
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Timeline {
    pub fn new(s: Settings, can_close: bool) -> Self {
        Self {
            s,
            can_close,
            phase: Phase::Serving,
            seen: HashSet::new(),
            count: None,
            last_new: None,
            kill_at: None,
            close_rate: None,
            run: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// True from the first trigger on.
    pub fn is_draining(&self) -> bool {
        self.run.is_some()
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.run.as_ref().map(|r| r.deadline)
    }

    /// The fleet close budget had to yield to the deadline in this drain.
    pub fn close_rate_yielded(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.rate_yielded)
    }

    pub fn summary(&self) -> Option<&Summary> {
        self.run.as_ref().and_then(|r| r.summary.as_ref())
    }

    /// Event: a trigger. Starts the drain (the pod is unready from here on) and returns
    /// true, or joins the running one and returns false. The first count after it is the
    /// baseline: its sockets are the ones present at the start, not new arrivals.
    pub fn trigger(&mut self, now: Instant, trigger: Trigger) -> bool {
        if self.run.is_some() {
            return false;
        }
        let (deadline, deadline_source) = self.deadline_from(now);
        self.run = Some(Run {
            trigger,
            started: now,
            deadline,
            deadline_source,
            connections_at_start: None,
            settle_end: None,
            close_end: None,
            closing: None,
            closes_requested: 0,
            sessions_closed: 0,
            close_failures: 0,
            rate_yielded: false,
            close_credit: 0,
            vanished: 0,
            summary: None,
        });
        self.phase = Phase::Settling;
        self.count = None;
        self.last_new = Some(now);
        true
    }

    /// Event: a drain that began at `started_at` before this timeline existed (an agent
    /// restarted mid-drain) resumes now. The pod is unready at once and the deadline
    /// counts from `started_at`, not from now, so a restart never grants a fresh budget;
    /// settling that already lasted long enough is over. Returns false if a drain runs.
    pub fn resume(&mut self, now: Instant, trigger: Trigger, started_at: Instant) -> bool {
        self.trigger(started_at.min(now), trigger)
    }

    /// Event: the pod is being deleted and the kubelet sends SIGKILL at `kill_at`. Starts
    /// the drain if none runs (returns true then); the deadline becomes
    /// `kill_at − app reserve` when that is earlier.
    pub fn pod_deleting(&mut self, now: Instant, kill_at: Instant) -> bool {
        self.kill_at = Some(self.kill_at.map_or(kill_at, |k| k.min(kill_at)));
        if self.trigger(now, Trigger::PodDeletion) {
            return true;
        }
        let (deadline, source) = self.deadline_from(now);
        self.apply_deadline(now, deadline, source);
        false
    }

    /// Event: the fleet budget for this pod changed (`None` = no budget).
    pub fn set_close_rate(&mut self, now: Instant, rate: Option<f64>) {
        self.close_rate = rate.filter(|r| r.is_finite() && *r > 0.0);
        self.replan(now);
    }

    /// Event: a snapshot of the live connection (or session) ids taken at `now`.
    ///
    /// With a closer, every connection that left must be explained by a close request:
    /// each requested close is a credit that one departure uses up. Departures beyond
    /// the credit, and every departure while the closer is failing, *vanished*: the app
    /// died, the network reset them, or clients left on their own. Without a closer every
    /// departure is a client leaving, which is the drain working.
    pub fn observe(&mut self, now: Instant, ids: &[u64]) {
        let current: HashSet<u64> = ids.iter().copied().collect();
        let n = current.len() as u64;
        let can_close = self.can_close;
        if let Some(run) = self.run.as_mut() {
            if run.connections_at_start.is_none() {
                run.connections_at_start = Some(n);
            } else {
                if current.iter().any(|id| !self.seen.contains(id)) {
                    self.last_new = Some(now);
                }
                let left = self.seen.iter().filter(|id| !current.contains(id)).count() as u64;
                if can_close && left > 0 {
                    let failing = run.closing.as_ref().is_some_and(|c| c.failures_in_row > 0);
                    let explained = if failing {
                        0
                    } else {
                        left.min(run.close_credit)
                    };
                    run.close_credit -= explained;
                    run.vanished = run.vanished.saturating_add(left - explained);
                }
            }
        }
        self.count = Some(n);
        self.seen = current;
    }

    /// Event: the answer to the last `Action::Close` (`None` = the call failed).
    pub fn close_answered(&mut self, now: Instant, reply: Option<CloseReply>) {
        let tick = self.s.close_tick;
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let Some(c) = run.closing.as_mut() else {
            return;
        };
        c.in_flight = false;
        match reply {
            Some(r) => {
                c.failures_in_row = 0;
                c.estimate = r.remaining;
                // The closer's numbers are input: never trust more closes than asked for.
                run.sessions_closed = run.sessions_closed.saturating_add(r.closed.min(c.asked));
                if r.remaining == 0 && self.phase == Phase::Closing {
                    self.phase = Phase::Waiting;
                    run.close_end = Some(now);
                }
            }
            None => {
                // A failed request closed nothing: its credit is void.
                run.close_credit = run.close_credit.saturating_sub(c.asked);
                run.close_failures += 1;
                c.failures_in_row = c.failures_in_row.saturating_add(1);
                let backoff = tick
                    .saturating_mul(1u32 << c.failures_in_row.min(10))
                    .min(MAX_CLOSE_BACKOFF);
                c.next_tick = now + backoff;
            }
        }
    }

    /// Advances the timeline and says what to do at `now`.
    pub fn next(&mut self, now: Instant) -> Action {
        let Some(run) = self.run.as_ref() else {
            return Action::Idle;
        };
        if let Some(s) = &run.summary {
            return Action::Finished(s.clone());
        }
        if self.phase == Phase::Settling {
            if !self.settled(now) {
                return self.sleep(now, Some(self.settle_wake(now)));
            }
            let closes = self.can_close && self.count != Some(0);
            if let Some(run) = self.run.as_mut() {
                run.settle_end = Some(now);
            }
            self.phase = if closes {
                self.start_closing(now);
                Phase::Closing
            } else {
                Phase::Waiting
            };
        }
        if self.count == Some(0) {
            return self.finish(now, Outcome::Drained);
        }
        if self.deadline().is_some_and(|d| now >= d) {
            return self.finish(now, Outcome::DeadlineExceeded);
        }
        if self.phase == Phase::Closing
            && let Some(action) = self.close_batch(now)
        {
            return action;
        }
        let tick = self
            .run
            .as_ref()
            .and_then(|r| r.closing.as_ref())
            .filter(|c| self.phase == Phase::Closing && !c.in_flight)
            .map(|c| c.next_tick);
        self.sleep(now, tick)
    }

    /// The deadline a drain starting (or re-evaluated) at `now` has: the earliest of its
    /// sources.
    fn deadline_from(&self, now: Instant) -> (Instant, DeadlineSource) {
        let started = self.run.as_ref().map_or(now, |r| r.started);
        let by_timeout = started + self.s.drain_timeout;
        let by_deletion = self
            .kill_at
            .map(|k| k.checked_sub(self.s.app_reserve).unwrap_or(started));
        match by_deletion {
            Some(d) if d < by_timeout => (d.max(started), DeadlineSource::PodDeletion),
            _ => (by_timeout, DeadlineSource::Timeout),
        }
    }

    /// Deadlines only move earlier.
    fn apply_deadline(&mut self, now: Instant, deadline: Instant, source: DeadlineSource) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if deadline < run.deadline {
            run.deadline = deadline.max(run.started);
            run.deadline_source = source;
            self.replan(now);
        }
    }

    /// Settling is over once no new connection came for `quiet`, after at least `min`
    /// and at most `max`; it never takes more than half the budget so closing keeps time.
    fn settled(&self, now: Instant) -> bool {
        let Some(run) = self.run.as_ref() else {
            return true;
        };
        let (min, max) = self.settle_bounds(run);
        let elapsed = now.saturating_duration_since(run.started);
        let last_new = self.last_new.unwrap_or(run.started);
        elapsed >= max
            || (elapsed >= min && now.saturating_duration_since(last_new) >= self.s.settle_quiet)
    }

    fn settle_bounds(&self, run: &Run) -> (Duration, Duration) {
        let half = run.deadline.saturating_duration_since(run.started) / 2;
        let max = self.s.settle_max.min(half);
        (self.s.settle_min.min(max), max)
    }

    fn settle_wake(&self, now: Instant) -> Instant {
        let Some(run) = self.run.as_ref() else {
            return now;
        };
        let (min, max) = self.settle_bounds(run);
        let last_new = self.last_new.unwrap_or(run.started);
        let quiet_at = (last_new + self.s.settle_quiet).max(run.started + min);
        quiet_at.min(run.started + max).max(now)
    }

    fn start_closing(&mut self, now: Instant) {
        let estimate = self.count.unwrap_or(1);
        let nominal_end = now + self.s.close_window;
        if let Some(run) = self.run.as_mut() {
            run.closing = Some(Closing {
                window_start: now,
                nominal_end,
                window_end: nominal_end,
                next_tick: now,
                batches: 0,
                estimate,
                asked: 0,
                in_flight: false,
                failures_in_row: 0,
                rate: None,
                hint_window: None,
            });
        }
        self.replan(now);
    }

    /// Fits the close window to the deadline and the fleet close rate.
    fn replan(&mut self, now: Instant) {
        let tick = self.s.close_tick;
        let rate = self.close_rate;
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let Some(c) = run.closing.as_mut() else {
            return;
        };
        let left = run.deadline.saturating_duration_since(now);
        let tail = (left / 4).min(MAX_TAIL);
        let (window, yielded) = pacing::close_window(
            c.estimate,
            c.nominal_end.saturating_duration_since(now),
            rate,
            left - tail,
            tick,
        );
        c.window_end = now + window;
        c.rate = rate.filter(|_| !yielded);
        run.rate_yielded |= yielded;
    }

    fn close_batch(&mut self, now: Instant) -> Option<Action> {
        let tick = self.s.close_tick;
        let range = self.s.reconnect_after;
        let run = self.run.as_mut()?;
        let c = run.closing.as_mut()?;
        if c.in_flight || now < c.next_tick {
            return None;
        }
        let max = pacing::batch_size(
            c.estimate,
            c.window_end.saturating_duration_since(now),
            tick,
        );
        let hint_window = *c
            .hint_window
            .get_or_insert(c.window_end.saturating_duration_since(c.window_start));
        let after = pacing::hint_delay(
            range,
            now.saturating_duration_since(c.window_start),
            hint_window,
        );
        c.batches += 1;
        c.in_flight = true;
        c.asked = max;
        // A batch is at least one session: under a budget below one per tick, ticks
        // are skipped so the rate holds.
        let spacing = c
            .rate
            .and_then(|r| Duration::try_from_secs_f64(max as f64 / r).ok())
            .unwrap_or_default();
        c.next_tick = now + tick.max(spacing);
        run.closes_requested = run.closes_requested.saturating_add(max);
        run.close_credit = run.close_credit.saturating_add(max);
        Some(Action::Close {
            max,
            after_ms: ms(after),
        })
    }

    fn sleep(&self, now: Instant, extra: Option<Instant>) -> Action {
        let mut until = now + self.s.poll;
        if let Some(d) = self.deadline() {
            until = until.min(d);
        }
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
        let remaining = self.count.unwrap_or(0);
        let Some(run) = self.run.as_mut() else {
            return Action::Idle;
        };
        let settle_end = run.settle_end.unwrap_or(now);
        let close_start = run.closing.as_ref().map(|_| settle_end);
        let close_end = run.close_end.unwrap_or(now);
        let summary = Summary {
            outcome,
            trigger: run.trigger,
            duration_ms: ms(now.saturating_duration_since(run.started)),
            budget_ms: ms(run.deadline.saturating_duration_since(run.started)),
            connections_at_start: run.connections_at_start.unwrap_or(0),
            remaining,
            closes_requested: run.closes_requested,
            sessions_closed: run.sessions_closed,
            admin_failures: run.close_failures,
            vanished: run.vanished,
            settle_ms: ms(settle_end.saturating_duration_since(run.started)),
            close_ms: close_start
                .map(|s| ms(close_end.saturating_duration_since(s)))
                .unwrap_or(0),
        };
        run.summary = Some(summary.clone());
        Action::Finished(summary)
    }

    pub fn status(&self, now: Instant) -> Status {
        let run = self.run.as_ref();
        Status {
            state: self.phase,
            trigger: run.map(|r| r.trigger),
            connections: self.count,
            connections_at_start: run.and_then(|r| r.connections_at_start),
            sessions: run
                .and_then(|r| r.closing.as_ref())
                .filter(|c| c.batches > 0 && !c.in_flight)
                .map(|c| c.estimate),
            elapsed_ms: run.map_or(0, |r| ms(now.saturating_duration_since(r.started))),
            deadline_in_ms: run.map(|r| ms(r.deadline.saturating_duration_since(now))),
            deadline_source: run.map(|r| r.deadline_source),
            closes_requested: run.map_or(0, |r| r.closes_requested),
            sessions_closed: run.map_or(0, |r| r.sessions_closed),
            admin_failures: run.map_or(0, |r| r.close_failures),
            vanished: run.map_or(0, |r| r.vanished),
            settle_ms: run.and_then(|r| {
                r.settle_end
                    .map(|e| ms(e.saturating_duration_since(r.started)))
            }),
            close_rate: self.close_rate,
            close_rate_yielded: self.close_rate_yielded(),
        }
    }
}
