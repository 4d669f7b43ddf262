//! The local lab (`wsdrain lab`): pods on 127.0.0.N-style loopback addresses (or, with
//! `--netns` as root, in network namespaces of their own), a real
//! HAProxy ingress, a kubelet-faithful termination driver and WebSocket clients, to
//! show on one machine what happens to clients when pods go away. See docs/lab.md.

pub mod client;
pub mod fleet;
pub mod ingress;
pub mod kubelet;
pub mod netns;
pub mod pod;
pub mod procs;
pub mod pyclient;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod soak;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use thiserror::Error;

use crate::units::{format_duration, parse_duration};
use ingress::Mode;
use pod::{PodTemplate, Sidecar};
use runner::RunConfig;
use scenario::Scenario;

#[derive(Debug, Error)]
pub enum LabError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("cannot start {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("ingress: {0}")]
    Ingress(String),
    #[error("pod: {0}")]
    Pod(String),
    #[error("clients: {0}")]
    Clients(String),
    #[error("scenario: {0}")]
    Scenario(String),
    #[error("netns: {0}")]
    Netns(String),
    #[error("{0}")]
    Usage(String),
}

/// N distinct ports free on `ip` right now. All listeners are held until every port is
/// known, so the ports differ.
pub fn free_ports<const N: usize>(ip: std::net::IpAddr) -> Result<[u16; N], LabError> {
    let mut held = Vec::new();
    let mut ports = [0u16; N];
    for p in &mut ports {
        let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| LabError::io("bind", e))?;
        *p = l.local_addr().map_err(|e| LabError::io("addr", e))?.port();
        held.push(l);
    }
    Ok(ports)
}

impl LabError {
    pub fn io(what: &'static str, e: std::io::Error) -> LabError {
        LabError::Io(what, e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    Rust,
    Python,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// seed, rolling, deadline, pacing, scale-up, autoscale, a scenario YAML file, or
    /// `demo` (the tables).
    pub scenario: String,
    /// Run the wsdrain agent in each pod (with a preStop hook on the app).
    #[arg(long, env = "WSDRAIN_LAB_AGENT", default_value = "on")]
    pub agent: OnOff,
    /// keep: changes keep connections; reset-all: every change resets every session;
    /// tiered: a reset-all gateway in front of a stable keep tier.
    #[arg(long, env = "WSDRAIN_LAB_INGRESS", default_value = "keep")]
    pub ingress: Mode,
    /// Your app instead of the reference app; {ip}, {port}, {admin_port} are filled in
    /// per pod. It must implement admin API v1.
    #[arg(long, env = "WSDRAIN_LAB_APP")]
    pub app: Option<String>,
    /// Replace the client count of every `clients` step.
    #[arg(long, env = "WSDRAIN_LAB_CLIENTS")]
    pub clients: Option<usize>,
    /// Print one JSON summary object on stdout.
    #[arg(long, env = "WSDRAIN_LAB_JSON")]
    pub json: bool,
    /// Which client drives the load.
    #[arg(long, env = "WSDRAIN_LAB_CLIENT", default_value = "rust")]
    pub client: ClientKind,
    /// Python interpreter for `--client python` [default: .venv/bin/python or python3].
    #[arg(long, env = "WSDRAIN_LAB_PYTHON")]
    pub python: Option<PathBuf>,
    /// The Python load client script for `--client python`.
    #[arg(
        long,
        env = "WSDRAIN_LAB_PYTHON_CLIENT",
        default_value = "tests/clients/lab_client.py"
    )]
    pub python_client: PathBuf,
    /// Native sidecar (SIGTERM after the app exited) or classic (SIGTERM at t0).
    #[arg(long, env = "WSDRAIN_LAB_SIDECAR", default_value = "native")]
    pub sidecar: Sidecar,
    /// The pods' terminationGracePeriodSeconds [default: 10s; 30s, the Kubernetes
    /// default, with --fleet-close-rate, so that a budgeted drain fits].
    #[arg(long, env = "WSDRAIN_LAB_GRACE", value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Delay between deletion and the endpoint leaving the ingress.
    #[arg(long, env = "WSDRAIN_LAB_PROPAGATION", default_value = "1s", value_parser = parse_duration)]
    pub propagation: Duration,
    /// Agent --close-window.
    #[arg(long, env = "WSDRAIN_LAB_CLOSE_WINDOW", default_value = "2s", value_parser = parse_duration)]
    pub close_window: Duration,
    /// Agent --close-tick.
    #[arg(long, env = "WSDRAIN_LAB_CLOSE_TICK", default_value = "100ms", value_parser = parse_duration)]
    pub close_tick: Duration,
    /// Agent --reconnect-after.
    #[arg(long, env = "WSDRAIN_LAB_RECONNECT_AFTER", default_value = "0ms..2s")]
    pub reconnect_after: String,
    /// Agent --settle-min [default: --propagation + 500ms]. Shorter than the propagation
    /// delay, closed clients can reconnect to the closing pod.
    #[arg(long, env = "WSDRAIN_LAB_SETTLE_MIN", value_parser = parse_duration)]
    pub settle_min: Option<Duration>,
    /// Agent --settle-quiet.
    #[arg(long, env = "WSDRAIN_LAB_SETTLE_QUIET", default_value = "300ms", value_parser = parse_duration)]
    pub settle_quiet: Duration,
    /// Time between two messages of one client.
    #[arg(long, env = "WSDRAIN_LAB_INTERVAL", default_value = "250ms", value_parser = parse_duration)]
    pub interval: Duration,
    /// Keep the run's temp dir (HAProxy config, logs) for inspection.
    #[arg(long, env = "WSDRAIN_LAB_KEEP_DIR")]
    pub keep_dir: bool,
    /// Write every connection's record (one JSON object per line) to this file.
    #[arg(long, env = "WSDRAIN_LAB_RECORDS")]
    pub records: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, env = "WSDRAIN_LAB_QUIET")]
    pub quiet: bool,
    /// Root only: each pod in its own network namespace on a bridge (10.213.0.0/24),
    /// HAProxy and clients in a "node" namespace; all removed at the end.
    #[arg(long, env = "WSDRAIN_LAB_NETNS")]
    pub netns: bool,
    /// Tag every process of the run with this id (default: a new one), e.g. so a test
    /// harness can sweep them; the `demo` runs get `<id>-r<N>`.
    #[arg(long, env = "WSDRAIN_LAB_RUN_ID", value_name = "ID")]
    pub run_id: Option<String>,
    /// `soak`: rolling restarts to run, each replacing every pod one at a time.
    #[arg(long, env = "WSDRAIN_LAB_ROUNDS", default_value_t = 20)]
    pub rounds: usize,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Internal: this process already runs in the node namespace of run id ID.
    #[arg(long, hide = true, value_name = "ID")]
    pub netns_inside: Option<String>,
}

