//! The agent as a process: how fast /prestop answers once the last client has left, and
//! how much memory the agent holds idle and while draining 5k WebSocket sessions.
//!
//! `cargo bench --bench agent` (or `make bench`). Prints figures and a verdict per goal;
//! asserts nothing. It measures the built `wsdrain` binary: `WSDRAIN_BENCH_BIN` if set,
//! else `target/release/wsdrain`, else `target/debug/wsdrain` (debug figures are not the
//! release goal). Every "pod" is its own loopback address; every child is killed when
//! its handle drops (normal end or panic) and by the kernel if this process dies.
//!
//! Footprint: binary size and idle RSS of the slim sidecar (`--no-default-features`),
//! the full development build and a minimal hyper "hello" server (`examples/hyper_floor.rs`),
//! all built in the same profile by `make bench` and passed in `WSDRAIN_BENCH_BIN`,
//! `WSDRAIN_BENCH_FULL_BIN` and `WSDRAIN_BENCH_FLOOR_BIN`. The 5k-session pod runs the
//! echo app from the full build (the slim one has none).
//!
//! Release latency: per round a fresh agent (no admin API, so it just waits) watches K
//! plain TCP connections held by this process; /prestop is called, and once the agent is
//! in `Waiting` the connections are closed at a random point of its poll cycle. The
//! figure is the time from that close to the /prestop answer. `--poll 1s` (what Istio and
//! Envoy Gateway do) runs its rounds concurrently so it costs seconds, not minutes.
//!
//! `WSDRAIN_BENCH_ONLY=event,footprint` (say) measures only those sections: `release`,
//! `event`, `flood`, `footprint`, `memory`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{machine, pick_binary};

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Proc, free_port, http, pod_ip, wait_listening};
use serde_json::Value;

const GOAL_RELEASE_P95: Duration = Duration::from_millis(150);
const GOAL_EVENT_RELEASE_P95: Duration = Duration::from_millis(20);
const GOAL_IDLE_RSS_KIB: u64 = 5 * 1024;
/// The sidecar's idle RSS at most this many times the hyper floor's.
const GOAL_FLOOR_RATIO: f64 = 1.5;
/// Processes started per binary for the footprint figures (the median is reported).
const FOOTPRINT_SAMPLES: usize = 5;
/// Connections held open per latency round.
const HELD: usize = 20;
/// Sequential rounds per fast poll setting, and the wall time they may take at most.
const ROUNDS: usize = 30;
const ROUNDS_LIMIT: Duration = Duration::from_secs(20);
/// Concurrent rounds with `--poll 1s`.
const ROUNDS_1S: usize = 20;
const SESSIONS: usize = 5_000;

