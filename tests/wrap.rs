//! `wsdrain wrap` with real processes: signal order, forwarding, reaping, exit codes.
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    Proc, free_port, http, pod_ip, repo_path, signal, venv_python, wait_listening, wait_until,
    wsdrain_bin,
};
use nix::sys::signal::Signal;

/// One `wsdrain wrap` run with its own "pod" address, record file and log file.
struct Wrapped {
    proc: Proc,
    dir: tempfile::TempDir,
    api: SocketAddr,
}

impl Wrapped {
    fn record(&self) -> PathBuf {
        self.dir.path().join("record")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wrap.log")).unwrap_or_default()
    }

    fn exit(&mut self, limit: Duration) -> ExitStatus {
        match self.proc.wait_timeout(limit) {
            Some(status) => status,
            None => panic!("wrap still running after {limit:?}; log:\n{}", self.log()),
        }
    }

    /// Waits for a line of the record file starting with `prefix`; returns it.
    fn wait_record(&self, prefix: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let text = std::fs::read_to_string(self.record()).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
                return line.to_owned();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "no '{prefix}' in the record after {limit:?}: {:?}; log:\n{}",
            std::fs::read_to_string(self.record()).unwrap_or_default(),
            self.log()
        );
    }

    fn recorded_pid(&self, prefix: &str) -> i32 {
        let line = self.wait_record(prefix, Duration::from_secs(10));
        line.split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"))
    }
}

impl Drop for Wrapped {
    /// A failing test must not leave the app or its children running.
    fn drop(&mut self) {
        let text = std::fs::read_to_string(self.record()).unwrap_or_default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if let (Some("started" | "orphan" | "leftover"), Some(pid)) =
                (words.next(), words.next())
                && let Ok(pid) = pid.parse::<i32>()
                && alive(pid)
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A "pod": its loopback address, the agent API address and the app's port.
struct Pod {
    ip: IpAddr,
    api: SocketAddr,
    app_port: u16,
}

impl Pod {
    fn new() -> Pod {
        let ip = pod_ip();
        Pod {
            ip,
            api: SocketAddr::new(ip, free_port(ip)),
            app_port: free_port(ip),
        }
    }
}

/// Agent options every run gets (tests add the timings they need).
fn agent_args(pod: &Pod, dir: &Path) -> Vec<String> {
    // The kubelet creates the file; the agent only overwrites it.
    let termination_log = dir.join("termination-log");
    std::fs::write(&termination_log, "").expect("create termination log");
    vec![
        "--listen".into(),
        pod.api.to_string(),
        "--ports".into(),
        pod.app_port.to_string(),
        "--address".into(),
        pod.ip.to_string(),
        "--termination-log".into(),
        termination_log.display().to_string(),
        "--no-kube".into(),
    ]
}

/// Starts `wsdrain wrap` with test agent options plus `extra`; `app` builds the app's
/// argv from the run's directory (where the record file lives).
fn start(pod: &Pod, extra: &[&str], app: impl FnOnce(&Path) -> Vec<String>) -> Wrapped {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("wrap.log")).expect("log file");
    let mut cmd = Command::new(wsdrain_bin());
    cmd.arg("wrap")
        .args(agent_args(pod, dir.path()))
        .args(extra)
        .arg("--")
        .args(app(dir.path()))
        .stdout(Stdio::null())
        .stderr(log);
    let proc = Proc::spawn("wrap", &mut cmd);
    Wrapped {
        proc,
        dir,
        api: pod.api,
    }
}

/// `start` with tests/fixtures/wrap/app.py as the app; returns once it runs.
fn start_app(extra: &[&str], app_opts: &[&str]) -> Wrapped {
    let w = start(&Pod::new(), extra, |dir| {
        let mut argv = vec![
            venv_python().display().to_string(),
            repo_path("tests/fixtures/wrap/app.py")
                .display()
                .to_string(),
            dir.join("record").display().to_string(),
        ];
        argv.extend(app_opts.iter().map(|s| s.to_string()));
        argv
    });
    w.wait_record("started", Duration::from_secs(15));
    w
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_field(&stat, 0) != Some("Z".into()),
        Err(_) => false,
    }
}

/// Field `n` after the command name of /proc/PID/stat (0 = state, 1 = ppid).
fn stat_field(stat: &str, n: usize) -> Option<String> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n).map(str::to_owned)
}

fn zombie_children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat_field(&stat, 1) == Some(parent.to_string())
            && stat_field(&stat, 0) == Some("Z".into())
        {
            out.push(pid);
        }
    }
    out
}

#[test]
fn app_exiting_by_itself_ends_wrap_with_its_code_at_once_and_nothing_left() {
    let mut w = start_app(
        &[
            "--settle-min",
            "5s",
            "--settle-max",
            "6s",
            "--drain-timeout",
            "8s",
        ],
        &["--exit", "3", "--leave", "60"],
    );
    let leftover = w.recorded_pid("leftover");
    // settle-min is 5 s: a drain would hold wrap far longer than this.
    let status = w.exit(Duration::from_secs(4));
    assert_eq!(status.code(), Some(3), "log:\n{}", w.log());
    assert!(
        !w.log().contains("draining") && !w.log().contains("drain started"),
        "no drain expected; log:\n{}",
        w.log()
    );
    assert!(
        !alive(leftover),
        "the app's `sleep` child {leftover} outlived wrap"
    );
}

