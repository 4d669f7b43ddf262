//! The runner's guarantees when I/O misbehaves: counts that hang or fail, callers that
//! hang up, a deadline that becomes shorter. Real tokio time, short timings.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::config::DurationRange;
use crate::conn::{ConnError, CountSockets, Snapshot};

/// A counter whose answers the test scripts: `ids` sockets, after `delay` from the
/// second call on; or an error every time.
struct Scripted {
    ids: Vec<u64>,
    delay: Duration,
    calls: u32,
    fail: bool,
}

impl CountSockets for Scripted {
    fn snapshot(&mut self) -> Result<Snapshot, ConnError> {
        self.calls += 1;
        if self.fail {
            return Err(ConnError::Io(std::io::Error::other("netlink gone")));
        }
        if self.calls > 1 {
            std::thread::sleep(self.delay);
        }
        Ok(Snapshot {
            ids: self.ids.clone(),
        })
    }
}

fn drainer(counter: Scripted, timeout: Duration, probe: Option<DeadlineProbe>) -> Drainer {
    let timings = Timings {
        settle_min: Duration::from_millis(50),
        settle_quiet: Duration::from_millis(20),
        settle_max: Duration::from_millis(100),
        close_tick: Duration::from_millis(10),
        close_window: Duration::from_millis(100),
        poll: Duration::from_millis(20),
        reconnect_after: DurationRange {
            min: Duration::ZERO,
            max: Duration::from_secs(1),
        },
        has_admin: false,
    };
    let io = Io {
        counter: Arc::new(Mutex::new(counter)),
        admin: None,
        close_code: 1012,
        hint: HintTemplate::default(),
        metrics: Arc::new(Metrics::new()),
        deadline_probe: probe,
    };
    Drainer::new(timings, timeout, io)
}

fn scripted(n: u64) -> Scripted {
    Scripted {
        ids: (0..n).collect(),
        delay: Duration::ZERO,
        calls: 0,
        fail: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_count_still_answers_by_the_deadline() {
    let d = drainer(
        Scripted {
            delay: Duration::from_millis(1500),
            ..scripted(3)
        },
        Duration::from_millis(400),
        None,
    );
    let t0 = Instant::now();
    let s = d.drain(Trigger::Prestop).await;
    let took = t0.elapsed();
    assert_eq!(s.outcome, Outcome::DeadlineExceeded);
    assert_eq!(s.remaining, 3);
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(
        took < Duration::from_millis(700),
        "hook waited on the stuck count: {took:?}"
    );
    // The runner, once unstuck, must not finish a second time.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(d.summary(), Some(s));
}

#[tokio::test]
async fn a_failing_count_never_reads_as_drained() {
    let d = drainer(
        Scripted {
            fail: true,
            ..scripted(0)
        },
        Duration::from_millis(300),
        None,
    );
    let s = d.drain(Trigger::Signal).await;
    assert_eq!(s.outcome, Outcome::DeadlineExceeded, "unknown is not zero");
    assert!(d.metrics().encode().contains("wsdrain_count_errors_total"));
}

#[tokio::test]
async fn a_caller_hanging_up_at_the_start_does_not_strand_the_pod() {
    let d = drainer(scripted(0), Duration::from_secs(5), None);
    let first = tokio::spawn({
        let d = d.clone();
        async move { d.drain(Trigger::Prestop).await }
    });
    tokio::task::yield_now().await;
    first.abort();
    assert!(d.is_draining());
    let s = tokio::time::timeout(Duration::from_secs(2), d.drain(Trigger::Signal))
        .await
        .expect("the drain went on without its first caller");
    assert_eq!(s.outcome, Outcome::Drained);
}

#[tokio::test]
async fn the_deadline_probe_shortens_the_drain() {
    let probe: DeadlineProbe =
        Arc::new(|| Box::pin(async { Some(Instant::now() + Duration::from_millis(250)) }));
    let d = drainer(scripted(2), Duration::from_secs(10), Some(probe));
    let t0 = Instant::now();
    let s = d.drain(Trigger::PodDeletion).await;
    assert_eq!(s.outcome, Outcome::DeadlineExceeded);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(s.budget_ms <= 300, "{s:?}");
}

#[tokio::test]
async fn serving_status_then_draining_status() {
    let d = drainer(scripted(0), Duration::from_secs(5), None);
    assert!(d.status().is_none());
    assert_eq!(d.count().await, Some(0));
    d.start(Trigger::Api);
    let st = d.status().expect("status right after the trigger");
    assert_eq!(st.state, Phase::Settling);
    let s = d.drain(Trigger::Prestop).await;
    assert_eq!(s.trigger, Trigger::Api, "joined the running drain");
}

/// A deadline probe that fails (the API answered 403, or never) must leave every decision
/// as it is with no probe at all: same outcome, budget, counts.
#[tokio::test]
async fn a_failing_deadline_probe_changes_nothing() {
    let failing: DeadlineProbe = Arc::new(|| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        })
    });
    let with = drainer(scripted(2), Duration::from_millis(400), Some(failing));
    let without = drainer(scripted(2), Duration::from_millis(400), None);
    let (a, b) = tokio::join!(
        with.drain(Trigger::Prestop),
        without.drain(Trigger::Prestop)
    );
    assert_eq!(a.outcome, b.outcome);
    assert_eq!(a.budget_ms, b.budget_ms);
    assert_eq!(a.remaining, b.remaining);
    assert_eq!(a.connections_at_start, b.connections_at_start);
    assert_eq!(a.closes_requested, b.closes_requested);
    assert_eq!(a.budget_ms, 400);
}