/// Fleet awareness in the lab (docs/lab.md, "Fleet scenarios").
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Agents rebalance after a scale-up [default: on for scale-up and autoscale].
    #[arg(long, env = "WSDRAIN_LAB_REBALANCE")]
    pub rebalance: Option<OnOff>,
    /// Agents share one close budget of N sessions per second while draining together.
    #[arg(long, env = "WSDRAIN_LAB_FLEET_CLOSE_RATE", value_parser = parse_rate)]
    pub fleet_close_rate: Option<f64>,
    /// autoscale: fewest pods.
    #[arg(long, env = "WSDRAIN_LAB_MIN_PODS", default_value_t = 2)]
    pub min_pods: usize,
    /// autoscale: most pods.
    #[arg(long, env = "WSDRAIN_LAB_MAX_PODS", default_value_t = 8)]
    pub max_pods: usize,
    /// autoscale: the sessions per pod the autoscaler aims for.
    #[arg(long, env = "WSDRAIN_LAB_TARGET_PER_POD", default_value_t = 50)]
    pub target_per_pod: u64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    crate::fleet::budget::Budget::new(s.parse().map_err(|_| format!("'{s}' is not a number"))?)
        .map(|b| b.per_second())
        .map_err(|e| e.to_string())
}

impl FleetArgs {
    fn lab(&self, scenario: &str) -> fleet::FleetLab {
        let default = matches!(scenario, "scale-up" | "autoscale");
        fleet::FleetLab {
            rebalance: self.rebalance.map_or(default, |r| r == OnOff::On),
            close_rate: self.fleet_close_rate,
        }
    }

