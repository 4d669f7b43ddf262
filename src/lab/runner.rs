//! Runs one scenario: ingress, pods and clients, the steps, then the summary.
//! Everything started here is owned by `Run` and killed when it is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::LabError;
use super::client::{ClientOpts, ConnRecord, Load};
use super::fleet::{self, AutoscaleReport, BalanceReport, FleetLab};
use super::ingress::{self, Health, Ingress, Mode};
use super::netns::{self, PodNs};
use super::pod::{Pod, PodReport, PodTemplate};
use super::procs::RunDir;
use super::pyclient::{PyClients, PyConfig};
use super::report::{
    Summary, late_arrivals, planned_peak, pool_changes, removed_per_pod, summarize,
};
use super::scenario::{Scenario, Step};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub scenario: Scenario,
    pub mode: Mode,
    pub template: PodTemplate,
    /// `Some`: the Python client drives the (non-ignoring) load.
    pub python: Option<PyConfig>,
    pub interval: Duration,
    pub close_window: Duration,
    pub close_tick: Duration,
    pub run_id: String,
    pub keep_dir: bool,
    /// Where to write the connection records (JSON lines).
    pub records: Option<std::path::PathBuf>,
    pub progress: bool,
    /// `--netns`: the namespace tag (pods get their own namespaces; we run in the node's).
    pub netns: Option<String>,
    /// Rebalancing and the fleet close budget of the agents.
    pub fleet: FleetLab,
}

pub(super) struct Run<'a> {
    pub(super) cfg: &'a RunConfig,
    /// The pods' template with the run's fleet flags (`--peers`).
    template: PodTemplate,
    pub(super) epoch: Instant,
    dir: RunDir,
    net: [u8; 2],
    pub(super) ingress: Ingress,
    pub(super) pods: Vec<Pod>,
    started: usize,
    pub(super) load: Load,
    py: Vec<PyClients>,
    pub(super) rust_clients: usize,
    py_clients: usize,
    removed: BTreeSet<String>,
    /// Slot of each deleted pod → its deletion time (ms from the run's start).
    deleted: BTreeMap<String, u64>,
    /// When the last `arriving_clients` client starts.
    arrivals_end: Instant,
    reports: Vec<PodReport>,
    samples: Vec<super::soak::Sample>,
    /// Records of clients that left during the run (the autoscale ramp-down).
    pub(super) retired: Vec<ConnRecord>,
    pub(super) balance: Option<BalanceReport>,
    pub(super) autoscaled: Option<AutoscaleReport>,
}

/// 127.A.B.0/24 for this run: A and B random, so parallel runs do not meet.
fn pick_net() -> [u8; 2] {
    [rand::random_range(64..=191), rand::random_range(1..=254)]
}

fn ip(net: [u8; 2], host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net[0], net[1], host))
}

pub async fn run(cfg: &RunConfig) -> Result<Summary, LabError> {
    let epoch = Instant::now();
    let dir = RunDir::create(&cfg.run_id, cfg.keep_dir)?;
    let net = pick_net();
    // With --netns we run in the node namespace: the ingress listens on its bridge.
    let front_ip = match cfg.netns {
        Some(_) => IpAddr::V4(netns::NODE_IP),
        None => ip(net, 1),
    };
    let layout = ingress::layout(
        front_ip,
        super::free_ports(front_ip)?,
        dir.path.join("admin.sock"),
    );
    let health = if cfg.template.agent_flags.is_some() {
        Health::Readyz
    } else {
        Health::Tcp
    };
    let ingress = Ingress::start(cfg.mode, health, layout, &dir.path, &cfg.run_id, epoch).await?;
    let template = fleet_template(cfg, net)?;
    let mut run = Run {
        cfg,
        template,
        epoch,
        dir,
        net,
        ingress,
        pods: Vec::new(),
        started: 0,
        load: Load::new(epoch),
        py: Vec::new(),
        rust_clients: 0,
        py_clients: 0,
        removed: BTreeSet::new(),
        deleted: BTreeMap::new(),
        arrivals_end: epoch,
        reports: Vec::new(),
        samples: Vec::new(),
        retired: Vec::new(),
        balance: None,
        autoscaled: None,
    };
    let result = run.steps().await;
    let records = run.finish().await;
    result?;
    if let Some(path) = &cfg.records {
        write_records(path, &records)?;
    }
    let mut s = Summary {
        scenario: cfg.scenario.name.clone(),
        agent: cfg.template.agent_flags.is_some(),
        ingress: cfg.mode.label().to_owned(),
        client: if cfg.python.is_some() {
            "python"
        } else {
            "rust"
        }
        .into(),
        run_id: cfg.run_id.clone(),
        netns: cfg.netns.as_deref().map(netns::ns_prefix),
        pods: std::mem::take(&mut run.reports),
        samples: std::mem::take(&mut run.samples),
        balance: run.balance.take(),
        autoscale: run.autoscaled.take(),
        ..Default::default()
    };
    summarize(&mut s, &records, &run.removed);
    late_arrivals(&mut s.removed, &records, &run.deleted);
    s.pool_changes = pool_changes(&records, &run.ingress.change_times());
    if s.agent {
        s.planned_close_rate_per_s = Some(planned_peak(
            &removed_per_pod(&records, &run.removed),
            cfg.close_window,
            cfg.close_tick,
        ));
    }
    s.duration_ms = epoch.elapsed().as_millis() as u64;
    Ok(s)
}

