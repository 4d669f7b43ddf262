//! The async side of the drain: a thin loop over the `Timeline` machine, a session
//! counter, an optional session closer and tokio's clock. One timeline per agent; every
//! trigger after the first joins the drain it started.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use super::hint::HintTemplate;
use super::machine::{Action, Phase, Status, Timeline, ms};
use super::report::{Notice, Outcome, Summary, Trigger};
use super::seams::{CloseReply, CloseRequest, Observer, SessionCloser, SessionCounter};
use super::settings::Settings;

/// Everything the drain talks to.
pub struct Parts {
    pub counter: Arc<dyn SessionCounter>,
    /// Without a closer the drain only waits for connections to leave.
    pub closer: Option<Arc<dyn SessionCloser>>,
    pub close_code: u16,
    pub hint: HintTemplate,
    pub observer: Arc<dyn Observer>,
}

struct Shared {
    parts: Parts,
    timeline: Mutex<Timeline>,
    done: watch::Sender<Option<Summary>>,
    notices: broadcast::Sender<Notice>,
}

/// Handle to the agent's one timeline. Cheap to clone.
#[derive(Clone)]
pub struct Drainer {
    shared: Arc<Shared>,
}

/// The clock: tokio's, so tests can pause it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Drainer {
    pub fn new(settings: Settings, parts: Parts) -> Self {
        let (done, _) = watch::channel(None);
        let (notices, _) = broadcast::channel(64);
        let timeline = Timeline::new(settings, parts.closer.is_some());
        Self {
            shared: Arc::new(Shared {
                parts,
                timeline: Mutex::new(timeline),
                done,
                notices,
            }),
        }
    }

    fn timeline(&self) -> MutexGuard<'_, Timeline> {
        lock(&self.shared.timeline)
    }

    /// Notices (started, closer failing, finished) for logs, Events, the termination message.
    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.shared.notices.subscribe()
    }

    /// True from the first trigger on.
    pub fn is_draining(&self) -> bool {
        self.timeline().is_draining()
    }

    pub fn phase(&self) -> Phase {
        self.timeline().phase()
    }

    /// The closer the drain uses, for other users of the same seam (the rebalancer).
    pub fn closer(&self) -> Option<Arc<dyn SessionCloser>> {
        self.shared.parts.closer.clone()
    }

    /// The close reason for a reconnect delay of `after_ms`, and the close code.
    pub fn close_request(&self, max: u64, after_ms: u64) -> CloseRequest {
        let reason = match self.shared.parts.hint.render(after_ms) {
            Ok(r) => r,
            Err(e) => {
                // Validated at start for the largest value; close without a reason.
                tracing::error!(error = %e, "hint does not fit; closing without a reason");
                String::new()
            }
        };
        CloseRequest {
            max,
            code: self.shared.parts.close_code,
            reason,
        }
    }

    /// The finished drain's summary, if one ended.
    pub fn summary(&self) -> Option<Summary> {
        self.shared.done.borrow().clone()
    }

    pub fn status(&self) -> Status {
        self.timeline().status(now())
    }

    /// Counts now while serving (for /status and /metrics); while draining the runner
    /// counts and this returns its last count.
    pub async fn count(&self) -> Option<u64> {
        if self.is_draining() {
            return self.timeline().status(now()).connections;
        }
        self.observe().await
    }

    /// Event: the fleet close budget for this pod (sessions per second; `None` = none).
    pub fn set_close_rate(&self, rate: Option<f64>) {
        self.timeline().set_close_rate(now(), rate);
    }

    /// Event: the pod is being deleted; the kubelet sends SIGKILL at `kill_at`. Starts
    /// the drain if none runs, and moves the deadline earlier when it must.
    pub fn pod_deleting(&self, kill_at: Instant) {
        let started = self.timeline().pod_deleting(now(), kill_at);
        if started {
            self.spawn_run();
        }
    }

    /// Starts the drain, or joins the running one; returns once it has ended, and never
    /// later than its deadline, even if a count or a close call hangs.
    pub async fn drain(&self, trigger: Trigger) -> Summary {
        let mut done = self.shared.done.subscribe();
        self.start(trigger);
        let poll = self.timeline().settings().poll;
        loop {
            if let Some(s) = done.borrow_and_update().clone() {
                return s;
            }
            let t = now();
            let deadline = self.timeline().deadline().unwrap_or(t);
            if t >= deadline {
                // The runner is late (stuck in I/O): the machine ends the drain from here.
                let action = self.timeline().next(t);
                if let Action::Finished(summary) = action {
                    tracing::warn!("drain runner is late; answering at the deadline");
                    self.finish(summary);
                }
                if let Some(s) = self.summary() {
                    return s;
                }
            }
            // Re-check at least every poll: the deadline may move earlier meanwhile.
            let wake = deadline.min(t + poll).max(t + Duration::from_millis(1));
            tokio::select! {
                changed = done.changed() => {
                    if changed.is_err() {
                        return self.summary().unwrap_or_else(|| unreachable_summary(trigger));
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Resumes a drain that began at `started_at`, before this agent started (a restart
    /// mid-drain): unready at once, with the deadline counted from `started_at`.
    pub fn resume(&self, trigger: Trigger, started_at: Instant) {
        let started = self.timeline().resume(now(), trigger, started_at);
        if started {
            self.spawn_run();
        }
    }

    /// Starts the drain in the background unless one is running. Returns at once and
    /// does no I/O, so a caller that goes away (an HTTP client hanging up) cannot leave
    /// the pod unready with no drain behind it.
    pub fn start(&self, trigger: Trigger) {
        let started = self.timeline().trigger(now(), trigger);
        if started {
            self.spawn_run();
        }
    }

    fn spawn_run(&self) {
        self.shared.parts.observer.phase(Phase::Settling);
        let me = self.clone();
        tokio::spawn(async move { me.run().await });
    }

    /// Takes a count and feeds it to the machine; a failed count keeps the last one.
    async fn observe(&self) -> Option<u64> {
        let parts = &self.shared.parts;
        match parts.counter.snapshot().await {
            Ok(snap) => {
                let n = snap.ids.len() as u64;
                parts.observer.counted(n);
                self.timeline().observe(now(), &snap.ids);
                Some(n)
            }
            Err(e) => {
                parts.observer.count_failed();
                tracing::debug!(error = %e, "counting connections failed; keeping the last count");
                None
            }
        }
    }

    async fn run(self) {
        let parts = &self.shared.parts;
        let mut close_failing = false;
        let mut count_failing = false;
        let connections = self.observe().await;
        let (trigger, budget_ms) = {
            let st = self.status();
            (st.trigger, st.deadline_in_ms.unwrap_or(0))
        };
        let Some(trigger) = trigger else {
            return;
        };
        tracing::info!(?trigger, connections, budget_ms, "drain started: unready");
        let _ = self.shared.notices.send(Notice::Started {
            trigger,
            connections: connections.unwrap_or(0),
            budget_ms,
        });
        let mut rate_yielded = false;
        loop {
            let (action, phase, yielded) = {
                let mut t = self.timeline();
                let a = t.next(now());
                (a, t.phase(), t.close_rate_yielded())
            };
            parts.observer.phase(phase);
            if yielded && !rate_yielded {
                rate_yielded = true;
                tracing::warn!(
                    "fleet close budget cannot close every session before the deadline; closing faster so the deadline holds"
                );
            }
            match action {
                Action::Sleep { until } => {
                    // Register for changes before the sleep, so none is missed.
                    let changed = parts.counter.changed();
                    tokio::select! {
                        _ = tokio::time::sleep_until(until.into()) => {}
                        _ = changed => {}
                    }
                    let counted = self.observe().await.is_some();
                    if !counted && !count_failing {
                        tracing::warn!("counting connections failed; keeping the last count");
                    }
                    count_failing = !counted;
                }
                Action::Close { max, after_ms } => {
                    let reply = self.close(max, after_ms, &mut close_failing).await;
                    self.timeline().close_answered(now(), reply);
                }
                Action::Finished(summary) => {
                    self.finish(summary);
                    return;
                }
                Action::Idle => return,
            }
        }
    }

    /// One close request, bounded by the closer's timeout and the deadline.
    async fn close(&self, max: u64, after_ms: u64, failing: &mut bool) -> Option<CloseReply> {
        let parts = &self.shared.parts;
        let closer = parts.closer.as_ref()?;
        let req = self.close_request(max, after_ms);
        parts.observer.close_requested(max);
        let t = now();
        let deadline = self.timeline().deadline().unwrap_or(t);
        let limit = closer
            .timeout()
            .min(deadline.saturating_duration_since(t))
            .max(Duration::from_millis(1));
        let result = match tokio::time::timeout(limit, closer.close(req)).await {
            Ok(r) => r.map_err(|e| (e.label, e.message)),
            Err(_) => Err((
                "timeout",
                format!("close call did not answer within {}ms", ms(limit)),
            )),
        };
        match result {
            Ok(reply) => {
                parts.observer.close_result("ok");
                tracing::debug!(
                    max,
                    after_ms,
                    closed = reply.closed,
                    remaining = reply.remaining,
                    "close batch"
                );
                if *failing {
                    tracing::info!("close calls answer again");
                }
                *failing = false;
                Some(reply)
            }
            Err((label, error)) => {
                parts.observer.close_result(label);
                if !*failing {
                    tracing::warn!(%error, "close call failed; will retry and keep waiting for connections to leave");
                    let _ = self.shared.notices.send(Notice::AdminFailing { error });
                }
                *failing = true;
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
        let phase = self.phase();
        self.shared.parts.observer.phase(phase);
        self.shared.parts.observer.finished(&summary);
        match summary.outcome {
            Outcome::Drained if summary.vanished > 0 => tracing::warn!(
                duration_ms = summary.duration_ms,
                sessions_closed = summary.sessions_closed,
                connections_at_start = summary.connections_at_start,
                vanished = summary.vanished,
                "drain finished: Drained, but connections vanished without a close (app died, resets, or clients leaving)"
            ),
            Outcome::Drained => tracing::info!(
                duration_ms = summary.duration_ms,
                sessions_closed = summary.sessions_closed,
                connections_at_start = summary.connections_at_start,
                "drain finished: Drained"
            ),
            Outcome::DeadlineExceeded => tracing::warn!(
                duration_ms = summary.duration_ms,
                remaining = summary.remaining,
                vanished = summary.vanished,
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

/// Only if the summary channel closed, which the `Drainer` it belongs to rules out;
/// keeps hooks answered anyway.
fn unreachable_summary(trigger: Trigger) -> Summary {
    Summary {
        outcome: Outcome::DeadlineExceeded,
        trigger,
        duration_ms: 0,
        budget_ms: 0,
        connections_at_start: 0,
        remaining: 0,
        closes_requested: 0,
        sessions_closed: 0,
        admin_failures: 0,
        vanished: 0,
        settle_ms: 0,
        close_ms: 0,
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