fn main() {
    let started = Instant::now();
    let (bin, kind) = pick_binary();
    let debug = kind.contains("debug");
    println!("agent bench: measuring {} ({kind})", bin.display());
    if debug {
        println!("  NOTE: a debug binary; its figures are not the release goal");
    }
    println!("  machine: {}", machine());

    let mut rows = Vec::new();
    let fast = [
        ("100ms", Duration::from_millis(100)),
        ("50ms", Duration::from_millis(50)),
    ];
    if wanted("release") {
        let mut measured = Vec::new();
        for (flag, poll) in fast {
            let lat = sequential_rounds(&bin, flag, poll);
            println!("  release --poll {flag:<5}: {}", lat.line());
            measured.push(lat);
        }
        let slow = concurrent_rounds(&bin, "1s", Duration::from_secs(1), ROUNDS_1S);
        println!(
            "  release --poll 1s   : {} ({ROUNDS_1S} concurrent)",
            slow.line()
        );
        for (lat, flag) in measured.iter().zip(["100ms", "50ms"]) {
            let ratio = slow.p95().as_secs_f64() / lat.p95().as_secs_f64().max(1e-6);
            let (goal, verdict) = if flag == "100ms" {
                let v = if lat.p95() <= GOAL_RELEASE_P95 && lat.failed == 0 {
                    "MET"
                } else {
                    "MISSED"
                };
                ("<= 150 ms".to_owned(), v.to_owned())
            } else {
                ("(knob)".to_owned(), "-".to_owned())
            };
            rows.push((
                format!("hook release p95, --poll {flag}"),
                format!("{:.0} ms ({ratio:.1}x faster than 1s poll)", ms(lat.p95())),
                goal,
                verdict,
            ));
        }
        rows.push((
            "hook release p95, --poll 1s (Istio/EG)".to_owned(),
            format!("{:.0} ms", ms(slow.p95())),
            "reference".to_owned(),
            "-".to_owned(),
        ));
    }

    if wanted("event") {
        rows.push(event_driven_release(&bin));
    }
    if wanted("flood") {
        rows.extend(api_flood(&bin));
    }

    if wanted("footprint") {
        let footprint = footprint(&bin);
        for f in &footprint {
            println!(
                "  footprint {:<11}: binary {:>9}, idle VmRSS {} (RssAnon {}), {}",
                f.label,
                mib_bytes(f.size),
                kib(f.rss),
                kib(f.anon),
                f.path.display()
            );
        }
        let floor = footprint
            .iter()
            .find(|f| f.label.starts_with("hyper floor"));
        for f in &footprint {
            let ratio = floor.map(|fl| f.rss as f64 / fl.rss.max(1) as f64);
            let (goal, verdict) = match (f.label.starts_with("sidecar"), ratio) {
                (true, Some(r)) if r <= GOAL_FLOOR_RATIO => ("<= 1.5x floor", "MET"),
                (true, Some(_)) => ("<= 1.5x floor", "MISSED"),
                (true, None) => ("<= 1.5x floor", "n/a (no floor)"),
                _ => ("-", "-"),
            };
            rows.push((
                format!("idle RSS, {}", f.label),
                match ratio {
                    Some(r) => format!("{} ({r:.2}x floor), {}", kib(f.rss), mib_bytes(f.size)),
                    None => format!("{}, {}", kib(f.rss), mib_bytes(f.size)),
                },
                goal.to_owned(),
                verdict.to_owned(),
            ));
        }
    }

    if wanted("memory") {
        let echo_bin = echo_binary(&bin);
        let mem = memory(&bin, &echo_bin);
        println!(
            "  idle VmRSS {}: RssAnon {} (the agent's own memory) + {} file-backed (binary pages, shared page cache)",
            kib(mem.idle),
            kib(mem.idle_anon),
            kib(mem.idle.saturating_sub(mem.idle_anon))
        );
        println!(
            "  memory: idle VmRSS {} | {} sessions connected VmRSS {} | draining max VmRSS {} | after drain VmRSS {}, VmHWM {}",
            kib(mem.idle),
            mem.sessions,
            kib(mem.connected),
            kib(mem.draining_max),
            kib(mem.after),
            kib(mem.hwm)
        );
        println!(
            "  drain of {}: {} in {:.1} s, {} clients saw close code 1012",
            mem.sessions, mem.outcome, mem.drain_secs, mem.got_1012
        );
        let idle_verdict = match (mem.idle <= GOAL_IDLE_RSS_KIB, debug) {
            (true, false) => "MET",
            (false, false) => "MISSED",
            (true, true) => "MET (debug build)",
            (false, true) => "n/a (debug build)",
        };
        rows.push((
            "agent idle RSS".to_owned(),
            kib(mem.idle),
            "<= 5 MiB".to_owned(),
            idle_verdict.to_owned(),
        ));
        rows.push((
            "agent idle RssAnon (without binary pages)".to_owned(),
            kib(mem.idle_anon),
            "-".to_owned(),
            "-".to_owned(),
        ));
        rows.push((
            format!("agent RSS while draining {} sessions", mem.sessions),
            kib(mem.draining_max),
            "-".to_owned(),
            "-".to_owned(),
        ));
        rows.push((
            "agent peak RSS (VmHWM) after the drain".to_owned(),
            kib(mem.hwm),
            "-".to_owned(),
            "-".to_owned(),
        ));
    }

    println!();
    println!("{:<42} {:<36} {:<14} verdict", "figure", "value", "goal");
    for (name, value, goal, verdict) in rows {
        println!("{name:<42} {value:<36} {goal:<14} {verdict}");
    }
    println!(
        "binary {kind}; total {:.1?}; machine {}",
        started.elapsed(),
        machine()
    );
}

