//! The ingress: a real HAProxy, configured with empty server slots up front and driven
//! through its runtime API (the `stats socket`) as pods come and go.
//!
//! - `keep`: an endpoint change keeps open connections (ingress-nginx, Envoy):
//!   a removed server goes to `maint`, its sessions stay.
//! - `reset-all`: every pool change resets every session (Azure Application Gateway):
//!   `shutdown sessions server` on every slot after each change.
//! - `tiered`: a `reset-all` gateway whose pool is a stable `keep` proxy tier that holds
//!   the pods. The gateway applies the reset-all rule to its own pool (the tier), which
//!   pods coming and going do not change; a change of the tier itself resets everyone.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::LabError;
use super::procs::Child;

/// Server slots per backend; a run never adds more pods than this (slots are not
/// reused, so records stay unambiguous). Sized for `soak`: 3 pods × (30 rounds + 1).
pub const SLOTS: usize = 96;
/// Response header naming the pod (slot) that serves a connection.
pub const POD_HEADER: &str = "x-lab-pod";
const BACKEND: &str = "pods";
/// The tiered gateway's backend: the stable proxy tier.
const TIER: &str = "tier";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Keep,
    ResetAll,
    Tiered,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Keep => "keep",
            Mode::ResetAll => "reset-all",
            Mode::Tiered => "tiered",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `GET /readyz` on the agent port (set per slot).
    Readyz,
    /// Plain TCP connect to the app port (no agent in the pod).
    Tcp,
}

/// Addresses the generated config binds.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Where clients connect.
    pub front: SocketAddr,
    /// The stable proxy tier's listeners (tiered mode only).
    pub tier: Vec<SocketAddr>,
    pub socket: PathBuf,
}

/// The HAProxy configuration for `mode` (pure: tested without HAProxy).
pub fn config(mode: Mode, health: Health, layout: &Layout) -> String {
    let mut c = format!(
        "global\n  stats socket {sock} mode 600 level admin\n  maxconn 8000\n\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  \
         timeout server 60s\n  timeout tunnel 1h\n  timeout client-fin 1s\n  \
         timeout server-fin 1s\n  timeout check 1s\n  retries 2\n  option redispatch\n\n",
        sock = layout.socket.display()
    );
    let pods_front = if mode == Mode::Tiered {
        c.push_str(&format!(
            "frontend gateway\n  bind {}\n  default_backend {TIER}\n\n",
            layout.front
        ));
        c.push_str(&format!("backend {TIER}\n  balance roundrobin\n"));
        for (i, addr) in layout.tier.iter().enumerate() {
            c.push_str(&format!("  server t{i} {addr} check inter 200ms\n"));
        }
        c.push('\n');
        layout.tier.clone()
    } else {
        vec![layout.front]
    };
    c.push_str("frontend ingress\n");
    for addr in pods_front {
        c.push_str(&format!("  bind {addr}\n"));
    }
    c.push_str(&format!("  default_backend {BACKEND}\n\n"));
    c.push_str(&format!("backend {BACKEND}\n  balance roundrobin\n"));
    if health == Health::Readyz {
        c.push_str("  option httpchk GET /readyz\n");
    }
    c.push_str(&format!("  http-response set-header {POD_HEADER} %s\n"));
    c.push_str("  default-server inter 200ms fall 1 rise 1\n");
    for i in 0..SLOTS {
        // A placeholder address; `add` sets the real one before enabling the slot.
        c.push_str(&format!("  server s{i} 127.0.0.1:9 disabled check\n"));
    }
    c
}

/// An endpoint as the ingress sees it.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Health-check port (the agent's; the app's itself with TCP checks).
    pub check_port: u16,
}

pub struct Ingress {
    pub mode: Mode,
    pub front: SocketAddr,
    socket: PathBuf,
    _proc: Child,
    /// Slots handed out so far (never reused within a run).
    used: Mutex<usize>,
    /// Tier listeners (tiered mode): the gateway's servers `t0`, `t1`, ...
    tier: usize,
    /// The run's clock (the clients' too), for `changes`.
    epoch: Instant,
    /// When each pool change took effect, in ms from `epoch` (before any reset it causes).
    changes: std::sync::Mutex<Vec<u64>>,
}

