//! `wsdrain wrap` with real processes: signal order, forwarding, reaping, exit codes.
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, free_port, pod_ip, repo_path, signal, venv_python, wsdrain_bin};
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

/// Agent options that need no app behind them (tests add the timings they need).
fn agent_args(ip: IpAddr, api: SocketAddr, dir: &Path) -> Vec<String> {
    let termination_log = dir.join("termination-log");
    vec![
        "--listen".into(),
        api.to_string(),
        "--ports".into(),
        free_port(ip).to_string(),
        "--address".into(),
        ip.to_string(),
        "--termination-log".into(),
        termination_log.display().to_string(),
        "--no-kube".into(),
    ]
}

/// Starts `wsdrain wrap` with test agent options plus `extra`; `app` builds the app's
/// argv from the run's directory (where the record file lives).
fn start(extra: &[&str], app: impl FnOnce(&Path) -> Vec<String>) -> Wrapped {
    let ip = pod_ip();
    let api = SocketAddr::new(ip, free_port(ip));
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("wrap.log")).expect("log file");
    let mut cmd = Command::new(wsdrain_bin());
    cmd.arg("wrap")
        .args(agent_args(ip, api, dir.path()))
        .args(extra)
        .arg("--")
        .args(app(dir.path()))
        .stdout(Stdio::null())
        .stderr(log);
    let proc = Proc::spawn("wrap", &mut cmd);
    Wrapped { proc, dir, api }
}

/// `start` with tests/fixtures/wrap/app.py as the app; returns once it runs.
fn start_app(extra: &[&str], app_opts: &[&str]) -> Wrapped {
    let w = start(extra, |dir| {
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
        !w.log().contains("draining"),
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
    assert!(!w.log().contains("draining"), "log:\n{}", w.log());

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
        &["--orphan", "0.5"],
    );
    let grand = w.recorded_pid("orphan");
    let wrap_pid = w.proc.pid();
    // Its parent exited, so it belongs to wrap now (PID 1 or child subreaper).
    let ppid = std::fs::read_to_string(format!("/proc/{grand}/stat"))
        .ok()
        .and_then(|s| stat_field(&s, 1));
    assert_eq!(
        ppid,
        Some(wrap_pid.to_string()),
        "grand-child not re-parented to wrap"
    );
    // Unreaped, it would stay a zombie (/proc entry in state Z) as long as wrap lives.
    let end = Instant::now() + Duration::from_secs(5);
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
        let mut w = start(&[], |_| vec![cmd.to_owned()]);
        let status = w.exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(code), "{cmd}; log:\n{}", w.log());
        let log = w.log();
        assert!(
            log.contains(message) && log.contains(cmd),
            "{cmd}: unclear error:\n{log}"
        );
    }
}