/// Whether `section` is measured: `WSDRAIN_BENCH_ONLY` lists the sections to run
/// (`release`, `event`, `flood`, `footprint`, `memory`, comma-separated); unset runs all.
fn wanted(section: &str) -> bool {
    std::env::var("WSDRAIN_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|s| s.trim() == section))
}

/// A build with the echo app: `WSDRAIN_BENCH_FULL_BIN`, else the measured binary.
fn echo_binary(bin: &Path) -> PathBuf {
    std::env::var_os("WSDRAIN_BENCH_FULL_BIN").map_or_else(|| bin.to_path_buf(), PathBuf::from)
}

struct Footprint {
    label: String,
    path: PathBuf,
    /// Bytes on disk.
    size: u64,
    /// Median idle VmRSS and RssAnon in KiB.
    rss: u64,
    anon: u64,
}

/// Binary size and idle RSS of the measured sidecar, the full build and the hyper floor,
/// whichever are given.
fn footprint(bin: &Path) -> Vec<Footprint> {
    let mut out = Vec::new();
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let candidates = [
        ("sidecar (measured binary)", Some(bin.to_path_buf()), false),
        (
            "full build (lab + echo)",
            var("WSDRAIN_BENCH_FULL_BIN"),
            false,
        ),
        (
            "hyper floor (examples/hyper_floor.rs)",
            var("WSDRAIN_BENCH_FLOOR_BIN"),
            true,
        ),
    ];
    for (label, path, is_floor) in candidates {
        let Some(path) = path else { continue };
        let Ok(meta) = std::fs::metadata(&path) else {
            println!("  footprint: {} missing, skipped", path.display());
            continue;
        };
        let mut samples: Vec<(u64, u64)> = (0..FOOTPRINT_SAMPLES)
            .map(|_| idle_rss(&path, is_floor))
            .collect();
        samples.sort();
        let (rss, anon) = samples[samples.len() / 2];
        out.push(Footprint {
            label: label.to_owned(),
            path,
            size: meta.len(),
            rss,
            anon,
        });
    }
    out
}

/// (VmRSS, RssAnon) in KiB of one fresh process, 500 ms after it listens: an agent
/// watching a port nobody uses, or the floor server.
fn idle_rss(path: &Path, is_floor: bool) -> (u64, u64) {
    let ip = pod_ip();
    let (proc, addr) = if is_floor {
        let addr = SocketAddr::new(ip, free_port(ip));
        let mut cmd = Command::new(path);
        cmd.arg(addr.to_string());
        (spawn("floor", &mut cmd), addr)
    } else {
        agent(path, ip, free_port(ip), &[])
    };
    wait_listening(addr, Duration::from_secs(10));
    // Idle means after start-up settled: a fixed pause is the measurement, not a wait.
    thread::sleep(Duration::from_millis(500));
    let (rss, _, anon) = rss(proc.pid());
    (rss, anon)
}

fn mib_bytes(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn kib(k: u64) -> String {
    format!("{:.2} MiB", k as f64 / 1024.0)
}

/// Spawns a child that the kernel kills if the spawning thread (and so this bench) dies.
#[allow(unsafe_code)]
fn spawn(name: &str, cmd: &mut Command) -> Proc {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    cmd.stderr(Stdio::null()).stdout(Stdio::null());
    Proc::spawn(name, cmd)
}

/// Starts an agent for `port` on `ip`; returns it and its API address.
fn agent(bin: &Path, ip: IpAddr, port: u16, extra: &[&str]) -> (Proc, SocketAddr) {
    let api = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(bin);
    cmd.arg("agent")
        .args(["--listen", &api.to_string()])
        .args(["--ports", &port.to_string()])
        .args(["--address", &ip.to_string()])
        .args(["--termination-log", "", "--log-format", "text"])
        .args(extra)
        .env("RUST_LOG", "warn");
    let p = spawn("agent", &mut cmd);
    wait_listening(api, Duration::from_secs(10));
    (p, api)
}

fn state(api: SocketAddr) -> String {
    let body = http("GET", api, "/status", &[]).1;
    serde_json::from_str::<Value>(&body).unwrap_or_default()["status"]["state"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[derive(Default)]
struct Latencies {
    ok: Vec<Duration>,
    failed: usize,
}

impl Latencies {
    fn add(&mut self, r: Option<Duration>) {
        match r {
            Some(d) => self.ok.push(d),
            None => self.failed += 1,
        }
    }

    fn pct(&self, p: f64) -> Duration {
        let mut v = self.ok.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    }

    fn p95(&self) -> Duration {
        self.pct(0.95)
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms over {} rounds ({} failed)",
            ms(self.pct(0.5)),
            ms(self.p95()),
            ms(self.pct(1.0)),
            self.ok.len(),
            self.failed
        )
    }
}

fn sequential_rounds(bin: &Path, flag: &str, poll: Duration) -> Latencies {
    let end = Instant::now() + ROUNDS_LIMIT;
    let mut lat = Latencies::default();
    while lat.ok.len() + lat.failed < ROUNDS && Instant::now() < end {
        lat.add(release_round(bin, flag, poll));
    }
    lat
}

fn concurrent_rounds(bin: &Path, flag: &str, poll: Duration, n: usize) -> Latencies {
    let mut lat = Latencies::default();
    thread::scope(|s| {
        let rounds: Vec<_> = (0..n)
            .map(|_| s.spawn(|| release_round(bin, flag, poll)))
            .collect();
        for r in rounds {
            lat.add(r.join().expect("round thread"));
        }
    });
    lat
}

/// One pod counting on its poll only (`--poll-only`): the poll figures.
fn release_round(bin: &Path, flag: &str, poll: Duration) -> Option<Duration> {
    release_round_with(bin, flag, poll, &["--poll-only"])
}

/// One pod: HELD connections, /prestop, close them all, time to the answer.
fn release_round_with(
    bin: &Path,
    flag: &str,
    poll: Duration,
    counting: &[&str],
) -> Option<Duration> {
    let ip = pod_ip();
    let listener = TcpListener::bind((ip, 0)).expect("bind app port");
    let port = listener.local_addr().expect("addr").port();
    let mut held: Vec<TcpStream> = (0..HELD)
        .map(|_| TcpStream::connect((ip, port)).expect("connect"))
        .collect();
    for _ in 0..HELD {
        held.push(listener.accept().expect("accept").0);
    }
    let (_agent, api) = agent(
        bin,
        ip,
        port,
        &[
            "--poll",
            flag,
            "--settle-min",
            "100ms",
            "--settle-quiet",
            "100ms",
            "--settle-max",
            "1s",
            "--drain-timeout",
            "10s",
        ]
        .iter()
        .chain(counting)
        .copied()
        .collect::<Vec<_>>(),
    );
    let hook = thread::spawn(move || {
        let (code, body) = http("GET", api, "/prestop", &[]);
        (Instant::now(), code, body)
    });
    let until = Instant::now() + Duration::from_secs(5);
    while state(api) != "Waiting" && Instant::now() < until {
        thread::sleep(Duration::from_millis(10));
    }
    // A random point of the agent's poll cycle.
    thread::sleep(poll.mul_f64(rand::random::<f64>()));
    let left = Instant::now();
    drop(held);
    let (answered, code, body) = hook.join().expect("hook thread");
    let drained = serde_json::from_str::<Value>(&body).unwrap_or_default()["outcome"] == "Drained";
    (code == 200 && drained).then(|| answered.saturating_duration_since(left))
}

/// Event-driven release (socket destroy notifications, the default): the agent keeps a
/// slow 1 s fallback poll, and the hook must still be answered within 20 ms of the last
/// connection going away. Same rounds as the poll figures above.
fn event_driven_release(bin: &Path) -> (String, String, String, String) {
    let end = Instant::now() + ROUNDS_LIMIT;
    let mut lat = Latencies::default();
    while lat.ok.len() + lat.failed < ROUNDS && Instant::now() < end {
        lat.add(release_round_with(
            bin,
            "1s",
            Duration::from_millis(100),
            &[],
        ));
    }
    println!(
        "  release event-driven (--poll 1s fallback): {}",
        lat.line()
    );
    let met = lat.p95() <= GOAL_EVENT_RELEASE_P95 && lat.failed == 0 && !lat.ok.is_empty();
    (
        "hook release p95, event-driven".to_owned(),
        format!("{:.1} ms", ms(lat.p95())),
        "<= 20 ms".to_owned(),
        if met { "MET" } else { "MISSED" }.to_owned(),
    )
}

/// Idle API connections in the flood figure.
const FLOOD: usize = 2000;

/// The agent under a flood of idle API connections (issue: 11.6 KB kept per connection
/// before the cap): /livez and /prestop latency while flooded, and RSS after the flood
/// against idle (goal: within 2 MiB).
fn api_flood(bin: &Path) -> Vec<(String, String, String, String)> {
    let ip = pod_ip();
    let app = TcpListener::bind((ip, 0)).expect("bind app port");
    let port = app.local_addr().expect("addr").port();
    let (agent, api) = agent(
        bin,
        ip,
        port,
        &["--settle-min", "0ms", "--settle-quiet", "0ms"],
    );
    thread::sleep(Duration::from_millis(300));
    // Anonymous memory is the agent's own; VmRSS also counts the binary's pages the
    // flood's code paths touched (shared, reclaimable page cache).
    let (idle_rss, _, idle) = rss(agent.pid());
    let mut conns = Vec::with_capacity(FLOOD);
    let end = Instant::now() + Duration::from_secs(30);
    while conns.len() < FLOOD && Instant::now() < end {
        if let Ok(s) = TcpStream::connect_timeout(&api, Duration::from_secs(1)) {
            conns.push(s);
        }
    }
    let mut livez = Latencies::default();
    for _ in 0..20 {
        let t = Instant::now();
        let ok = http("GET", api, "/livez", &[]).0 == 200;
        livez.add(ok.then(|| t.elapsed()));
    }
    let flooded = rss(agent.pid()).2;
    let t = Instant::now();
    let prestop_ok = http("GET", api, "/prestop", &[]).0 == 200;
    let prestop = t.elapsed();
    drop(conns);
    thread::sleep(Duration::from_millis(500));
    let (after_rss, _, after) = rss(agent.pid());
    println!(
        "  API flood of {FLOOD} idle connections: /livez {}; /prestop {:.1} ms ({}); RssAnon idle {} | flooded {} | after {} (VmRSS {} -> {})",
        livez.line(),
        ms(prestop),
        if prestop_ok { "200" } else { "FAILED" },
        kib(idle),
        kib(flooded),
        kib(after),
        kib(idle_rss),
        kib(after_rss)
    );
    let grown = after.saturating_sub(idle);
    let fast = livez.p95() <= Duration::from_millis(100)
        && livez.failed == 0
        && prestop_ok
        && prestop <= Duration::from_millis(100);
    vec![
        (
            format!("/livez p95 and /prestop, {FLOOD} idle API conns"),
            format!("{:.1} ms / {:.1} ms", ms(livez.p95()), ms(prestop)),
            "<= 100 ms".to_owned(),
            if fast { "MET" } else { "MISSED" }.to_owned(),
        ),
        (
            format!("agent RssAnon after {FLOOD} idle API conns"),
            format!("+{} over idle", kib(grown)),
            "<= 2 MiB".to_owned(),
            if grown <= 2048 { "MET" } else { "MISSED" }.to_owned(),
        ),
    ]
}

/// (VmRSS, VmHWM, RssAnon) in KiB of a process.
fn rss(pid: i32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"), field("RssAnon:"))
}

struct Memory {
    idle: u64,
    idle_anon: u64,
    sessions: usize,
    connected: u64,
    draining_max: u64,
    after: u64,
    hwm: u64,
    outcome: String,
    drain_secs: f64,
    got_1012: usize,
}

/// A pod with the echo app and 5k WebSocket sessions; the agent's RSS before, during and
/// after draining them.
fn memory(bin: &Path, echo_bin: &Path) -> Memory {
    let ip = pod_ip();
    let app = SocketAddr::new(ip, free_port(ip));
    let admin = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(echo_bin);
    cmd.args([
        "echo",
        "--listen",
        &app.to_string(),
        "--admin",
        &admin.to_string(),
    ])
    .args(["--log-format", "text"])
    .env("RUST_LOG", "warn");
    let _echo = spawn("echo", &mut cmd);
    wait_listening(app, Duration::from_secs(10));
    wait_listening(admin, Duration::from_secs(10));
    let url = format!("http://{admin}");
    let (agent, api) = agent(
        bin,
        ip,
        app.port(),
        &[
            "--admin-url",
            &url,
            "--settle-min",
            "300ms",
            "--settle-quiet",
            "200ms",
            "--settle-max",
            "2s",
            "--close-window",
            "2s",
            "--drain-timeout",
            "20s",
        ],
    );
    thread::sleep(Duration::from_millis(500));
    let (idle, _, idle_anon) = rss(agent.pid());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let clients = rt.block_on(connect_all(app, SESSIONS));
    let sessions = clients.len();
    let _ = state(api); // one count with the sessions open
    let (connected, ..) = rss(agent.pid());

    let t0 = Instant::now();
    let hook = thread::spawn(move || http("GET", api, "/prestop", &[]).1);
    let mut draining_max = 0;
    let until = Instant::now() + Duration::from_secs(25);
    while !hook.is_finished() && Instant::now() < until {
        draining_max = draining_max.max(rss(agent.pid()).0);
        thread::sleep(Duration::from_millis(20));
    }
    let body = hook.join().expect("hook thread");
    let drain_secs = t0.elapsed().as_secs_f64();
    let (after, hwm, _) = rss(agent.pid());
    let got_1012 = rt.block_on(async {
        let until = Instant::now() + Duration::from_secs(3);
        while clients.iter().any(|c| !c.is_finished()) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut n = 0;
        for c in clients {
            if c.is_finished() {
                n += usize::from(c.await.ok().flatten() == Some(1012));
            } else {
                c.abort();
            }
        }
        n
    });
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    Memory {
        idle,
        idle_anon,
        sessions,
        connected,
        draining_max,
        after,
        hwm,
        outcome: v["outcome"].as_str().unwrap_or("no answer").to_owned(),
        drain_secs,
        got_1012,
    }
}

/// Opens up to `n` WebSocket sessions (batches of 250, bounded in time); each task holds
/// its session until the server closes it and yields the close code it saw.
async fn connect_all(app: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<Option<u16>>> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{app}/");
    let end = Instant::now() + Duration::from_secs(30);
    let mut held = Vec::with_capacity(n);
    while held.len() < n && Instant::now() < end {
        let batch: Vec<_> = (0..(n - held.len()).min(250))
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let connect = tokio_tungstenite::connect_async(url);
                    tokio::time::timeout(Duration::from_secs(10), connect).await
                })
            })
            .collect();
        for b in batch {
            if let Ok(Ok(Ok((mut ws, _)))) = b.await {
                held.push(tokio::spawn(async move {
                    let mut code = None;
                    let limit = tokio::time::sleep(Duration::from_secs(40));
                    tokio::pin!(limit);
                    loop {
                        tokio::select! {
                            msg = ws.next() => match msg {
                                Some(Ok(Message::Close(Some(f)))) => code = Some(f.code.into()),
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => return code,
                            },
                            _ = &mut limit => return code,
                        }
                    }
                }));
            }
        }
    }
    held
}
