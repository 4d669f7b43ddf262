//! The agent as a process under abuse: floods of idle API connections, a low file
//! descriptor limit, a restart in the middle of a drain, an app that dies mid-drain.
//! Every load is bounded in count and time; everything runs on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, free_port, http, pod_ip, wait_listening, wsdrain_bin};
use serde_json::Value;

/// The agent's cap on API connections (`api::MAX_CONNECTIONS`).
const CAP: usize = 32;
/// Idle connections in a flood.
const FLOOD: usize = 2000;
/// What the kubelet allows a probe by default (`timeoutSeconds: 1`); the injected
/// liveness probe allows 2 s. The bench shows the typical figure (well under 100 ms).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

fn quiet(cmd: &mut Command) {
    if std::env::var_os("WSDRAIN_TEST_LOGS").is_none() {
        cmd.stderr(std::process::Stdio::null());
    }
}

/// An agent with at most `nofile` file descriptors (like `ulimit -n`), no settling.
fn agent_with_fd_limit(
    ip: IpAddr,
    app_port: u16,
    nofile: u32,
    extra: &[&str],
) -> (Proc, SocketAddr) {
    let api = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(wsdrain_bin())
        .arg("agent")
        .args(["--listen", &api.to_string()])
        .args(["--ports", &app_port.to_string()])
        .args(["--address", &ip.to_string()])
        .args(["--termination-log", "", "--log-format", "text"])
        .args([
            "--settle-min",
            "0ms",
            "--settle-quiet",
            "0ms",
            "--poll",
            "50ms",
        ])
        .args(extra)
        .env("RUST_LOG", "info");
    quiet(&mut cmd);
    let p = Proc::spawn("agent", &mut cmd);
    wait_listening(api, Duration::from_secs(10));
    (p, api)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// VmRSS in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Opens `n` idle connections (TCP handshake only, no request), bounded in time.
fn flood(api: SocketAddr, n: usize) -> Vec<TcpStream> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut open = Vec::with_capacity(n);
    while open.len() < n && Instant::now() < end {
        if let Ok(s) = TcpStream::connect_timeout(&api, Duration::from_secs(2)) {
            open.push(s);
        }
    }
    assert_eq!(open.len(), n, "the flood could not connect");
    open
}

/// One request, timed.
fn timed(method: &str, api: SocketAddr, path: &str) -> (u16, Duration, String) {
    let t = Instant::now();
    let (code, body) = http(method, api, path, &[]);
    (code, t.elapsed(), body)
}

/// How many of `conns` the agent has closed (EOF or reset when read).
fn closed_by_agent(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|s| {
            let _ = s.set_nonblocking(true);
            let mut b = [0u8; 1];
            match (&mut &**s).read(&mut b) {
                Ok(0) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                Ok(_) => false,
            }
        })
        .count()
}

/// Issue 12, items 2 and 3: 2000 idle API connections against an agent limited to 1024
/// file descriptors. The agent holds at most its cap of connections (the oldest idle
/// ones make room), never runs out of descriptors, answers `/livez` and a preStop hook
/// within a probe timeout, and gives its memory back afterwards.
#[test]
fn idle_api_flood_under_a_low_fd_limit_keeps_probes_and_hooks_answered() {
    let ip = pod_ip();
    let app = TcpListener::bind((ip, 0)).expect("bind app");
    let app_port = app.local_addr().expect("addr").port();
    let (agent, api) = agent_with_fd_limit(ip, app_port, 1024, &[]);
    let pid = agent.pid();
    assert_eq!(timed("GET", api, "/livez").0, 200);
    let idle_fds = open_fds(pid);
    let idle_rss = rss_kib(pid);

    let conns = flood(api, FLOOD);
    // Still answered while the flood is held open.
    for _ in 0..5 {
        let (code, took, _) = timed("GET", api, "/livez");
        assert_eq!(code, 200);
        assert!(took < PROBE_TIMEOUT, "/livez took {took:?} under the flood");
    }
    let fds = open_fds(pid);
    assert!(
        fds <= idle_fds + CAP + 8,
        "agent holds {fds} fds under the flood (idle {idle_fds}, cap {CAP})"
    );
    let closed = closed_by_agent(&conns);
    assert!(
        closed >= FLOOD - CAP - 8,
        "only {closed} of {FLOOD} idle connections were closed by the agent"
    );
    // The evictions are exported, so an operator sees the flood.
    let metrics = timed("GET", api, "/metrics").2;
    let evicted: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wsdrain_api_connections_evicted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no eviction counter: {metrics}"));
    assert!(
        evicted >= closed,
        "{evicted} evictions exported, {closed} seen"
    );
    assert!(
        metrics.contains("wsdrain_api_connections_shed_total 0"),
        "{metrics}"
    );

    // The hook: no app connections, so the drain ends at once and the hook is answered.
    let (code, took, body) = timed("GET", api, "/prestop");
    assert_eq!(code, 200, "{body}");
    assert!(
        took < PROBE_TIMEOUT,
        "/prestop took {took:?} under the flood"
    );
    let summary: Value = serde_json::from_str(&body).expect("summary json");
    assert_eq!(summary["outcome"], "Drained");

    drop(conns);
    let end = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > idle_fds + 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        open_fds(pid) <= idle_fds + 2,
        "fds not returned after the flood"
    );
    // A bound that cannot flake: before the cap, 2000 connections kept ~23 MiB.
    let after = rss_kib(pid);
    assert!(
        after <= idle_rss + 8 * 1024,
        "RSS {after} KiB after the flood vs {idle_rss} KiB idle"
    );
    drop(app);
}

