//! Pacing: how many sessions to close per tick, and the reconnect delay of each batch.

use std::time::Duration;

use super::settings::DelayRange;

/// The close window from `now`: at least what is left of the configured window
/// (`nominal_left`), stretched so that `open` sessions go out no faster than `rate` per
/// second, but never past `room` (the deadline minus the tail): when the budget cannot
/// finish in time the deadline wins. Returns the window and whether the budget yielded.
pub fn close_window(
    open: u64,
    nominal_left: Duration,
    rate: Option<f64>,
    room: Duration,
    tick: Duration,
) -> (Duration, bool) {
    let needed = match rate {
        Some(r) if r > 0.0 && r.is_finite() => {
            Duration::try_from_secs_f64(open as f64 / r).unwrap_or(Duration::MAX)
        }
        _ => Duration::ZERO,
    };
    let want = nominal_left.max(needed);
    let window = want.min(room).max(tick);
    (window, needed > room)
}

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

/// The reconnect delay for a batch closed `elapsed` into a close window of `window`:
/// growing linearly from `range.min` at the window's start to `range.max` at its end.
/// Closes already arrive at a steady rate; a delay that grows with time stretches the
/// reconnects over window + (max − min), so the survivors see a *lower* rate than the
/// close rate. (A varying but unordered delay — random or a low-discrepancy sequence —
/// bunches some reconnects: 1.4× the close rate in the worst second for 2 s of spread.)
pub fn hint_delay(range: DelayRange, elapsed: Duration, window: Duration) -> Duration {
    let frac = if window.is_zero() {
        1.0
    } else {
        (elapsed.as_secs_f64() / window.as_secs_f64()).clamp(0.0, 1.0)
    };
    range.min + range.max.saturating_sub(range.min).mul_f64(frac)
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
    fn a_close_rate_stretches_the_window_until_the_deadline() {
        let room = Duration::from_secs(20);
        // 600 sessions at 50/s need 12 s: longer than the 10 s window, inside the room.
        assert_eq!(
            close_window(600, WINDOW, Some(50.0), room, TICK),
            (Duration::from_secs(12), false)
        );
        // A generous budget keeps the configured window.
        assert_eq!(
            close_window(100, WINDOW, Some(1000.0), room, TICK),
            (WINDOW, false)
        );
        // 2000 at 50/s need 40 s: the deadline wins, and says so.
        assert_eq!(
            close_window(2000, WINDOW, Some(50.0), room, TICK),
            (room, true)
        );
        // No budget, or a nonsense one: the configured window, cut to the room.
        assert_eq!(
            close_window(10, WINDOW, None, TICK * 5, TICK),
            (TICK * 5, false)
        );
        assert_eq!(
            close_window(10, WINDOW, Some(f64::NAN), room, TICK),
            (WINDOW, false)
        );
        assert_eq!(
            close_window(10, WINDOW, Some(0.0), room, TICK),
            (WINDOW, false)
        );
        // Never shorter than one tick.
        assert_eq!(
            close_window(10, Duration::ZERO, None, Duration::ZERO, TICK).0,
            TICK
        );
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

    fn range() -> DelayRange {
        DelayRange {
            min: Duration::from_millis(200),
            max: Duration::from_millis(2200),
        }
    }

    #[test]
    fn hint_grows_over_the_window_and_stays_in_range() {
        let ms = |e: u64| hint_delay(range(), Duration::from_millis(e), WINDOW).as_millis();
        assert_eq!(ms(0), 200);
        assert_eq!(ms(5000), 1200);
        assert_eq!(ms(10_000), 2200);
        assert_eq!(ms(60_000), 2200, "sweeps after the window get the maximum");
        assert_eq!(
            hint_delay(range(), Duration::ZERO, Duration::ZERO).as_millis(),
            2200
        );
        let fixed = DelayRange {
            min: Duration::from_millis(700),
            max: Duration::from_millis(700),
        };
        assert_eq!(
            hint_delay(fixed, Duration::from_secs(3), WINDOW).as_millis(),
            700
        );
    }

    /// The point of the hint: reconnects reach the survivors no faster than closes
    /// leave the draining pod, in every one-second window.
    #[test]
    fn reconnects_are_never_bunched_above_the_close_rate() {
        let window = Duration::from_secs(4);
        let tick = Duration::from_millis(100);
        let (open, mut elapsed) = (200u64, Duration::ZERO);
        let mut left = open;
        let mut reconnects = Vec::new();
        while left > 0 && reconnects.len() < 1000 {
            let b = batch_size(left, window.saturating_sub(elapsed), tick).min(left);
            let at = elapsed + hint_delay(range(), elapsed, window);
            reconnects.extend(std::iter::repeat_n(at, b as usize));
            left -= b;
            elapsed += tick;
        }
        let close_rate = open as f64 / window.as_secs_f64();
        let worst = (0..800)
            .map(|k| {
                let from = Duration::from_millis(k * 10);
                reconnects
                    .iter()
                    .filter(|&&r| r >= from && r < from + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0);
        assert!(
            (worst as f64) <= close_rate,
            "worst second has {worst} reconnects, close rate {close_rate}/s"
        );
    }
}
