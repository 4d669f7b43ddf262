//! The drain deadline: the configured one, cut short by the pod's deletionTimestamp.

use std::time::{Duration, Instant, SystemTime};

/// The earlier of `configured` and `deletion − app_reserve`.
///
/// `deletion` is wall-clock time (the pod's `metadata.deletionTimestamp`, i.e. the moment
/// the kubelet sends SIGKILL); it is mapped onto the monotonic clock through the pair
/// (`now_wall`, `now`) read at the same moment. A deletion whose reserve-adjusted time is
/// already past gives `now`: the drain must end at once so the app keeps its reserve.
pub fn drain_deadline(
    configured: Instant,
    now: Instant,
    now_wall: SystemTime,
    deletion: Option<SystemTime>,
    app_reserve: Duration,
) -> Instant {
    let Some(deletion) = deletion else {
        return configured;
    };
    let end = deletion
        .checked_sub(app_reserve)
        // Before the epoch: certainly past.
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let from_deletion = match end.duration_since(now_wall) {
        // An absurdly far future cannot be represented; the configured deadline wins anyway.
        Ok(left) => now.checked_add(left).unwrap_or(configured),
        Err(_) => now,
    };
    configured.min(from_deletion)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn absent_deletion_keeps_configured() {
        let now = Instant::now();
        let wall = SystemTime::now();
        assert_eq!(
            drain_deadline(now + s(25), now, wall, None, s(5)),
            now + s(25)
        );
    }

    #[test]
    fn near_deletion_shortens() {
        let now = Instant::now();
        let wall = SystemTime::now();
        // kubectl delete --grace-period=15: SIGKILL at +15 s, app keeps 5 s → drain ends at +10 s.
        let d = drain_deadline(now + s(25), now, wall, Some(wall + s(15)), s(5));
        assert_eq!(d, now + s(10));
    }

    #[test]
    fn far_deletion_keeps_configured() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let d = drain_deadline(now + s(25), now, wall, Some(wall + s(300)), s(5));
        assert_eq!(d, now + s(25));
    }

    #[test]
    fn past_deletion_ends_now() {
        let now = Instant::now();
        let wall = SystemTime::now();
        assert_eq!(
            drain_deadline(now + s(25), now, wall, Some(wall - s(1)), s(5)),
            now
        );
        // --grace-period=5 with a 5 s reserve leaves nothing.
        assert_eq!(
            drain_deadline(now + s(25), now, wall, Some(wall + s(5)), s(5)),
            now
        );
        assert_eq!(
            drain_deadline(now + s(25), now, wall, Some(SystemTime::UNIX_EPOCH), s(5)),
            now
        );
    }
}
