//! The agent's Prometheus metrics (docs/monitoring.md). Filled by the drain through its
//! `Observer` seam, and by the edges (Kubernetes API failures, proxy, fleet).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::drain::Phase;
use crate::drain::report::Summary;
use crate::drain::seams::Observer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub drain_state: Gauge,
    /// State set: 1 for the current phase, 0 for the others.
    pub drain_phase: Family<PhaseLabel, Gauge>,
    pub drain_duration_seconds: Gauge<f64, AtomicU64>,
    pub closes_requested: Counter,
    pub forced_remaining: Gauge,
    pub admin_requests: Family<ResultLabel, Counter>,
    pub count_errors: Counter,
    pub kube_failures: Gauge,
    pub vanished: Counter,
    pub rebalance_closes: Counter,
    /// Idle API connections closed to make room for a new one (`net::Slots`).
    pub api_evicted: Counter,
    /// New API connections refused because every slot had a request in flight.
    pub api_shed: Counter,
    /// Proxy mode's totals (sessions, drained, bad frames, …), copied from the proxy.
    pub proxy_events: Family<EventLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsdrain");
        let m = Metrics {
            connections: Gauge::default(),
            drain_state: Gauge::default(),
            drain_phase: Family::default(),
            drain_duration_seconds: Gauge::default(),
            closes_requested: Counter::default(),
            forced_remaining: Gauge::default(),
            admin_requests: Family::default(),
            count_errors: Counter::default(),
            kube_failures: Gauge::default(),
            vanished: Counter::default(),
            rebalance_closes: Counter::default(),
            api_evicted: Counter::default(),
            api_shed: Counter::default(),
            proxy_events: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Established TCP connections on the app ports",
            m.connections.clone(),
        );
        registry.register(
            "drain_state",
            "0 serving, 1 settling, 2 closing, 3 waiting, 4 drained, 5 deadline exceeded",
            m.drain_state.clone(),
        );
        registry.register(
            "drain_phase",
            "The drain phase as a state set: 1 for the current phase",
            m.drain_phase.clone(),
        );
        registry.register(
            "build",
            "wsdrain build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        registry.register(
            "drain_duration_seconds",
            "Duration of the last finished drain",
            m.drain_duration_seconds.clone(),
        );
        registry.register(
            "closes_requested",
            "Sessions the agent asked the app to close",
            m.closes_requested.clone(),
        );
        registry.register(
            "forced_remaining",
            "Connections still open when the last drain hit its deadline",
            m.forced_remaining.clone(),
        );
        registry.register(
            "admin_requests",
            "Calls to the app admin API by result",
            m.admin_requests.clone(),
        );
        registry.register(
            "count_errors",
            "Failed connection counts",
            m.count_errors.clone(),
        );
        registry.register(
            "kube_api_failures",
            "Failed Kubernetes API calls",
            m.kube_failures.clone(),
        );
        registry.register(
            "connections_vanished",
            "Connections that went away during a drain without a close requested for them (app died, resets)",
            m.vanished.clone(),
        );
        registry.register(
            "rebalance_closes",
            "Sessions closed to move clients to less loaded pods",
            m.rebalance_closes.clone(),
        );
        registry.register(
            "api_connections_evicted",
            "Idle agent API connections closed to make room at the connection cap",
            m.api_evicted.clone(),
        );
        registry.register(
            "api_connections_shed",
            "New agent API connections refused because every slot had a request in flight",
            m.api_shed.clone(),
        );
        registry.register(
            "proxy_events",
            "Proxy mode totals by event: sessions, drained, close_timeouts, bad_frames_client, bad_frames_app, stalled, upstream_errors",
            m.proxy_events.clone(),
        );
        let m = Metrics { registry, ..m };
        m.set_phase(Phase::Serving);
        m
    }

    fn set_phase(&self, phase: Phase) {
        self.drain_state.set(phase.gauge());
        for p in Phase::ALL {
            self.drain_phase
                .get_or_create(&PhaseLabel { phase: p.label() })
                .set(i64::from(p == phase));
        }
    }

    pub fn admin_result(&self, result: &'static str) {
        self.admin_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Observer for Metrics {
    fn counted(&self, connections: u64) {
        self.connections
            .set(connections.min(i64::MAX as u64) as i64);
    }

    fn count_failed(&self) {
        self.count_errors.inc();
    }

    fn phase(&self, phase: Phase) {
        self.set_phase(phase);
    }

    fn close_requested(&self, max: u64) {
        self.closes_requested.inc_by(max);
    }

    fn close_result(&self, label: &'static str) {
        self.admin_result(label);
    }

    fn finished(&self, summary: &Summary) {
        self.drain_duration_seconds
            .set(summary.duration_ms as f64 / 1000.0);
        self.forced_remaining
            .set(summary.remaining.min(i64::MAX as u64) as i64);
        self.vanished.inc_by(summary.vanished);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let m = Metrics::new();
        m.admin_result("timeout");
        m.closes_requested.inc_by(3);
        let text = m.encode();
        for name in [
            "wsdrain_connections ",
            "wsdrain_drain_state ",
            "wsdrain_drain_duration_seconds ",
            "wsdrain_closes_requested_total 3",
            "wsdrain_forced_remaining ",
            "wsdrain_admin_requests_total{result=\"timeout\"} 1",
            "wsdrain_drain_phase{phase=\"serving\"} 1",
            "wsdrain_drain_phase{phase=\"closing\"} 0",
            "wsdrain_build_info{version=",
            "wsdrain_connections_vanished_total 0",
        ] {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
    }
}
