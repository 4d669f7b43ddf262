//! The rebalancer's decision, pure: own session count and the ready peers' counts in,
//! "close k sessions over w" or "hold" out, with the current time injected.
//!
//! Rule (docs/scaling.md): with own count C and fleet mean M over the ready peers and
//! this pod, when C > ⌈M·(1 + tolerance)⌉ and C − ⌈M⌉ ≥ `min_excess`, close C − ⌈M⌉
//! (what this pod holds above the mean) over `window`, then hold for `cooldown`. The
//! closed clients reconnect through the ingress, which spreads them over the fleet.
//!
//! Oscillation: if the ingress sends the closed clients straight back (session affinity,
//! a hash of the client address), every rebalance is futile. A rebalance that finds the
//! own count no lower than at the previous one doubles the cooldown (up to
//! `MAX_BACKOFF_SHIFT` doublings), so a futile loop disconnects ever fewer clients per
//! hour. A round-robin ingress sends part of the closed clients back too, but the count
//! still falls round after round (the excess halves when half the pods are new): no
//! back-off then.

use std::time::{Duration, Instant};

/// The largest count a peer is believed to have; larger ones are clamped. A lying
/// peer can only raise the mean, which makes this pod close fewer sessions.
pub const MAX_PEER_SESSIONS: u64 = 1_000_000;
/// A new peer counts in the mean once it has been ready for this many fleet intervals
/// (6 s at the default 2 s): about an endpoint's propagation plus an ingress's sync.
pub const WARMUP_INTERVALS: u32 = 3;
/// The warm-up at the default fleet interval.
pub const PEER_WARMUP: Duration = Duration::from_secs(6);
/// At most 2⁴ = 16 × the cooldown between futile rebalances.
pub const MAX_BACKOFF_SHIFT: u32 = 4;

/// The knobs (`--rebalance-tolerance`, `--rebalance-min`, `--rebalance-window`,
/// `--rebalance-cooldown`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub tolerance: f64,
    pub min_excess: u64,
    pub window: Duration,
    pub cooldown: Duration,
    /// How long a peer must have been ready before it counts (see `fleet::ready_counts`).
    pub warmup: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tolerance: 0.1,
            min_excess: 5,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
            warmup: PEER_WARMUP,
        }
    }
}

/// Why nothing is closed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// This pod is draining: the drain closes everything anyway.
    Draining,
    /// A rebalance is running or cooling down until then.
    Cooldown { until: Instant },
    /// No ready peer with a believable count: there is no fleet to compare with.
    NoPeers,
    /// Within the tolerance of the mean.
    Balanced,
    /// Above the tolerance, but by fewer than `min_excess` sessions.
    SmallExcess { excess: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Hold(Hold),
    /// Close `sessions` over `over`, paced, while staying Ready.
    Close {
        sessions: u64,
        over: Duration,
        /// The fleet mean (rounded up) the closes aim for.
        target: u64,
    },
}

/// A peer's count as it reported it: negative means a broken or lying peer, ignored.
pub fn believable(count: i64) -> Option<u64> {
    u64::try_from(count).ok().map(|c| c.min(MAX_PEER_SESSIONS))
}

/// The rebalancer's memory: when the last rebalance may be followed by the next one.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    settings: Settings,
    busy_until: Option<Instant>,
    /// The own count when the last rebalance began, until a balanced count is seen.
    last_from: Option<u64>,
    /// Rebalances in a row that found the count no lower than the one before.
    futile: u32,
}

