//! What proxy mode costs, side by side in one run: the same echo workload direct to the
//! app, through `wsdrain agent --proxy`, through HAProxy (`mode http`, `timeout tunnel`)
//! and through nginx (`proxy_pass` with the Upgrade headers).
//!
//! `cargo bench --bench proxy` (or `make bench`). Prints a table, the ratios to HAProxy
//! and a verdict per goal; asserts nothing. Figures:
//! - added latency per message: one connection, ping-pong of 64-byte text messages; the
//!   p50/p99 round trip through the proxy minus the direct one (5 rounds of 1000,
//!   alternating between the paths; the median round is reported);
//! - messages per second with the proxy pinned to one core (`taskset`), 50 connections
//!   with 8 messages in flight each, 1 s per round, same rounds; the app and this process
//!   share the other core;
//! - RSS per idle WebSocket session: the proxy's VmRSS with 5k idle sessions open minus
//!   before, divided by 5k;
//! - hook release after the last proxied session is gone: per round a fresh agent with
//!   20 sessions; /prestop; the proxy closes them (paced); the figure is the /prestop
//!   answer minus the moment the last client saw its TCP connection end (the session
//!   leaves the proxy's table as its sockets close). Goal p95 <= 10 ms.
//!
//! The wsdrain binary is `WSDRAIN_BENCH_BIN` if set, else `target/release/wsdrain`, else
//! `target/debug/wsdrain` (then the figures are not the release goal). Every child is
//! killed when its handle drops and by the kernel if this process dies.

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{machine, pick_binary};

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Proc, free_port, pod_ip, wait_listening};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const WARMUP: usize = 100;
/// Round trips per round; rounds alternate between the paths.
const PING_PONGS: usize = 1_000;
const ROUNDS: usize = 5;
const CONNS: usize = 50;
const WINDOW: usize = 8;
const LOAD_TIME: Duration = Duration::from_secs(1);
const SESSIONS: usize = 5_000;
/// The proxy under test runs on one core; the app and the clients on the other.
const PROXY_CORE: &str = "1";
/// The release rounds measure the agent's reaction, not a contended core: both cores.
const ALL_CORES: &str = "0,1";
const RELEASE_ROUNDS: usize = 30;
const RELEASE_SESSIONS: usize = 20;
const GOAL_RELEASE_P95_MS: f64 = 10.0;
const CLIENT_CORE: &str = "0";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Wsdrain,
    Haproxy,
    Nginx,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Wsdrain => "wsdrain proxy",
            Target::Haproxy => "HAProxy",
            Target::Nginx => "nginx",
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    p50_us: f64,
    p99_us: f64,
    msgs_per_s: f64,
    rss_per_session: Option<f64>,
    sessions: usize,
    note: String,
}