/// A slow-loris flood (half-sent requests) is idle too: it cannot starve a probe.
#[test]
fn half_sent_requests_do_not_starve_livez() {
    let ip = pod_ip();
    let app = TcpListener::bind((ip, 0)).expect("bind app");
    let (_agent, api) = agent_with_fd_limit(ip, app.local_addr().expect("addr").port(), 1024, &[]);
    let mut conns = flood(api, 500);
    for c in &mut conns {
        let _ = c.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n");
    }
    let (code, took, _) = timed("GET", api, "/livez");
    assert_eq!(code, 200);
    assert!(took < PROBE_TIMEOUT, "/livez took {took:?}");
}

/// A plain agent (no fd limit) with a state directory.
fn agent_with_state(ip: IpAddr, app_port: u16, state: &std::path::Path) -> (Proc, SocketAddr) {
    let api = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(wsdrain_bin());
    cmd.arg("agent")
        .args(["--listen", &api.to_string()])
        .args(["--ports", &app_port.to_string()])
        .args(["--address", &ip.to_string()])
        .args(["--termination-log", "", "--log-format", "text"])
        .args([
            "--drain-timeout",
            "20s",
            "--settle-min",
            "200ms",
            "--settle-quiet",
            "100ms",
        ])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "info");
    quiet(&mut cmd);
    let p = Proc::spawn("agent", &mut cmd);
    wait_listening(api, Duration::from_secs(10));
    (p, api)
}

fn status(api: SocketAddr) -> Value {
    serde_json::from_str(&http("GET", api, "/status", &[]).1).expect("status json")
}

/// Issue 12, item 8: an agent SIGKILLed mid-drain and started again resumes the drain:
/// unready from its first answer on, with the deadline of the original trigger.
#[test]
fn a_restarted_agent_resumes_the_drain_with_its_original_deadline() {
    let ip = pod_ip();
    let app = TcpListener::bind((ip, 0)).expect("bind app");
    let app_port = app.local_addr().expect("addr").port();
    // Clients that never leave: the drain runs until its deadline.
    let _clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect((ip, app_port)).expect("connect"))
        .collect();
    let _server_side: Vec<TcpStream> = (0..3).map(|_| app.accept().expect("accept").0).collect();
    let state = tempfile::tempdir().expect("state dir");

    let (mut first, api) = agent_with_state(ip, app_port, state.path());
    assert_eq!(http("POST", api, "/drain", &[]).0, 202);
    let end = Instant::now() + Duration::from_secs(10);
    while !(state.path().join("drain.json").exists()
        && status(api)["status"]["elapsed_ms"].as_u64() >= Some(1_500))
    {
        assert!(Instant::now() < end, "no drain marker written");
        std::thread::sleep(Duration::from_millis(20));
    }
    common::signal(first.pid(), nix::sys::signal::Signal::SIGKILL);
    first
        .wait_timeout(Duration::from_secs(5))
        .expect("agent killed");

    let (_second, api) = agent_with_state(ip, app_port, state.path());
    let (code, body) = http("GET", api, "/readyz", &[]);
    assert_eq!(code, 503, "a restarted agent must not serve again: {body}");
    let st = status(api)["status"].clone();
    assert_ne!(st["state"], "Serving", "{st}");
    assert_eq!(st["trigger"], "api", "{st}");
    let left = st["deadline_in_ms"].as_u64().expect("deadline");
    assert!(
        left <= 18_500,
        "a fresh budget was granted: {left} ms left of 20 s"
    );
}