impl Rebalancer {
    pub fn new(settings: Settings) -> Rebalancer {
        Rebalancer {
            settings,
            busy_until: None,
            last_from: None,
            futile: 0,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What to do now, given this pod's count and the counts the ready peers reported
    /// (draining and unreachable peers are left out by the caller).
    pub fn decide(&mut self, now: Instant, own: u64, peers: &[i64], draining: bool) -> Decision {
        if draining {
            return Decision::Hold(Hold::Draining);
        }
        if let Some(until) = self.busy_until.filter(|&u| now < u) {
            return Decision::Hold(Hold::Cooldown { until });
        }
        let counts: Vec<u64> = peers.iter().copied().filter_map(believable).collect();
        if counts.is_empty() {
            return Decision::Hold(Hold::NoPeers);
        }
        let own_f = own as f64;
        let total = own_f + counts.iter().map(|&c| c as f64).sum::<f64>();
        let mean = total / (counts.len() + 1) as f64;
        let threshold = (mean * (1.0 + self.settings.tolerance)).ceil();
        if own_f <= threshold {
            self.settled();
            return Decision::Hold(Hold::Balanced);
        }
        let target = mean.ceil() as u64;
        let excess = own.saturating_sub(target);
        if excess < self.settings.min_excess {
            self.settled();
            return Decision::Hold(Hold::SmallExcess { excess });
        }
        self.futile = match self.last_from {
            Some(before) if own >= before => self.futile.saturating_add(1),
            _ => 0,
        };
        self.last_from = Some(own);
        let cooldown = self.settings.cooldown * (1u32 << self.futile.min(MAX_BACKOFF_SHIFT));
        self.busy_until = Some(now + self.settings.window + cooldown);
        Decision::Close {
            sessions: excess,
            over: self.settings.window,
            target,
        }
    }

    fn settled(&mut self) {
        self.futile = 0;
        self.last_from = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rb() -> Rebalancer {
        Rebalancer::new(Settings::default())
    }

    fn closes(d: Decision) -> u64 {
        match d {
            Decision::Close { sessions, .. } => sessions,
            Decision::Hold(_) => 0,
        }
    }

    #[test]
    fn after_scale_up_the_old_pods_close_down_to_the_mean() {
        // 3 pods of 100, 3 new empty ones: mean 50.
        let t0 = Instant::now();
        let d = rb().decide(t0, 100, &[100, 100, 0, 0, 0], false);
        assert_eq!(
            d,
            Decision::Close {
                sessions: 50,
                over: 10 * S,
                target: 50
            }
        );
    }

    #[test]
    fn within_tolerance_or_small_excess_holds() {
        let t0 = Instant::now();
        // mean 100, threshold 110.
        assert_eq!(
            rb().decide(t0, 110, &[95, 95], false),
            Decision::Hold(Hold::Balanced)
        );
        // 12 vs 8, 8: mean 9.33, threshold ⌈10.27⌉ = 11, excess 12 − 10 = 2 < 5.
        assert_eq!(
            rb().decide(t0, 12, &[8, 8], false),
            Decision::Hold(Hold::SmallExcess { excess: 2 })
        );
        // Exactly the minimum closes.
        let mut r = Rebalancer::new(Settings {
            min_excess: 2,
            ..Settings::default()
        });
        assert_eq!(closes(r.decide(t0, 12, &[8, 8], false)), 2);
    }

    #[test]
    fn never_during_a_drain_and_not_alone() {
        let t0 = Instant::now();
        assert_eq!(
            rb().decide(t0, 500, &[0, 0], true),
            Decision::Hold(Hold::Draining)
        );
        assert_eq!(
            rb().decide(t0, 500, &[], false),
            Decision::Hold(Hold::NoPeers)
        );
    }

    #[test]
    fn cooldown_runs_from_the_window_start_to_window_plus_cooldown() {
        let t0 = Instant::now();
        let mut r = rb();
        assert_eq!(closes(r.decide(t0, 100, &[0], false)), 50);
        for dt in [0, 1, 10, 39] {
            assert!(
                matches!(
                    r.decide(t0 + dt * S, 100, &[0], false),
                    Decision::Hold(Hold::Cooldown { .. })
                ),
                "{dt}s"
            );
        }
        assert!(closes(r.decide(t0 + 40 * S, 100, &[0], false)) > 0);
    }

    /// Clients that come back to the same pod (a sticky ingress): each futile rebalance
    /// doubles the wait, so over an hour far fewer clients are disconnected than one
    /// rebalance per window + cooldown would, and never more than one window at a time.
    #[test]
    fn clients_that_come_back_to_the_same_pod_back_off() {
        let t0 = Instant::now();
        let mut r = rb();
        let mut times = Vec::new();
        let mut closed = 0;
        for s in (0..3600).step_by(2) {
            let now = t0 + s * S;
            // The count never moves: every closed client came straight back.
            let k = closes(r.decide(now, 200, &[100, 100, 100], false));
            if k > 0 {
                times.push(s);
                closed += k;
            }
        }
        let gaps: Vec<u32> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(&gaps[..4], &[40, 70, 130, 250], "{times:?}");
        assert!(gaps[4..].iter().all(|&g| g == 490), "{gaps:?}");
        // Without the back-off: 90 rebalances of 75 in the hour.
        assert!(times.len() <= 12, "{} rebalances: {times:?}", times.len());
        assert_eq!(closed, 75 * times.len() as u64);
    }

    /// A round-robin ingress sends 1/N of all closed clients to every pod, old ones
    /// included: the excess halves each round (3 old + 3 new pods), without back-off.
    #[test]
    fn a_round_robin_ingress_converges_round_by_round() {
        let t0 = Instant::now();
        let mut r = rb();
        let (mut old, mut new) = (100.0f64, 0.0f64);
        let mut rounds = Vec::new();
        for s in (0..600).step_by(2) {
            let own = old.round() as u64;
            let peers = [own as i64, own as i64, new as i64, new as i64, new as i64];
            let k = closes(r.decide(t0 + s * S, own, &peers, false)) as f64;
            if k > 0.0 {
                rounds.push(s);
                // All three old pods close k; the 3k reconnects spread over six pods.
                old += -k + 3.0 * k / 6.0;
                new += 3.0 * k / 6.0;
            }
        }
        assert_eq!(rounds, vec![0, 40, 80], "every window + cooldown");
        assert!(old / ((old + new) / 2.0) <= 1.2, "old {old}, new {new}");
    }

    #[test]
    fn a_balanced_count_resets_the_back_off() {
        let t0 = Instant::now();
        let mut r = rb();
        assert!(closes(r.decide(t0, 200, &[100], false)) > 0);
        assert!(closes(r.decide(t0 + 40 * S, 200, &[100], false)) > 0);
        // Balanced after the second window: the next imbalance waits only the base cooldown.
        assert_eq!(
            r.decide(t0 + 110 * S, 100, &[100], false),
            Decision::Hold(Hold::Balanced)
        );
        assert!(closes(r.decide(t0 + 112 * S, 200, &[100], false)) > 0);
        assert!(closes(r.decide(t0 + 152 * S, 200, &[100], false)) > 0);
    }

    #[test]
    fn peers_that_disappear_leave_the_mean() {
        let t0 = Instant::now();
        // Three empty new pods: close to the mean of 50.
        assert_eq!(
            closes(rb().decide(t0, 100, &[100, 100, 0, 0, 0], false)),
            50
        );
        // Two of them went away (unreachable, deleted): mean 75, threshold 83.
        assert_eq!(closes(rb().decide(t0, 100, &[100, 100, 0], false)), 25);
        // All peers gone: nothing to compare with.
        assert_eq!(
            rb().decide(t0, 100, &[], false),
            Decision::Hold(Hold::NoPeers)
        );
    }

    #[test]
    fn lying_peers_cannot_make_a_pod_close_more() {
        let t0 = Instant::now();
        let honest = closes(rb().decide(t0, 100, &[100, 0], false));
        assert_eq!(honest, 33, "mean 66.7 → target 67");
        // Negative counts are ignored: the same as the peer not being there.
        assert_eq!(
            closes(rb().decide(t0, 100, &[100, 0, -1_000_000], false)),
            honest
        );
        assert_eq!(
            rb().decide(t0, 100, &[-1, -5], false),
            Decision::Hold(Hold::NoPeers)
        );
        // Huge counts are clamped: they raise the mean, and nothing overflows.
        assert_eq!(
            rb().decide(t0, 100, &[i64::MAX, 0], false),
            Decision::Hold(Hold::Balanced)
        );
        assert_eq!(believable(i64::MAX), Some(MAX_PEER_SESSIONS));
        // A pod with more than the clamp still closes only to the mean.
        let own = 3 * MAX_PEER_SESSIONS;
        let k = closes(rb().decide(t0, own, &[i64::MAX, i64::MAX], false));
        assert_eq!(k, own - (5 * MAX_PEER_SESSIONS).div_ceil(3));
    }

    #[test]
    fn never_closes_more_than_it_has_or_below_the_mean() {
        let t0 = Instant::now();
        for own in [0u64, 1, 7, 50, 333, 10_000] {
            for peers in [&[0i64][..], &[0, 0, 0], &[5, 500], &[1, 2, 3, 4, 5, 6, 7]] {
                let k = closes(rb().decide(t0, own, peers, false));
                let total = own + peers.iter().map(|&p| p as u64).sum::<u64>();
                let mean = total as f64 / (peers.len() + 1) as f64;
                assert!(k <= own, "{own} {peers:?}");
                assert!(
                    k == 0 || (own - k) as f64 >= mean,
                    "{own} {peers:?}: left {} below mean {mean}",
                    own - k
                );
            }
        }
    }
}
