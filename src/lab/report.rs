//! Turns per-connection records into the run's summary (pure) and prints the table.

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use serde::Serialize;

use super::client::ConnRecord;
use super::pod::PodReport;

/// What happened to the connections the removed pods were serving.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Removed {
    /// Connections served by a removed pod and ended by the server side.
    pub connections: usize,
    pub abnormal: usize,
    /// Close code 1012 with a parseable reconnect hint.
    pub clean_1012_with_hint: usize,
    /// Whose client's next connection landed on a pod that stays.
    pub reconnected_to_survivor: usize,
    /// Connections a removed pod accepted after its deletion (t0): the ingress sends new
    /// clients there until the endpoint removal has propagated.
    pub opened_after_delete: usize,
    /// Of those, opened after the pod had begun closing sessions (its first close
    /// frame): a settle phase that ended before the endpoint left the ingress.
    pub opened_after_closes_began: usize,
    /// The latest of them, in ms after the deletion.
    pub last_opened_after_delete_ms: Option<u64>,
}

/// Time after a pool change within which a reset counts as caused by it; a connection
/// still open after it was kept. HAProxy resets a session within milliseconds.
pub const RESET_WINDOW_MS: u64 = 500;

/// The connections open at one pool change and what became of them.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PoolChange {
    /// When the change took effect (ms from the run's start).
    pub at_ms: u64,
    /// Connections open at that moment.
    pub open: usize,
    /// Of those, ended without a close frame within `RESET_WINDOW_MS`.
    pub reset: usize,
    /// Of those, still open `RESET_WINDOW_MS` later.
    pub kept: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub agent: bool,
    pub ingress: String,
    pub client: String,
    pub clients: usize,
    pub connections: usize,
    /// Connections that ended without a close frame (1006), not by the client.
    pub abnormal_closes: usize,
    pub clients_with_abnormal_close: usize,
    /// Close frames whose reason carried a reconnect hint.
    pub clean_closes_with_hint: usize,
    pub messages_sent: u64,
    pub messages_lost: u64,
    pub messages_resent: u64,
    pub reconnects: usize,
    pub reconnect_p50_ms: Option<u64>,
    pub reconnect_p99_ms: Option<u64>,
    /// Most reconnects that completed within any 1 s window (they all land on survivors).
    pub peak_reconnects_per_s: usize,
    /// The most closes the agents' plan puts into any one second (see `planned_peak`).
    pub planned_close_rate_per_s: Option<f64>,
    pub removed: Removed,
    /// What each change of the ingress's pod pool did to the connections open then.
    pub pool_changes: Vec<PoolChange>,
    pub pods: Vec<PodReport>,
    /// `scale-up` (a `balance_ms` step): imbalance before and after, time to balanced.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub balance: Option<super::fleet::BalanceReport>,
    /// `autoscale`: pods and sessions per pod.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<super::fleet::AutoscaleReport>,
    pub run_id: String,
    /// `--netns`: the prefix of the run's network namespaces (`wsdl-<tag>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub duration_ms: u64,
    /// The soak's `sample` steps (memory and fds of the pods' processes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<super::soak::Sample>,
}

