//! The fleet close budget (`--fleet-close-rate N`): when D pods drain together (this one
//! included), each closes at most N/D sessions per second, so the pods that stay see at
//! most N reconnects per second in total. The drain core stretches its close window to
//! honour the rate, and yields to its deadline when it can't (docs/scaling.md).

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
#[error("--fleet-close-rate: {0} is not a rate (use a number of sessions per second above 0)")]
pub struct BudgetError(pub f64);

/// Sessions per second the whole fleet may close.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    per_second: f64,
}

impl Budget {
    pub fn new(per_second: f64) -> Result<Budget, BudgetError> {
        if per_second.is_finite() && per_second > 0.0 {
            Ok(Budget { per_second })
        } else {
            Err(BudgetError(per_second))
        }
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// This pod's close rate while `draining_peers` other pods drain with it.
    pub fn share(&self, draining_peers: usize) -> f64 {
        self.per_second / (draining_peers as f64 + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_pods_split_the_budget() {
        let b = Budget::new(50.0).unwrap();
        assert_eq!(b.share(0), 50.0, "alone: the whole budget");
        assert_eq!(b.share(1), 25.0);
        assert!((b.share(2) - 50.0 / 3.0).abs() < 1e-9);
        for d in 1..=64usize {
            let total = b.share(d - 1) * d as f64;
            assert!(total <= 50.0 + 1e-9, "{d} pods close {total}/s in total");
        }
        assert!(b.share(usize::MAX) > 0.0, "never a zero rate");
    }

    #[test]
    fn only_positive_finite_rates() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Budget::new(bad).is_err(), "{bad}");
        }
        let e = Budget::new(-3.0).unwrap_err().to_string();
        assert!(e.contains("--fleet-close-rate"), "{e}");
    }
}
