//! Webhook metrics in the Prometheus text format. Names follow Prometheus conventions:
//! counters end in `_total`, durations in `_seconds`, and `wsdrain_build_info` says which
//! version runs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// What happened to one admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Patch returned: the agent was injected.
    Injected,
    /// A Pod CREATE that the injector declined (opted out, already injected, ...).
    Skipped,
    /// Not ours to look at: other kinds, other operations, subresources.
    Ignored,
    /// The injector failed on this pod; allowed without a patch.
    Error,
    /// The request itself was bad (400, 413, 408...).
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Ignored => "ignored",
            Outcome::Error => "error",
            Outcome::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// One finished drain, as the agent's Event tells it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub namespace: String,
    pub workload: String,
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    component: &'static str,
}

pub struct Metrics {
    registry: Registry,
    admissions: Family<ResultLabel, Counter>,
    latency: Histogram,
    connections: Gauge,
    evictions: Counter,
    reloads: Family<ResultLabel, Counter>,
    drains: Family<DrainLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        registry.register(
            "wsdrain_build",
            "Version of the running binary",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                component: "webhook",
            }),
        );
        let drains = Family::<DrainLabels, Counter>::default();
        registry.register(
            "wsdrain_drains",
            "Drains finished cluster-wide, by namespace, workload and outcome, counted from the agents' Events",
            drains.clone(),
        );
        let admissions = Family::<ResultLabel, Counter>::default();
        registry.register(
            "wsdrain_webhook_admissions",
            "Admission requests by result (injected, skipped, ignored, error, invalid)",
            admissions.clone(),
        );
        // 50 µs .. ~0.4 s: the API server's timeout is seconds, our goal is p99 <= 2 ms.
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 14));
        registry.register(
            "wsdrain_webhook_admission_duration_seconds",
            "Time from request headers to response, body read included",
            latency.clone(),
        );
        // Every result shows up at 0 from the start, so dashboards and alerts see the series.
        for o in [
            Outcome::Injected,
            Outcome::Skipped,
            Outcome::Ignored,
            Outcome::Error,
            Outcome::Invalid,
        ] {
            let _ = admissions.get_or_create(&ResultLabel { result: o.as_str() });
        }
        let connections = Gauge::default();
        registry.register(
            "wsdrain_webhook_connections",
            "Client connections open now (TLS handshake, request or keep-alive)",
            connections.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "wsdrain_webhook_connection_evictions",
            "Connections closed because the table was full and a newer client needed the place",
            evictions.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "wsdrain_webhook_certificate_reloads",
            "Changed certificate files seen: loaded, or rejected (the previous pair stays in service)",
            reloads.clone(),
        );
        for result in ["loaded", "rejected"] {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        Metrics {
            registry,
            admissions,
            latency,
            connections,
            evictions,
            reloads,
            drains,
        }
    }

    pub fn record(&self, outcome: Outcome, seconds: f64) {
        self.admissions
            .get_or_create(&ResultLabel {
                result: outcome.as_str(),
            })
            .inc();
        self.latency.observe(seconds);
    }

    pub fn set_connections(&self, open: usize) {
        self.connections
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    pub fn connection_evicted(&self) {
        self.evictions.inc();
    }

    pub fn certificate_reloaded(&self, loaded: bool) {
        let result = if loaded { "loaded" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn drains_finished(&self, labels: &DrainLabels, times: u64) {
        self.drains.get_or_create(labels).inc_by(times);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histogram_are_exposed() {
        let m = Metrics::new();
        m.record(Outcome::Injected, 0.001);
        let text = m.encode();
        assert!(
            text.contains("wsdrain_webhook_admissions_total{result=\"injected\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wsdrain_webhook_admissions_total{result=\"invalid\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("wsdrain_webhook_admission_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "wsdrain_build_info{{version=\"{}\",component=\"webhook\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        m.drains_finished(
            &DrainLabels {
                namespace: "chat".into(),
                workload: "ws".into(),
                outcome: "drained".into(),
            },
            2,
        );
        assert!(
            m.encode().contains(
                "wsdrain_drains_total{namespace=\"chat\",workload=\"ws\",outcome=\"drained\"} 2"
            ),
            "{}",
            m.encode()
        );
    }
}