    fn autoscale(&self, clients: Option<usize>) -> Result<fleet::Autoscale, LabError> {
        let a = fleet::Autoscale {
            min_pods: self.min_pods,
            max_pods: self.max_pods,
            target_per_pod: self.target_per_pod,
            clients: clients.unwrap_or(300),
        };
        if a.min_pods == 0 || a.min_pods > a.max_pods || a.max_pods > 12 {
            return Err(LabError::Usage(
                "--min-pods and --max-pods: 1 <= min <= max <= 12".into(),
            ));
        }
        if a.target_per_pod == 0 || a.clients > 2000 {
            return Err(LabError::Usage(
                "--target-per-pod above 0 and at most 2000 --clients".into(),
            ));
        }
        Ok(a)
    }
}

impl LabArgs {
    /// `demo`: the number of the run within it, for a run id of its own.
    fn config(
        &self,
        scenario: Scenario,
        agent: OnOff,
        mode: Mode,
        demo_run: Option<usize>,
    ) -> RunConfig {
        let scenario_name = scenario.name.clone();
        // Settling outlasts the endpoint's propagation by default, as it should in a cluster.
        let settle_min = self
            .settle_min
            .unwrap_or(self.propagation + Duration::from_millis(500));
        let settle_max = settle_min.max(Duration::from_secs(3));
        let agent_flags = (agent == OnOff::On).then(|| {
            let mut f: Vec<String> = Vec::new();
            for (k, v) in [
                ("--settle-min", format_duration(settle_min)),
                ("--settle-quiet", format_duration(self.settle_quiet)),
                ("--settle-max", format_duration(settle_max)),
                ("--close-window", format_duration(self.close_window)),
                ("--close-tick", format_duration(self.close_tick)),
                ("--reconnect-after", self.reconnect_after.clone()),
                ("--log-format", "json".to_owned()),
            ] {
                f.push(k.to_owned());
                f.push(v);
            }
            f
        });
        let python = (self.client == ClientKind::Python).then(|| pyclient::PyConfig {
            python: self.python.clone().unwrap_or_else(|| {
                let venv = PathBuf::from(".venv/bin/python");
                if venv.exists() {
                    venv
                } else {
                    PathBuf::from("python3")
                }
            }),
            script: self.python_client.clone(),
        });
        RunConfig {
            scenario,
            mode,
            template: PodTemplate {
                wsdrain: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("wsdrain")),
                app_cmd: self.app.clone(),
                agent_flags,
                sidecar: self.sidecar,
                grace: self
                    .grace
                    .unwrap_or(if self.fleet.fleet_close_rate.is_some() {
                        Duration::from_secs(30)
                    } else {
                        Duration::from_secs(10)
                    }),
                propagation: self.propagation,
                agent_port: None,
            },
            python,
            interval: self.interval,
            close_window: self.close_window,
            close_tick: self.close_tick,
            // The outer `--netns` process or the caller chose the id (and may sweep by
            // it); each demo run extends it, so every process still carries it.
            run_id: {
                let base = self.netns_inside.as_ref().or(self.run_id.as_ref()).cloned();
                match (base, demo_run) {
                    (Some(id), None) => id,
                    (Some(id), Some(i)) => format!("{id}-r{i}"),
                    (None, _) => procs::new_run_id(),
                }
            },
            netns: self
                .netns_inside
                .as_deref()
                .map(|id| netns::tag_of(id).to_owned()),
            keep_dir: self.keep_dir,
            records: self.records.clone(),
            progress: !self.quiet,
            fleet: self.fleet.lab(&scenario_name),
        }
    }
}

pub async fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    if let Some(id) = &args.run_id {
        check_run_id(id)?;
    }
    if args.netns && args.netns_inside.is_none() {
        // Creates the namespaces and runs this command again inside the node one.
        return netns::run_outer(args.run_id.clone(), args.keep_dir, args.quiet).await;
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    // SIGHUP: the terminal was closed.
    let mut hup = signal(SignalKind::hangup())?;
    // On any of them the run's future is dropped: every child's process group is
    // SIGKILLed and the temp dir removed by their Drop.
    let (what, code) = tokio::select! {
        r = run_inner(&args) => return r,
        _ = int.recv() => ("interrupted", 130),
        _ = term.recv() => ("terminated", 143),
        _ = hup.recv() => ("hung up", 129),
    };
    eprintln!("wsdrain lab: {what}, everything started was stopped");
    Ok(ExitCode::from(code))
}

