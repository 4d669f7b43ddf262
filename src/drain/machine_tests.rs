//! The drain timeline driven by a fake clock and a simulated pod: no sockets, no sleeps.

use std::time::{Duration, Instant};

use super::machine::{Action, Drain, Phase, Timings};
use super::report::{Outcome, Summary, Trigger};
use crate::admin::DrainReply;
use crate::config::DurationRange;

fn timings(has_admin: bool) -> Timings {
    Timings {
        settle_min: Duration::from_secs(2),
        settle_quiet: Duration::from_secs(1),
        settle_max: Duration::from_secs(15),
        close_tick: Duration::from_millis(100),
        close_window: Duration::from_secs(10),
        poll: Duration::from_millis(100),
        reconnect_after: DurationRange {
            min: Duration::ZERO,
            max: Duration::from_secs(2),
        },
        has_admin,
    }
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
    /// Closes sessions but clients ignore the close frame: sockets stay.
    ClientsIgnoreClose,
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
    }

    fn close(&mut self, max: u64) -> Option<DrainReply> {
        match self.app {
            App::Failing => None,
            App::Cooperative | App::ClientsIgnoreClose => {
                let n = max.min(self.sessions);
                self.sessions -= n;
                if self.app == App::Cooperative {
                    self.sockets.drain(..n as usize);
                }
                Some(DrainReply {
                    closed: n,
                    remaining: self.sessions,
                })
            }
        }
    }

    /// Runs a drain with `budget` to its end; returns the summary and the drain.
    fn run(&mut self, t: Timings, budget: Duration) -> (Summary, Drain) {
        let mut d = Drain::start(
            t,
            Trigger::Prestop,
            self.now,
            self.now + budget,
            &self.sockets,
        );
        assert_eq!(d.phase(), Phase::Settling, "unready at once");
        for _ in 0..100_000 {
            d.observe(self.now, &self.sockets);
            match d.next(self.now) {
                Action::Sleep { until } => {
                    assert!(
                        until > self.now || until == d.deadline(),
                        "busy loop at {:?}",
                        self.at()
                    );
                    assert!(until <= d.deadline(), "sleeps past the deadline");
                    self.advance_to(
                        until
                            .max(self.now + Duration::from_millis(1))
                            .min(d.deadline().max(self.now)),
                    );
                }
                Action::Close { max, after_ms } => {
                    assert!(after_ms <= 2000);
                    let reply = self.close(max);
                    self.closes.push((self.at(), max, after_ms));
                    d.close_answered(self.now, reply);
                }
                Action::Finished(s) => return (s, d),
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
    let mut pod = Pod::new(30, App::Failing);
    let t = timings(true);
    let mut d = Drain::start(
        t,
        Trigger::Signal,
        pod.now,
        pod.now + secs(20.0),
        &pod.sockets,
    );
    let mut failed = 0;
    for _ in 0..10_000 {
        d.observe(pod.now, &pod.sockets);
        match d.next(pod.now) {
            Action::Sleep { until } => pod.advance_to(until),
            Action::Close { max, .. } => {
                if failed < 3 {
                    failed += 1;
                    d.close_answered(pod.now, None);
                } else {
                    pod.app = App::Cooperative;
                    let r = pod.close(max);
                    d.close_answered(pod.now, r);
                }
            }
            Action::Finished(s) => {
                assert_eq!(s.outcome, Outcome::Drained);
                assert_eq!(s.admin_failures, 3);
                assert_eq!(s.sessions_closed, 30);
                return;
            }
        }
    }
    panic!("never finished");
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
    let t = timings(false);
    let mut d = Drain::start(t, Trigger::Api, pod.now, pod.now + secs(25.0), &pod.sockets);
    for _ in 0..10_000 {
        d.observe(pod.now, &pod.sockets);
        // The clients leave on their own at 7 s.
        if pod.at() >= secs(7.0) {
            pod.sockets.clear();
        }
        match d.next(pod.now) {
            Action::Sleep { until } => {
                if pod.at() > secs(2.5) {
                    assert_eq!(d.phase(), Phase::Waiting);
                }
                pod.advance_to(until)
            }
            Action::Close { .. } => panic!("no admin, no close"),
            Action::Finished(s) => {
                assert_eq!(s.outcome, Outcome::Drained);
                // Released within one poll of the count reaching zero.
                assert!(pod.at() <= secs(7.1), "{:?}", pod.at());
                return;
            }
        }
    }
    panic!("never finished");
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
fn shorter_real_deadline_applies() {
    let pod = Pod::new(5, App::ClientsIgnoreClose);
    let mut d = Drain::start(
        timings(true),
        Trigger::Prestop,
        pod.now,
        pod.now + secs(25.0),
        &pod.sockets,
    );
    d.shorten_deadline(pod.now + secs(5.0));
    assert_eq!(d.deadline(), pod.now + secs(5.0));
    d.shorten_deadline(pod.now + secs(9.0));
    assert_eq!(d.deadline(), pod.now + secs(5.0), "never moved later");
    assert_eq!(d.next(pod.now + secs(5.0)), d.next(pod.now + secs(5.0)));
    assert!(
        matches!(d.next(pod.now + secs(5.0)), Action::Finished(s) if s.outcome == Outcome::DeadlineExceeded)
    );
}

#[test]
fn status_reports_progress() {
    let pod = Pod::new(40, App::Cooperative);
    let mut d = Drain::start(
        timings(true),
        Trigger::Prestop,
        pod.now,
        pod.now + secs(25.0),
        &pod.sockets,
    );
    let st = d.status(pod.now + secs(1.0));
    assert_eq!(st.state, Phase::Settling);
    assert_eq!(st.connections, 40);
    assert_eq!(st.deadline_in_ms, 24_000);
    let later = pod.now + secs(2.0);
    d.observe(later, &pod.sockets);
    match d.next(later) {
        Action::Close { max, .. } => {
            assert_eq!(max, 1);
            d.close_answered(
                later,
                Some(DrainReply {
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
