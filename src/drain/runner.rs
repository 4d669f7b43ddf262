//! The async side of the drain: counts sockets, calls the admin API, sleeps, and feeds the
//! pure `Drain` machine. One drain per agent; every trigger after the first joins it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use super::hint::HintTemplate;
use super::machine::{Action, Drain, Phase, Status, Timings};
use super::report::{Notice, Outcome, Summary, Trigger};
use crate::admin::{AdminClient, DrainRequest};
use crate::conn::{ConnError, CountSockets, Snapshot};
use crate::metrics::Metrics;

/// Looks up a shorter deadline when a drain starts (the pod's deletion deadline).
pub type DeadlineProbe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<Instant>> + Send>> + Send + Sync>;

/// How far past the deadline a waiting hook tolerates a late runner before answering.
const FORCE_SLACK: Duration = Duration::from_millis(50);

/// Longest wait for the deadline probe; the drain runs meanwhile.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the drain talks to.
pub struct Io {
    pub counter: Arc<Mutex<dyn CountSockets>>,
    pub admin: Option<AdminClient>,
    pub close_code: u16,
    pub hint: HintTemplate,
    pub metrics: Arc<Metrics>,
    pub deadline_probe: Option<DeadlineProbe>,
}

struct Shared {
    timings: Timings,
    drain_timeout: Duration,
    io: Io,
    drain: Mutex<Option<Drain>>,
    done: watch::Sender<Option<Summary>>,
    notices: broadcast::Sender<Notice>,
}

/// Handle to the agent's one drain. Cheap to clone.
#[derive(Clone)]
pub struct Drainer {
    shared: Arc<Shared>,
}

impl Drainer {
    pub fn new(timings: Timings, drain_timeout: Duration, io: Io) -> Self {
        let (done, _) = watch::channel(None);
        let (notices, _) = broadcast::channel(64);
        Self {
            shared: Arc::new(Shared {
                timings,
                drain_timeout,
                io,
                drain: Mutex::new(None),
                done,
                notices,
            }),
        }
    }