fn failing_agent(args: &[&str]) -> (Option<i32>, String) {
    let (status, stderr) = common::failing_agent(args, &[]);
    (status.code(), stderr)
}

/// Issue 12, item 10: every bad flag names itself, once, and exits 2 (usage), whether
/// clap or the agent's own checks found it.
#[test]
fn bad_flags_exit_2_and_name_the_flag_once() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--ports", "8080", "--drain-timeout", "-5s"],
            "--drain-timeout",
        ),
        (&["--ports", "8080", "--close-code", "1000"], "--close-code"),
        (&["--ports", "0"], "--ports"),
        (
            &["--ports", "8080", "--admin-url", "http://"],
            "--admin-url",
        ),
        (&["--ports", "8080", "--settle-min", "20s"], "--settle-min"),
        (&["--ports", "nope"], "--ports"),
    ];
    for (args, flag) in cases {
        let (code, stderr) = failing_agent(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("unexpected argument"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("\x1b["),
            "colour codes on a pipe: {stderr:?}"
        );
    }
    let (_, stderr) = failing_agent(&["--ports", "8080", "--admin-url", "http://"]);
    assert!(!stderr.contains("must start with http://"), "{stderr}");
}

/// Issue 12, item 10: warnings for an empty token and a remote admin URL, and plain
/// text (no ANSI colours) when stderr is not a terminal.
#[test]
fn risky_settings_warn_and_logs_on_a_pipe_have_no_colours() {
    let ip = pod_ip();
    let api = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(wsdrain_bin());
    cmd.arg("agent")
        .args(["--listen", &api.to_string(), "--ports", "8080"])
        .args(["--token", "", "--admin-url", "http://10.9.8.7:8081"])
        .args(["--termination-log", "", "--log-format", "text", "--no-kube"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut agent = Proc::spawn("agent", &mut cmd);
    wait_listening(api, Duration::from_secs(10));
    common::signal(agent.pid(), nix::sys::signal::Signal::SIGINT);
    agent
        .wait_timeout(Duration::from_secs(10))
        .expect("agent exits");
    let stderr = agent.stderr();
    assert!(stderr.contains("--token is empty"), "{stderr}");
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "colour codes on a pipe: {stderr:?}"
    );
}

/// Issue 12, item 12: a short soak (3 rolling restarts, 100 clients): every close is
/// clean, nothing is lost, the agents' memory does not grow and no fd leaks.
#[test]
fn a_short_soak_stays_clean_and_leaks_nothing() {
    let run_id = format!(
        "wsdrain-lab-soak{}-{:04x}",
        std::process::id() % 10_000,
        rand::random::<u16>()
    );
    let mut cmd = Command::new(wsdrain_bin());
    cmd.args([
        "lab",
        "soak",
        "--rounds",
        "3",
        "--clients",
        "100",
        "--json",
        "--quiet",
    ])
    .args(["--run-id", &run_id])
    .current_dir(common::repo_path(""))
    .stdout(std::process::Stdio::piped());
    quiet(&mut cmd);
    let mut lab = Proc::spawn("lab", &mut cmd);
    let Some(status) = lab.wait_timeout(Duration::from_secs(240)) else {
        // Let the lab stop everything it started before the Drop's SIGKILL.
        common::signal(lab.pid(), nix::sys::signal::Signal::SIGINT);
        let _ = lab.wait_timeout(Duration::from_secs(10));
        panic!("the soak did not finish within 240 s");
    };
    let mut out = String::new();
    lab.child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    assert!(status.success(), "lab soak failed: {out}");
    let v: Value = serde_json::from_str(out.trim()).expect("soak json");
    assert_eq!(v["rounds"], 3, "{v}");
    assert_eq!(v["scenario"], "soak");
    assert_eq!(v["abnormal_closes"], 0, "{v}");
    assert_eq!(v["messages_lost"], 0, "{v}");
    assert_eq!(v["samples"].as_array().map(Vec::len), Some(4), "{v}");
    // Every pod was replaced three times, each drained in kubelet order.
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(9), "{v}");
    let ratio = v["agent_rss_growth_ratio"].as_f64().expect("ratio");
    assert!(ratio <= 1.25, "agent RSS grew {ratio}x over 3 rounds");
    let leak = v["fd_leak"].as_i64().expect("fd_leak");
    assert!(leak <= 2, "fds after vs before: {leak}");
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Issue 12, item 3: with fewer descriptors than the connection cap, accept fails with
/// EMFILE. The agent neither spins on it nor lets idle connections lock out the probe:
/// it closes the oldest idle connection and accepts the probe.
#[test]
fn out_of_file_descriptors_the_agent_neither_spins_nor_locks_out_probes() {
    let ip = pod_ip();
    let app = TcpListener::bind((ip, 0)).expect("bind app");
    let (agent, api) = agent_with_fd_limit(ip, app.local_addr().expect("addr").port(), 36, &[]);
    let pid = agent.pid();
    let conns = flood(api, 300);
    let before = cpu_ticks(pid);
    let t = Instant::now();
    for _ in 0..5 {
        let (code, took, _) = timed("GET", api, "/livez");
        assert_eq!(code, 200);
        assert!(took < PROBE_TIMEOUT, "/livez took {took:?} out of fds");
    }
    std::thread::sleep(Duration::from_secs(1));
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu = (cpu_ticks(pid) - before) as f64 / ticks_per_s;
    let wall = t.elapsed().as_secs_f64();
    assert!(
        cpu < 0.5 * wall,
        "agent used {cpu:.2} s of CPU in {wall:.2} s: spinning"
    );
    drop(conns);
}

/// Issue 12, item 9: the app is SIGKILLed in the middle of the close window. Its
/// clients get no close frame; the count still reaches zero, but the hook's summary,
/// the status and the metrics say how many connections vanished.
#[test]
fn an_app_killed_mid_drain_reports_vanished_connections() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const CLIENTS: usize = 200;
    let ip = pod_ip();
    let echo = common::EchoApp::start(ip, &[]);
    let app = echo.public;
    let admin = format!("http://{}", echo.admin);
    let api = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(wsdrain_bin());
    cmd.arg("agent")
        .args(["--listen", &api.to_string(), "--admin-url", &admin])
        .args([
            "--ports",
            &app.port().to_string(),
            "--address",
            &ip.to_string(),
        ])
        .args(["--termination-log", "", "--log-format", "text"])
        .args([
            "--settle-min",
            "200ms",
            "--settle-quiet",
            "100ms",
            "--poll",
            "50ms",
        ])
        .args(["--close-window", "6s", "--drain-timeout", "20s"])
        .env("RUST_LOG", "info");
    quiet(&mut cmd);
    let _agent = Proc::spawn("agent", &mut cmd);
    wait_listening(api, Duration::from_secs(10));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let clients: Vec<_> = rt.block_on(async {
        let mut out = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{app}/"))
                .await
                .expect("connect");
            ws.send(Message::text("hi")).await.expect("send");
            ws.next().await.expect("echo").expect("echo");
            out.push(ws);
        }
        out
    });
    // Keep reading so clients answer close frames like real ones.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| rt.spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
        .collect();

    let hook = std::thread::spawn(move || http("GET", api, "/prestop", &[]));
    common::wait_until("20 sessions closed", Duration::from_secs(10), || {
        status(api)["status"]["sessions_closed"]
            .as_u64()
            .unwrap_or(0)
            >= 20
    });
    let mut echo = echo;
    common::signal(echo.proc.pid(), nix::sys::signal::Signal::SIGKILL);
    echo.proc
        .wait_timeout(Duration::from_secs(5))
        .expect("app killed");

    let (code, body) = hook.join().expect("hook thread");
    assert_eq!(code, 200, "{body}");
    let s: Value = serde_json::from_str(&body).expect("summary");
    let closed = s["sessions_closed"].as_u64().expect("closed");
    let vanished = s["vanished"].as_u64().expect("vanished field");
    assert!(closed < CLIENTS as u64, "{s}");
    assert!(
        vanished >= CLIENTS as u64 - closed - 5 && vanished > 0,
        "{vanished} vanished, {closed} closed of {CLIENTS}: {s}"
    );
    let metrics = http("GET", api, "/metrics", &[]).1;
    assert!(
        metrics.contains(&format!("wsdrain_connections_vanished_total {vanished}")),
        "{metrics}"
    );
    for r in readers {
        r.abort();
    }
}
