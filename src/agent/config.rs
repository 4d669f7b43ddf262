//! Agent options: every flag is also a `WSDRAIN_*` env var (docs/agent.md, "Options").
//! `AgentArgs` is what clap parses; `AgentArgs::validate` turns it into an `AgentConfig`
//! whose fields are all checked, so the rest of the agent never sees a bad value.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::drain::hint::{HintError, HintTemplate};
use crate::drain::settings::{DelayRange, Settings};
use crate::proxy::{Route, Timeouts};
use crate::units::{
    DurationRange, check_close_code, format_duration, parse_admin_url, parse_duration, parse_port,
    parse_range,
};

pub use crate::kube::PodRef;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("--hint-template: {0}")]
    Hint(#[from] HintError),
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn parse_route(s: &str) -> Result<Route, String> {
    s.parse()
}

/// A path; empty is allowed and means "off".
fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// Options of `wsdrain agent` (and of `wsdrain wrap`, which runs the same agent in-process).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Address of the agent HTTP API (readyz, prestop, drain, status, metrics).
    #[arg(long, env = "WSDRAIN_LISTEN", default_value = "0.0.0.0:19901")]
    pub listen: SocketAddr,

    /// The app's ports whose established TCP connections are counted (comma list)
    /// [default with --proxy: the proxy's listen ports].
    #[arg(long, env = "WSDRAIN_PORTS", value_delimiter = ',', value_parser = parse_port)]
    pub ports: Vec<u16>,

    /// Proxy mode: relay LISTEN to the app on UPSTREAM and close its WebSockets from the
    /// proxy (docs/proxy.md). Repeatable; the env var takes a comma list.
    #[arg(long, env = "WSDRAIN_PROXY", value_name = "LISTEN=UPSTREAM", value_delimiter = ',', value_parser = parse_route)]
    pub proxy: Vec<Route>,

    /// Proxy mode: longest wait for the end of the app's message in progress before the
    /// drain's Close goes out (then it goes between two frames).
    #[arg(long, env = "WSDRAIN_BOUNDARY_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub boundary_wait: Duration,

    /// Proxy mode: a session's TCP connections are dropped this long after its close
    /// sequence started, answered or not.
    #[arg(long, env = "WSDRAIN_CLOSE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub close_timeout: Duration,

    /// Count only sockets on this local address (labs running several pods on 127.0.0.N).
    #[arg(long, env = "WSDRAIN_ADDRESS")]
    pub address: Option<IpAddr>,

    /// Base URL of the app's admin API v1 (loopback). Without it the agent only waits.
    #[arg(long, env = "WSDRAIN_ADMIN_URL")]
    pub admin_url: Option<String>,

    /// Per-call timeout for admin API requests.
    #[arg(long, env = "WSDRAIN_ADMIN_TIMEOUT", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub admin_timeout: Duration,

    /// The pod's terminationGracePeriodSeconds; sets the default drain timeout.
    #[arg(long, env = "WSDRAIN_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub grace_period: Duration,

    /// Time left to the app between the end of the drain and SIGKILL.
    #[arg(long, env = "WSDRAIN_APP_RESERVE", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub app_reserve: Duration,

    /// Bound of the whole drain [default: grace period - app reserve].
    #[arg(long, env = "WSDRAIN_DRAIN_TIMEOUT", value_parser = parse_duration, allow_hyphen_values = true)]
    pub drain_timeout: Option<Duration>,

    /// Least time to wait for the ingress to stop sending new connections.
    #[arg(long, env = "WSDRAIN_SETTLE_MIN", default_value = "2s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub settle_min: Duration,

    /// Settling ends once no new connection arrived for this long.
    #[arg(long, env = "WSDRAIN_SETTLE_QUIET", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub settle_quiet: Duration,

    /// Most time spent settling.
    #[arg(long, env = "WSDRAIN_SETTLE_MAX", default_value = "15s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub settle_max: Duration,

    /// Interval between two close batches.
    #[arg(long, env = "WSDRAIN_CLOSE_TICK", default_value = "100ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub close_tick: Duration,

    /// Time over which closes are spread (shrunk to fit the deadline).
    #[arg(long, env = "WSDRAIN_CLOSE_WINDOW", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub close_window: Duration,

    /// WebSocket close code sent to clients: 1012, 1001 or 4000-4999.
    #[arg(long, env = "WSDRAIN_CLOSE_CODE", default_value_t = 1012)]
    pub close_code: u16,

    /// Range of reconnect delays put into the hint, varied per batch (e.g. 0ms..2s).
    #[arg(long, env = "WSDRAIN_RECONNECT_AFTER", default_value = "0ms..2s", value_parser = parse_range, allow_hyphen_values = true)]
    pub reconnect_after: DurationRange,

    /// Close reason template; {after_ms} is replaced by the reconnect delay. At most 123 bytes.
    #[arg(long, env = "WSDRAIN_HINT_TEMPLATE", default_value = crate::drain::hint::DEFAULT_TEMPLATE)]
    pub hint_template: String,

    /// Interval between two connection counts.
    #[arg(long, env = "WSDRAIN_POLL", default_value = "100ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub poll: Duration,

    /// Count only on the poll, without the kernel's socket destroy notifications.
    #[arg(long, env = "WSDRAIN_POLL_ONLY")]
    pub poll_only: bool,

    /// Token required in the X-Wsdrain-Token header of /prestop and /drain.
    #[arg(long, env = "WSDRAIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Accept /prestop and /drain only from loopback and these addresses (e.g. HOST_IP).
    #[arg(long, env = "WSDRAIN_TRIGGER_FROM", value_delimiter = ',')]
    pub trigger_from: Vec<IpAddr>,

    /// Time the agent stays up after a SIGTERM-ended drain so that hook answers get out.
    #[arg(long, env = "WSDRAIN_LINGER", default_value = "250ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub linger: Duration,

    /// Do not talk to the Kubernetes API even when POD_NAME/POD_NAMESPACE are set.
    #[arg(long, env = "WSDRAIN_NO_KUBE")]
    pub no_kube: bool,

    /// The own pod's name (downward API), enables the Kubernetes API client.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// The own pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Patch the readiness-gate condition wsdrain.io/serving on the own pod.
    #[arg(long, env = "WSDRAIN_READINESS_GATE")]
    pub readiness_gate: bool,

    /// Directory for the drain marker (an emptyDir): a restarted agent resumes the drain
    /// it finds there, with its original deadline ("" disables).
    #[arg(long, env = "WSDRAIN_STATE_DIR", value_parser = parse_path)]
    pub state_dir: Option<PathBuf>,

    /// Where the drain summary is written on exit ("" disables).
    #[arg(
        long,
        env = "WSDRAIN_TERMINATION_LOG",
        default_value = "/dev/termination-log",
        value_parser = parse_path
    )]
    pub termination_log: PathBuf,

    #[command(flatten)]
    pub fleet: crate::fleet::args::FleetArgs,
}

