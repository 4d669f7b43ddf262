//! The agent's fleet flags (each also a `WSDRAIN_*` env var) and their checks.

use std::net::IpAddr;
use std::time::Duration;

use crate::agent::config::{ConfigError, invalid};
use crate::units::{format_duration, is_dns_label, parse_duration};

use super::budget::Budget;
use super::rebalance::Settings;
use super::{FleetConfig, Source, peers};

/// Fleet awareness options of `wsdrain agent` (docs/scaling.md).
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Peers are the endpoints of this Service (its EndpointSlices, in the pod's namespace).
    #[arg(long, env = "WSDRAIN_SERVICE")]
    pub service: Option<String>,

    /// Peers are these agents (comma list of base URLs, e.g. http://10.0.0.7:19901).
    #[arg(long, env = "WSDRAIN_PEERS")]
    pub peers: Option<String>,

    /// How often the peers' /status is read.
    #[arg(long, env = "WSDRAIN_FLEET_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub fleet_interval: Duration,

    /// Close sessions above the fleet mean while Ready, so clients move to new pods.
    #[arg(
        long,
        env = "WSDRAIN_REBALANCE",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub rebalance: bool,

    /// Rebalance only above mean × (1 + tolerance).
    #[arg(long, env = "WSDRAIN_REBALANCE_TOLERANCE", default_value_t = 0.1)]
    pub rebalance_tolerance: f64,

    /// Rebalance only when at least this many sessions are above the mean.
    #[arg(long, env = "WSDRAIN_REBALANCE_MIN", default_value_t = 5)]
    pub rebalance_min: u64,

    /// Time over which a rebalance spreads its closes.
    #[arg(long, env = "WSDRAIN_REBALANCE_WINDOW", default_value = "10s", value_parser = parse_duration)]
    pub rebalance_window: Duration,

    /// Pause after a rebalance's window before the next one.
    #[arg(long, env = "WSDRAIN_REBALANCE_COOLDOWN", default_value = "30s", value_parser = parse_duration)]
    pub rebalance_cooldown: Duration,

    /// Sessions per second all pods draining together may close in total.
    #[arg(long, env = "WSDRAIN_FLEET_CLOSE_RATE")]
    pub fleet_close_rate: Option<f64>,

    /// The pod's IP (downward API), to find the own endpoint in the EndpointSlices.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
}

/// A Service name: an RFC 1035 label.
fn check_service(name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a Service name (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

impl FleetArgs {
    /// `None` when neither rebalancing nor a budget is on and no peers are named.
    pub fn validate(&self) -> Result<Option<FleetConfig>, ConfigError> {
        let service = self
            .service
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let peer_list = self
            .peers
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let source = match (service, peer_list) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "--peers",
                    "use either --service or --peers, not both",
                ));
            }
            (Some(s), None) => {
                check_service(s).map_err(|e| invalid("--service", e))?;
                Some(Source::Service(s.to_owned()))
            }
            (None, Some(list)) => Some(Source::Static(
                peers::parse_peer_list(list).map_err(|e| invalid("--peers", e))?,
            )),
            (None, None) => None,
        };
        if self.fleet_interval < Duration::from_millis(100) {
            return Err(invalid("--fleet-interval", "must be at least 100ms"));
        }
        let t = self.rebalance_tolerance;
        if !(t.is_finite() && (0.0..=10.0).contains(&t)) {
            return Err(invalid(
                "--rebalance-tolerance",
                format!("{t} is not within 0 to 10"),
            ));
        }
        if self.rebalance_min == 0 {
            return Err(invalid("--rebalance-min", "must be at least 1"));
        }
        if self.rebalance_window < Duration::from_millis(100) {
            return Err(invalid(
                "--rebalance-window",
                format!(
                    "{} is shorter than 100ms",
                    format_duration(self.rebalance_window)
                ),
            ));
        }
        let budget = self
            .fleet_close_rate
            .map(Budget::new)
            .transpose()
            .map_err(|e| invalid("--fleet-close-rate", e.0.to_string() + " is not above 0"))?;
        let Some(source) = source else {
            if self.rebalance || budget.is_some() {
                let field = if self.rebalance {
                    "--rebalance"
                } else {
                    "--fleet-close-rate"
                };
                return Err(invalid(field, "needs peers: set --service or --peers"));
            }
            return Ok(None);
        };
        Ok(Some(FleetConfig {
            source,
            interval: self.fleet_interval,
            rebalance: self.rebalance.then_some(Settings {
                tolerance: t,
                min_excess: self.rebalance_min,
                window: self.rebalance_window,
                cooldown: self.rebalance_cooldown,
                warmup: self.fleet_interval * super::rebalance::WARMUP_INTERVALS,
            }),
            budget,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        fleet: FleetArgs,
    }

    fn parse(args: &[&str]) -> Result<Option<FleetConfig>, String> {
        let mut full = vec!["wsdrain"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        cli.fleet.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn off_by_default_and_defaults_follow_the_contract() {
        assert!(parse(&[]).unwrap().is_none());
        let c = parse(&["--service", "chat", "--rebalance"])
            .unwrap()
            .unwrap();
        assert_eq!(c.source, Source::Service("chat".into()));
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.rebalance, Some(Settings::default()));
        assert!(c.budget.is_none());
        let c = parse(&["--peers", "http://127.0.0.2:1", "--rebalance", "false"])
            .unwrap()
            .unwrap();
        assert!(c.rebalance.is_none());
        let c = parse(&[
            "--peers",
            "http://a:1",
            "--fleet-close-rate",
            "50",
            "--rebalance",
            "true",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.budget.map(|b| b.per_second()), Some(50.0));
        assert!(c.rebalance.is_some());
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[&str], &str)] = &[
            (&["--rebalance"], "--rebalance"),
            (&["--fleet-close-rate", "5"], "--fleet-close-rate"),
            (&["--service", "Chat_1"], "--service"),
            (&["--service", "a", "--peers", "http://b:1"], "--peers"),
            (&["--peers", "ftp://x:1"], "--peers"),
            (
                &["--peers", "http://x:1", "--fleet-interval", "10ms"],
                "--fleet-interval",
            ),
            (
                &["--peers", "http://x:1", "--rebalance-tolerance=-1"],
                "--rebalance-tolerance",
            ),
            (
                &["--peers", "http://x:1", "--rebalance-min", "0"],
                "--rebalance-min",
            ),
            (
                &["--peers", "http://x:1", "--rebalance-window", "0"],
                "--rebalance-window",
            ),
            (
                &["--peers", "http://x:1", "--fleet-close-rate", "0"],
                "--fleet-close-rate",
            ),
        ];
        for (args, field) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(field), "{args:?}: {err}");
        }
    }
}
