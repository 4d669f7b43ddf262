//! Helpers shared by the integration tests: spawn real wsdrain processes on their own
//! loopback address (one "pod" each), find free ports, wait for readiness.
#![allow(dead_code)]

pub mod bench;
pub mod kube_api;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn wsdrain_bin() -> &'static str {
    env!("CARGO_BIN_EXE_wsdrain")
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The Python interpreter of the venv that `scripts/setup-deps.sh` creates.
pub fn venv_python() -> PathBuf {
    let p = repo_path(".venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run `make test` (or scripts/setup-deps.sh) first",
        p.display()
    );
    p
}

/// A loopback address of our own (a "pod"), distinct per call within a test run and
/// unlikely to be shared with other test binaries running at the same time.
pub fn pod_ip() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let b = ((pid >> 8) % 200 + 20) as u8;
    let c = ((pid + n) % 250 + 2) as u8;
    let d = (n / 250 % 250 + 2) as u8;
    IpAddr::V4(Ipv4Addr::new(127, b, c, d))
}

/// A port free on `ip` right now.
pub fn free_port(ip: IpAddr) -> u16 {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A child process killed (and reaped) when dropped, so failing tests leave nothing behind.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the exited process wrote to its piped stderr.
    #[allow(dead_code)]
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut text).expect("read stderr");
        }
        text
    }

    /// Waits for the process to exit by itself, at most `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Sends a signal to a process by pid (tests only).
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `limit`. The way
/// tests synchronise with a process: on an observable condition, never a fixed sleep.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Collects a child's stderr lines in the background (and echoes them with
/// WSDRAIN_TEST_LOGS set), so a test can wait for a log line.
#[derive(Clone, Default)]
pub struct LogTail(std::sync::Arc<std::sync::Mutex<String>>);

impl LogTail {
    pub fn follow(stderr: impl std::io::Read + Send + 'static) -> LogTail {
        use std::io::BufRead;
        let tail = LogTail::default();
        let text = tail.0.clone();
        let echo = std::env::var_os("WSDRAIN_TEST_LOGS").is_some();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if echo {
                    eprintln!("{line}");
                }
                let mut text = text.lock().unwrap_or_else(|e| e.into_inner());
                text.push_str(&line);
                text.push('\n');
            }
        });
        tail
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until a line containing `needle` was logged; panics after `limit`.
    pub fn wait_for(&self, needle: &str, limit: Duration) {
        wait_until(&format!("log line {needle:?}"), limit, || {
            self.contains(needle)
        });
    }
}

/// Polls until a TCP connect to `addr` succeeds; panics after `limit`.
pub fn wait_listening(addr: SocketAddr, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr} after {limit:?}");
}

/// Minimal blocking HTTP/1.1 request for tests: returns (status, body).
pub fn http(method: &str, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, decode_chunked_if_needed(&text, body))
}

fn decode_chunked_if_needed(head: &str, body: String) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body;
    }
    let mut out = String::new();
    let mut rest = body.as_str();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The reference app `wsdrain echo` on `ip`: public and admin ports picked free, both
/// listening when this returns. Logs only with WSDRAIN_TEST_LOGS set.
pub struct EchoApp {
    pub proc: Proc,
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

impl EchoApp {
    pub fn start(ip: IpAddr, extra: &[&str]) -> EchoApp {
        let public = SocketAddr::new(ip, free_port(ip));
        let admin = SocketAddr::new(ip, free_port(ip));
        let mut cmd = Command::new(wsdrain_bin());
        cmd.args(["echo", "--listen", &public.to_string()])
            .args(["--admin", &admin.to_string(), "--log-format", "text"])
            .args(extra);
        if std::env::var_os("WSDRAIN_TEST_LOGS").is_none() {
            cmd.stderr(Stdio::null());
        }
        let proc = Proc::spawn("echo", &mut cmd);
        wait_listening(public, Duration::from_secs(10));
        wait_listening(admin, Duration::from_secs(10));
        EchoApp {
            proc,
            public,
            admin,
        }
    }
}

/// `kubernetes-validate --strict` (from the venv) on one file, against the oldest version
/// wsdrain supports with native sidecars and the newest schema the tool has — the same
/// pair as scripts/validate-manifests.sh.
pub fn kubernetes_validate(path: &std::path::Path) {
    let bin = repo_path(".venv/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "{} missing: run scripts/setup-deps.sh",
        bin.display()
    );
    for version in [Some("1.29.0"), None] {
        let mut cmd = Command::new(&bin);
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let out = cmd.arg(path).output().expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "{} against {}: {}{}",
            path.display(),
            version.unwrap_or("latest"),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `wsdrain agent ARGS` with ENV, which must fail at start (an agent that wrongly
/// starts is killed after 10 s by `Proc`'s Drop, not waited on); returns its exit status
/// and stderr.
#[allow(dead_code)]
pub fn failing_agent(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut cmd = std::process::Command::new(wsdrain_bin());
    cmd.arg("agent")
        .args(args)
        .envs(env.iter().copied())
        .env("WSDRAIN_TERMINATION_LOG", "")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut agent = Proc::spawn("agent", &mut cmd);
    let status = agent
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{args:?} {env:?}: the agent started instead of failing"));
    (status, agent.stderr())
}