/// Checked agent settings. Built only by `AgentArgs::validate`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    /// Ports counted by sock_diag: `--ports` without the proxy's listen ports (those
    /// are counted by the proxy's own session table).
    pub ports: Vec<u16>,
    pub address: Option<IpAddr>,
    pub proxy: Vec<Route>,
    pub proxy_timeouts: Timeouts,
    pub admin_url: Option<hyper::Uri>,
    pub admin_timeout: Duration,
    pub grace_period: Duration,
    pub app_reserve: Duration,
    pub drain_timeout: Duration,
    pub settle_min: Duration,
    pub settle_quiet: Duration,
    pub settle_max: Duration,
    pub close_tick: Duration,
    pub close_window: Duration,
    pub close_code: u16,
    pub reconnect_after: DurationRange,
    pub hint: HintTemplate,
    pub poll: Duration,
    pub poll_only: bool,
    pub token: Option<String>,
    pub trigger_from: Vec<IpAddr>,
    pub linger: Duration,
    pub kube: Option<PodRef>,
    pub readiness_gate: bool,
    pub termination_log: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Accepted but risky settings, logged loudly at start.
    pub warnings: Vec<String>,
    /// Peers, rebalancing and the fleet close budget; `None`: off.
    pub fleet: Option<crate::fleet::FleetConfig>,
    pub pod_ip: Option<IpAddr>,
}

const MAX_TOKEN_LEN: usize = 256;