    /// Notices (started, admin failing, finished) for logs, Events, the termination message.
    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.shared.notices.subscribe()
    }

    /// True from the first trigger on (the drain exists from then on).
    pub fn is_draining(&self) -> bool {
        lock(&self.shared.drain).is_some()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.io.metrics
    }

    /// The finished drain's summary, if one ended.
    pub fn summary(&self) -> Option<Summary> {
        self.shared.done.borrow().clone()
    }

    /// The running (or finished) drain's status, `None` while serving.
    pub fn status(&self) -> Option<Status> {
        lock(&self.shared.drain)
            .as_ref()
            .map(|d| d.status(Instant::now()))
    }

    /// Counts connections now (for /status and /metrics while serving).
    pub async fn count(&self) -> Option<u64> {
        let n = count(&self.shared.io).await.ok()?.ids.len() as u64;
        self.shared.io.metrics.connections.set(n as i64);
        Some(n)
    }

    /// Starts the drain, or joins the running one; returns once it has ended, and never
    /// later than its deadline (plus `FORCE_SLACK`), even if a count or call hangs.
    pub async fn drain(&self, trigger: Trigger) -> Summary {
        let mut done = self.shared.done.subscribe();
        self.start(trigger);
        loop {
            if let Some(s) = done.borrow_and_update().clone() {
                return s;
            }
            let deadline = lock(&self.shared.drain)
                .as_ref()
                .map(|d| d.deadline())
                .unwrap_or_else(Instant::now);
            let force_at = deadline + FORCE_SLACK;
            if Instant::now() >= force_at {
                return self.force_finish();
            }
            // Re-check at least every poll: the deadline may move earlier meanwhile.
            let wake = force_at.min(Instant::now() + self.shared.timings.poll);
            tokio::select! {
                changed = done.changed() => {
                    if changed.is_err() {
                        return self.force_finish();
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Ends the drain from the waiting side when the runner is late (stuck in I/O).
    fn force_finish(&self) -> Summary {
        if let Some(s) = self.summary() {
            return s;
        }
        let action = lock(&self.shared.drain)
            .as_mut()
            .map(|d| d.next(Instant::now()));
        match action {
            Some(Action::Finished(summary)) => {
                tracing::warn!("drain runner is late; answering at the deadline");
                self.finish(summary.clone());
                summary
            }
            _ => self.summary().unwrap_or_else(fallback_summary),
        }
    }

    /// Starts the drain in the background unless one is running. Returns at once and
    /// does no I/O, so a caller that goes away (an HTTP client hanging up) cannot leave
    /// the pod unready with no drain behind it.
    pub fn start(&self, trigger: Trigger) {
        {
            // The lock makes "first trigger" exact; /readyz and /status both read this.
            let mut drain = lock(&self.shared.drain);
            if drain.is_some() {
                return;
            }
            let started = Instant::now();
            let deadline = started + self.shared.drain_timeout;
            *drain = Some(Drain::start(
                self.shared.timings.clone(),
                trigger,
                started,
                deadline,
            ));
        }
        self.shared
            .io
            .metrics
            .drain_state
            .set(Phase::Settling.gauge());
        let me = self.clone();
        tokio::spawn(async move { me.run(trigger).await });
    }

    /// Moves the running drain's deadline earlier (e.g. the pod deletion became known
    /// after a maintenance drain had started).
    pub fn shorten_deadline(&self, deadline: Instant) {
        if let Some(d) = lock(&self.shared.drain).as_mut() {
            d.shorten_deadline(deadline);
        }
    }

    /// Applies the deadline probe's answer, if any, without holding up the drain.
    fn spawn_deadline_probe(&self) {
        let Some(probe) = self.shared.io.deadline_probe.clone() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            if let Ok(Some(deadline)) = tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                me.shorten_deadline(deadline);
                let left = deadline.saturating_duration_since(Instant::now());
                tracing::info!(
                    deadline_in_ms = left.as_millis() as u64,
                    "pod deletion deadline applies"
                );
            }
        });
    }

    /// Takes a count and feeds it to the machine; a failed count keeps the last one.
    async fn observe(&self, count_failing: &mut bool) -> Option<u64> {
        let io = &self.shared.io;
        match count(io).await {
            Ok(snap) => {
                *count_failing = false;
                let n = snap.ids.len() as u64;
                io.metrics.connections.set(n as i64);
                if let Some(d) = lock(&self.shared.drain).as_mut() {
                    d.observe(Instant::now(), &snap.ids);
                }
                Some(n)
            }
            Err(e) => {
                io.metrics.count_errors.inc();
                if !*count_failing {
                    tracing::warn!(error = %e, "counting connections failed; keeping the last count");
                }
                *count_failing = true;
                None
            }
        }
    }

    async fn run(self, trigger: Trigger) {
        let io = &self.shared.io;
        let mut admin_failing = false;
        let mut count_failing = false;
        self.spawn_deadline_probe();
        let connections = self.observe(&mut count_failing).await;
        let budget_ms = self.shared.drain_timeout.as_millis() as u64;
        tracing::info!(?trigger, connections, budget_ms, "drain started: unready");
        let _ = self.shared.notices.send(Notice::Started {
            trigger,
            connections: connections.unwrap_or(0),
            budget_ms,
        });
        loop {
            let action = match lock(&self.shared.drain).as_mut() {
                Some(d) => {
                    let a = d.next(Instant::now());
                    io.metrics.drain_state.set(d.phase().gauge());
                    a
                }
                None => return,
            };
            match action {
                Action::Sleep { until } => {
                    tokio::time::sleep_until(until.into()).await;
                    self.observe(&mut count_failing).await;
                }
                Action::Close { max, after_ms } => {
                    let reply = self.close(max, after_ms, &mut admin_failing).await;
                    if let Some(d) = lock(&self.shared.drain).as_mut() {
                        d.close_answered(Instant::now(), reply);
                    }
                }
                Action::Finished(summary) => {
                    self.finish(summary);
                    return;
                }
            }
        }
    }

    /// One close request to the app, bounded by the admin timeout and the deadline.
    async fn close(
        &self,
        max: u64,
        after_ms: u64,
        admin_failing: &mut bool,
    ) -> Option<crate::admin::DrainReply> {
        let io = &self.shared.io;
        let admin = io.admin.as_ref()?;
        let reason = match io.hint.render(after_ms) {
            Ok(r) => r,
            Err(e) => {
                // Validated at start for the largest value; keep draining without a reason.
                tracing::error!(error = %e, "hint does not fit; closing without a reason");
                String::new()
            }
        };
        let req = DrainRequest {
            max,
            code: io.close_code,
            reason,
        };
        io.metrics.closes_requested.inc_by(max);
        let deadline = lock(&self.shared.drain)
            .as_ref()
            .map(|d| d.deadline())
            .unwrap_or_else(Instant::now);
        // The client bounds each call by its own timeout; here also by the deadline.
        let limit = admin
            .timeout()
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        let result = match tokio::time::timeout(limit, admin.drain(&req)).await {
            Ok(r) => r.map_err(|e| (e.result_label(), e.to_string())),
            Err(_) => Err((
                "timeout",
                format!("admin API did not answer within {limit:?}"),
            )),
        };
        match result {
            Ok(reply) => {
                io.metrics.admin_result("ok");
                tracing::debug!(
                    max,
                    after_ms,
                    closed = reply.closed,
                    remaining = reply.remaining,
                    "close batch"
                );
                if *admin_failing {
                    tracing::info!("admin API answers again");
                }
                *admin_failing = false;
                Some(reply)
            }
            Err((label, error)) => {
                io.metrics.admin_result(label);
                if !*admin_failing {
                    tracing::warn!(%error, "admin API failed; will retry and keep waiting for connections to leave");
                    let _ = self.shared.notices.send(Notice::AdminFailing { error });
                }
                *admin_failing = true;
                None
            }
        }
    }

    fn finish(&self, summary: Summary) {
        // Either the runner or a late-waiting hook ends the drain; only the first counts.
        let first = self.shared.done.send_if_modified(|done| {
            let empty = done.is_none();
            if empty {
                *done = Some(summary.clone());
            }
            empty
        });
        if !first {
            return;
        }
        let m = &self.shared.io.metrics;
        m.drain_duration_seconds
            .set(summary.duration_ms as f64 / 1000.0);
        m.forced_remaining.set(summary.remaining as i64);
        match summary.outcome {
            Outcome::Drained => tracing::info!(
                duration_ms = summary.duration_ms,
                sessions_closed = summary.sessions_closed,
                connections_at_start = summary.connections_at_start,
                "drain finished: Drained"
            ),
            Outcome::DeadlineExceeded => tracing::warn!(
                duration_ms = summary.duration_ms,
                remaining = summary.remaining,
                "drain finished: DeadlineExceeded"
            ),
        }
        let _ = self.shared.notices.send(Notice::Finished(summary));
    }
}

/// A poisoned lock only means another task panicked mid-update; the drain goes on.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn count(io: &Io) -> Result<Snapshot, ConnError> {
    let counter = io.counter.clone();
    match tokio::task::spawn_blocking(move || lock(&counter).snapshot()).await {
        Ok(r) => r,
        Err(e) => Err(ConnError::Io(std::io::Error::other(e.to_string()))),
    }
}

/// Only if the drain state vanished, which `start` rules out; keeps hooks answered anyway.
fn fallback_summary() -> Summary {
    Summary {
        outcome: Outcome::DeadlineExceeded,
        trigger: Trigger::Prestop,
        duration_ms: 0,
        budget_ms: 0,
        connections_at_start: 0,
        remaining: 0,
        closes_requested: 0,
        sessions_closed: 0,
        admin_failures: 0,
        settle_ms: 0,
        close_ms: 0,
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