#[test]
fn app_ignoring_sigterm_gets_sigkill_after_child_grace() {
    let mut w = start_app(
        &[
            "--child-grace",
            "700ms",
            "--settle-min",
            "0ms",
            "--settle-quiet",
            "0ms",
        ],
        &["--ignore-term"],
    );
    let sent = Instant::now();
    signal(w.proc.pid(), Signal::SIGTERM);
    let status = w.exit(Duration::from_secs(15));
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(137), "log:\n{}", w.log());
    assert!(
        took >= Duration::from_millis(700),
        "SIGKILL came before --child-grace: {took:?}"
    );
    assert!(w.log().contains("SIGKILL"), "log:\n{}", w.log());
}

#[test]
fn other_signals_are_passed_on_at_once_without_a_drain() {
    let mut w = start_app(&["--settle-min", "0ms", "--settle-quiet", "0ms"], &[]);
    // One at a time: equal pending signals may merge.
    for (sig, name) in [
        (Signal::SIGHUP, "SIGHUP"),
        (Signal::SIGUSR1, "SIGUSR1"),
        (Signal::SIGUSR2, "SIGUSR2"),
        (Signal::SIGWINCH, "SIGWINCH"),
        (Signal::SIGQUIT, "SIGQUIT"),
        (Signal::SIGINT, "SIGINT"),
    ] {
        signal(w.proc.pid(), sig);
        w.wait_record(&format!("signal {name} "), Duration::from_secs(5));
    }
    assert!(
        w.proc.child.try_wait().expect("try_wait").is_none(),
        "wrap ended on a forwarded signal"
    );
    assert!(!w.log().contains("drain started"), "log:\n{}", w.log());

    signal(w.proc.pid(), Signal::SIGTERM);
    let status = w.exit(Duration::from_secs(15));
    w.wait_record("signal SIGTERM ", Duration::from_secs(1));
    assert_eq!(
        status.code(),
        Some(21),
        "the app's own exit code; log:\n{}",
        w.log()
    );
}

#[test]
fn orphaned_grandchild_is_reaped() {
    let mut w = start_app(
        &["--settle-min", "0ms", "--settle-quiet", "0ms"],
        &["--orphan", "2"],
    );
    let grand = w.recorded_pid("orphan");
    let wrap_pid = w.proc.pid();
    // Its parent exited, so it belongs to wrap now (PID 1 or child subreaper); it lives
    // 2 s, long enough to look at it.
    let ppid = std::fs::read_to_string(format!("/proc/{grand}/stat"))
        .ok()
        .and_then(|s| stat_field(&s, 1));
    assert_eq!(
        ppid,
        Some(wrap_pid.to_string()),
        "grand-child not re-parented to wrap"
    );
    // Unreaped, it would stay a zombie (/proc entry in state Z) as long as wrap lives.
    let end = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{grand}")).exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !Path::new(&format!("/proc/{grand}")).exists(),
        "grand-child {grand} was not reaped"
    );
    assert_eq!(zombie_children(wrap_pid), Vec::<i32>::new());

    signal(wrap_pid, Signal::SIGTERM);
    assert_eq!(w.exit(Duration::from_secs(15)).code(), Some(21));
}

#[test]
fn bad_commands_fail_like_a_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").expect("write");
    let cases = [
        ("wsdrain-no-such-command-here", 127, "command not found"),
        (plain.to_str().expect("utf-8 path"), 126, "cannot execute"),
        (
            dir.path().to_str().expect("utf-8 path"),
            126,
            "cannot execute",
        ),
    ];
    for (cmd, code, message) in cases {
        let mut w = start(&Pod::new(), &[], |_| vec![cmd.to_owned()]);
        let status = w.exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(code), "{cmd}; log:\n{}", w.log());
        let log = w.log();
        assert!(
            log.contains(message) && log.contains(cmd),
            "{cmd}: unclear error:\n{log}"
        );
    }
}

