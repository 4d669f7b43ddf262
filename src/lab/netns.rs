//! `wsdrain lab --netns` (root): every pod in its own network namespace, as in Kubernetes.
//!
//! The lab creates a "node" namespace `wsdl-<tag>-n` holding a bridge `br0`
//! (10.213.0.1/24) and re-runs itself inside it (`nsenter --net`, which keeps the mount
//! namespace, so pod namespaces it creates stay visible to `ip netns`); HAProxy and the
//! clients therefore run in the node namespace. Each pod gets `wsdl-<tag>-p<N>`, joined to
//! the bridge by a veth pair (`vp<N>` in the node, `eth0` in the pod) with address
//! 10.213.0.(N+1). Every `ip` command names one of these namespaces (`ip -n`): nothing is
//! ever configured in the host namespace, and the test range exists only inside them.
//!
//! Cleanup: the outer process's `Sweep` (also on Drop) SIGKILLs every process left in a
//! `wsdl-<tag>-` namespace, then deletes the namespaces and the run's temp dir.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::LabError;
use super::procs::{Child, RUN_ENV};

/// Namespace names start with this; the test looks for `wsdl-<tag>`.
pub const PREFIX: &str = "wsdl-";
/// The node's bridge address; pods are .2 and up in the same /24.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// Fixed ports inside a pod: each pod has its own namespace, as in Kubernetes.
pub const APP_PORT: u16 = 8080;
pub const ADMIN_PORT: u16 = 9090;
pub const AGENT_PORT: u16 = 19901;
const BRIDGE: &str = "br0";
/// Bound of one `ip` invocation.
const IP_LIMIT: Duration = Duration::from_secs(5);

/// `wsdl-<tag>`: the prefix of every namespace of one lab invocation.
pub fn ns_prefix(tag: &str) -> String {
    format!("{PREFIX}{tag}")
}

pub fn node_ns(tag: &str) -> String {
    format!("{}-n", ns_prefix(tag))
}

/// Root, `ip` and `nsenter` are needed; say so plainly otherwise.
pub fn check() -> Result<(), LabError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(LabError::Netns(
            "--netns needs root (it creates network namespaces); run as root, or drop \
             --netns to run pods on loopback addresses"
                .into(),
        ));
    }
    for (tool, arg) in [("ip", "-V"), ("nsenter", "--version")] {
        run(tool, &[arg]).map_err(|e| {
            LabError::Netns(format!(
                "--netns needs `{tool}` (iproute2 / util-linux): {e}"
            ))
        })?;
    }
    Ok(())
}

/// Runs a tool to completion within `IP_LIMIT`; returns its stdout.
fn run(tool: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {tool}: {e}"))?;
    let end = Instant::now() + IP_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{tool} {} did not finish", args.join(" ")));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS`: always inside one of the lab's namespaces, never the host's.
fn ip_in(ns: &str, args: &[&str]) -> Result<(), LabError> {
    if !ns.starts_with(PREFIX) {
        return Err(LabError::Netns(format!("refusing to configure '{ns}'")));
    }
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all).map(drop).map_err(LabError::Netns)
}

fn netns_add(ns: &str) -> Result<(), LabError> {
    run("ip", &["netns", "add", ns])
        .map(drop)
        .map_err(LabError::Netns)?;
    ip_in(ns, &["link", "set", "lo", "up"])
}

/// Creates the node namespace with its bridge (in the outer process).
pub fn create_node(tag: &str) -> Result<(), LabError> {
    let ns = node_ns(tag);
    netns_add(&ns)?;
    let cidr = format!("{NODE_IP}/24");
    ip_in(&ns, &["link", "add", BRIDGE, "type", "bridge"])?;
    ip_in(&ns, &["addr", "add", &cidr, "dev", BRIDGE])?;
    ip_in(&ns, &["link", "set", BRIDGE, "up"])
}

/// The node side of pod N's veth pair (interface names: at most 15 bytes).
fn veth_name(n: u8) -> String {
    format!("vp{n}")
}

/// Pod numbers of this process: never reused, so a new pod never meets the veth of a
/// deleted one the kernel has not freed yet (the demo runs five scenarios in a row).
static NEXT_POD: AtomicU8 = AtomicU8::new(1);

/// One pod's namespace; deleted on Drop (after the pod's processes got SIGKILL).
#[derive(Debug)]
pub struct PodNs {
    pub name: String,
    pub ip: IpAddr,
}