fn main() {
    let started = Instant::now();
    let (bin, kind) = pick_binary();
    println!("proxy bench: wsdrain {} ({kind})", bin.display());
    if kind.contains("debug") {
        println!("  NOTE: a debug binary; its figures are not the release goal");
    }
    println!("  machine: {}", machine());
    let pinned = pin_self();
    if !pinned {
        println!("  NOTE: taskset unavailable: nothing pinned, throughput is shared-CPU");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let ip = pod_ip();
    let app = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(&bin);
    cmd.args(["echo", "--no-admin", "--listen", &app.to_string()])
        .args(["--log-format", "text"])
        .env("RUST_LOG", "warn");
    let _app = spawn("echo", pinned.then_some(CLIENT_CORE), &mut cmd);
    wait_listening(app, Duration::from_secs(10));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // All proxies up at once: memory is measured on each fresh process in turn, then
    // latency and throughput in interleaved rounds (medians reported), so a change in the
    // machine's load hits every path alike.
    let mut running = Vec::new();
    for target in [
        Target::Direct,
        Target::Wsdrain,
        Target::Haproxy,
        Target::Nginx,
    ] {
        match start(target, &bin, ip, app, dir.path(), pinned) {
            Ok((proc, addr)) => running.push((target, proc, addr, Row::default())),
            Err(why) => println!("  {}: skipped ({why})", target.name()),
        }
    }
    for (_, proc, addr, row) in running.iter_mut() {
        if let Some(p) = proc {
            rt.block_on(memory(*addr, p.pid(), row));
        }
    }
    let mut samples: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); running.len()];
    for _ in 0..ROUNDS {
        for (i, (_, _, addr, _)) in running.iter().enumerate() {
            let (p50, p99) = rt.block_on(ping_pong(*addr));
            let tp = rt.block_on(load(*addr));
            samples[i].push((p50, p99, tp));
        }
    }
    let mut rows = Vec::new();
    for ((target, proc, _, mut row), s) in running.into_iter().zip(samples) {
        let median = |f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = s.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        row.p50_us = median(|x| x.0);
        row.p99_us = median(|x| x.1);
        row.msgs_per_s = median(|x| x.2);
        println!(
            "  {:<14} p50 {:>7.1} us  p99 {:>7.1} us  {:>8.0} msg/s  {}{}",
            target.name(),
            row.p50_us,
            row.p99_us,
            row.msgs_per_s,
            row.rss_per_session
                .map(|b| format!("{:.2} KiB/session", b / 1024.0))
                .unwrap_or_else(|| "-".into()),
            row.note
        );
        rows.push((target, Some(row)));
        drop(proc);
    }
    report(&rows);
    release(&rt, &bin, ip, app, pinned);
    println!(
        "proxy bench done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

fn report(rows: &[(Target, Option<Row>)]) {
    let get = |t: Target| {
        rows.iter()
            .find(|(x, _)| *x == t)
            .and_then(|(_, r)| r.clone())
    };
    let Some(direct) = get(Target::Direct) else {
        return;
    };
    println!();
    println!("| path | added p50 | added p99 | msg/s (proxy on 1 core) | RSS per idle session |");
    println!("|---|---|---|---|---|");
    for (t, r) in rows {
        let Some(r) = r else {
            println!("| {} | skipped | | | |", t.name());
            continue;
        };
        let rss = r
            .rss_per_session
            .map(|b| format!("{:.2} KiB ({} sessions)", b / 1024.0, r.sessions))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {:.1} us | {:.1} us | {:.0} | {} |",
            t.name(),
            r.p50_us - direct.p50_us,
            r.p99_us - direct.p99_us,
            r.msgs_per_s,
            rss
        );
    }
    let (Some(w), Some(h)) = (get(Target::Wsdrain), get(Target::Haproxy)) else {
        println!("ratios: need both wsdrain and HAProxy figures");
        return;
    };
    // Added latency can be ~0 or negative within noise: floor it at 1 us for ratios.
    let added = |r: &Row| (r.p99_us - direct.p99_us).max(1.0);
    let p99_ratio = added(&w) / added(&h);
    let tp_ratio = w.msgs_per_s / h.msgs_per_s.max(1.0);
    println!();
    println!("wsdrain vs HAProxy:");
    println!(
        "  added p99     {:.2}x  (goal <= 1.0x: {})",
        p99_ratio,
        verdict(p99_ratio <= 1.0)
    );
    println!(
        "  throughput    {:.2}x  (goal >= 0.8x: {})",
        tp_ratio,
        verdict(tp_ratio >= 0.8)
    );
    if let (Some(a), Some(b)) = (w.rss_per_session, h.rss_per_session) {
        let r = a / b.max(1.0);
        println!(
            "  RSS/session   {:.2}x  (goal <= 1.0x: {})",
            r,
            verdict(r <= 1.0)
        );
    }
    if let Some(n) = get(Target::Nginx) {
        println!(
            "wsdrain vs nginx: added p99 {:.2}x, throughput {:.2}x, RSS/session {}",
            added(&w) / added(&n),
            w.msgs_per_s / n.msgs_per_s.max(1.0),
            match (w.rss_per_session, n.rss_per_session) {
                (Some(a), Some(b)) => format!("{:.2}x", a / b.max(1.0)),
                _ => "-".into(),
            }
        );
    }
}

