//! The drain timeline driven by a fake clock and a simulated pod: no sockets, no sleeps.
//! Every deadline source (the timeout, the pod's deletion time before or during a drain)
//! and the fleet close rate are events fed with the fake clock.

use std::time::{Duration, Instant};

use super::machine::{Action, DeadlineSource, Phase, Timeline};
use super::report::{Outcome, Summary, Trigger};
use super::seams::CloseReply;
use super::settings::{DelayRange, Settings};

/// (settings, can_close)
type Timings = (Settings, bool);

fn timings(can_close: bool) -> Timings {
    (settings(), can_close)
}

fn settings() -> Settings {
    Settings {
        drain_timeout: Duration::from_secs(25),
        app_reserve: Duration::from_secs(5),
        settle_min: Duration::from_secs(2),
        settle_quiet: Duration::from_secs(1),
        settle_max: Duration::from_secs(15),
        close_tick: Duration::from_millis(100),
        close_window: Duration::from_secs(10),
        poll: Duration::from_millis(100),
        reconnect_after: DelayRange {
            min: Duration::ZERO,
            max: Duration::from_secs(2),
        },
    }
}

/// A timeline with this drain timeout, triggered at `now`.
fn started(t: Timings, budget: Duration, now: Instant) -> Timeline {
    let (mut s, can_close) = t;
    s.drain_timeout = budget;
    let mut d = Timeline::new(s, can_close);
    assert!(d.trigger(now, Trigger::Prestop));
    d
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// How the simulated app answers close requests.
#[derive(Clone, Copy, PartialEq)]
enum App {
    /// Closes what it is asked; the clients drop their sockets at once.
    Cooperative,
    /// Admin endpoint fails every call.
    Failing,
    /// Admin endpoint fails this many calls, then cooperates.
    FailsFirst(u32),
    /// Closes sessions but clients ignore the close frame: sockets stay.
    ClientsIgnoreClose,
    /// Cooperates until it is killed at this time: every socket is reset at once, and
    /// its admin endpoint refuses from then on.
    DiesAt(Duration),
}

struct Pod {
    t0: Instant,
    now: Instant,
    sockets: Vec<u64>,
    next_id: u64,
    /// Times (since t0) at which a new connection arrives.
    arrivals: Vec<Duration>,
    app: App,
    sessions: u64,
    closes: Vec<(Duration, u64, u64)>,
    /// When all clients leave on their own.
    leave_at: Option<Duration>,
    /// The phase after each step, for assertions on the timeline.
    phases: Vec<(Duration, Phase)>,
}

impl Pod {
    fn new(connections: u64, app: App) -> Self {
        let t0 = Instant::now();
        Pod {
            t0,
            now: t0,
            sockets: (0..connections).collect(),
            next_id: connections,
            arrivals: Vec::new(),
            app,
            sessions: connections,
            closes: Vec::new(),
            leave_at: None,
            phases: Vec::new(),
        }
    }

    fn at(&self) -> Duration {
        self.now - self.t0
    }

    fn advance_to(&mut self, until: Instant) {
        assert!(until >= self.now, "time went backwards");
        self.now = until;
        while self
            .arrivals
            .first()
            .is_some_and(|a| self.t0 + *a <= self.now)
        {
            self.arrivals.remove(0);
            self.sockets.push(self.next_id);
            self.next_id += 1;
            self.sessions += 1;
        }
        if self.leave_at.is_some_and(|at| self.at() >= at) {
            self.sockets.clear();
            self.sessions = 0;
        }
        if let App::DiesAt(at) = self.app
            && self.at() >= at
        {
            self.sockets.clear();
            self.sessions = 0;
            self.app = App::Failing;
        }
    }

    fn close(&mut self, max: u64) -> Option<CloseReply> {
        match self.app {
            App::Failing => None,
            App::FailsFirst(n) if n > 0 => {
                self.app = App::FailsFirst(n - 1);
                None
            }
            App::FailsFirst(_) | App::Cooperative | App::ClientsIgnoreClose | App::DiesAt(_) => {
                let n = max.min(self.sessions);
                self.sessions -= n;
                if self.app != App::ClientsIgnoreClose {
                    self.sockets.drain(..n as usize);
                }
                Some(CloseReply {
                    closed: n,
                    remaining: self.sessions,
                })
            }
        }
    }

    /// Runs a drain with `budget` to its end; returns the summary and the drain.
    fn run(&mut self, t: Timings, budget: Duration) -> (Summary, Timeline) {
        let d = started(t, budget, self.now);
        assert_eq!(d.phase(), Phase::Settling, "unready at once");
        self.run_timeline(d)
    }

    /// Runs a triggered timeline to its end.
    fn run_timeline(&mut self, mut d: Timeline) -> (Summary, Timeline) {
        for _ in 0..100_000 {
            let deadline = d.deadline().expect("a running drain has a deadline");
            d.observe(self.now, &self.sockets);
            let action = d.next(self.now);
            self.phases.push((self.at(), d.phase()));
            match action {
                Action::Sleep { until } => {
                    assert!(
                        until > self.now || until == deadline,
                        "busy loop at {:?}",
                        self.at()
                    );
                    assert!(until <= deadline, "sleeps past the deadline");
                    self.advance_to(
                        until
                            .max(self.now + Duration::from_millis(1))
                            .min(deadline.max(self.now)),
                    );
                }
                Action::Close { max, after_ms } => {
                    assert!(after_ms <= 2000);
                    let reply = self.close(max);
                    self.closes.push((self.at(), max, after_ms));
                    d.close_answered(self.now, reply);
                }
                Action::Finished(s) => return (s, d),
                Action::Idle => panic!("a triggered timeline is never idle"),
            }
        }
        panic!("drain never finished");
    }
}

#[test]
fn empty_pod_waits_settle_min_then_drains() {
    let mut pod = Pod::new(0, App::Cooperative);
    let (s, _) = pod.run(timings(true), secs(25.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(
        pod.at(),
        secs(2.0),
        "settle-min holds even with no connections"
    );
    assert_eq!(s.closes_requested, 0);
}

#[test]
fn quiet_detection_extends_settle_while_connections_arrive() {
    let mut pod = Pod::new(10, App::Cooperative);
    // The ingress keeps routing new connections until 4.5 s.
    pod.arrivals = [0.5, 1.2, 1.9, 2.6, 3.3, 4.0, 4.5].map(secs).to_vec();
    let (s, _) = pod.run(timings(true), secs(25.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(
        s.settle_ms, 5500,
        "quiet 1 s after the last arrival at 4.5 s"
    );
    assert_eq!(
        pod.closes[0].0,
        secs(5.5),
        "first close right after settling"
    );
    assert_eq!(s.sessions_closed, 17);
}

#[test]
fn settle_max_bounds_a_busy_ingress() {
    let mut pod = Pod::new(5, App::Cooperative);
    pod.arrivals = (1..100).map(|i| secs(i as f64 * 0.4)).collect();
    let (s, _) = pod.run(timings(true), secs(60.0));
    assert_eq!(s.settle_ms, 15_000);
    assert_eq!(s.outcome, Outcome::Drained);
}

#[test]
fn closes_are_paced_over_the_window() {
    let mut pod = Pod::new(1000, App::Cooperative);
    let (s, _) = pod.run(timings(true), secs(25.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.sessions_closed, 1000);
    // 100 ticks of 10 over 10 s: never everything at once.
    assert_eq!(pod.closes.len(), 100);
    assert!(
        pod.closes.iter().all(|c| c.1 == 10),
        "{:?}",
        &pod.closes[..3]
    );
    let first = pod.closes[0].0;
    let last = pod.closes.last().unwrap().0;
    assert_eq!(last - first, secs(9.9));
    // Reconnect hints vary across batches.
    let distinct: std::collections::HashSet<u64> = pod.closes.iter().map(|c| c.2).collect();
    assert!(distinct.len() > 50);
}

#[test]
fn close_window_shrinks_to_fit_the_deadline() {
    let mut pod = Pod::new(600, App::Cooperative);
    let (s, _) = pod.run(timings(true), secs(6.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.settle_ms, 2000);
    // 4 s left after settling: window = 4 s - 1 s tail = 3 s, 30 ticks of 20.
    assert_eq!(pod.closes.len(), 30);
    assert!(pod.at() <= secs(6.0));
}

#[test]
fn deadline_shorter_than_settle() {
    let mut pod = Pod::new(50, App::Cooperative);
    let (s, _) = pod.run(timings(true), secs(1.0));
    // Settling takes at most half the budget, then everything is closed in the rest.
    assert_eq!(s.settle_ms, 500);
    assert_eq!(s.outcome, Outcome::Drained);
    assert!(s.duration_ms <= 1000, "{s:?}");
}

#[test]
fn failing_admin_still_ends_at_the_deadline_with_backoff() {
    let mut pod = Pod::new(20, App::Failing);
    let (s, d) = pod.run(timings(true), secs(10.0));
    assert_eq!(s.outcome, Outcome::DeadlineExceeded);
    assert_eq!(d.phase(), Phase::DeadlineExceeded);
    assert_eq!(pod.at(), secs(10.0));
    assert_eq!(s.remaining, 20);
    assert_eq!(s.admin_failures as usize, pod.closes.len());
    // Backoff: 8 s of failures at most 1 per 100 ms, and far fewer once backed off.
    assert!(pod.closes.len() < 20, "{} attempts", pod.closes.len());
    assert!(
        pod.closes.len() >= 8,
        "keeps retrying: {}",
        pod.closes.len()
    );
}

#[test]
fn admin_recovers_after_failures() {
    let mut pod = Pod::new(30, App::FailsFirst(3));
    let (s, _) = pod.run(timings(true), secs(20.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.admin_failures, 3);
    assert_eq!(s.sessions_closed, 30);
}

#[test]
fn count_never_reaching_zero_hits_the_deadline() {
    let mut pod = Pod::new(100, App::ClientsIgnoreClose);
    let (s, _) = pod.run(timings(true), secs(25.0));
    assert_eq!(s.outcome, Outcome::DeadlineExceeded);
    assert_eq!(s.remaining, 100);
    assert_eq!(s.sessions_closed, 100);
    assert_eq!(pod.at(), secs(25.0), "answers exactly at the deadline");
    assert_eq!(s.duration_ms, 25_000);
}

#[test]
fn without_admin_only_waits() {
    let mut pod = Pod::new(3, App::Cooperative);
    pod.leave_at = Some(secs(7.0));
    let (s, _) = pod.run(timings(false), secs(25.0));
    assert!(pod.closes.is_empty(), "no admin, no close");
    assert_eq!(s.outcome, Outcome::Drained);
    // Released within one poll of the count reaching zero.
    assert!(pod.at() <= secs(7.1), "{:?}", pod.at());
    assert!(
        pod.phases
            .iter()
            .filter(|(at, _)| *at > secs(2.0) && *at < secs(7.0))
            .all(|(_, p)| *p == Phase::Waiting),
        "waits after settling"
    );
}

#[test]
fn zero_count_releases_within_one_poll() {
    let mut pod = Pod::new(10, App::Cooperative);
    let (s, _) = pod.run(timings(true), secs(25.0));
    // 10 sessions, one per tick from 2 s: the last leaves at 2.9 s, seen at the next poll.
    assert_eq!(s.outcome, Outcome::Drained);
    assert!(
        pod.at() <= secs(2.9) + Duration::from_millis(100),
        "{:?}",
        pod.at()
    );
}

#[test]
fn serving_until_the_first_trigger_then_one_drain() {
    let now = Instant::now();
    let mut d = Timeline::new(settings(), true);
    assert_eq!(d.phase(), Phase::Serving);
    assert_eq!(d.next(now), Action::Idle);
    d.observe(now, &[1, 2, 3]);
    let st = d.status(now);
    assert_eq!(
        (st.state, st.connections, st.trigger),
        (Phase::Serving, Some(3), None)
    );
    assert_eq!(st.deadline_in_ms, None);
    assert!(d.trigger(now, Trigger::Api));
    assert!(!d.trigger(now, Trigger::Prestop), "a later trigger joins");
    let st = d.status(now);
    assert_eq!(st.trigger, Some(Trigger::Api));
    assert_eq!(
        st.connections, None,
        "the serving count is not the baseline"
    );
    assert_eq!(st.deadline_source, Some(DeadlineSource::Timeout));
    assert_eq!(st.deadline_in_ms, Some(25_000));
}

/// Event: the pod's deletion time arrives during a drain (the watch, or the probe at
/// drain start). The deadline moves earlier, never later.
#[test]
fn pod_deletion_during_a_drain_shortens_it() {
    let pod = Pod::new(5, App::ClientsIgnoreClose);
    let mut d = started(timings(true), secs(25.0), pod.now);
    // SIGKILL at +10 s, 5 s app reserve: the drain must end at +5 s.
    assert!(!d.pod_deleting(pod.now + secs(1.0), pod.now + secs(10.0)));
    assert_eq!(d.deadline(), Some(pod.now + secs(5.0)));
    assert_eq!(
        d.status(pod.now).deadline_source,
        Some(DeadlineSource::PodDeletion)
    );
    d.pod_deleting(pod.now + secs(2.0), pod.now + secs(60.0));
    assert_eq!(d.deadline(), Some(pod.now + secs(5.0)), "never moved later");
    assert_eq!(d.next(pod.now + secs(5.0)), d.next(pod.now + secs(5.0)));
    assert!(
        matches!(d.next(pod.now + secs(5.0)), Action::Finished(s) if s.outcome == Outcome::DeadlineExceeded)
    );
}

/// Event: the deletion is the first thing the agent hears of (the watch, no hook): it
/// starts the drain with the deletion's deadline.
#[test]
fn pod_deletion_while_serving_starts_the_drain() {
    let now = Instant::now();
    let mut d = Timeline::new(settings(), true);
    // kubectl delete --grace-period=12: SIGKILL at +12 s, drain until +7 s.
    assert!(d.pod_deleting(now, now + secs(12.0)));
    assert_eq!(d.phase(), Phase::Settling);
    let st = d.status(now);
    assert_eq!(st.trigger, Some(Trigger::PodDeletion));
    assert_eq!(st.deadline_in_ms, Some(7_000));
    assert_eq!(st.deadline_source, Some(DeadlineSource::PodDeletion));
    // A later hook joins the same drain and its deadline.
    assert!(!d.trigger(now + secs(1.0), Trigger::Prestop));
    assert_eq!(d.deadline(), Some(now + secs(7.0)));
}

/// Event: a deletion whose SIGKILL is already within the app reserve ends the drain at
/// once, so the app keeps its reserve; a far one leaves the timeout in force.
#[test]
fn pod_deletion_past_or_far() {
    let now = Instant::now();
    let mut d = Timeline::new(settings(), true);
    d.trigger(now, Trigger::Prestop);
    d.pod_deleting(now, now + secs(3.0));
    assert_eq!(d.deadline(), Some(now), "within the reserve: now");
    assert!(matches!(d.next(now), Action::Finished(s) if s.budget_ms == 0));

    let mut far = Timeline::new(settings(), true);
    far.trigger(now, Trigger::Prestop);
    far.pod_deleting(now, now + secs(300.0));
    assert_eq!(far.deadline(), Some(now + secs(25.0)));
    assert_eq!(
        far.status(now).deadline_source,
        Some(DeadlineSource::Timeout)
    );
}

/// A deletion seen while the drain settles cuts the close window to the new deadline:
/// every session still gets its close before the deadline.
#[test]
fn a_shorter_deadline_replans_the_close_window() {
    let mut pod = Pod::new(300, App::Cooperative);
    let mut d = started(timings(true), secs(25.0), pod.now);
    d.observe(pod.now, &pod.sockets);
    // At 2 s settling ends and closing starts over 10 s; at 3 s the deadline becomes 6 s.
    let at2 = pod.now + secs(2.0);
    pod.advance_to(at2);
    d.observe(at2, &pod.sockets);
    assert!(matches!(d.next(at2), Action::Close { .. }));
    d.close_answered(at2, pod.close(30));
    pod.advance_to(pod.t0 + secs(3.0));
    d.pod_deleting(pod.now, pod.t0 + secs(11.0));
    assert_eq!(d.deadline(), Some(pod.t0 + secs(6.0)));
    let (s, _) = pod.run_timeline(d);
    assert_eq!(s.outcome, Outcome::Drained);
    assert!(pod.at() <= secs(6.0), "{:?}", pod.at());
}

/// Event: a fleet close rate. 600 sessions at 50/s take 12 s instead of the 10 s window.
#[test]
fn a_close_rate_paces_below_the_budget() {
    let mut pod = Pod::new(600, App::Cooperative);
    let mut d = started(timings(true), secs(25.0), pod.now);
    d.set_close_rate(pod.now, Some(50.0));
    let (s, d) = pod.run_timeline(d);
    assert_eq!(s.outcome, Outcome::Drained);
    assert!(!d.status(pod.now).close_rate_yielded);
    // No one-second window holds more than 50 closes (+ one batch of rounding).
    let worst = (0..250)
        .map(|k| {
            let from = secs(k as f64 * 0.1);
            pod.closes
                .iter()
                .filter(|c| c.0 >= from && c.0 < from + secs(1.0))
                .map(|c| c.1)
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0);
    assert!(worst <= 55, "worst second closed {worst}");
    let last = pod.closes.last().map(|c| c.0).unwrap_or_default();
    assert!(
        last >= secs(13.0),
        "stretched past the 10 s window: {last:?}"
    );
}

/// When the budget cannot finish before the deadline, the deadline wins, and the
/// status says the budget yielded.
#[test]
fn the_deadline_wins_over_the_close_rate() {
    let mut pod = Pod::new(2000, App::Cooperative);
    let mut d = started(timings(true), secs(12.0), pod.now);
    d.set_close_rate(pod.now, Some(50.0));
    let (s, d) = pod.run_timeline(d);
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.sessions_closed, 2000);
    assert!(pod.at() <= secs(12.0));
    assert!(d.status(pod.now).close_rate_yielded);
}

#[test]
fn status_reports_progress() {
    let pod = Pod::new(40, App::Cooperative);
    let mut d = started(timings(true), secs(25.0), pod.now);
    d.observe(pod.now, &pod.sockets);
    let st = d.status(pod.now + secs(1.0));
    assert_eq!(st.state, Phase::Settling);
    assert_eq!(st.connections, Some(40));
    assert_eq!(st.deadline_in_ms, Some(24_000));
    let later = pod.now + secs(2.0);
    d.observe(later, &pod.sockets);
    match d.next(later) {
        Action::Close { max, .. } => {
            assert_eq!(max, 1);
            d.close_answered(
                later,
                Some(CloseReply {
                    closed: 1,
                    remaining: 39,
                }),
            );
        }
        other => panic!("expected a close, got {other:?}"),
    }
    let st = d.status(later);
    assert_eq!(st.state, Phase::Closing);
    assert_eq!(st.sessions, Some(39));
    assert_eq!(st.closes_requested, 1);
}

/// Issue 12 item 8: an agent restarted 20 s into a 25 s drain resumes it with 5 s left,
/// already past settling, instead of starting over with a fresh budget.
#[test]
fn a_resumed_drain_keeps_its_original_deadline() {
    let t0 = Instant::now();
    let now = t0 + secs(20.0);
    let mut d = Timeline::new(settings(), true);
    assert!(d.resume(now, Trigger::Prestop, t0));
    assert!(d.is_draining(), "unready at once");
    assert_eq!(d.deadline(), Some(t0 + secs(25.0)));
    assert_eq!(d.status(now).deadline_in_ms, Some(5_000));
    d.observe(now, &[1, 2, 3]);
    // Settling ran out before the restart: closing starts at once.
    assert!(matches!(d.next(now), Action::Close { .. }));
    assert_eq!(d.phase(), Phase::Closing);
    // A second trigger joins the resumed drain.
    assert!(!d.trigger(now, Trigger::Signal));
}

#[test]
fn a_resumed_drain_past_its_deadline_ends_at_once() {
    let t0 = Instant::now();
    let now = t0 + secs(40.0);
    let mut d = Timeline::new(settings(), true);
    assert!(d.resume(now, Trigger::Signal, t0));
    d.observe(now, &[1]);
    match d.next(now) {
        Action::Finished(s) => {
            assert_eq!(s.outcome, Outcome::DeadlineExceeded);
            assert_eq!(s.budget_ms, 25_000);
            assert_eq!(s.remaining, 1);
        }
        other => panic!("expected the end, got {other:?}"),
    }
}

#[test]
fn a_resume_time_in_the_future_counts_from_now() {
    let now = Instant::now();
    let mut d = Timeline::new(settings(), true);
    assert!(d.resume(now, Trigger::Prestop, now + secs(100.0)));
    assert_eq!(d.deadline(), Some(now + secs(25.0)));
}

/// The deletion time still wins over the resumed timeout when it is earlier.
#[test]
fn a_resumed_drain_still_takes_a_shorter_deletion_deadline() {
    let t0 = Instant::now();
    let now = t0 + secs(3.0);
    let mut d = Timeline::new(settings(), true);
    assert!(d.resume(now, Trigger::Prestop, t0));
    assert!(!d.pod_deleting(now, t0 + secs(12.0)));
    assert_eq!(d.deadline(), Some(t0 + secs(7.0)));
}

/// Issue 12 item 9: the app is killed 4 s into the drain; its clients' sockets are
/// reset and the admin endpoint refuses. The count reaches zero, but the summary must
/// not pass that off as a clean drain.
#[test]
fn an_app_killed_mid_drain_is_not_a_clean_drain() {
    let mut pod = Pod::new(200, App::DiesAt(secs(4.0)));
    let (s, _) = pod.run(timings(true), secs(25.0));
    assert_eq!(s.outcome, Outcome::Drained, "the count did reach zero");
    assert!(s.sessions_closed > 0 && s.sessions_closed < 200);
    assert_eq!(
        s.vanished,
        200 - s.sessions_closed,
        "every connection the app did not close vanished"
    );
}

#[test]
fn a_cooperative_drain_has_nothing_vanished() {
    let mut pod = Pod::new(500, App::Cooperative);
    let (s, _) = pod.run(timings(true), secs(25.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.vanished, 0);
}

#[test]
fn departures_while_the_closer_fails_vanished() {
    let mut pod = Pod::new(50, App::Failing);
    pod.leave_at = Some(secs(5.0));
    let (s, _) = pod.run(timings(true), secs(25.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.vanished, 50);
}

/// Without a closer, clients leaving is the drain working: nothing is vanished.
#[test]
fn without_a_closer_departures_are_the_drain() {
    let mut pod = Pod::new(50, App::Cooperative);
    pod.leave_at = Some(secs(5.0));
    let (s, _) = pod.run(timings(false), secs(25.0));
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.vanished, 0);
}
