//! When the kubelet will SIGKILL the pod, on the monotonic clock the drain runs on.
//!
//! `metadata.deletionTimestamp` is wall-clock time (the moment the grace period ends).
//! This only maps it onto an `Instant`; what the drain makes of it (minus the app
//! reserve, the earlier of it and the timeout) is the drain machine's decision.

use std::time::{Instant, SystemTime};

/// `deletion` as an `Instant`, through the pair (`now`, `now_wall`) read at the same
/// moment. A deletion already past maps to the past (or `now` when that can't be
/// represented).
pub fn kill_instant(deletion: SystemTime, now: Instant, now_wall: SystemTime) -> Instant {
    match deletion.duration_since(now_wall) {
        // An absurdly far future: far enough that it never decides anything.
        Ok(ahead) => now
            .checked_add(ahead)
            .unwrap_or(now + std::time::Duration::from_secs(86_400 * 365)),
        Err(past) => now.checked_sub(past.duration()).unwrap_or(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn future_past_and_extreme_deletions() {
        let now = Instant::now();
        let wall = SystemTime::now();
        assert_eq!(kill_instant(wall + s(15), now, wall), now + s(15));
        assert_eq!(kill_instant(wall, now, wall), now);
        let past = kill_instant(wall - s(1), now, wall);
        assert!(past <= now);
        // Before the epoch-ish and far future: no panic, sane ordering.
        assert!(kill_instant(SystemTime::UNIX_EPOCH, now, wall) <= now);
        assert!(kill_instant(wall + s(86_400 * 3650), now, wall) > now + s(86_400));
    }
}