/// The pods' template with the fleet flags: with agents on loopback, one agent port for
/// the run and every pod address in `--peers`. (Pods in network namespaces get no peers.)
fn fleet_template(cfg: &RunConfig, net: [u8; 2]) -> Result<PodTemplate, LabError> {
    let mut t = cfg.template.clone();
    let Some(flags) = t.agent_flags.as_mut() else {
        return Ok(t);
    };
    let peers = match cfg.netns {
        Some(_) => Vec::new(),
        None => {
            let [port] = super::free_ports(ip(net, 2))?;
            t.agent_port = Some(port);
            fleet::peer_urls(net, port)
        }
    };
    flags.extend(fleet::agent_flags(&cfg.fleet, &peers));
    Ok(t)
}

impl Run<'_> {
    pub(super) fn say(&self, what: &str) {
        if self.cfg.progress {
            eprintln!("  [{:>5.1}s] {what}", self.epoch.elapsed().as_secs_f64());
        }
    }

    pub(super) fn opts(&self, ignore_close: bool) -> ClientOpts {
        ClientOpts {
            front: self.ingress.front,
            interval: self.cfg.interval,
            ignore_close,
        }
    }

    async fn steps(&mut self) -> Result<(), LabError> {
        self.scale_up(self.cfg.scenario.pods).await?;
        for step in self.cfg.scenario.steps.clone() {
            match step {
                Step::Clients(n) => self.add_clients(n, false).await?,
                Step::ArrivingClients { n, every_ms } => {
                    let every = Duration::from_millis(every_ms);
                    self.say(&format!("+{n} clients arriving, one every {every_ms} ms"));
                    self.load.add_spaced(n, &self.opts(false), every);
                    self.rust_clients += n;
                    self.arrivals_end = self.arrivals_end.max(Instant::now() + every * n as u32);
                }
                Step::IgnoringClients(n) => self.add_clients(n, true).await?,
                Step::ScaleTo(n) if n > self.pods.len() => {
                    self.scale_up(n - self.pods.len()).await?
                }
                Step::ScaleTo(n) => {
                    let gone = self.pods.len().saturating_sub(n);
                    self.delete_newest(gone).await;
                }
                Step::Rolling => self.rolling().await?,
                Step::WaitMs(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Step::Sample => {
                    self.load
                        .wait_connected(self.rust_clients, Duration::from_secs(10))
                        .await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let pids: Vec<_> = self.pods.iter().map(Pod::pids).collect();
                    self.samples.push(super::soak::Sample::take(&pids));
                }
                Step::TierChange => {
                    self.say("the stable tier changes (the gateway's own pool)");
                    self.ingress.change_tier().await?;
                }
                Step::BalanceMs(ms) => self.watch_balance(Duration::from_millis(ms)).await,
                Step::Autoscale(a) => self.autoscale(a).await?,
            }
        }
        // Let every client come back (hints are at most a few seconds) and talk a bit.
        self.say("waiting for clients to settle");
        tokio::time::sleep_until(self.arrivals_end.into()).await;
        self.load
            .wait_connected(self.rust_clients, Duration::from_secs(10))
            .await;
        if !self.py.is_empty() {
            // The Python clients report only at the end: give them the longest hint.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        Ok(())
    }

    async fn add_clients(&mut self, n: usize, ignore_close: bool) -> Result<(), LabError> {
        self.say(&format!(
            "+{n} {}clients ({} pods)",
            if ignore_close { "close-ignoring " } else { "" },
            self.pods.len()
        ));
        let opts = self.opts(ignore_close);
        match (&self.cfg.python, ignore_close) {
            (Some(py), false) => {
                let p = PyClients::start(
                    py,
                    n,
                    1_000_000 + self.py_clients,
                    &opts,
                    self.epoch,
                    &self.cfg.run_id,
                )
                .await?;
                self.py.push(p);
                self.py_clients += n;
            }
            _ => {
                self.load.add(n, &opts);
                self.rust_clients += n;
                let want = self.rust_clients;
                if !self
                    .load
                    .wait_connected(want, Duration::from_secs(10))
                    .await
                {
                    return Err(LabError::Clients(format!(
                        "only {} of {want} clients connected after 10s",
                        self.load.connected()
                    )));
                }
            }
        }
        Ok(())
    }

    pub(super) async fn scale_up(&mut self, n: usize) -> Result<(), LabError> {
        let mut new = Vec::new();
        for _ in 0..n {
            self.started += 1;
            let name = format!("pod-{}", self.started);
            let (addr, ns) = match &self.cfg.netns {
                Some(tag) => {
                    let ns = PodNs::create(tag)?;
                    (ns.ip, Some(ns))
                }
                None => {
                    // Host part 2..: .1 is the ingress.
                    let host = u8::try_from(self.started + 1)
                        .map_err(|_| LabError::Pod("too many pods in one run".into()))?;
                    (ip(self.net, host), None)
                }
            };
            let pod = Pod::start(
                &self.template,
                &name,
                addr,
                ns,
                &self.dir.path,
                &self.cfg.run_id,
            )?;
            new.push(pod);
        }
        for p in &mut new {
            let mut tries = 1;
            loop {
                match p.wait_ready(Duration::from_secs(10)).await {
                    Ok(()) => break,
                    // A port picked free was taken before the container bound it (another
                    // connection's ephemeral port): start the pod again on fresh ports.
                    Err(LabError::Pod(why))
                        if tries < 3
                            && self.cfg.netns.is_none()
                            && why.contains("Address already in use") =>
                    {
                        tries += 1;
                        self.say(&format!("{}: port taken at start, restarting it", p.name));
                        let name = p.name.clone();
                        // The old pod's processes are SIGKILLed when it is dropped here.
                        *p = Pod::start(
                            &self.template,
                            &name,
                            p.ip,
                            None,
                            &self.dir.path,
                            &self.cfg.run_id,
                        )?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let eps: Vec<_> = new.iter().map(Pod::endpoint).collect();
        let slots = self.ingress.add(&eps).await?;
        for (p, slot) in new.iter_mut().zip(slots) {
            p.slot = Some(slot);
        }
        self.pods.extend(new);
        self.say(&format!(
            "scaled up: {} pods ready in the ingress",
            self.pods.len()
        ));
        Ok(())
    }

    pub(super) async fn delete_newest(&mut self, n: usize) {
        let keep = self.pods.len() - n;
        let gone: Vec<Pod> = self.pods.drain(keep..).collect();
        let names: Vec<_> = gone.iter().map(|p| p.name.as_str()).collect();
        self.say(&format!(
            "deleting {} (kubelet termination)",
            names.join(", ")
        ));
        let t0 = self.epoch.elapsed().as_millis() as u64;
        for p in &gone {
            if let Some(s) = &p.slot {
                self.removed.insert(s.clone());
                self.deleted.insert(s.clone(), t0);
            }
        }
        let t = &self.template;
        let ingress = &self.ingress;
        let reports =
            futures_util::future::join_all(gone.iter().map(|p| p.terminate(t, ingress))).await;
        for p in &gone {
            p.kill().await;
        }
        self.say(&format!("deleted; {} pods left", self.pods.len()));
        self.reports.extend(reports);
    }

    async fn rolling(&mut self) -> Result<(), LabError> {
        let old = self.pods.len();
        for _ in 0..old {
            self.scale_up(1).await?;
            // The oldest pod goes: move it to the end and delete "the newest".
            let first = self.pods.remove(0);
            self.pods.push(first);
            self.delete_newest(1).await;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Vec<ConnRecord> {
        let load = std::mem::replace(&mut self.load, Load::new(self.epoch));
        let mut records = load.stop().await;
        records.append(&mut self.retired);
        for p in self.py.drain(..) {
            match p.stop().await {
                Ok(mut r) => records.append(&mut r),
                Err(e) => tracing::warn!(error = %e, "python client"),
            }
        }
        for p in &self.pods {
            p.kill().await;
        }
        records
    }
}

fn write_records(path: &std::path::Path, records: &[ConnRecord]) -> Result<(), LabError> {
    let mut out = String::new();
    for r in records {
        let line = serde_json::to_string(r)
            .map_err(|e| LabError::io("encode record", std::io::Error::other(e)))?;
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| LabError::io("write --records", e))
}