/// Nearest-rank percentile of unsorted values.
pub fn percentile(values: &[u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v.get(rank - 1).copied()
}

/// Largest number of event times within any window of `window_ms`.
pub fn peak_in_window(times: &[u64], window_ms: u64) -> usize {
    let mut t = times.to_vec();
    t.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..t.len() {
        while t[hi] - t[lo] >= window_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Fills the connection figures of `s` from the records; `removed_slots` are the slots
/// of pods deleted during the run.
pub fn summarize(s: &mut Summary, records: &[ConnRecord], removed_slots: &BTreeSet<String>) {
    let mut by_client: BTreeMap<usize, Vec<&ConnRecord>> = BTreeMap::new();
    for r in records {
        by_client.entry(r.client).or_default().push(r);
    }
    s.clients = by_client.len();
    s.connections = records.len();
    s.abnormal_closes = records.iter().filter(|r| r.abnormal()).count();
    s.clients_with_abnormal_close = by_client
        .values()
        .filter(|rs| rs.iter().any(|r| r.abnormal()))
        .count();
    s.clean_closes_with_hint = records
        .iter()
        .filter(|r| r.code.is_some() && r.hint_ms.is_some())
        .count();
    s.messages_sent = records.iter().map(|r| r.sent).sum();
    s.messages_lost = records.iter().map(|r| r.lost).sum();
    s.messages_resent = records.iter().map(|r| r.resent).sum();
    let reconnect: Vec<u64> = records.iter().filter_map(|r| r.reconnect_ms).collect();
    s.reconnects = reconnect.len();
    s.reconnect_p50_ms = percentile(&reconnect, 0.50);
    s.reconnect_p99_ms = percentile(&reconnect, 0.99);
    let opened: Vec<u64> = records
        .iter()
        .filter(|r| r.reconnect_ms.is_some())
        .map(|r| r.opened_ms)
        .collect();
    s.peak_reconnects_per_s = peak_in_window(&opened, 1000);
    let mut removed = Removed::default();
    for rs in by_client.values() {
        let mut rs = rs.clone();
        rs.sort_by_key(|r| r.opened_ms);
        for (i, r) in rs.iter().enumerate() {
            let on_removed = r.pod.as_ref().is_some_and(|p| removed_slots.contains(p));
            if !on_removed || r.by_client {
                continue;
            }
            removed.connections += 1;
            if r.abnormal() {
                removed.abnormal += 1;
            }
            if r.code == Some(1012) && r.hint_ms.is_some() {
                removed.clean_1012_with_hint += 1;
            }
            let next_on_survivor = rs
                .get(i + 1)
                .and_then(|n| n.pod.as_ref())
                .is_some_and(|p| !removed_slots.contains(p));
            if next_on_survivor {
                removed.reconnected_to_survivor += 1;
            }
        }
    }
    s.removed = removed;
}

/// Fills the `opened_after_*` figures of `removed` from the records; `deleted` maps each
/// removed slot to its deletion time (ms from the run's start).
pub fn late_arrivals(
    removed: &mut Removed,
    records: &[ConnRecord],
    deleted: &BTreeMap<String, u64>,
) {
    for (slot, &t0) in deleted {
        let on_slot = || records.iter().filter(|r| r.pod.as_deref() == Some(slot));
        let closes_began = on_slot()
            .filter(|r| r.code.is_some() && !r.by_client)
            .map(|r| r.ended_ms)
            .min();
        for r in on_slot().filter(|r| r.opened_ms >= t0) {
            removed.opened_after_delete += 1;
            if closes_began.is_some_and(|c| r.opened_ms > c) {
                removed.opened_after_closes_began += 1;
            }
            let after = r.opened_ms - t0;
            removed.last_opened_after_delete_ms = Some(
                removed
                    .last_opened_after_delete_ms
                    .map_or(after, |m| m.max(after)),
            );
        }
    }
}

/// For each pool change time, the connections open then and what became of them
/// (`open - reset - kept` ended otherwise: a close frame that happened to come first).
pub fn pool_changes(records: &[ConnRecord], times: &[u64]) -> Vec<PoolChange> {
    times
        .iter()
        .map(|&at| {
            let open: Vec<&ConnRecord> = records
                .iter()
                // Whole ms: a reset often lands in the change's own millisecond.
                .filter(|r| r.opened_ms < at && r.ended_ms >= at)
                .collect();
            let within = at + RESET_WINDOW_MS;
            PoolChange {
                at_ms: at,
                open: open.len(),
                reset: open
                    .iter()
                    .filter(|r| r.abnormal() && r.ended_ms <= within)
                    .count(),
                kept: open.iter().filter(|r| r.ended_ms > within).count(),
            }
        })
        .collect()
}

/// Server-ended connections of each removed pod (what each agent had to close).
pub fn removed_per_pod(records: &[ConnRecord], removed_slots: &BTreeSet<String>) -> Vec<usize> {
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        if let Some(p) = &r.pod
            && removed_slots.contains(p)
            && !r.by_client
        {
            *per.entry(p.as_str()).or_default() += 1;
        }
    }
    per.into_values().collect()
}

/// The most closes per second the agents plan when each of the (concurrently drained)
/// pods closes `n` sessions in equal batches, one per `tick`, over `window` (the
/// agent's pacing rule): `batch = ceil(n / ceil(window / tick))`, and one pod closes
/// `min(n, batch * ticks per second)` in any second.
pub fn planned_peak(per_pod: &[usize], window: Duration, tick: Duration) -> f64 {
    let tick_ns = tick.as_nanos().max(1);
    let ticks = window.as_nanos().div_ceil(tick_ns).max(1);
    let per_second = (1_000_000_000 / tick_ns).max(1);
    per_pod
        .iter()
        .map(|&n| {
            let n = n as u128;
            n.min(n.div_ceil(ticks) * per_second) as f64
        })
        .sum()
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The demo table: one row per run.
pub fn table(rows: &[(String, Summary)]) -> String {
    let mut out = format!(
        "| {:<43} | {:>7} | {:>13} | {:>15} | {:>16} | {:>13} | {:>13} | {:>16} | {:>13} |\n",
        "setup",
        "clients",
        "clients reset",
        "abnormal (1006)",
        "clean with hint",
        "reconnect p50",
        "reconnect p99",
        "peak reconnect/s",
        "messages lost"
    );
    out.push_str(&format!(
        "|{}|{}:|{}:|{}:|{}:|{}:|{}:|{}:|{}:|\n",
        "-".repeat(45),
        "-".repeat(8),
        "-".repeat(14),
        "-".repeat(16),
        "-".repeat(17),
        "-".repeat(14),
        "-".repeat(14),
        "-".repeat(17),
        "-".repeat(14)
    ));
    for (label, s) in rows {
        out.push_str(&format!(
            "| {:<43} | {:>7} | {:>13} | {:>15} | {:>16} | {:>10} ms | {:>10} ms | {:>16} | {:>13} |\n",
            label,
            s.clients,
            s.clients_with_abnormal_close,
            s.abnormal_closes,
            s.clean_closes_with_hint,
            opt(s.reconnect_p50_ms),
            opt(s.reconnect_p99_ms),
            s.peak_reconnects_per_s,
            s.messages_lost
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(client: usize, pod: &str, opened: u64, code: Option<u16>) -> ConnRecord {
        ConnRecord {
            client,
            pod: Some(pod.into()),
            opened_ms: opened,
            code,
            ..Default::default()
        }
    }

    #[test]
    fn late_arrivals_count_opens_after_deletion_and_after_the_first_close() {
        let mut closed = rec(1, "s1", 100, Some(1012));
        closed.ended_ms = 1200;
        let records = vec![
            closed,
            rec(2, "s1", 900, None),  // before the deletion at 1000
            rec(3, "s1", 1100, None), // after it, before the first close
            rec(4, "s1", 1500, None), // after the first close (1200)
            rec(5, "s0", 1600, None), // a survivor
        ];
        let deleted = BTreeMap::from([("s1".to_owned(), 1000)]);
        let mut r = Removed::default();
        late_arrivals(&mut r, &records, &deleted);
        assert_eq!(r.opened_after_delete, 2);
        assert_eq!(r.opened_after_closes_began, 1);
        assert_eq!(r.last_opened_after_delete_ms, Some(500));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn peak_counts_events_within_a_sliding_second() {
        assert_eq!(peak_in_window(&[0, 100, 900, 1000, 1950, 1999], 1000), 3);
        assert_eq!(peak_in_window(&[0, 100, 900, 999, 2500], 1000), 4);
        assert_eq!(peak_in_window(&[], 1000), 0);
        assert_eq!(peak_in_window(&[5, 5, 5], 1000), 3);
    }

    #[test]
    fn removed_pod_clients_are_followed_to_their_next_connection() {
        let mut a = rec(0, "s3", 0, Some(1012));
        a.reason = r#"{"reconnect_after_ms":10}"#.into();
        a.hint_ms = Some(10);
        let mut a2 = rec(0, "s0", 500, None);
        a2.reconnect_ms = Some(400);
        a2.by_client = true;
        let b = rec(1, "s4", 0, None);
        let mut b2 = rec(1, "s4", 300, None);
        b2.reconnect_ms = Some(200);
        b2.by_client = true;
        let removed: BTreeSet<String> = ["s3".to_owned(), "s4".to_owned()].into();
        let mut s = Summary::default();
        summarize(&mut s, &[a, a2, b, b2], &removed);
        assert_eq!(s.clients, 2);
        assert_eq!(s.abnormal_closes, 1);
        assert_eq!(s.clean_closes_with_hint, 1);
        assert_eq!(
            s.removed,
            Removed {
                connections: 2,
                abnormal: 1,
                clean_1012_with_hint: 1,
                reconnected_to_survivor: 1,
                ..Default::default()
            }
        );
        assert_eq!(s.reconnect_p50_ms, Some(200));
        assert_eq!(s.peak_reconnects_per_s, 2);
    }

    #[test]
    fn pool_changes_sort_open_connections_into_reset_and_kept() {
        let span = |opened, ended, code| ConnRecord {
            opened_ms: opened,
            ended_ms: ended,
            code,
            ..Default::default()
        };
        let records = [
            span(0, 1_005, None),         // reset by the change at 1000
            span(0, 5_000, None),         // kept, reset much later by something else
            span(100, 1_200, Some(1012)), // a close frame raced the change
            span(999, 3_000, Some(1000)), // kept
            span(1_000, 3_000, None),     // opened in the change's millisecond: after it
            span(0, 1_000, None),         // reset in the change's millisecond
            span(0, 999, None),           // gone before the change
        ];
        assert_eq!(
            pool_changes(&records, &[1_000]),
            vec![PoolChange {
                at_ms: 1_000,
                open: 5,
                reset: 2,
                kept: 2
            }]
        );
        assert_eq!(pool_changes(&records, &[]), vec![]);
    }

    #[test]
    fn planned_peak_follows_the_agents_batches() {
        let ms = Duration::from_millis;
        // 40 over 2 s in 100 ms ticks: 2 per tick, 20 per second.
        assert_eq!(planned_peak(&[40], ms(2000), ms(100)), 20.0);
        // A window of one tick closes everything at once.
        assert_eq!(planned_peak(&[40], ms(100), ms(100)), 40.0);
        // Few sessions: one per tick, all within the first second; pods add up.
        assert_eq!(planned_peak(&[3, 3, 3], ms(2000), ms(100)), 9.0);
        // 100 over 5 s: 2 per tick.
        assert_eq!(planned_peak(&[100], ms(5000), ms(100)), 20.0);
        assert_eq!(planned_peak(&[], ms(2000), ms(100)), 0.0);
    }

    #[test]
    fn table_has_a_row_per_run() {
        let t = table(&[
            ("a".into(), Summary::default()),
            ("b".into(), Summary::default()),
        ]);
        assert_eq!(t.lines().count(), 4);
    }
}