impl Ingress {
    pub async fn start(
        mode: Mode,
        health: Health,
        layout: Layout,
        dir: &Path,
        run_id: &str,
        epoch: Instant,
    ) -> Result<Ingress, LabError> {
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, config(mode, health, &layout))
            .map_err(|e| LabError::io("write haproxy.cfg", e))?;
        let mut cmd = tokio::process::Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg_path);
        let proc = Child::spawn("haproxy", cmd, run_id, &dir.join("haproxy.log"))?;
        let ingress = Ingress {
            mode,
            front: layout.front,
            socket: layout.socket,
            _proc: proc,
            used: Mutex::new(0),
            tier: if mode == Mode::Tiered {
                layout.tier.len()
            } else {
                0
            },
            epoch,
            changes: Default::default(),
        };
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if ingress.command("show info").await.is_ok() {
                return Ok(ingress);
            }
            if let Some(status) = ingress._proc.exited() {
                return Err(LabError::Ingress(format!(
                    "haproxy exited ({status}); see {}",
                    dir.join("haproxy.log").display()
                )));
            }
            if Instant::now() > end {
                return Err(LabError::Ingress(
                    "haproxy admin socket not up in 5s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One runtime API command; returns HAProxy's answer.
    pub async fn command(&self, cmd: &str) -> Result<String, LabError> {
        let io = |e| LabError::Ingress(format!("runtime API '{cmd}': {e}"));
        let run = async {
            let mut s = UnixStream::connect(&self.socket).await.map_err(io)?;
            s.write_all(format!("{cmd}\n").as_bytes())
                .await
                .map_err(io)?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.map_err(io)?;
            Ok::<_, LabError>(out)
        };
        let out = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .map_err(|_| LabError::Ingress(format!("runtime API '{cmd}': timed out")))??;
        let first = out.lines().next().unwrap_or("");
        if [
            "No such",
            "Unknown",
            "Require",
            "Invalid",
            "Can't",
            "not allowed",
        ]
        .iter()
        .any(|e| first.contains(e))
        {
            return Err(LabError::Ingress(format!("runtime API '{cmd}': {first}")));
        }
        Ok(out)
    }

    /// Puts endpoints into free slots (one pool change), waits until HAProxy's health
    /// check sees them up, then stops checking them. Returns the slot names (also the
    /// value of the pod header).
    pub async fn add(&self, endpoints: &[Endpoint]) -> Result<Vec<String>, LabError> {
        let mut names = Vec::new();
        {
            let mut used = self.used.lock().await;
            for ep in endpoints {
                if *used >= SLOTS {
                    return Err(LabError::Ingress(format!("all {SLOTS} server slots used")));
                }
                let name = format!("s{}", *used);
                *used += 1;
                let srv = format!("{BACKEND}/{name}");
                self.command(&format!(
                    "set server {srv} addr {} port {}",
                    ep.addr.ip(),
                    ep.addr.port()
                ))
                .await?;
                self.command(&format!("set server {srv} check-port {}", ep.check_port))
                    .await?;
                self.command(&format!("set server {srv} state ready"))
                    .await?;
                names.push(name);
            }
        }
        for name in &names {
            self.wait_up(name, Duration::from_secs(5)).await?;
            // The check only brings the pod up (scale-up waits for ready). In Kubernetes a
            // terminating pod leaves an ingress when its endpoint change propagates, not
            // when its readiness probe fails: removal is only `remove`, at t0 + propagation.
            self.command(&format!("disable health {BACKEND}/{name}"))
                .await?;
        }
        self.pool_changed(BACKEND).await?;
        Ok(names)
    }

    /// Takes a slot out of rotation (one pool change); keeps its sessions unless the
    /// mode resets everything.
    pub async fn remove(&self, name: &str) -> Result<(), LabError> {
        self.command(&format!("set server {BACKEND}/{name} state maint"))
            .await?;
        self.pool_changed(BACKEND).await
    }

    /// Tiered mode: takes the last tier listener out of the gateway's pool, as when the
    /// stable tier itself is rolled. That is a change of the gateway's own pool.
    pub async fn change_tier(&self) -> Result<(), LabError> {
        let last = self
            .tier
            .checked_sub(1)
            .ok_or_else(|| LabError::Ingress("tier_change needs --ingress tiered".into()))?;
        self.command(&format!("set server {TIER}/t{last} state maint"))
            .await?;
        self.pool_changed(TIER).await
    }

    /// Times of the pool changes so far (ms from the run's epoch).
    pub fn change_times(&self) -> Vec<u64> {
        self.changes.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// A change of `backend`'s pool. The reset-all gateway resets every session of its
    /// own pool when that changes: the pods in `reset-all` mode, the tier in `tiered`.
    async fn pool_changed(&self, backend: &str) -> Result<(), LabError> {
        if let Ok(mut c) = self.changes.lock() {
            c.push(self.epoch.elapsed().as_millis() as u64);
        }
        let servers: Vec<String> = match (self.mode, backend) {
            (Mode::ResetAll, BACKEND) => (0..*self.used.lock().await)
                .map(|i| format!("s{i}"))
                .collect(),
            (Mode::Tiered, TIER) => (0..self.tier).map(|i| format!("t{i}")).collect(),
            _ => return Ok(()),
        };
        for srv in servers {
            self.command(&format!("shutdown sessions server {backend}/{srv}"))
                .await?;
        }
        Ok(())
    }

    /// Polls `show servers state` until the slot's operational state is "running".
    async fn wait_up(&self, name: &str, limit: Duration) -> Result<(), LabError> {
        let end = Instant::now() + limit;
        loop {
            let out = self
                .command(&format!("show servers state {BACKEND}"))
                .await?;
            if server_running(&out, name) {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(LabError::Ingress(format!(
                    "server {name} not up after {limit:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// In `show servers state` output (format 1), field 4 is the server name and field 6
/// `srv_op_state` (2 = running).
fn server_running(out: &str, name: &str) -> bool {
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .any(|f| f.get(3) == Some(&name) && f.get(5) == Some(&"2"))
}

/// The addresses a run binds: the front and tier listeners on their own 127.x address.
pub fn layout(ip: IpAddr, ports: [u16; 3], socket: PathBuf) -> Layout {
    Layout {
        front: SocketAddr::new(ip, ports[0]),
        tier: vec![SocketAddr::new(ip, ports[1]), SocketAddr::new(ip, ports[2])],
        socket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay() -> Layout {
        layout(
            "127.9.9.1".parse().unwrap(),
            [1000, 1001, 1002],
            "/tmp/x.sock".into(),
        )
    }

    #[test]
    fn keep_config_has_slots_health_checks_and_pod_header() {
        let c = config(Mode::Keep, Health::Readyz, &lay());
        assert!(c.contains("stats socket /tmp/x.sock"));
        assert!(c.contains("bind 127.9.9.1:1000"));
        assert!(c.contains("option httpchk GET /readyz"));
        assert!(c.contains("timeout tunnel 1h"));
        assert!(c.contains("inter 200ms"));
        assert_eq!(c.matches(" disabled check").count(), SLOTS);
        assert!(c.contains("set-header x-lab-pod %s"));
        assert!(!c.contains("frontend gateway"));
    }

    #[test]
    fn tcp_health_has_no_http_check() {
        let c = config(Mode::Keep, Health::Tcp, &lay());
        assert!(!c.contains("httpchk"));
    }

    #[test]
    fn tiered_config_puts_a_gateway_in_front_of_the_tier() {
        let c = config(Mode::Tiered, Health::Readyz, &lay());
        assert!(c.contains("frontend gateway\n  bind 127.9.9.1:1000"));
        assert!(c.contains("server t0 127.9.9.1:1001"));
        assert!(c.contains("server t1 127.9.9.1:1002"));
        assert!(c.contains("frontend ingress\n  bind 127.9.9.1:1001\n  bind 127.9.9.1:1002"));
    }

    #[test]
    fn parses_server_state() {
        let out = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state ...\n\
                   3 pods 1 s0 127.1.1.2 2 0 1 1 5 6 3 4 6 0 0 0 - 8080 - 0 0 - - 0\n\
                   3 pods 2 s1 127.1.1.3 0 5 1 1 5 1 0 0 1 0 0 0 - 9 - 0 0 - - 0\n";
        assert!(server_running(out, "s0"));
        assert!(!server_running(out, "s1"));
        assert!(!server_running(out, "s2"));
    }
}
