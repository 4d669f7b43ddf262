//! End-to-end tests of `wsdrain lab`: real pods (reference app + agent), a real HAProxy,
//! real clients. Each run is bounded; after each, nothing the lab started may remain.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

/// A fresh run id the lab will tag every process with (`--run-id`).
fn new_run_id() -> String {
    format!(
        "wsdrain-lab-t{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A running `wsdrain lab` and everything it may have started, all tagged with `run_id`.
/// On Drop, also when the test panics (a timeout, a failed assert): SIGINT so the lab
/// runs its own cleanup, SIGKILL if it has not exited after 5 s, then a sweep of every
/// process still carrying the run id, its `--netns` namespaces and its temp dirs.
struct LabRun {
    p: common::Proc,
    run_id: String,
}

impl LabRun {
    fn spawn(run_id: &str, args: &[&str], stdout: Stdio) -> LabRun {
        let mut cmd = Command::new(common::wsdrain_bin());
        cmd.arg("lab")
            .args(args)
            .args(["--run-id", run_id])
            .current_dir(common::repo_path(""))
            .stdout(stdout)
            .stderr(Stdio::piped());
        LabRun {
            p: common::Proc::spawn("lab", &mut cmd),
            run_id: run_id.to_owned(),
        }
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        // No expect/unwrap here: a panic while unwinding would abort the test binary.
        if let Ok(None) = self.p.child.try_wait() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.p.pid()), Signal::SIGINT);
            let end = Instant::now() + Duration::from_secs(5);
            while matches!(self.p.child.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.p.child.kill();
            let _ = self.p.child.wait();
        }
        sweep(&self.run_id);
    }
}

