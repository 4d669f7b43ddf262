//! The lab's fleet scenarios (docs/lab.md): `scale-up` (do clients move to new pods?)
//! and `autoscale` (an autoscaler with the HPA's formula on the agents' `/metrics`), and
//! the fleet flags the lab gives its agents: `--peers` (every pod address the run may
//! use, on one agent port) and rebalance timings compressed like the lab's other timings.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::LabError;
use super::client::Load;
use super::pod::{Pod, http_get};
use super::runner::Run;
use super::scenario::{Scenario, Step};

/// How often the agents read their peers in the lab.
pub const FLEET_INTERVAL: Duration = Duration::from_millis(500);
/// The lab's rebalance window and cooldown (the agent's defaults are 10 s and 30 s).
pub const REBALANCE_WINDOW: Duration = Duration::from_secs(2);
pub const REBALANCE_COOLDOWN: Duration = Duration::from_secs(3);
/// Bound of one question to a pod's agent or app (a busy machine answers slowly).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Per-pod sessions are sampled this often.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// max/mean at or below this is balanced.
pub const BALANCED: f64 = 1.2;
/// Pod addresses 127.A.B.2 to 127.A.B.(1 + this) are in every agent's `--peers`.
pub const PEER_SLOTS: u8 = 24;
/// Ids of the autoscale clients that leave: apart from the others (and the Python ones).
const LEAVER_IDS: usize = 2_000_000;
/// The HPA's default tolerance.
pub const HPA_TOLERANCE: f64 = 0.1;
/// The lab autoscaler's sync period (the HPA's is 15 s) and scale-down stabilisation
/// window (the HPA's is 5 min): compressed like every lab timing.
pub const AUTOSCALE_SYNC: Duration = Duration::from_secs(1);
pub const SCALE_DOWN_WINDOW: Duration = Duration::from_secs(5);

/// The fleet options of a lab run.
#[derive(Debug, Clone, Default)]
pub struct FleetLab {
    pub rebalance: bool,
    /// `--fleet-close-rate` for every agent.
    pub close_rate: Option<f64>,
}

/// The agent flags for fleet awareness; `peers` are the agents' base URLs. Without
/// peers (`--netns` runs) none: rebalancing and the budget need peers.
pub fn agent_flags(lab: &FleetLab, peers: &[String]) -> Vec<String> {
    let mut f = Vec::new();
    if peers.is_empty() {
        return f;
    }
    f.extend(["--peers".to_owned(), peers.join(",")]);
    f.extend(["--fleet-interval".to_owned(), ms(FLEET_INTERVAL)]);
    if lab.rebalance {
        f.extend(["--rebalance".to_owned(), "true".to_owned()]);
        f.extend(["--rebalance-window".to_owned(), ms(REBALANCE_WINDOW)]);
        f.extend(["--rebalance-cooldown".to_owned(), ms(REBALANCE_COOLDOWN)]);
    }
    if let Some(rate) = lab.close_rate {
        f.extend(["--fleet-close-rate".to_owned(), rate.to_string()]);
    }
    f
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Every agent URL a loopback run may use: pods get 127.A.B.2, .3, … in start order.
pub fn peer_urls(net: [u8; 2], agent_port: u16) -> Vec<String> {
    (2..2 + PEER_SLOTS)
        .map(|host| format!("http://127.{}.{}.{host}:{agent_port}", net[0], net[1]))
        .collect()
}

/// `scale-up`: 3 pods, the clients, 3 more pods, then ~30 s of watching the balance.
pub fn scale_up_scenario() -> Scenario {
    Scenario {
        name: "scale-up".into(),
        pods: 3,
        steps: vec![
            Step::Clients(300),
            Step::ScaleTo(6),
            Step::BalanceMs(30_000),
        ],
    }
}

/// `autoscale`: `min_pods` to start with; the autoscaler does the rest.
pub fn autoscale_scenario(spec: Autoscale) -> Scenario {
    Scenario {
        name: "autoscale".into(),
        pods: spec.min_pods,
        steps: vec![Step::Autoscale(spec)],
    }
}

/// The lab autoscaler's bounds and target, and the client ramp it reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscale {
    pub min_pods: usize,
    pub max_pods: usize,
    pub target_per_pod: u64,
    /// Clients at the peak; two thirds of them leave in the ramp-down.
    pub clients: usize,
}