impl PodNs {
    /// Runs in the node namespace (the inner process).
    pub fn create(tag: &str) -> Result<PodNs, LabError> {
        let n = NEXT_POD.fetch_add(1, Ordering::Relaxed);
        if n > 250 {
            return Err(LabError::Netns("more than 250 pods in one lab run".into()));
        }
        let name = format!("{}-p{n}", ns_prefix(tag));
        netns_add(&name)?;
        let pod = PodNs {
            name,
            ip: IpAddr::V4(Ipv4Addr::new(10, 213, 0, n + 1)),
        };
        let veth = veth_name(n);
        let node = node_ns(tag);
        ip_in(
            &node,
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ],
        )?;
        ip_in(&node, &["link", "set", &veth, "master", BRIDGE, "up"])?;
        ip_in(
            &pod.name,
            &["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"],
        )?;
        ip_in(&pod.name, &["link", "set", "eth0", "up"])?;
        Ok(pod)
    }

    /// `cmd` run inside the pod's namespace (`ip netns exec` execs it: same pid).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for PodNs {
    fn drop(&mut self) {
        // The veth pair goes with the namespace once its last process is gone.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Removes everything of one `--netns` invocation: processes still inside its
/// namespaces, the namespaces, the temp dir. Also on Drop (errors, panics).
pub struct Sweep {
    tag: String,
    run_dir: Option<std::path::PathBuf>,
    done: bool,
}

impl Sweep {
    pub fn new(tag: &str, run_dir: Option<std::path::PathBuf>) -> Sweep {
        Sweep {
            tag: tag.to_owned(),
            run_dir,
            done: false,
        }
    }

    /// The namespaces of this invocation that still exist.
    pub fn namespaces(&self) -> Vec<String> {
        lab_namespaces(&self.tag)
    }

    pub fn sweep(&mut self) {
        self.done = true;
        let all = self.namespaces();
        for ns in &all {
            // Only processes inside a namespace this run created.
            let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for ns in &all {
            let _ = run("ip", &["netns", "del", ns]);
        }
        if let Some(dir) = &self.run_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        if !self.done {
            self.sweep();
        }
    }
}

/// `ip netns list` entries of one tag (`wsdl-<tag>-…`).
pub fn lab_namespaces(tag: &str) -> Vec<String> {
    let want = format!("{}-", ns_prefix(tag));
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&want))
        .map(str::to_owned)
        .collect()
}

/// The outer `wsdrain lab --netns`: creates the node namespace, re-runs this very
/// command inside it with `--netns-inside <run id>`, passes signals (INT, TERM, HUP) on,
/// cleans up.
pub async fn run_outer(
    run_id: Option<String>,
    keep_dir: bool,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    check()?;
    let run_id = run_id.unwrap_or_else(super::procs::new_run_id);
    let tag = tag_of(&run_id).to_owned();
    let run_dir = (!keep_dir).then(|| std::env::temp_dir().join(&run_id));
    let mut sweep = Sweep::new(&tag, run_dir);
    create_node(&tag)?;
    if !quiet {
        eprintln!(
            "wsdrain lab --netns: node namespace {} (bridge {NODE_IP}/24)",
            node_ns(&tag)
        );
    }
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", node_ns(&tag)))
        .arg("--")
        .arg(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .args(["--netns-inside", &run_id])
        .env(RUN_ENV, &run_id)
        // Its own group, so the inner lab's SIGKILL fallback cannot hit this process.
        .process_group(0);
    // Handlers first: a signal right after the spawn must not kill us before the inner lab.
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let inner = Child::adopt("lab (node namespace)", cmd.spawn()?)?;
    let (status, code) = tokio::select! {
        s = inner.wait(Duration::MAX) => (s, None),
        _ = int.recv() => (stop(&inner, Signal::SIGINT).await, Some(130)),
        _ = term.recv() => (stop(&inner, Signal::SIGTERM).await, Some(143)),
        _ = hup.recv() => (stop(&inner, Signal::SIGHUP).await, Some(129)),
    };
    drop(inner);
    sweep.sweep();
    let left = sweep.namespaces();
    if !left.is_empty() {
        anyhow::bail!("network namespaces left behind: {left:?}");
    }
    Ok(match (code, status.and_then(|s| s.code())) {
        (Some(c), _) => ExitCode::from(c),
        (None, Some(c)) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, None) => {
            eprintln!("wsdrain lab --netns: the lab in the node namespace was killed ({status:?})");
            ExitCode::FAILURE
        }
    })
}

/// Passes a signal on to the inner lab (which stops its children) and waits, bounded.
async fn stop(inner: &Child, sig: Signal) -> Option<std::process::ExitStatus> {
    let _ = kill(Pid::from_raw(inner.pid()), sig);
    let s = inner.wait(Duration::from_secs(10)).await;
    if s.is_none() {
        inner.kill().await;
    }
    s
}

/// The run id's random part: `wsdrain-lab-<pid>-<hex8>` → `<hex8>`.
pub fn tag_of(run_id: &str) -> &str {
    run_id.rsplit('-').next().unwrap_or(run_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_prefixed() {
        let tag = tag_of("wsdrain-lab-4242-0a1b2c3d");
        assert_eq!(tag, "0a1b2c3d");
        assert_eq!(node_ns(tag), "wsdl-0a1b2c3d-n");
        // Interface names are limited to 15 bytes (IFNAMSIZ); namespace names are files.
        assert!(veth_name(250).len() <= 15 && BRIDGE.len() <= 15);
        assert!(format!("{}-p250", ns_prefix(tag)).len() <= 20);
    }

    #[test]
    fn never_configures_a_foreign_namespace() {
        assert!(ip_in("default", &["link"]).is_err());
    }
}