impl AgentConfig {
    /// The drain core's settings, in its own terms.
    pub fn drain_settings(&self) -> Settings {
        Settings {
            drain_timeout: self.drain_timeout,
            app_reserve: self.app_reserve,
            settle_min: self.settle_min,
            settle_quiet: self.settle_quiet,
            settle_max: self.settle_max,
            close_tick: self.close_tick,
            close_window: self.close_window,
            poll: self.poll,
            reconnect_after: DelayRange {
                min: self.reconnect_after.min,
                max: self.reconnect_after.max,
            },
        }
    }
}

impl AgentArgs {
    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let mut ports = self.ports;
        if ports.is_empty() && self.proxy.is_empty() {
            return Err(invalid(
                "--ports",
                "at least one app port is required (or --proxy LISTEN=UPSTREAM)",
            ));
        }
        let proxied: Vec<u16> = self.proxy.iter().map(|r| r.listen.port()).collect();
        if let Some(dup) = proxied
            .iter()
            .enumerate()
            .find_map(|(i, p)| proxied[..i].contains(p).then_some(*p))
        {
            return Err(invalid("--proxy", format!("listen port {dup} given twice")));
        }
        if self.proxy.iter().any(|r| r.listen.port() == 0) {
            return Err(invalid("--proxy", "LISTEN needs a port"));
        }
        ports.retain(|p| !proxied.contains(p));
        ports.sort_unstable();
        ports.dedup();
        if self.close_timeout.is_zero() {
            return Err(invalid("--close-timeout", "must be more than 0"));
        }
        if self.boundary_wait >= self.close_timeout {
            return Err(invalid(
                "--boundary-wait",
                format!(
                    "{} must be shorter than --close-timeout {}",
                    format_duration(self.boundary_wait),
                    format_duration(self.close_timeout)
                ),
            ));
        }

        let admin_url = match self.admin_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(raw) => Some(parse_admin_url(raw).map_err(|e| invalid("--admin-url", e))?),
        };
        if self.admin_timeout.is_zero() {
            return Err(invalid("--admin-timeout", "must be more than 0"));
        }
        if self.app_reserve >= self.grace_period && self.drain_timeout.is_none() {
            return Err(invalid(
                "--app-reserve",
                format!(
                    "{} leaves no drain time in a grace period of {} (set --drain-timeout or a longer --grace-period)",
                    format_duration(self.app_reserve),
                    format_duration(self.grace_period)
                ),
            ));
        }
        let drain_timeout = self
            .drain_timeout
            .unwrap_or(self.grace_period.saturating_sub(self.app_reserve));
        if drain_timeout.is_zero() {
            return Err(invalid("--drain-timeout", "must be more than 0"));
        }
        if self.settle_min > self.settle_max {
            return Err(invalid(
                "--settle-min",
                format!(
                    "{} is longer than --settle-max {}",
                    format_duration(self.settle_min),
                    format_duration(self.settle_max)
                ),
            ));
        }
        for (field, d) in [("--close-tick", self.close_tick), ("--poll", self.poll)] {
            if d < Duration::from_millis(1) {
                return Err(invalid(field, "must be at least 1ms"));
            }
        }
        if self.close_window.is_zero() {
            return Err(invalid("--close-window", "must be more than 0"));
        }
        check_close_code(self.close_code).map_err(|e| invalid("--close-code", e))?;
        if self.reconnect_after.max > Duration::from_secs(3600) {
            return Err(invalid("--reconnect-after", "must be at most 1h"));
        }
        let hint = HintTemplate::parse(&self.hint_template)?;
        // The longest value must still fit in a close frame.
        hint.render(self.reconnect_after.max.as_millis() as u64)?;

        let mut warnings = Vec::new();
        if let Some(url) = &admin_url
            && !is_loopback_host(url)
        {
            warnings.push(format!(
                "--admin-url {url} is not a loopback address: the admin API closes sessions and should listen on 127.0.0.1 or ::1 only"
            ));
        }
        let token = match self.token {
            Some(t) if t.is_empty() => {
                warnings.push(
                    "--token is empty: authentication is OFF, anyone who reaches the agent can call /prestop and /drain and take the pod out of rotation".to_owned(),
                );
                None
            }
            Some(t) if t.len() > MAX_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(invalid(
                    "--token",
                    format!("must be 1-{MAX_TOKEN_LEN} visible ASCII characters"),
                ));
            }
            t => t,
        };
        let kube = match (self.no_kube, self.pod_name, self.pod_namespace) {
            (false, Some(name), Some(namespace)) if !name.is_empty() && !namespace.is_empty() => {
                Some(PodRef { name, namespace })
            }
            _ => None,
        };
        let termination_log = Some(self.termination_log).filter(|p| !p.as_os_str().is_empty());
        let fleet = self.fleet.validate()?;

        Ok(AgentConfig {
            listen: self.listen,
            ports,
            address: self.address,
            proxy: self.proxy,
            proxy_timeouts: Timeouts {
                boundary_wait: self.boundary_wait,
                close_timeout: self.close_timeout,
                ..Timeouts::default()
            },
            admin_url,
            admin_timeout: self.admin_timeout,
            grace_period: self.grace_period,
            app_reserve: self.app_reserve,
            drain_timeout,
            settle_min: self.settle_min,
            settle_quiet: self.settle_quiet,
            settle_max: self.settle_max,
            close_tick: self.close_tick,
            close_window: self.close_window,
            close_code: self.close_code,
            reconnect_after: self.reconnect_after,
            hint,
            poll: self.poll,
            poll_only: self.poll_only,
            token,
            trigger_from: self.trigger_from,
            linger: self.linger,
            kube,
            readiness_gate: self.readiness_gate,
            termination_log,
            state_dir: self.state_dir.filter(|p| !p.as_os_str().is_empty()),
            warnings,
            fleet,
            pod_ip: self.fleet.pod_ip,
        })
    }
}