/// max/mean of per-pod sessions; `None` without sessions.
pub fn imbalance(counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if counts.is_empty() || total == 0 {
        return None;
    }
    let mean = total as f64 / counts.len() as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    Some(round2(max / mean))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The `scale-up` figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BalanceReport {
    /// max/mean sessions per pod right after the scale-up.
    pub imbalance_before: Option<f64>,
    /// max/mean at the end.
    pub imbalance_after: Option<f64>,
    /// First time (s after the scale-up) max/mean was at most 1.2; null if never.
    pub seconds_to_balanced: Option<f64>,
    /// Sessions per pod at the end.
    pub pod_sessions: Vec<u64>,
}

/// The figures from per-pod samples taken from the scale-up on (time since then).
pub fn balance_report(samples: &[(Duration, Vec<u64>)]) -> BalanceReport {
    let Some((_, first)) = samples.first() else {
        return BalanceReport::default();
    };
    let last = samples.last().map(|(_, c)| c.clone()).unwrap_or_default();
    BalanceReport {
        imbalance_before: imbalance(first),
        imbalance_after: imbalance(&last),
        seconds_to_balanced: samples
            .iter()
            .find(|(_, c)| imbalance(c).is_some_and(|i| i <= BALANCED))
            .map(|(t, _)| round2(t.as_secs_f64())),
        pod_sessions: last,
    }
}

/// The HPA's rule: desired = ⌈current · metric/target⌉, unchanged within the tolerance,
/// within [min, max].
pub fn hpa_desired(current: usize, metric: f64, target: f64, min: usize, max: usize) -> usize {
    let ratio = metric / target;
    let desired = if !ratio.is_finite() || (ratio - 1.0).abs() <= HPA_TOLERANCE {
        current
    } else {
        (current as f64 * ratio).ceil() as usize
    };
    desired.clamp(min, max)
}

/// The `autoscale` figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AutoscaleReport {
    pub max_pods: usize,
    pub final_pods: usize,
    /// The most sessions on one pod at the peak, after balancing.
    pub max_sessions_per_pod: u64,
    pub target_per_pod: u64,
    /// (ms from the run's start, pods) at every change.
    pub scaled: Vec<(u64, usize)>,
}

/// A pod's sessions: its agent's `/status` (sessions, else connections), else its
/// app's admin API (`GET /connections`).
pub async fn pod_sessions(pod: &Pod) -> Option<u64> {
    let get = |port, path| async move {
        let addr = std::net::SocketAddr::new(pod.ip, port);
        match tokio::time::timeout(ASK_TIMEOUT, http_get(addr, path, "wsdrain-lab")).await {
            Ok(Ok((200, body))) => Some(body),
            _ => None,
        }
    };
    if let Some(port) = pod.agent_port {
        let body = get(port, "/status").await?;
        let s = crate::fleet::peers::parse_status(body.as_bytes()).ok()?;
        return s.count.and_then(|c| u64::try_from(c).ok());
    }
    let body = get(pod.admin_port, "/connections").await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v.get("open")?.as_u64()
}

/// Sessions of every pod that answered.
async fn all_sessions(pods: &[Pod]) -> Vec<u64> {
    futures_util::future::join_all(pods.iter().map(pod_sessions))
        .await
        .into_iter()
        .flatten()
        .collect()
}

