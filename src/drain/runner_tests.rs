//! The runner's guarantees when I/O misbehaves (counts that hang or fail, callers that
//! hang up, a deadline that becomes shorter) and its event-driven release. Tokio's
//! paused clock: timings are exact and nothing sleeps for real.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant as TokioInstant;

use super::*;
use crate::drain::seams::{BoxFuture, CloseError, CountError, NoObserver, Snapshot};
use crate::drain::settings::DelayRange;

/// A counter whose answers the test scripts: the ids it holds, after `delay` from the
/// second call on; or an error every time. `set` changes the ids and wakes `changed`.
struct Scripted {
    ids: Mutex<Vec<u64>>,
    delay: Duration,
    calls: AtomicU64,
    fail: bool,
    notify: Notify,
    event_driven: bool,
}

impl Scripted {
    fn set(&self, ids: Vec<u64>) {
        *self.ids.lock().unwrap() = ids;
        self.notify.notify_waiters();
    }
}

impl SessionCounter for Scripted {
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CountError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(CountError("netlink gone".into()));
            }
            if n > 0 && !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            Ok(Snapshot {
                ids: self.ids.lock().unwrap().clone(),
            })
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        if !self.event_driven {
            return Box::pin(std::future::pending());
        }
        let notified = self.notify.notified();
        Box::pin(notified)
    }
}

fn scripted(n: u64) -> Scripted {
    Scripted {
        ids: Mutex::new((0..n).collect()),
        delay: Duration::ZERO,
        calls: AtomicU64::new(0),
        fail: false,
        notify: Notify::new(),
        event_driven: false,
    }
}

/// A closer that closes what it is asked and takes the sessions off the counter.
struct Closing {
    counter: Arc<Scripted>,
    requests: Mutex<Vec<CloseRequest>>,
}