/// Lines a child prints on stdout, each with the wall-clock time it was read.
fn read_lines(
    stdout: std::process::ChildStdout,
) -> std::sync::mpsc::Receiver<(SystemTime, String)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((SystemTime::now(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[test]
fn sigterm_drains_websockets_before_the_app_gets_it() {
    const CLIENTS: usize = 20;
    let pod = Pod::new();
    let admin = SocketAddr::new(pod.ip, free_port(pod.ip));
    let app = SocketAddr::new(pod.ip, pod.app_port);
    let admin_url = format!("http://{admin}");
    let mut w = start(
        &pod,
        &[
            "--admin-url",
            &admin_url,
            "--settle-min",
            "300ms",
            "--settle-quiet",
            "100ms",
            "--settle-max",
            "2s",
            "--close-tick",
            "50ms",
            "--close-window",
            "500ms",
            "--poll",
            "50ms",
            "--drain-timeout",
            "15s",
            "--reconnect-after",
            "100ms..900ms",
            "--child-grace",
            "5s",
        ],
        |dir| {
            vec![
                venv_python().display().to_string(),
                repo_path("tests/fixtures/wrap/echo_app.py")
                    .display()
                    .to_string(),
                dir.join("record").display().to_string(),
                wsdrain_bin().to_owned(),
                app.to_string(),
                admin.to_string(),
            ]
        },
    );
    w.wait_record("started", Duration::from_secs(15));
    wait_listening(app, Duration::from_secs(15));
    wait_listening(w.api, Duration::from_secs(15));
    assert_eq!(http("GET", w.api, "/readyz", &[]).0, 200);

    let mut client = Proc::spawn(
        "ws_client",
        Command::new(venv_python())
            .arg(repo_path("tests/clients/ws_client.py"))
            .arg(format!("ws://{app}/"))
            .arg(CLIENTS.to_string())
            .arg("20")
            .stdout(Stdio::piped()),
    );
    let lines = read_lines(client.child.stdout.take().expect("client stdout"));
    let (ready_at, ready) = lines.recv_timeout(Duration::from_secs(25)).expect("READY");
    assert_eq!(ready, "READY");

    let sigterm_at = SystemTime::now();
    signal(w.proc.pid(), Signal::SIGTERM);
    // The agent API is served in-process: it turns unready while the drain runs.
    let end = Instant::now() + Duration::from_secs(3);
    let mut unready = false;
    while !unready && Instant::now() < end {
        unready = http("GET", w.api, "/readyz", &[]).0 == 503;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(unready, "/readyz never answered 503 during the drain");

    let (_, report) = lines
        .recv_timeout(Duration::from_secs(25))
        .expect("client report");
    let report: serde_json::Value = serde_json::from_str(&report).expect("client JSON");
    let status = w.exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(42),
        "the app's exit code; log:\n{}",
        w.log()
    );
    assert!(client.wait_timeout(Duration::from_secs(5)).is_some());

    assert_eq!(report["opened"], CLIENTS, "{report}");
    assert_eq!(report["still_open"], 0, "{report}");
    let closes = report["closes"].as_array().expect("closes");
    assert_eq!(closes.len(), CLIENTS, "{report}");
    let mut last_close_ms = 0;
    for close in closes {
        assert_eq!(close["code"], 1012, "{report}");
        let hint: serde_json::Value =
            serde_json::from_str(close["reason"].as_str().expect("reason")).expect("JSON hint");
        let after = hint["reconnect_after_ms"]
            .as_u64()
            .expect("reconnect_after_ms");
        assert!((100..=900).contains(&after), "hint {after} out of range");
        last_close_ms = last_close_ms.max(close["at_ms"].as_u64().expect("at_ms"));
    }

    // The app got SIGTERM only once its count was zero, and not before the drain's
    // settle phase was over.
    let line = w.wait_record("sigterm", Duration::from_secs(1));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields.get(2),
        Some(&"0"),
        "app sessions open at its SIGTERM: {line}"
    );
    let app_sigterm: f64 = fields[1].parse().expect("time");
    assert!(
        app_sigterm >= unix_secs(sigterm_at) + 0.3,
        "app SIGTERM {app_sigterm} less than settle-min after wrap's {sigterm_at:?}"
    );
    // The clients' last close, on the wall clock: READY was read a little after the
    // client printed it, so this is an upper bound; 250 ms absorbs a slow reader.
    let last_close = unix_secs(ready_at) + last_close_ms as f64 / 1000.0;
    assert!(
        app_sigterm >= last_close - 0.25,
        "app SIGTERM at {app_sigterm}, clients' last close at about {last_close}"
    );

    let summary = std::fs::read_to_string(w.dir.path().join("termination-log")).unwrap_or_default();
    assert!(
        summary.contains("drained in"),
        "termination log: {summary:?}"
    );
}

#[test]
fn sigterm_is_held_during_the_drain_and_a_second_one_passes_it_on() {
    let mut w = start_app(
        &[
            "--settle-min",
            "8s",
            "--settle-max",
            "9s",
            "--drain-timeout",
            "10s",
        ],
        &[],
    );
    signal(w.proc.pid(), Signal::SIGTERM);
    // settle-min 8 s: the drain is still running half a second in.
    wait_until("the drain 500 ms in", Duration::from_secs(5), || {
        let body = http("GET", w.api, "/status", &[]).1;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["status"]["elapsed_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 500)
    });
    let record = std::fs::read_to_string(w.record()).unwrap_or_default();
    assert!(
        !record.contains("SIGTERM"),
        "app got SIGTERM during the drain: {record}"
    );
    assert_eq!(http("GET", w.api, "/readyz", &[]).0, 503, "not draining");

    let second = Instant::now();
    signal(w.proc.pid(), Signal::SIGTERM);
    w.wait_record("signal SIGTERM ", Duration::from_secs(5));
    let status = w.exit(Duration::from_secs(5));
    assert!(second.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(21), "log:\n{}", w.log());
}