impl Run<'_> {
    /// `balance_ms`: let traffic flow while sampling the per-pod sessions.
    pub(super) async fn watch_balance(&mut self, total: Duration) {
        self.say(&format!(
            "watching the balance for {:.0} s",
            total.as_secs_f64()
        ));
        let start = Instant::now();
        let mut samples = Vec::new();
        loop {
            let at = start.elapsed();
            let mut counts = all_sessions(&self.pods).await;
            if counts.len() < self.pods.len() {
                // A pod that did not answer would skew max/mean: ask once more.
                counts = all_sessions(&self.pods).await;
            }
            samples.push((at, counts));
            if start.elapsed() >= total {
                break;
            }
            tokio::time::sleep(SAMPLE_EVERY.min(total.saturating_sub(start.elapsed()))).await;
        }
        let report = balance_report(&samples);
        self.say(&format!(
            "imbalance {:?} → {:?}, balanced after {:?} s: {:?}",
            report.imbalance_before,
            report.imbalance_after,
            report.seconds_to_balanced,
            report.pod_sessions
        ));
        self.balance = Some(report);
    }

    /// The autoscale story: clients ramp up, hold, two thirds leave; every sync period
    /// the autoscaler reads the agents' `wsdrain_connections` and scales with the HPA's
    /// formula (scale-downs wait for the stabilisation window, as the HPA's do).
    pub(super) async fn autoscale(&mut self, a: Autoscale) -> Result<(), LabError> {
        let opts = self.opts(false);
        let leaving = a.clients * 2 / 3;
        let staying = a.clients - leaving;
        let ramp = Duration::from_secs(6);
        let every = ramp / a.clients.max(1) as u32;
        self.say(&format!(
            "{} clients arriving over {ramp:?}; target {} per pod, {}..{} pods",
            a.clients, a.target_per_pod, a.min_pods, a.max_pods
        ));
        let mut leavers = Load::numbered_from(self.epoch, LEAVER_IDS);
        self.load.add_spaced(staying, &opts, every * 3);
        leavers.add_spaced(leaving, &opts, every * 3 / 2);
        self.rust_clients += staying;
        let mut report = AutoscaleReport {
            max_pods: self.pods.len(),
            target_per_pod: a.target_per_pod,
            ..Default::default()
        };
        let start = Instant::now();
        let peak_end = start + ramp + Duration::from_secs(24);
        let end = peak_end + Duration::from_secs(18);
        let mut left = false;
        // Scale-down recommendations within the stabilisation window: the highest wins.
        let mut recent: Vec<(Instant, usize)> = Vec::new();
        while Instant::now() < end {
            tokio::time::sleep(AUTOSCALE_SYNC).await;
            if !left && Instant::now() >= peak_end {
                let peak = all_sessions(&self.pods).await;
                report.max_sessions_per_pod = peak.iter().copied().max().unwrap_or(0);
                self.say(&format!(
                    "peak sessions per pod {peak:?}; {leaving} clients leave"
                ));
                let gone = std::mem::replace(&mut leavers, Load::new(self.epoch));
                // (The replacement never gets clients.)
                self.retired.extend(gone.stop().await);
                left = true;
            }
            let counts = all_metrics(&self.pods).await;
            if counts.is_empty() {
                continue;
            }
            let metric = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
            let current = self.pods.len();
            let desired = hpa_desired(
                current,
                metric,
                a.target_per_pod as f64,
                a.min_pods,
                a.max_pods,
            );
            let now = Instant::now();
            recent.retain(|(t, _)| now.duration_since(*t) < SCALE_DOWN_WINDOW);
            recent.push((now, desired));
            let stable = recent.iter().map(|(_, d)| *d).max().unwrap_or(desired);
            let covers_window = recent
                .first()
                .is_some_and(|(t, _)| now.duration_since(*t) + AUTOSCALE_SYNC >= SCALE_DOWN_WINDOW);
            if desired > current {
                self.say(&format!("autoscaler: {metric:.0} per pod → {desired} pods"));
                self.scale_up(desired - current).await?;
            } else if stable < current && covers_window {
                self.say(&format!("autoscaler: {metric:.0} per pod → {stable} pods"));
                self.delete_newest(current - stable).await;
                recent.clear();
            } else {
                continue;
            }
            report.max_pods = report.max_pods.max(self.pods.len());
            report
                .scaled
                .push((self.epoch.elapsed().as_millis() as u64, self.pods.len()));
        }
        if !left {
            self.retired.extend(leavers.stop().await);
        }
        report.final_pods = self.pods.len();
        self.autoscaled = Some(report);
        Ok(())
    }
}

/// The demo's scale-up table: one row per run.
pub fn balance_table(rows: &[(String, super::report::Summary)]) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let mut out = format!(
        "| {:<28} | {:>16} | {:>15} | {:>19} | {:<24} | {:>15} | {:>13} |\n",
        "setup",
        "imbalance before",
        "imbalance after",
        "seconds to balanced",
        "sessions per pod",
        "abnormal (1006)",
        "messages lost"
    );
    out.push_str(&format!(
        "|{}|{}:|{}:|{}:|{}|{}:|{}:|\n",
        "-".repeat(30),
        "-".repeat(17),
        "-".repeat(16),
        "-".repeat(20),
        "-".repeat(26),
        "-".repeat(16),
        "-".repeat(14)
    ));
    for (label, s) in rows {
        let b = s.balance.clone().unwrap_or_default();
        let per_pod = b
            .pod_sessions
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!(
            "| {:<28} | {:>16} | {:>15} | {:>19} | {:<24} | {:>15} | {:>13} |\n",
            label,
            opt(b.imbalance_before),
            opt(b.imbalance_after),
            opt(b.seconds_to_balanced),
            per_pod,
            s.abnormal_closes,
            s.messages_lost
        ));
    }
    out
}

