//! Pacing: how many sessions to close per tick, and the reconnect delay of each batch.

use std::time::Duration;

use crate::config::DurationRange;

/// Sessions to close now so that `open` sessions are all closed by the end of the
/// window, one batch per `tick`. At least 1; everything left once the window is over.
pub fn batch_size(open: u64, window_left: Duration, tick: Duration) -> u64 {
    let ticks_left = window_left
        .as_nanos()
        .div_ceil(tick.as_nanos().max(1))
        .max(1);
    let ticks_left = u64::try_from(ticks_left).unwrap_or(u64::MAX);
    open.div_ceil(ticks_left).max(1)
}

/// The reconnect delay for batch `index`: spread evenly over the range by the golden-ratio
/// sequence, so consecutive batches land far apart and any prefix of batches covers the
/// range evenly (no randomness: the plan is reproducible and testable).
pub fn spread(range: DurationRange, index: u64) -> Duration {
    const PHI_FRAC: f64 = 0.618_033_988_749_894_9;
    let frac = (index as f64 * PHI_FRAC).fract();
    let span = range.max.saturating_sub(range.min);
    range.min + span.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);
    const WINDOW: Duration = Duration::from_secs(10);

    /// Closes `open` sessions tick by tick as the app would and returns the batches.
    fn plan(open: u64) -> Vec<u64> {
        let mut left = open;
        let mut batches = Vec::new();
        let mut elapsed = Duration::ZERO;
        while left > 0 {
            let b = batch_size(left, WINDOW.saturating_sub(elapsed), TICK).min(left);
            batches.push(b);
            left -= b;
            elapsed += TICK;
            assert!(batches.len() <= 1000, "plan does not converge");
        }
        batches
    }

    #[test]
    fn one_session_is_one_batch() {
        assert_eq!(plan(1), vec![1]);
    }

    #[test]
    fn seven_sessions_one_per_tick() {
        assert_eq!(plan(7), vec![1; 7]);
    }

    #[test]
    fn ten_thousand_spread_over_the_window() {
        let p = plan(10_000);
        assert_eq!(p.len(), 100, "one batch per tick over 10 s");
        assert!(p.iter().all(|&b| b == 100), "{p:?}");
    }

    #[test]
    fn uneven_counts_finish_inside_the_window() {
        for open in [99, 101, 250, 1234, 9999] {
            let p = plan(open);
            assert!(p.len() <= 100, "{open}: {} ticks", p.len());
            assert_eq!(p.iter().sum::<u64>(), open);
            let (lo, hi) = (p.iter().min().unwrap(), p.iter().max().unwrap());
            assert!(hi - lo <= 1, "{open}: batches vary too much: {lo}..{hi}");
        }
    }

    #[test]
    fn window_over_means_close_everything() {
        assert_eq!(batch_size(500, Duration::ZERO, TICK), 500);
        assert_eq!(batch_size(0, WINDOW, TICK), 1);
    }

    #[test]
    fn spread_stays_in_range_and_covers_it() {
        let r = DurationRange {
            min: Duration::from_millis(200),
            max: Duration::from_millis(2200),
        };
        let v: Vec<u64> = (0..20).map(|i| spread(r, i).as_millis() as u64).collect();
        assert!(v.iter().all(|&x| (200..=2200).contains(&x)), "{v:?}");
        // Every 400 ms quarter of the range gets some batches.
        for q in 0..5 {
            let lo = 200 + q * 400;
            assert!(
                v.iter().any(|&x| x >= lo && x < lo + 400),
                "empty bucket {lo}: {v:?}"
            );
        }
        let fixed = DurationRange {
            min: Duration::from_millis(700),
            max: Duration::from_millis(700),
        };
        assert_eq!(spread(fixed, 5), Duration::from_millis(700));
    }
}