/// Kills every process tagged with `run_id`, deletes its namespaces and temp dirs.
fn sweep(run_id: &str) {
    // Bounded: a process may have been forking while we killed.
    for _ in 0..3 {
        let pids = pids_with(run_id);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if nix::unistd::Uid::effective().is_root() {
        let tag = run_id.rsplit('-').next().unwrap_or(run_id);
        for ns in namespaces_with(&format!("wsdl-{tag}-")) {
            let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
            let pids = pids.map(|o| o.stdout).unwrap_or_default();
            for pid in String::from_utf8_lossy(&pids).split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
    // The run's dir, and a demo's `<id>-rN` ones.
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(run_id) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Runs `wsdrain lab ARGS --json --quiet`, returns the summary; fails after `limit`.
fn lab(args: &[&str], limit: Duration) -> Value {
    lab_as(&new_run_id(), args, limit)
}

/// `lab` with a run id chosen by the caller.
fn lab_as(run_id: &str, args: &[&str], limit: Duration) -> Value {
    let mut args = args.to_vec();
    args.extend(["--json", "--quiet"]);
    let mut run = LabRun::spawn(run_id, &args, Stdio::piped());
    // Drain both pipes while the lab runs, so a chatty run cannot block on a full pipe.
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read_all(run.p.child.stdout.take().map(|o| Box::new(o) as _));
    let err = read_all(run.p.child.stderr.take().map(|e| Box::new(e) as _));
    let status = run.p.wait_timeout(limit);
    // On timeout LabRun's Drop stops the lab and sweeps what it started.
    let status = status.unwrap_or_else(|| panic!("lab {args:?} did not finish in {limit:?}"));
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    assert!(status.success(), "lab {args:?} failed: {status}\n{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["run_id"], run_id, "the lab took the run id it was given");
    // The lab's own cleanup, checked before the guard's sweep could hide a leak.
    assert_no_leftovers(run_id);
    assert!(
        !std::env::temp_dir().join(run_id).exists(),
        "temp dir of {run_id} left"
    );
    v
}

fn n(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = match k.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[k],
        };
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path} missing in {v}"))
}

/// No process carries the run id in its environment or command line.
fn assert_no_leftovers(run_id: &str) {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let found = procs_with(run_id);
        if found.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "leftover processes of {run_id}: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pids_with(needle: &str) -> Vec<i32> {
    procs_with(needle)
        .iter()
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect()
}

/// "pid: command line" of every process with `needle` in its environment or command line.
fn procs_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        for f in ["environ", "cmdline"] {
            if let Ok(bytes) = std::fs::read(e.path().join(f))
                && String::from_utf8_lossy(&bytes).contains(needle)
            {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                found.push(format!(
                    "{name}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                ));
                break;
            }
        }
    }
    found
}

const LIMIT: Duration = Duration::from_secs(60);

/// One pool change of a run: connections open at it, reset by it, kept through it.
#[derive(Debug)]
struct Change {
    open: u64,
    reset: u64,
    kept: u64,
}

fn changes(v: &Value) -> Vec<Change> {
    v["pool_changes"]
        .as_array()
        .unwrap_or_else(|| panic!("pool_changes missing in {v}"))
        .iter()
        .map(|c| Change {
            open: n(c, "open"),
            reset: n(c, "reset"),
            kept: n(c, "kept"),
        })
        .collect()
}

/// seed's pool changes: 3 pods in, 3 more in (20 clients open), 3 out one by one.
const SEED_CHANGES: usize = 5;
const SCALE_UP: usize = 1;

/// A keep ingress (or a stable tier) resets no one on a pool change; the 20 clients of
/// the first three pods live through the scale-up.
fn assert_changes_keep_connections(s: &Value) {
    let ch = changes(s);
    assert_eq!(ch.len(), SEED_CHANGES, "{ch:?}");
    assert!(
        ch.iter().all(|c| c.reset == 0),
        "a pool change reset: {ch:?}"
    );
    assert_eq!(ch[SCALE_UP].open, 20, "{ch:?}");
    assert_eq!(ch[SCALE_UP].kept, 20, "{ch:?}");
}

#[test]
fn seed_keep_ingress_agent_closes_cleanly_where_no_agent_resets() {
    let with = lab(&["seed", "--agent", "on", "--ingress", "keep"], LIMIT);
    let removed = n(&with, "removed.connections");
    assert!(removed > 0, "no client was on a removed pod: {with}");
    assert_eq!(n(&with, "removed.abnormal"), 0, "{with}");
    assert_eq!(n(&with, "removed.clean_1012_with_hint"), removed, "{with}");
    assert_eq!(
        n(&with, "removed.reconnected_to_survivor"),
        removed,
        "{with}"
    );
    assert_eq!(n(&with, "abnormal_closes"), 0, "{with}");
    assert_eq!(n(&with, "messages_lost"), 0, "{with}");
    assert_eq!(n(&with, "clients"), 40);
    assert_changes_keep_connections(&with);
    for pod in with["pods"].as_array().expect("pods") {
        assert_eq!(pod["drain_outcome"], "Drained", "{pod}");
        assert!(pod["killed"].as_array().is_some_and(Vec::is_empty), "{pod}");
    }

    let without = lab(&["seed", "--agent", "off", "--ingress", "keep"], LIMIT);
    assert!(n(&without, "removed.connections") > 0, "{without}");
    assert_eq!(
        n(&without, "removed.abnormal"),
        n(&without, "removed.connections"),
        "without the agent every client of a removed pod sees a reset: {without}"
    );
    assert!(n(&without, "abnormal_closes") > n(&with, "abnormal_closes"));
    assert_eq!(n(&without, "clean_closes_with_hint"), 0);
    assert_changes_keep_connections(&without);
}

#[test]
fn reset_all_gateway_resets_everyone_and_a_stable_tier_fixes_it() {
    for agent in ["on", "off"] {
        let s = lab(&["seed", "--agent", agent, "--ingress", "reset-all"], LIMIT);
        let ch = changes(&s);
        assert_eq!(ch.len(), SEED_CHANGES, "{s}");
        // Every connection open at any pool change is gone right after it; without the
        // agent (no close frames at all) every one of them by a reset. With the agent a
        // close frame may beat the reset by a few ms: that connection is neither.
        for c in &ch {
            assert_eq!(c.kept, 0, "agent {agent}: survived a pool change: {ch:?}");
            if agent == "off" {
                assert_eq!(c.reset, c.open, "agent off: {ch:?}");
            }
        }
        // The scale-up alone resets the first 20 clients, agent or not.
        assert_eq!(ch[SCALE_UP].open, 20, "{ch:?}");
        assert_eq!(ch[SCALE_UP].reset, 20, "{ch:?}");
        // ... and the scale-down resets clients again.
        assert!(
            ch[SCALE_UP + 1..].iter().map(|c| c.reset).sum::<u64>() > 0,
            "{ch:?}"
        );
    }
    // The gateway resets on changes of its own pool, the tier, which pods do not change
    // (a tier change does reset: the_tiered_gateway_resets_everyone_when_its_own_pool_changes).
    let tiered = lab(&["seed", "--agent", "on", "--ingress", "tiered"], LIMIT);
    let removed = n(&tiered, "removed.connections");
    assert!(removed > 0, "{tiered}");
    assert_eq!(n(&tiered, "abnormal_closes"), 0, "{tiered}");
    assert_eq!(
        n(&tiered, "removed.clean_1012_with_hint"),
        removed,
        "{tiered}"
    );
    assert_eq!(
        n(&tiered, "removed.reconnected_to_survivor"),
        removed,
        "{tiered}"
    );
    assert_eq!(n(&tiered, "messages_lost"), 0, "{tiered}");
    assert_changes_keep_connections(&tiered);
}

/// Writes a scenario YAML for one test; removed when dropped.
struct ScenarioFile(std::path::PathBuf);

impl ScenarioFile {
    fn new(name: &str, yaml: &str) -> ScenarioFile {
        let path = std::env::temp_dir().join(format!("{}-{name}.yaml", new_run_id()));
        std::fs::write(&path, yaml).expect("write scenario");
        ScenarioFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for ScenarioFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_tiered_gateway_resets_everyone_when_its_own_pool_changes() {
    // Tiered zero resets are not by construction: the gateway applies reset-all to the
    // tier, and a change of the tier resets every session.
    let f = ScenarioFile::new(
        "tier",
        "name: tier\npods: 2\nsteps:\n  - clients: 10\n  - wait_ms: 300\n  - tier_change\n",
    );
    let s = lab(&[f.path(), "--ingress", "tiered"], LIMIT);
    let ch = changes(&s);
    assert_eq!(ch.len(), 2, "pods in, then the tier: {ch:?}");
    assert_eq!(ch[1].open, 10, "{ch:?}");
    assert_eq!(ch[1].reset, 10, "{ch:?}");
    assert_eq!(n(&s, "clients_with_abnormal_close"), 10, "{s}");
}

/// New clients keep arriving (one every 80 ms, 2 pods) while one of two pods is deleted.
const ARRIVALS: &str = "name: arrivals\npods: 2\nsteps:\n  - clients: 10\n  - wait_ms: 300\n  \
     - {arriving_clients: 40, every_ms: 80}\n  - wait_ms: 800\n  - scale_to: 1\n";

#[test]
fn a_settle_shorter_than_the_propagation_delay_lets_clients_land_on_a_closing_pod() {
    let f = ScenarioFile::new("arrivals", ARRIVALS);
    // The endpoint leaves the ingress at t0 + 1 s (--propagation), not when the agent's
    // /readyz fails: a health check may not remove it earlier.
    let short = lab(
        &[f.path(), "--settle-min", "50ms", "--settle-quiet", "50ms"],
        LIMIT,
    );
    assert_eq!(n(&short, "pods.0.endpoint_removed_ms") / 100, 10, "{short}");
    assert!(
        n(&short, "removed.last_opened_after_delete_ms") >= 500,
        "the deleted pod left the ingress before the propagation delay: {short}"
    );
    // Its closes began at once, so some new clients came after them: closed twice.
    assert!(
        n(&short, "removed.opened_after_closes_began") > 0,
        "no client landed on the pod after its closes began: {short}"
    );
    assert_eq!(n(&short, "abnormal_closes"), 0, "{short}");

    // The default settle (quiet 300 ms > the 160 ms between a pod's new clients) lasts
    // until the endpoint is gone: new clients still come until then, none after a close.
    let default = lab(&[f.path()], LIMIT);
    assert!(n(&default, "removed.opened_after_delete") > 0, "{default}");
    assert_eq!(
        n(&default, "removed.opened_after_closes_began"),
        0,
        "{default}"
    );
    assert_eq!(n(&default, "abnormal_closes"), 0, "{default}");
}

#[test]
fn paced_closes_keep_reconnects_near_the_planned_rate() {
    // A fixed hint of 0 ms isolates the agent's pacing from the hint's spread.
    let paced = lab(
        &["pacing", "--close-window", "2s", "--reconnect-after", "0ms"],
        LIMIT,
    );
    let planned = paced["planned_close_rate_per_s"]
        .as_f64()
        .expect("planned rate");
    let peak = n(&paced, "peak_reconnects_per_s") as f64;
    assert!(planned > 0.0, "{paced}");
    assert!(
        peak <= 1.2 * planned,
        "peak {peak}/s above 1.2 x planned {planned}/s: {paced}"
    );
    let burst = lab(
        &[
            "pacing",
            "--close-window",
            "100ms",
            "--reconnect-after",
            "0ms",
        ],
        LIMIT,
    );
    let burst_peak = n(&burst, "peak_reconnects_per_s") as f64;
    assert!(
        burst_peak > 1.2 * planned,
        "closing all at once ({burst_peak}/s) should exceed the paced plan ({planned}/s)"
    );
    assert_eq!(n(&paced, "abnormal_closes"), 0, "{paced}");
}

#[test]
fn rolling_update_with_a_classic_sidecar_drains_every_pod() {
    let s = lab(&["rolling", "--sidecar", "classic"], LIMIT);
    let removed = n(&s, "removed.connections");
    assert!(removed >= 20, "every client was on a replaced pod: {s}");
    assert_eq!(n(&s, "abnormal_closes"), 0, "{s}");
    assert_eq!(n(&s, "removed.clean_1012_with_hint"), removed, "{s}");
    assert_eq!(n(&s, "messages_lost"), 0, "{s}");
    let pods = s["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 3, "{s}");
    for pod in pods {
        assert_eq!(pod["drain_outcome"], "Drained", "{pod}");
        // Classic: the agent's SIGTERM comes at t0, the app's after its hook; the agent
        // (draining on SIGTERM too) outlives the app.
        let term = pod["term_ms"].as_array().expect("term_ms");
        assert_eq!(term[0][0], "agent", "{pod}");
        assert_eq!(term[0][1], 0, "{pod}");
        assert_eq!(term[1][0], "app", "{pod}");
        assert!(term[1][1].as_u64() >= pod["hook_ms"].as_u64(), "{pod}");
        let exit = pod["exit_ms"].as_array().expect("exit_ms");
        assert_eq!(exit.last().map(|e| &e[0]), Some(&"agent".into()), "{pod}");
        assert!(pod["killed"].as_array().is_some_and(Vec::is_empty), "{pod}");
    }
}

#[test]
fn python_websockets_clients_see_the_same_clean_closes() {
    let s = lab(&["seed", "--client", "python"], LIMIT);
    let removed = n(&s, "removed.connections");
    assert!(removed > 0, "{s}");
    assert_eq!(n(&s, "removed.abnormal"), 0, "{s}");
    assert_eq!(n(&s, "removed.clean_1012_with_hint"), removed, "{s}");
    assert_eq!(n(&s, "messages_lost"), 0, "{s}");
}

#[test]
fn close_ignoring_clients_end_at_the_deadline_before_sigkill() {
    let s = lab(&["deadline", "--grace", "6s"], LIMIT);
    let pods = s["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    assert_eq!(pod["drain_outcome"], "DeadlineExceeded", "{pod}");
    // The hook answered within the grace period, so nobody needed SIGKILL.
    assert!(n(pod, "hook_ms") < 6_000, "{pod}");
    assert!(pod["killed"].as_array().is_some_and(Vec::is_empty), "{pod}");
}

#[test]
fn own_app_via_app_placeholders() {
    let py = common::venv_python();
    let app = format!(
        "exec {} tests/clients/lab_app.py {{ip}} {{port}} {{admin_port}}",
        py.display()
    );
    let s = lab(&["seed", "--app", &app, "--clients", "6"], LIMIT);
    assert!(n(&s, "removed.connections") > 0, "{s}");
    assert_eq!(n(&s, "removed.abnormal"), 0, "{s}");
}

/// How `stop_after_scale_up` ends the lab.
enum Stop {
    /// Send this signal to the lab, which must exit with this code and leave nothing.
    Signal(Signal, i32),
    /// SIGKILL the process whose command line has this marker (the `--netns` inner lab):
    /// the lab exits 1 and leaves nothing.
    KillInner(&'static str),
    /// SIGKILL the lab itself: its cleanup cannot run, so things are left until the
    /// test's guard sweeps them.
    KillLab,
}

/// Starts `wsdrain lab ARGS`, SIGINTs it once 6 pods are up, checks exit 130 and that
/// no process or temp dir of the run remains. Returns the run id.
fn interrupt_after_scale_up(args: &[&str]) -> String {
    stop_after_scale_up(args, Stop::Signal(Signal::SIGINT, 130))
}

/// Starts `wsdrain lab ARGS`, stops it as `how` says once 6 pods are up, and checks
/// that no process or temp dir of the run remains. Returns the run id.
fn stop_after_scale_up(args: &[&str], how: Stop) -> String {
    let run_id = new_run_id();
    let mut run = LabRun::spawn(&run_id, args, Stdio::null());
    let stderr = run.p.child.stderr.take().expect("stderr");
    // Lines arrive through a channel so every wait below is bounded in time.
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(20);
    let next_line = || {
        let left = end.saturating_duration_since(Instant::now());
        lines
            .recv_timeout(left)
            .expect("the lab stopped talking before scaling up")
    };
    let first = std::iter::repeat_with(next_line)
        .find(|l| l.contains("run id"))
        .expect("run id line");
    assert!(first.ends_with(&run_id), "{first}");
    // Stop it once pods, HAProxy and clients are all up.
    while !next_line().contains("scaled up: 6 pods") {}
    let found = procs_with(&run_id);
    assert!(!found.is_empty(), "nothing found to clean up");
    let code = match how {
        Stop::Signal(sig, code) => {
            common::signal(run.p.pid(), sig);
            Some(code)
        }
        Stop::KillInner(marker) => {
            let inner = found
                .iter()
                .find(|p| p.contains(marker))
                .and_then(|p| p.split(':').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no process with {marker}: {found:?}"));
            common::signal(inner, Signal::SIGKILL);
            Some(1)
        }
        Stop::KillLab => {
            common::signal(run.p.pid(), Signal::SIGKILL);
            None
        }
    };
    let status = run
        .p
        .wait_timeout(Duration::from_secs(15))
        .expect("lab exits");
    assert_eq!(status.code(), code, "{status}");
    if code.is_none() {
        // Nothing cleaned up after the lab: HAProxy, apps and agents still run.
        std::thread::sleep(Duration::from_millis(300));
        let left = procs_with(&run_id);
        assert!(
            left.iter().any(|p| p.contains("haproxy")),
            "a SIGKILLed lab cannot have stopped its HAProxy: {left:?}"
        );
        drop(run);
    }
    assert_no_leftovers(&run_id);
    assert!(
        !std::env::temp_dir().join(&run_id).exists(),
        "temp dir left"
    );
    run_id
}

#[test]
fn interrupted_lab_leaves_nothing_behind() {
    // The user's-app path (sh -c in its own process group) is the harder one to clean up.
    let app = format!(
        "{} tests/clients/lab_app.py {{ip}} {{port}} {{admin_port}}",
        common::venv_python().display()
    );
    interrupt_after_scale_up(&["seed", "--app", &app]);
}

#[test]
fn hung_up_lab_leaves_nothing_behind() {
    // A closed terminal: SIGHUP stops the run like Ctrl-C (exit 128 + 1).
    stop_after_scale_up(&["seed"], Stop::Signal(Signal::SIGHUP, 129));
}

#[test]
fn a_lab_test_that_times_out_leaves_nothing_behind() {
    // A limit far shorter than the run: the helper panics as a hung test would.
    let run_id = new_run_id();
    let id = run_id.clone();
    let r = std::panic::catch_unwind(move || lab_as(&id, &["seed"], Duration::from_secs(3)));
    let msg = r.expect_err("seed cannot finish in 3 s");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("did not finish"), "{msg}");
    assert_no_leftovers(&run_id);
    assert!(
        !std::env::temp_dir().join(&run_id).exists(),
        "temp dir left"
    );
}

#[test]
fn a_sigkilled_lab_is_swept_by_the_test_guard() {
    stop_after_scale_up(&["seed"], Stop::KillLab);
}

/// `--netns` creates network namespaces: it needs root, and CI runs as root. Not root
/// is a failure, not a skip, so the namespace path cannot go untested unnoticed.
fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the --netns lab tests need root (they create network namespaces); \
         CI runs them as root: run `cargo test --test lab` as root"
    );
}

/// Network namespaces whose name starts with `prefix` (`wsdl-<tag>`).
fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn netns_pods_give_the_same_guarantees_and_leave_no_namespace() {
    require_root();
    let s = lab(
        &["seed", "--netns", "--agent", "on", "--ingress", "keep"],
        LIMIT,
    );
    let prefix = s["netns"].as_str().expect("netns prefix in the summary");
    assert!(prefix.starts_with("wsdl-"), "{s}");
    assert_eq!(namespaces_with(prefix), Vec::<String>::new());
    let removed = n(&s, "removed.connections");
    assert!(removed > 0, "no client was on a removed pod: {s}");
    assert_eq!(n(&s, "removed.abnormal"), 0, "{s}");
    assert_eq!(n(&s, "removed.clean_1012_with_hint"), removed, "{s}");
    assert_eq!(n(&s, "removed.reconnected_to_survivor"), removed, "{s}");
    assert_eq!(n(&s, "abnormal_closes"), 0, "{s}");
    assert_eq!(n(&s, "messages_lost"), 0, "{s}");
    assert_eq!(n(&s, "clients"), 40);
    assert_changes_keep_connections(&s);
    for pod in s["pods"].as_array().expect("pods") {
        assert_eq!(pod["drain_outcome"], "Drained", "{pod}");
        assert_eq!(pod["hook_status"], 200, "{pod}");
        assert!(pod["killed"].as_array().is_some_and(Vec::is_empty), "{pod}");
    }
}

#[test]
fn interrupted_netns_lab_leaves_no_namespace() {
    require_root();
    let run_id = interrupt_after_scale_up(&["seed", "--netns"]);
    let tag = run_id.rsplit('-').next().expect("tag");
    assert_eq!(
        namespaces_with(&format!("wsdl-{tag}")),
        Vec::<String>::new()
    );
}

#[test]
fn netns_without_root_fails_clearly() {
    require_root();
    // Drop to nobody: the lab must refuse before creating anything.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::wsdrain_bin())
        .args(["lab", "seed", "--netns"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--netns needs root"), "{err}");
}

#[test]
fn netns_lab_whose_inner_part_crashes_leaves_nothing_behind() {
    require_root();
    // The pods' processes outlive the crashed inner lab: the outer sweep must find them
    // in the namespaces, kill them and delete the namespaces.
    let run_id = stop_after_scale_up(&["seed", "--netns"], Stop::KillInner("--netns-inside"));
    let tag = run_id.rsplit('-').next().expect("tag");
    assert_eq!(
        namespaces_with(&format!("wsdl-{tag}")),
        Vec::<String>::new()
    );
}

// ---- fleet scenarios (docs/lab.md, "Fleet scenarios") ----------------------------------

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn scale_up_rebalancing_moves_clients_to_the_new_pods() {
    let on = lab(
        &[
            "scale-up",
            "--agent",
            "on",
            "--rebalance",
            "on",
            "--clients",
            "300",
        ],
        LIMIT,
    );
    assert!(f(&on, "imbalance_before") >= 1.8, "{on}");
    assert!(f(&on, "imbalance_after") <= 1.2, "{on}");
    assert!(f(&on, "seconds_to_balanced") <= 30.0, "{on}");
    assert_eq!(on["pod_sessions"].as_array().map(Vec::len), Some(6), "{on}");
    assert_eq!(n(&on, "abnormal_closes"), 0, "{on}");
    assert_eq!(n(&on, "messages_lost"), 0, "{on}");
    assert_eq!(n(&on, "clients"), 300, "{on}");
    // Moved clients got 1012 with the hint: every close was clean.
    assert!(n(&on, "clean_closes_with_hint") > 0, "{on}");

    let off = lab(
        &[
            "scale-up",
            "--agent",
            "on",
            "--rebalance",
            "off",
            "--clients",
            "300",
        ],
        LIMIT,
    );
    assert!(f(&off, "imbalance_after") >= 1.8, "{off}");
    assert!(off["seconds_to_balanced"].is_null(), "{off}");
    assert_eq!(n(&off, "clean_closes_with_hint"), 0, "nothing moved: {off}");
    assert_eq!(n(&off, "abnormal_closes"), 0, "{off}");
}

#[test]
fn scale_up_rebalances_a_foreign_app_too() {
    let py = common::venv_python();
    let app = format!(
        "exec {} tests/clients/lab_app.py {{ip}} {{port}} {{admin_port}}",
        py.display()
    );
    let s = lab(
        &[
            "scale-up",
            "--rebalance",
            "on",
            "--clients",
            "120",
            "--app",
            &app,
        ],
        LIMIT,
    );
    assert!(f(&s, "imbalance_before") >= 1.8, "{s}");
    assert!(f(&s, "imbalance_after") <= 1.2, "{s}");
    assert_eq!(n(&s, "abnormal_closes"), 0, "{s}");
    assert_eq!(n(&s, "messages_lost"), 0, "{s}");
}

#[test]
fn autoscale_follows_the_connections_up_and_down() {
    let s = lab(&["autoscale"], Duration::from_secs(90));
    let target = n(&s, "target_per_pod") as f64;
    assert!(n(&s, "max_pods") >= 5, "scaled up on connections: {s}");
    assert_eq!(n(&s, "final_pods"), 2, "scaled back down: {s}");
    assert!(n(&s, "max_sessions_per_pod") as f64 <= 1.3 * target, "{s}");
    assert_eq!(n(&s, "abnormal_closes"), 0, "{s}");
    assert_eq!(n(&s, "messages_lost"), 0, "{s}");
    assert_eq!(n(&s, "clients"), 300, "{s}");
    for pod in s["pods"].as_array().expect("pods") {
        assert_eq!(pod["drain_outcome"], "Drained", "{pod}");
    }
}

#[test]
fn a_fleet_close_budget_caps_what_the_survivors_see() {
    // 600 + 600 clients; the 3 pods removed at once hold ~300 sessions. Both runs get
    // the same grace period, so only the budget differs. One message a second per client
    // (not 4): on a busy 2-core machine the clients' own handshake delays bunch the
    // reconnects they measure (up to 3 s late seen at load 14), which is noise here.
    let args = [
        "seed",
        "--agent",
        "on",
        "--clients",
        "600",
        "--grace",
        "30s",
        "--interval",
        "1s",
    ];
    let with = lab(
        &[&args[..], &["--fleet-close-rate", "50"]].concat(),
        Duration::from_secs(120),
    );
    let peak = n(&with, "peak_reconnects_per_s");
    assert!(peak <= 60, "budget 50/s, survivors saw {peak}/s: {with}");
    assert!(n(&with, "removed.connections") >= 200, "{with}");
    assert_eq!(n(&with, "abnormal_closes"), 0, "{with}");
    for pod in with["pods"].as_array().expect("pods") {
        // The budget never holds a drain past its deadline (30 s grace − 5 s reserve).
        assert!(n(pod, "hook_ms") <= 25_500, "{pod}");
        assert!(pod["killed"].as_array().is_some_and(Vec::is_empty), "{pod}");
    }
    let without = lab(&args, Duration::from_secs(120));
    assert!(
        n(&without, "peak_reconnects_per_s") > peak,
        "without the budget the peak is higher: {without}"
    );
}