/// `wsdrain_connections` of every agent that answered (the app's count without agents).
async fn all_metrics(pods: &[Pod]) -> Vec<u64> {
    futures_util::future::join_all(pods.iter().map(pod_metric))
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn pod_metric(pod: &Pod) -> Option<u64> {
    let Some(port) = pod.agent_port else {
        return pod_sessions(pod).await;
    };
    let addr = std::net::SocketAddr::new(pod.ip, port);
    let req = http_get(addr, "/metrics", "wsdrain-lab");
    match tokio::time::timeout(ASK_TIMEOUT, req).await {
        Ok(Ok((200, body))) => gauge(&body, "wsdrain_connections"),
        _ => None,
    }
}

/// The value of an unlabelled gauge in Prometheus text.
pub fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_metrics_text_gives_a_count_or_nothing(text in "(wsdrain_connections[ -~]{0,20}\n|[ -~]{0,40}\n){0,6}") {
            if let Some(v) = gauge(&text, "wsdrain_connections") {
                let line = text.lines().any(|l| l.starts_with("wsdrain_connections "));
                prop_assert!(line, "{} from {:?}", v, text);
            }
        }

        #[test]
        fn the_hpa_rule_stays_in_bounds(current in 1usize..20, metric in 0.0f64..10_000.0, target in 1.0f64..1000.0) {
            let d = hpa_desired(current, metric, target, 2, 8);
            prop_assert!((2..=8).contains(&d));
        }
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[100, 100, 100, 0, 0, 0]), Some(2.0));
        assert_eq!(imbalance(&[50, 50, 50, 50]), Some(1.0));
        assert_eq!(imbalance(&[]), None);
        assert_eq!(imbalance(&[0, 0]), None);
    }

    #[test]
    fn balance_report_finds_the_first_balanced_sample() {
        let s = |ms: u64, c: &[u64]| (Duration::from_millis(ms), c.to_vec());
        let r = balance_report(&[
            s(0, &[100, 100, 0, 0]),
            s(500, &[75, 75, 25, 25]),
            s(1000, &[55, 55, 45, 45]),
            s(1500, &[60, 50, 45, 45]),
        ]);
        assert_eq!(r.imbalance_before, Some(2.0));
        assert_eq!(r.seconds_to_balanced, Some(1.0));
        assert_eq!(r.imbalance_after, Some(1.2));
        assert_eq!(r.pod_sessions, vec![60, 50, 45, 45]);
        let never = balance_report(&[s(0, &[100, 0]), s(500, &[100, 0])]);
        assert_eq!(never.seconds_to_balanced, None);
        let json = serde_json::to_value(&never).unwrap();
        assert!(json["seconds_to_balanced"].is_null(), "{json}");
    }

    #[test]
    fn hpa_formula_with_tolerance_and_bounds() {
        assert_eq!(hpa_desired(2, 150.0, 50.0, 2, 8), 6);
        assert_eq!(hpa_desired(6, 52.0, 50.0, 2, 8), 6, "within 10%");
        assert_eq!(hpa_desired(6, 16.7, 50.0, 2, 8), 3);
        assert_eq!(hpa_desired(6, 1.0, 50.0, 2, 8), 2, "not below min");
        assert_eq!(hpa_desired(4, 500.0, 50.0, 2, 8), 8, "not above max");
        assert_eq!(hpa_desired(3, 0.0, 0.0, 2, 8), 3, "no target: no change");
    }

    #[test]
    fn gauges_from_prometheus_text() {
        let text = "# HELP wsdrain_connections x\n# TYPE wsdrain_connections gauge\nwsdrain_connections 42\nwsdrain_connections_other 7\n";
        assert_eq!(gauge(text, "wsdrain_connections"), Some(42));
        assert_eq!(
            gauge("wsdrain_connections -3\n", "wsdrain_connections"),
            None
        );
        assert_eq!(gauge("", "wsdrain_connections"), None);
    }

    #[test]
    fn every_agent_gets_every_pod_address_and_the_fleet_flags() {
        let urls = peer_urls([100, 7], 4000);
        assert_eq!(urls.len(), PEER_SLOTS as usize);
        assert_eq!(urls[0], "http://127.100.7.2:4000");
        let f = agent_flags(
            &FleetLab {
                rebalance: true,
                close_rate: Some(50.0),
            },
            &urls[..2],
        );
        assert_eq!(
            f,
            [
                "--peers",
                "http://127.100.7.2:4000,http://127.100.7.3:4000",
                "--fleet-interval",
                "500ms",
                "--rebalance",
                "true",
                "--rebalance-window",
                "2000ms",
                "--rebalance-cooldown",
                "3000ms",
                "--fleet-close-rate",
                "50"
            ]
        );
        let all = FleetLab {
            rebalance: true,
            close_rate: Some(5.0),
        };
        assert!(
            agent_flags(&all, &[]).is_empty(),
            "no peers, no fleet flags"
        );
    }
}