/// Hook release latency after the last proxied session is gone, over fresh agents.
fn release(rt: &tokio::runtime::Runtime, bin: &Path, ip: IpAddr, app: SocketAddr, pinned: bool) {
    let mut lat = Vec::new();
    let mut failed = 0;
    for _ in 0..RELEASE_ROUNDS {
        match rt.block_on(release_round(bin, ip, app, pinned.then_some(ALL_CORES))) {
            Some(d) => lat.push(d.as_secs_f64() * 1e3),
            None => failed += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let p95 = pct(0.95);
    println!();
    println!(
        "hook release after the last proxied session: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms ({} rounds, {failed} failed)  (goal p95 <= {GOAL_RELEASE_P95_MS} ms: {})",
        pct(0.5),
        p95,
        lat.last().copied().unwrap_or(f64::NAN),
        lat.len(),
        verdict(p95 <= GOAL_RELEASE_P95_MS && failed == 0)
    );
}

/// `wsdrain agent --proxy listen=app` on `ip`, its API on a free port of its own (quiet
/// logs, no Kubernetes): the command, to add flags to, and the API address.
fn proxy_agent(
    bin: &Path,
    ip: IpAddr,
    listen: SocketAddr,
    app: SocketAddr,
) -> (Command, SocketAddr) {
    let api = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(bin);
    cmd.arg("agent")
        .args(["--proxy", &format!("{listen}={app}")])
        .args(["--listen", &api.to_string(), "--address", &ip.to_string()])
        .args(["--no-kube", "--termination-log", "", "--log-format", "text"])
        .env("RUST_LOG", "warn");
    (cmd, api)
}

async fn release_round(
    bin: &Path,
    ip: IpAddr,
    app: SocketAddr,
    core: Option<&str>,
) -> Option<Duration> {
    let listen = SocketAddr::new(ip, free_port(ip));
    let (mut cmd, api) = proxy_agent(bin, ip, listen, app);
    cmd.args([
        "--settle-min",
        "200ms",
        "--settle-quiet",
        "100ms",
        "--settle-max",
        "1s",
    ])
    .args([
        "--close-window",
        "300ms",
        "--close-tick",
        "50ms",
        "--drain-timeout",
        "10s",
    ]);
    let _agent = spawn("wsdrain", core, &mut cmd);
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&api, Duration::from_millis(100)).is_err() {
        if Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ended = Vec::new();
    for _ in 0..RELEASE_SESSIONS {
        let mut ws = connect(listen).await?;
        ended.push(tokio::spawn(async move {
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_secs(15), ws.next()).await
            {}
            Instant::now()
        }));
    }
    let hook = tokio::task::spawn_blocking(move || {
        let (status, body) = common::http("GET", api, "/prestop", &[]);
        (status, body, Instant::now())
    });
    let mut last = None;
    for e in ended {
        let at = e.await.ok()?;
        last = Some(last.map_or(at, |l: Instant| l.max(at)));
    }
    let (status, body, answered) = hook.await.ok()?;
    let drained = body.contains("\"Drained\"");
    let last = last?;
    (status == 200 && drained).then(|| answered.saturating_duration_since(last))
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

/// Starts the proxy in front of `app` (none for Direct); its process and the address
/// clients connect to.
fn start(
    target: Target,
    bin: &Path,
    ip: IpAddr,
    app: SocketAddr,
    dir: &Path,
    pinned: bool,
) -> Result<(Option<Proc>, SocketAddr), String> {
    let core = pinned.then_some(PROXY_CORE);
    let listen = SocketAddr::new(ip, free_port(ip));
    let proc = match target {
        Target::Direct => return Ok((None, app)),
        Target::Wsdrain => spawn("wsdrain", core, &mut proxy_agent(bin, ip, listen, app).0),
        Target::Haproxy => {
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 9500\n  nbthread 1\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 1h\n\
                     frontend fe\n  bind {listen}\n  default_backend be\n\
                     backend be\n  server app {app}\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let mut cmd = Command::new(which("haproxy")?);
            cmd.args(["-db", "-f"]).arg(&cfg);
            spawn("haproxy", core, &mut cmd)
        }
        Target::Nginx => {
            let prefix = dir.join("nginx");
            std::fs::create_dir_all(prefix.join("logs")).map_err(|e| e.to_string())?;
            let p = prefix.display();
            std::fs::write(
                prefix.join("nginx.conf"),
                format!(
                    "worker_processes 1;\nmaster_process off;\ndaemon off;\nworker_rlimit_nofile 20000;\n\
                     error_log {p}/logs/error.log warn;\npid {p}/nginx.pid;\n\
                     events {{ worker_connections 12000; }}\n\
                     http {{\n  access_log off;\n\
                       client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;\n\
                       fastcgi_temp_path {p}/fcgi; uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;\n\
                       map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
                       server {{\n    listen {listen};\n    location / {{\n\
                         proxy_pass http://{app};\n      proxy_http_version 1.1;\n\
                         proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
                         proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            let mut cmd = Command::new(which("nginx")?);
            cmd.arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(prefix.join("nginx.conf"));
            cmd.args(["-e", "stderr"]);
            spawn("nginx", core, &mut cmd)
        }
    };
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(100)).is_err() {
        if Instant::now() > end {
            return Err(format!("nothing listening on {listen}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok((Some(proc), listen))
}

fn which(name: &str) -> Result<PathBuf, String> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(format!(
        "{name} not installed (scripts/setup-deps.sh installs it)"
    ))
}

/// RSS per idle session: the process's VmRSS with SESSIONS idle sessions open minus
/// before, on a process that has carried nothing else yet.
async fn memory(addr: SocketAddr, pid: i32, row: &mut Row) {
    let before = rss_kib(pid);
    let held = connect_idle(addr, SESSIONS).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    row.sessions = held.len();
    if !held.is_empty() {
        row.rss_per_session =
            Some((after.saturating_sub(before) * 1024) as f64 / held.len() as f64);
    }
    if held.len() < SESSIONS {
        row.note = format!(" (only {} of {SESSIONS} sessions opened)", held.len());
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr) -> Option<Ws> {
    let url = format!("ws://{addr}/");
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .ok()?
    .ok()?;
    Some(ws)
}

/// One connection, sequential round trips: (p50, p99) in microseconds.
async fn ping_pong(addr: SocketAddr) -> (f64, f64) {
    let Some(mut ws) = connect(addr).await else {
        return (f64::NAN, f64::NAN);
    };
    let msg = Message::text("x".repeat(64));
    let mut rtts = Vec::with_capacity(PING_PONGS);
    for i in 0..WARMUP + PING_PONGS {
        let t = Instant::now();
        if ws.send(msg.clone()).await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
        if i >= WARMUP {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (pct(0.50), pct(0.99))
}

/// CONNS connections with WINDOW messages in flight each for LOAD_TIME: echoes per second.
async fn load(addr: SocketAddr) -> f64 {
    let stop = Instant::now() + LOAD_TIME;
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        tasks.push(tokio::spawn(async move {
            let Some(ws) = connect(addr).await else {
                return (0u64, Duration::ZERO);
            };
            let (mut tx, mut rx) = ws.split();
            let msg = Message::text("y".repeat(64));
            for _ in 0..WINDOW {
                if tx.send(msg.clone()).await.is_err() {
                    return (0, Duration::ZERO);
                }
            }
            let t0 = Instant::now();
            let mut echoed = 0u64;
            while Instant::now() < stop {
                match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                    Ok(Some(Ok(_))) => echoed += 1,
                    _ => break,
                }
                if tx.send(msg.clone()).await.is_err() {
                    break;
                }
            }
            (echoed, t0.elapsed())
        }));
    }
    let mut total = 0.0;
    for t in tasks {
        if let Ok((n, took)) = t.await
            && !took.is_zero()
        {
            total += n as f64 / took.as_secs_f64();
        }
    }
    total
}

/// Opens up to `n` idle sessions (batches of 250, bounded in time) and holds them.
async fn connect_idle(addr: SocketAddr, n: usize) -> Vec<Ws> {
    let end = Instant::now() + Duration::from_secs(60);
    let mut held = Vec::with_capacity(n);
    while held.len() < n && Instant::now() < end {
        let batch: Vec<_> = (0..(n - held.len()).min(250))
            .map(|_| tokio::spawn(connect(addr)))
            .collect();
        let mut opened = 0;
        for b in batch {
            if let Ok(Some(ws)) = b.await {
                held.push(ws);
                opened += 1;
            }
        }
        if opened == 0 {
            break;
        }
    }
    held
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Pins this process (and the threads it starts later) to CLIENT_CORE.
fn pin_self() -> bool {
    Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            CLIENT_CORE,
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Spawns a child (on `core` via taskset) that the kernel kills if this bench dies.
#[allow(unsafe_code)] // the pre_exec below: children die with the bench
fn spawn(name: &str, core: Option<&str>, cmd: &mut Command) -> Proc {
    let mut cmd = match core {
        Some(core) => {
            let mut pinned = Command::new("taskset");
            pinned
                .args(["-c", core])
                .arg(cmd.get_program())
                .args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    pinned.env(k, v);
                }
            }
            pinned
        }
        None => std::mem::replace(cmd, Command::new("true")),
    };
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    cmd.stderr(Stdio::null()).stdout(Stdio::null());
    Proc::spawn(name, &mut cmd)
}