/// A `--run-id` names the temp dir and (its last `-` part) the `--netns` namespaces.
pub fn check_run_id(id: &str) -> Result<(), LabError> {
    let tag = netns::tag_of(id);
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !tag.is_empty()
        && tag.len() <= 12;
    if ok {
        Ok(())
    } else {
        Err(LabError::Usage(format!(
            "--run-id '{id}': use letters, digits and '-' (at most 64), the part after the \
             last '-' at most 12 long"
        )))
    }
}

async fn run_inner(args: &LabArgs) -> anyhow::Result<ExitCode> {
    if args.scenario == "demo" {
        return demo(args).await;
    }
    if args.scenario == "soak" {
        return soak::run(args).await;
    }
    let mut scenario = match args.scenario.as_str() {
        "autoscale" => fleet::autoscale_scenario(args.fleet.autoscale(args.clients)?),
        other => Scenario::load(other)?,
    };
    if let Some(n) = args.clients {
        scenario = scenario.with_clients(n);
    }
    let cfg = args.config(scenario, args.agent, args.ingress, None);
    if !args.quiet {
        eprintln!(
            "wsdrain lab {}: agent {:?}, ingress {:?}, run id {}",
            cfg.scenario.name, args.agent, args.ingress, cfg.run_id
        );
    }
    let s = runner::run(&cfg).await?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("{}", report::table(&[(cfg.scenario.name.clone(), s)]));
    }
    Ok(ExitCode::SUCCESS)
}

/// `make demo`: the user's story with and without the agent, behind each ingress.
async fn demo(args: &LabArgs) -> anyhow::Result<ExitCode> {
    let runs = [
        ("keep ingress, no agent", OnOff::Off, Mode::Keep),
        ("keep ingress, wsdrain", OnOff::On, Mode::Keep),
        ("reset-all gateway, no agent", OnOff::Off, Mode::ResetAll),
        ("reset-all gateway, wsdrain", OnOff::On, Mode::ResetAll),
        ("reset-all + stable tier, wsdrain", OnOff::On, Mode::Tiered),
    ];
    let mut rows = Vec::new();
    let mut summaries = Vec::new();
    for (i, (label, agent, mode)) in runs.iter().enumerate() {
        let mut scenario = Scenario::load("seed")?;
        if let Some(n) = args.clients {
            scenario = scenario.with_clients(n);
        }
        let cfg = args.config(scenario, *agent, *mode, Some(i + 1));
        eprintln!("[{}/{}] seed: {label}", i + 1, runs.len());
        let s = runner::run(&cfg).await?;
        summaries.push(s.clone());
        rows.push((label.to_string(), s));
    }
    let scale_up = demo_scale_up(args, runs.len()).await?;
    summaries.extend(scale_up.iter().map(|(_, s)| s.clone()));
    if args.json {
        println!("{}", serde_json::to_string(&summaries)?);
    } else {
        println!("\n{}", report::table(&rows));
        println!("\n{}", fleet::balance_table(&scale_up));
    }
    Ok(ExitCode::SUCCESS)
}

/// The scale-up story of `make demo`: 3 pods with clients, 3 more pods; without
/// rebalancing the new pods stay idle, with it the clients spread within seconds.
async fn demo_scale_up(
    args: &LabArgs,
    done: usize,
) -> anyhow::Result<Vec<(String, report::Summary)>> {
    let mut rows = Vec::new();
    for (i, (label, rebalance)) in [
        ("scale 3 → 6, no rebalance", OnOff::Off),
        ("scale 3 → 6, rebalance", OnOff::On),
    ]
    .into_iter()
    .enumerate()
    {
        let mut scenario = fleet::scale_up_scenario();
        if let Some(n) = args.clients {
            scenario = scenario.with_clients(n);
        }
        let mut cfg = args.config(scenario, OnOff::On, Mode::Keep, Some(done + i + 1));
        cfg.fleet.rebalance = rebalance == OnOff::On;
        eprintln!("[{}/{}] scale-up: {label}", done + i + 1, done + 2);
        rows.push((label.to_owned(), runner::run(&cfg).await?));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_path_and_namespace_safe() {
        assert!(check_run_id("wsdrain-lab-t42-0a1b2c3d").is_ok());
        for bad in ["", "a/b", "x-", "../etc", "wsdrain-lab-1-0123456789abc"] {
            assert!(check_run_id(bad).is_err(), "{bad}");
        }
    }
}