impl SessionCloser for Closing {
    fn close(&self, req: CloseRequest) -> BoxFuture<'_, Result<CloseReply, CloseError>> {
        Box::pin(async move {
            let mut ids = self.counter.ids.lock().unwrap().clone();
            let n = (req.max as usize).min(ids.len());
            ids.drain(..n);
            let remaining = ids.len() as u64;
            self.counter.set(ids);
            self.requests.lock().unwrap().push(req);
            Ok(CloseReply {
                closed: n as u64,
                remaining,
            })
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}

fn settings(timeout: Duration) -> Settings {
    Settings {
        drain_timeout: timeout,
        app_reserve: Duration::from_secs(5),
        settle_min: Duration::from_millis(50),
        settle_quiet: Duration::from_millis(20),
        settle_max: Duration::from_millis(100),
        close_tick: Duration::from_millis(10),
        close_window: Duration::from_millis(100),
        poll: Duration::from_millis(20),
        reconnect_after: DelayRange {
            min: Duration::ZERO,
            max: Duration::from_secs(1),
        },
    }
}

fn drainer_with(
    counter: Arc<Scripted>,
    closer: Option<Arc<dyn SessionCloser>>,
    s: Settings,
) -> Drainer {
    let parts = Parts {
        counter,
        closer,
        close_code: 1012,
        hint: HintTemplate::default(),
        observer: Arc::new(NoObserver),
    };
    Drainer::new(s, parts)
}

fn drainer(counter: Scripted, timeout: Duration) -> Drainer {
    drainer_with(Arc::new(counter), None, settings(timeout))
}

#[tokio::test(start_paused = true)]
async fn a_hanging_count_still_answers_by_the_deadline() {
    let d = drainer(
        Scripted {
            delay: Duration::from_millis(1500),
            ..scripted(3)
        },
        Duration::from_millis(400),
    );
    let t0 = TokioInstant::now();
    let s = d.drain(Trigger::Prestop).await;
    assert_eq!(s.outcome, Outcome::DeadlineExceeded);
    assert_eq!(s.remaining, 3);
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(400),
        "answered at the deadline"
    );
    // The runner, once unstuck, must not finish a second time.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(d.summary(), Some(s));
}

#[tokio::test(start_paused = true)]
async fn a_failing_count_never_reads_as_drained() {
    let d = drainer(
        Scripted {
            fail: true,
            ..scripted(0)
        },
        Duration::from_millis(300),
    );
    let s = d.drain(Trigger::Signal).await;
    assert_eq!(s.outcome, Outcome::DeadlineExceeded, "unknown is not zero");
    assert_eq!(s.duration_ms, 300);
}

#[tokio::test(start_paused = true)]
async fn a_caller_hanging_up_at_the_start_does_not_strand_the_pod() {
    let d = drainer(scripted(0), Duration::from_secs(5));
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
    assert_eq!(s.trigger, Trigger::Prestop, "the first trigger started it");
}

/// The pod's deletion time arriving mid-drain (the edge maps deletionTimestamp to an
/// Instant) shortens the drain the hook waits on.
#[tokio::test(start_paused = true)]
async fn pod_deletion_shortens_the_running_drain() {
    let d = drainer(scripted(2), Duration::from_secs(10));
    let t0 = TokioInstant::now();
    let hook = tokio::spawn({
        let d = d.clone();
        async move { d.drain(Trigger::Prestop).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // SIGKILL at +5.35 s, 5 s app reserve: the drain ends at +350 ms.
    d.pod_deleting((t0 + Duration::from_millis(5350)).into_std());
    let s = hook.await.unwrap();
    assert_eq!(s.outcome, Outcome::DeadlineExceeded);
    assert_eq!(t0.elapsed(), Duration::from_millis(350));
    assert_eq!(s.budget_ms, 350);
}

#[tokio::test(start_paused = true)]
async fn serving_status_then_draining_status() {
    let d = drainer(scripted(0), Duration::from_secs(5));
    assert_eq!(d.status().state, Phase::Serving);
    assert_eq!(d.count().await, Some(0));
    d.start(Trigger::Api);
    let st = d.status();
    assert_eq!(st.state, Phase::Settling);
    let s = d.drain(Trigger::Prestop).await;
    assert_eq!(s.trigger, Trigger::Api, "joined the running drain");
    assert_eq!(d.status().state, Phase::Drained);
}

/// An event-driven counter releases the hook the moment the last connection is gone,
/// not at the next poll.
#[tokio::test(start_paused = true)]
async fn the_last_connection_leaving_releases_at_once() {
    let counter = Arc::new(Scripted {
        event_driven: true,
        ..scripted(4)
    });
    let mut s = settings(Duration::from_secs(20));
    s.poll = Duration::from_secs(5);
    let d = drainer_with(counter.clone(), None, s);
    let t0 = TokioInstant::now();
    let hook = tokio::spawn({
        let d = d.clone();
        async move { d.drain(Trigger::Prestop).await }
    });
    tokio::time::sleep(Duration::from_millis(1234)).await;
    counter.set(vec![]);
    let summary = hook.await.unwrap();
    assert_eq!(summary.outcome, Outcome::Drained);
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(1234),
        "released at the event"
    );
}

/// With a closer, every session is closed with the code and hint, paced over the window.
#[tokio::test(start_paused = true)]
async fn a_closer_closes_every_session_with_the_hint() {
    let counter = Arc::new(Scripted {
        event_driven: true,
        ..scripted(50)
    });
    let closer = Arc::new(Closing {
        counter: counter.clone(),
        requests: Mutex::new(Vec::new()),
    });
    let d = drainer_with(
        counter.clone(),
        Some(closer.clone()),
        settings(Duration::from_secs(5)),
    );
    let s = d.drain(Trigger::Prestop).await;
    assert_eq!(s.outcome, Outcome::Drained);
    assert_eq!(s.sessions_closed, 50);
    let reqs = closer.requests.lock().unwrap();
    assert_eq!(reqs.len(), 10, "5 per tick over the 100 ms window");
    assert!(reqs.iter().all(|r| r.code == 1012 && r.max == 5));
    assert!(reqs[0].reason.starts_with(r#"{"reconnect_after_ms":"#));
    assert_ne!(reqs[0].reason, reqs[9].reason, "hints grow over the window");
}

/// The fleet budget fed through the handle slows the closes down.
#[tokio::test(start_paused = true)]
async fn a_close_rate_slows_the_closes() {
    let counter = Arc::new(Scripted {
        event_driven: true,
        ..scripted(100)
    });
    let closer = Arc::new(Closing {
        counter: counter.clone(),
        requests: Mutex::new(Vec::new()),
    });
    let d = drainer_with(counter, Some(closer), settings(Duration::from_secs(30)));
    d.set_close_rate(Some(50.0));
    let t0 = TokioInstant::now();
    let s = d.drain(Trigger::Prestop).await;
    assert_eq!(s.outcome, Outcome::Drained);
    // 100 sessions at 50/s: about 2 s of closing after ~100 ms of settling.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took <= Duration::from_millis(2300),
        "{took:?}"
    );
    assert_eq!(d.status().close_rate, Some(50.0));
}