/// `localhost`, 127.0.0.0/8, `::1` (and its IPv4-mapped form).
fn is_loopback_host(url: &hyper::Uri) -> bool {
    let host = url.host().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> Result<AgentConfig, String> {
        let mut full = vec!["wsdrain"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        cli.agent.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_design() {
        let c = parse(&["--ports", "8080"]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:19901".parse().unwrap());
        assert_eq!(c.drain_timeout, Duration::from_secs(25));
        assert_eq!(c.settle_min, Duration::from_secs(2));
        assert_eq!(c.settle_quiet, Duration::from_secs(1));
        assert_eq!(c.settle_max, Duration::from_secs(15));
        assert_eq!(c.close_tick, Duration::from_millis(100));
        assert_eq!(c.close_window, Duration::from_secs(10));
        assert_eq!(c.close_code, 1012);
        assert_eq!(c.poll, Duration::from_millis(100));
        assert_eq!(c.reconnect_after.max, Duration::from_secs(2));
        assert!(c.admin_url.is_none());
        assert!(c.kube.is_none());
    }

    #[test]
    fn ports_list_and_dedup() {
        let c = parse(&["--ports", "8081,8080,8081"]).unwrap();
        assert_eq!(c.ports, vec![8080, 8081]);
        assert!(
            parse(&["--ports", "80,x"])
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            parse(&["--ports", "0"])
                .unwrap_err()
                .contains("0 is not allowed")
        );
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[&str], &str)] = &[
            (&["--ports", "1", "--close-code", "1000"], "--close-code"),
            (&["--ports", "1", "--settle-min", "20s"], "--settle-min"),
            (&["--ports", "1", "--admin-url", "ftp://x"], "--admin-url"),
            (
                &["--ports", "1", "--admin-url", "http://[bad"],
                "--admin-url",
            ),
            (&["--ports", "1", "--grace-period", "5s"], "--app-reserve"),
            (&["--ports", "1", "--poll", "0"], "--poll"),
            (&["--ports", "1", "--hint-template", "x"], "--hint-template"),
            (&["--ports", "1", "--token", "a b"], "--token"),
            (&["--ports", "1", "--close-tick", "10x"], "--close-tick"),
        ];
        for (args, field) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(field), "{args:?}: {err}");
        }
    }

    /// Issue 12 item 10: a negative duration reaches the parser, so the error names the
    /// flag instead of "unexpected argument '-5'".
    #[test]
    fn negative_durations_name_the_flag() {
        let err = parse(&["--ports", "1", "--drain-timeout", "-5s"]).unwrap_err();
        assert!(err.contains("--drain-timeout"), "{err}");
        assert!(err.contains("negative"), "{err}");
        let err = parse(&["--ports", "1", "--reconnect-after", "-1s..2s"]).unwrap_err();
        assert!(err.contains("--reconnect-after"), "{err}");
    }

    #[test]
    fn empty_token_and_remote_admin_warn() {
        let c = parse(&["--ports", "1", "--token", ""]).unwrap();
        assert!(c.token.is_none());
        assert!(
            c.warnings.iter().any(|w| w.contains("--token is empty")),
            "{:?}",
            c.warnings
        );
        let c = parse(&["--ports", "1", "--admin-url", "http://10.0.0.5:8081"]).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("not a loopback")));
        for local in [
            "http://127.0.0.1:8081",
            "http://localhost:8081",
            "http://[::1]:8081",
        ] {
            let c = parse(&["--ports", "1", "--admin-url", local, "--token", "t"]).unwrap();
            assert!(c.warnings.is_empty(), "{local}: {:?}", c.warnings);
        }
    }

    #[test]
    fn messages_do_not_repeat_themselves() {
        let err = parse(&["--ports", "1", "--admin-url", "http://"]).unwrap_err();
        assert!(err.contains("no host"), "{err}");
        assert!(!err.contains("must start with http://"), "{err}");
        let err = parse(&["--ports", "0"]).unwrap_err();
        assert!(!err.contains("port 0 is not a port"), "{err}");
    }

    #[test]
    fn proxy_routes_take_over_their_ports() {
        let c = parse(&["--proxy", "0.0.0.0:8080=127.0.0.1:8081"]).unwrap();
        assert_eq!(c.proxy.len(), 1);
        assert!(c.ports.is_empty(), "the proxy's table counts 8080");
        assert_eq!(c.proxy_timeouts.boundary_wait, Duration::from_secs(1));
        assert_eq!(c.proxy_timeouts.close_timeout, Duration::from_secs(3));
        let c = parse(&[
            "--proxy",
            "0.0.0.0:8080=127.0.0.1:8081",
            "--proxy",
            "0.0.0.0:9090=127.0.0.1:9091",
            "--ports",
            "8080,7000",
            "--boundary-wait",
            "250ms",
        ])
        .unwrap();
        assert_eq!(c.proxy.len(), 2);
        assert_eq!(
            c.ports,
            vec![7000],
            "only non-proxied ports go to sock_diag"
        );
        assert_eq!(c.proxy_timeouts.boundary_wait, Duration::from_millis(250));
        let cases: &[(&[&str], &str)] = &[
            (&["--proxy", "8080=127.0.0.1:8081"], "--proxy"),
            (&["--proxy", "0.0.0.0:8080"], "--proxy"),
            (
                &[
                    "--proxy",
                    "0.0.0.0:8080=127.0.0.1:1,0.0.0.0:8080=127.0.0.1:2",
                ],
                "--proxy",
            ),
            (
                &["--proxy", "0.0.0.0:1=127.0.0.1:2", "--close-timeout", "0"],
                "--close-timeout",
            ),
            (
                &["--proxy", "0.0.0.0:1=127.0.0.1:2", "--boundary-wait", "5s"],
                "--boundary-wait",
            ),
            (
                &["--proxy", "0.0.0.0:1=127.0.0.1:2", "--boundary-wait", "x"],
                "--boundary-wait",
            ),
        ];
        for (args, field) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(field), "{args:?}: {err}");
        }
    }

    #[test]
    fn drain_timeout_explicit_and_kube_needs_both_names() {
        let c = parse(&["--ports", "1", "--drain-timeout", "7s", "--pod-name", "p"]).unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(7));
        assert!(c.kube.is_none());
        let c = parse(&["--ports", "1", "--pod-name", "p", "--pod-namespace", "n"]).unwrap();
        assert_eq!(c.kube.unwrap().namespace, "n");
        let c = parse(&[
            "--ports",
            "1",
            "--pod-name",
            "p",
            "--pod-namespace",
            "n",
            "--no-kube",
        ])
        .unwrap();
        assert!(c.kube.is_none());
    }
}
