//! The drain agent end to end: real `wsdrain agent` processes, real sockets on a loopback
//! address per "pod", the reference app or plain TCP holders as the app.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{LogTail, Proc, free_port, http, pod_ip, wait_listening, wait_until, wsdrain_bin};
use serde_json::Value;

/// Short timings so a drain takes seconds, not minutes.
const FAST: &[&str] = &[
    "--settle-min",
    "300ms",
    "--settle-quiet",
    "200ms",
    "--settle-max",
    "2s",
    "--close-tick",
    "100ms",
    "--poll",
    "100ms",
    "--log-format",
    "text",
];

struct Agent {
    proc: Proc,
    api: SocketAddr,
    log: LogTail,
}

impl Agent {
    fn start(ip: IpAddr, app_port: u16, extra: &[&str]) -> Agent {
        let api = SocketAddr::new(ip, free_port(ip));
        let mut cmd = Command::new(wsdrain_bin());
        cmd.arg("agent")
            .args(["--listen", &api.to_string()])
            .args(["--ports", &app_port.to_string()])
            .args(["--address", &ip.to_string()])
            .args(["--termination-log", ""])
            .args(FAST)
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped());
        let mut proc = Proc::spawn("agent", &mut cmd);
        let log = LogTail::follow(proc.child.stderr.take().expect("piped stderr"));
        wait_listening(api, Duration::from_secs(10));
        Agent { proc, api, log }
    }

    fn get(&self, path: &str) -> (u16, String) {
        http("GET", self.api, path, &[])
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.get("/status").1).expect("status json")
    }

    fn state(&self) -> String {
        self.status()["status"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until a drain has started (any trigger).
    fn wait_draining(&self) {
        wait_until("the drain to start", Duration::from_secs(5), || {
            self.state() != "Serving"
        });
    }

    /// Waits until the drain settled and waits for the connections to leave.
    fn wait_state(&self, state: &str) {
        wait_until(&format!("state {state}"), Duration::from_secs(10), || {
            self.state() == state
        });
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").1;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Calls /prestop in a thread; returns (answer time, status, summary).
    fn prestop_async(
        &self,
        headers: Vec<(String, String)>,
    ) -> thread::JoinHandle<(Instant, u16, Value)> {
        let api = self.api;
        thread::spawn(move || {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let (code, body) = http("GET", api, "/prestop", &h);
            let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
            (Instant::now(), code, v)
        })
    }
}

/// A plain TCP "app" that accepts and holds connections until told to drop them.
struct Holder {
    port: u16,
    server_side: Arc<Mutex<Vec<TcpStream>>>,
    clients: Vec<TcpStream>,
}

impl Holder {
    fn start(ip: IpAddr, n: usize) -> Holder {
        let listener = TcpListener::bind((ip, 0)).expect("bind holder");
        let port = listener.local_addr().expect("addr").port();
        let server_side = Arc::new(Mutex::new(Vec::new()));
        let held = server_side.clone();
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                held.lock().unwrap().push(s);
            }
        });
        let clients = (0..n)
            .map(|_| TcpStream::connect((ip, port)).expect("connect holder"))
            .collect();
        let end = Instant::now() + Duration::from_secs(5);
        while server_side.lock().unwrap().len() < n && Instant::now() < end {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server_side.lock().unwrap().len(), n, "holder accepted all");
        Holder {
            port,
            server_side,
            clients,
        }
    }

    /// Clients leave: both ends closed.
    fn drop_all(&mut self) {
        self.clients.clear();
        self.server_side.lock().unwrap().clear();
    }
}

#[test]
fn clients_ignoring_close_hit_the_deadline() {
    let ip = pod_ip();
    let holder = Holder::start(ip, 25);
    let agent = Agent::start(ip, holder.port, &["--drain-timeout", "3s"]);
    assert_eq!(agent.get("/readyz").0, 200);
    let t0 = Instant::now();
    let hook = agent.prestop_async(vec![]);
    agent.wait_draining();
    assert_eq!(agent.get("/readyz").0, 503, "unready at once");
    let (answered, code, summary) = hook.join().unwrap();
    let took = answered - t0;
    assert_eq!(code, 200);
    assert_eq!(summary["outcome"], "DeadlineExceeded");
    assert_eq!(summary["remaining"], 25);
    // At the deadline, within one poll (plus process and HTTP overhead).
    assert!(
        took >= Duration::from_millis(2900),
        "answered early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(3300),
        "answered late: {took:?}"
    );
    let st = agent.status();
    assert_eq!(st["status"]["state"], "DeadlineExceeded");
    // Peers and people see when the drain started, as wall-clock time.
    let since = st["status"]["draining_since"]
        .as_str()
        .expect("draining_since");
    assert!(since.ends_with('Z') && since.len() >= 20, "{since}");
    assert_eq!(agent.metric("wsdrain_forced_remaining"), Some(25.0));
    assert_eq!(
        agent.metric("wsdrain_drain_phase{phase=\"deadline_exceeded\"}"),
        Some(1.0)
    );
    assert_eq!(agent.metric("wsdrain_drain_state"), Some(5.0));
    drop(holder);
}

#[test]
fn without_admin_the_agent_waits_for_clients_to_leave() {
    let ip = pod_ip();
    let mut holder = Holder::start(ip, 10);
    let agent = Agent::start(ip, holder.port, &["--drain-timeout", "20s"]);
    let hook = agent.prestop_async(vec![]);
    agent.wait_state("Waiting");
    assert!(!hook.is_finished(), "answered while clients were connected");
    let left_at = Instant::now();
    holder.drop_all();
    let (answered, code, summary) = hook.join().unwrap();
    assert_eq!(code, 200);
    assert_eq!(summary["outcome"], "Drained");
    assert_eq!(summary["closes_requested"], 0);
    let release = answered - left_at;
    assert!(
        release <= Duration::from_millis(200),
        "hook released {release:?} after the last client left"
    );
}

#[test]
fn admin_failures_are_counted_and_the_drain_still_ends() {
    // One fake admin per failure mode; clients never leave, so every drain runs to its deadline.
    let modes = [
        ("refused", "refused"),
        ("slow", "timeout"),
        ("500", "http_error"),
        ("garbage", "bad_body"),
    ];
    let runs: Vec<_> = modes
        .iter()
        .map(|&(mode, label)| {
            thread::spawn(move || {
                let ip = pod_ip();
                let holder = Holder::start(ip, 3);
                let admin_port = fake_admin(ip, mode);
                let url = format!("http://{ip}:{admin_port}");
                let agent = Agent::start(
                    ip,
                    holder.port,
                    &[
                        "--drain-timeout",
                        "2500ms",
                        "--admin-url",
                        &url,
                        "--admin-timeout",
                        "300ms",
                    ],
                );
                let t0 = Instant::now();
                let (answered, code, summary) = agent.prestop_async(vec![]).join().unwrap();
                let took = answered - t0;
                assert_eq!(code, 200, "{mode}");
                assert_eq!(summary["outcome"], "DeadlineExceeded", "{mode}");
                assert!(
                    summary["admin_failures"].as_u64().unwrap() >= 1,
                    "{mode}: {summary}"
                );
                assert!(took <= Duration::from_millis(2900), "{mode}: late {took:?}");
                let failures = agent
                    .metric(&format!(
                        "wsdrain_admin_requests_total{{result=\"{label}\"}}"
                    ))
                    .unwrap_or(0.0);
                assert!(failures >= 1.0, "{mode}: no {label} counted");
                assert_eq!(agent.get("/livez").0, 200, "{mode}: agent alive");
                drop(holder);
            })
        })
        .collect();
    for r in runs {
        r.join().unwrap();
    }
}

/// A misbehaving admin endpoint. Returns its port.
fn fake_admin(ip: IpAddr, mode: &'static str) -> u16 {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    if mode == "refused" {
        return port; // dropped below: nothing listens
    }
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let reply = match mode {
                    "slow" => {
                        thread::sleep(Duration::from_secs(2));
                        "HTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n{\"closed\":1,\"remaining\":0}\n".to_string()
                    }
                    "500" => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"
                        .to_string(),
                    _ => "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!".to_string(),
                };
                let _ = s.write_all(reply.as_bytes());
            });
        }
    });
    port
}

#[test]
fn token_guards_the_drain_triggers() {
    let ip = pod_ip();
    let holder = Holder::start(ip, 1);
    let agent = Agent::start(
        ip,
        holder.port,
        &["--token", "s3cret", "--drain-timeout", "2s"],
    );
    let (code, _) = http("POST", agent.api, "/drain", &[]);
    assert_eq!(code, 401, "no token");
    let (code, _) = http(
        "GET",
        agent.api,
        "/prestop",
        &[("X-Wsdrain-Token", "wrong")],
    );
    assert_eq!(code, 401, "wrong token");
    assert_eq!(agent.get("/readyz").0, 200, "no drain started");
    assert_eq!(agent.status()["status"]["state"], "Serving");
    assert!(agent.status()["status"]["draining_since"].is_null());
    let (code, body) = http(
        "POST",
        agent.api,
        "/drain",
        &[("X-Wsdrain-Token", "s3cret")],
    );
    assert_eq!(code, 202, "{body}");
    assert_eq!(agent.get("/readyz").0, 503);
}

#[test]
fn concurrent_hooks_share_one_drain_and_late_hooks_answer_at_once() {
    let ip = pod_ip();
    let mut holder = Holder::start(ip, 4);
    let agent = Agent::start(ip, holder.port, &["--drain-timeout", "10s"]);
    let a = agent.prestop_async(vec![]);
    let b = agent.prestop_async(vec![]);
    agent.wait_state("Waiting");
    assert!(!a.is_finished() && !b.is_finished(), "both hooks wait");
    holder.drop_all();
    let (_, ca, sa) = a.join().unwrap();
    let (_, cb, sb) = b.join().unwrap();
    assert_eq!((ca, cb), (200, 200));
    assert_eq!(sa, sb, "one drain, one summary");
    assert_eq!(sa["outcome"], "Drained");
    let t = Instant::now();
    let (code, late) = http("POST", agent.api, "/prestop", &[]);
    assert_eq!(code, 200);
    assert_eq!(late, sa.to_string());
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[test]
fn sigterm_drains_then_exits_zero_and_answers_waiting_hooks() {
    use nix::sys::signal::Signal::SIGTERM;
    // During a drain: the hook gets its answer, then the agent exits 0.
    let ip = pod_ip();
    let mut holder = Holder::start(ip, 3);
    let mut agent = Agent::start(ip, holder.port, &["--drain-timeout", "10s"]);
    let hook = agent.prestop_async(vec![]);
    agent.wait_state("Waiting");
    common::signal(agent.proc.pid(), SIGTERM);
    agent
        .log
        .wait_for("termination signal", Duration::from_secs(5));
    // Still answering after it took the signal, the drain still waiting for clients.
    assert_eq!(agent.state(), "Waiting", "must not exit mid-drain");
    assert!(agent.proc.child.try_wait().unwrap().is_none());
    holder.drop_all();
    let (_, code, summary) = hook.join().unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        summary["trigger"], "prestop",
        "SIGTERM joined the running drain"
    );
    let status = agent
        .proc
        .wait_timeout(Duration::from_secs(5))
        .expect("agent exits");
    assert_eq!(status.code(), Some(0));

    // Before any drain: SIGTERM starts one, the agent exits once the pod is empty.
    let ip = pod_ip();
    let mut holder = Holder::start(ip, 2);
    let mut agent = Agent::start(ip, holder.port, &["--drain-timeout", "10s"]);
    common::signal(agent.proc.pid(), SIGTERM);
    agent.wait_draining();
    assert_eq!(agent.get("/readyz").0, 503);
    assert_eq!(agent.status()["status"]["trigger"], "signal");
    agent.wait_state("Waiting");
    assert!(agent.proc.child.try_wait().unwrap().is_none());
    holder.drop_all();
    let status = agent
        .proc
        .wait_timeout(Duration::from_secs(5))
        .expect("agent exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn bad_flags_name_the_field_and_exit_nonzero() {
    // An address that is surely taken (root may bind any port, so no "privileged" port).
    let ip = pod_ip();
    let taken = TcpListener::bind((ip, 0)).expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    // (flags, env, the field the error must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--ports", "8080", "--close-code", "1000"],
            vec![],
            "--close-code",
        ),
        (
            vec!["--ports", "8080", "--reconnect-after", "3s..1s"],
            vec![],
            "--reconnect-after",
        ),
        (vec!["--ports", "nope"], vec![], "--ports"),
        (
            vec!["--ports", "8080", "--listen", &taken_addr],
            vec![],
            "--listen",
        ),
        // Env vars work like flags.
        (
            vec![],
            vec![("WSDRAIN_PORTS", "8080"), ("WSDRAIN_CLOSE_CODE", "999")],
            "--close-code",
        ),
    ];
    for (args, env, field) in cases {
        let mut env = env.to_vec();
        env.push(("WSDRAIN_LOG_FORMAT", "text"));
        let (status, stderr) = common::failing_agent(&args, &env);
        assert!(!status.success(), "{args:?} {env:?} accepted");
        assert!(stderr.contains(field), "{args:?} {env:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    drop(taken);
}

#[test]
fn oversized_and_garbage_requests_do_not_disturb_a_drain() {
    let ip = pod_ip();
    let holder = Holder::start(ip, 2);
    let agent = Agent::start(ip, holder.port, &["--drain-timeout", "3s"]);
    let hook = agent.prestop_async(vec![]);
    agent.wait_draining();
    // 1 MiB of header garbage, then raw junk.
    for junk in [
        format!(
            "GET /status HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1 << 20)
        ),
        "\x16\x03\x01 not http at all\r\n\r\n".to_string(),
    ] {
        if let Ok(mut s) = TcpStream::connect(agent.api) {
            let _ = s.write_all(junk.as_bytes());
            let mut sink = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.read_to_end(&mut sink);
        }
    }
    let (code, _) = http("POST", agent.api, "/nope", &[]);
    assert_eq!(code, 404);
    let (code, _) = http("DELETE", agent.api, "/drain", &[]);
    assert_eq!(code, 405);
    let (_, code, summary) = hook.join().unwrap();
    assert_eq!(code, 200);
    assert_eq!(summary["outcome"], "DeadlineExceeded");
    assert_eq!(agent.get("/livez").0, 200);
    drop(holder);
}

/// A "pod": the reference echo app and its agent on one loopback address.
struct EchoPod {
    app: SocketAddr,
    _echo: common::EchoApp,
    agent: Agent,
}

impl EchoPod {
    fn start(agent_extra: &[&str]) -> EchoPod {
        Self::start_with(&[], agent_extra)
    }

    fn start_with(echo_extra: &[&str], agent_extra: &[&str]) -> EchoPod {
        let ip = pod_ip();
        let echo = common::EchoApp::start(ip, echo_extra);
        let (app, admin) = (echo.public, echo.admin);
        let url = format!("http://{admin}");
        let mut extra = vec!["--admin-url", url.as_str()];
        extra.extend_from_slice(agent_extra);
        let agent = Agent::start(ip, app.port(), &extra);
        EchoPod {
            app,
            _echo: echo,
            agent,
        }
    }
}

/// What one client saw: when the close frame came, its code and reason, when the TCP ended.
#[derive(Debug, Clone)]
struct Seen {
    close_at: Instant,
    code: u16,
    reason: String,
    ended_at: Instant,
}

/// Opens `n` tokio-tungstenite clients and returns a handle that yields what each saw.
fn rust_clients(
    app: SocketAddr,
    n: usize,
) -> (
    std::sync::mpsc::Receiver<()>,
    thread::JoinHandle<Vec<Option<Seen>>>,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{app}/"))
                    .await
                    .expect("connect");
                ws.send(Message::text("hello")).await.unwrap();
                let echo = ws.next().await.unwrap().unwrap();
                assert_eq!(echo, Message::text("hello"));
                conns.push(ws);
            }
            ready_tx.send(()).unwrap();
            let tasks: Vec<_> = conns
                .into_iter()
                .map(|mut ws| {
                    tokio::spawn(async move {
                        let mut seen: Option<(Instant, u16, String)> = None;
                        let limit = tokio::time::sleep(Duration::from_secs(40));
                        tokio::pin!(limit);
                        loop {
                            tokio::select! {
                                msg = ws.next() => match msg {
                                    Some(Ok(Message::Close(Some(f)))) => {
                                        seen = Some((Instant::now(), f.code.into(), f.reason.to_string()));
                                    }
                                    Some(Ok(_)) => {}
                                    Some(Err(_)) | None => break,
                                },
                                _ = &mut limit => return None,
                            }
                        }
                        seen.map(|(close_at, code, reason)| Seen {
                            close_at,
                            code,
                            reason,
                            ended_at: Instant::now(),
                        })
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(n);
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
    });
    (ready_rx, handle)
}

fn hint_ms(reason: &str) -> u64 {
    let v: Value = serde_json::from_str(reason)
        .unwrap_or_else(|e| panic!("reason {reason:?} is not JSON: {e}"));
    v["reconnect_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no reconnect_after_ms in {reason}"))
}

#[test]
fn five_hundred_clients_get_1012_with_a_hint_paced_over_the_window() {
    const N: usize = 500;
    let pod = EchoPod::start(&["--close-window", "2s", "--drain-timeout", "20s"]);
    let (ready, clients) = rust_clients(pod.app, N);
    ready
        .recv_timeout(Duration::from_secs(60))
        .expect("clients connected");
    assert_eq!(pod.agent.get("/readyz").0, 200);

    let t0 = Instant::now();
    let hook = pod.agent.prestop_async(vec![]);
    pod.agent.wait_draining();
    assert_eq!(pod.agent.get("/readyz").0, 503, "unready at once");
    let (answered, code, summary) = hook.join().unwrap();
    assert_eq!(code, 200);
    assert_eq!(summary["outcome"], "Drained", "{summary}");
    assert_eq!(summary["remaining"], 0);
    assert_eq!(summary["sessions_closed"], N as u64);

    let seen: Vec<Seen> = clients
        .join()
        .unwrap()
        .into_iter()
        .map(|s| s.expect("every client got a close frame"))
        .collect();
    for s in &seen {
        assert_eq!(s.code, 1012);
        assert!(hint_ms(&s.reason) <= 2000, "{}", s.reason);
    }
    // Paced: closes spread over the 2 s window in 100 ms ticks, not all in one.
    let first = seen.iter().map(|s| s.close_at).min().unwrap();
    let last = seen.iter().map(|s| s.close_at).max().unwrap();
    assert!(
        last - first >= Duration::from_millis(1500),
        "closes within {:?}",
        last - first
    );
    let mut per_tick = std::collections::BTreeMap::new();
    for s in &seen {
        *per_tick
            .entry((s.close_at - first).as_millis() / 100)
            .or_insert(0) += 1;
    }
    assert!(
        per_tick.len() >= 15,
        "only {} ticks: {per_tick:?}",
        per_tick.len()
    );
    assert!(per_tick.values().all(|&n| n <= 60), "a burst: {per_tick:?}");
    let hints: std::collections::HashSet<u64> = seen.iter().map(|s| hint_ms(&s.reason)).collect();
    assert!(hints.len() >= 10, "hint varies per batch: {hints:?}");
    // The hook answers within poll (100 ms) + 100 ms of the last connection leaving.
    let gone = seen.iter().map(|s| s.ended_at).max().unwrap();
    let release = answered.saturating_duration_since(gone);
    assert!(
        release <= Duration::from_millis(200),
        "hook released {release:?} after zero"
    );
    assert!(answered - t0 < Duration::from_secs(10));
    assert_eq!(pod.agent.metric("wsdrain_connections"), Some(0.0));
}

/// Runs one of the external client scripts against a pod and drains it.
fn external_clients(program: &str, script: &str) {
    let pod = EchoPod::start(&["--close-window", "1s", "--drain-timeout", "15s"]);
    let url = format!("ws://{}/", pod.app);
    let mut child = Command::new(program)
        .arg(common::repo_path(script))
        .args([url.as_str(), "50", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY", "{script}");
    let (_, code, summary) = pod.agent.prestop_async(vec![]).join().unwrap();
    assert_eq!(code, 200);
    assert_eq!(summary["outcome"], "Drained", "{summary}");
    line.clear();
    out.read_line(&mut line).unwrap();
    let _ = child.wait();
    let report: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{script}: {e}: {line}"));
    assert_eq!(report["opened"], 50, "{report}");
    assert_eq!(report["still_open"], 0, "{report}");
    let closes = report["closes"].as_array().unwrap();
    assert_eq!(closes.len(), 50);
    for c in closes {
        assert_eq!(c["code"], 1012, "{script}: {c}");
        assert!(hint_ms(c["reason"].as_str().unwrap()) <= 2000);
    }
}

#[test]
fn python_websockets_clients_receive_1012_and_the_hint() {
    external_clients(
        common::venv_python().to_str().unwrap(),
        "tests/clients/ws_client.py",
    );
}

#[test]
fn node_ws_clients_receive_1012_and_the_hint() {
    external_clients("node", "tests/clients/ws_client.js");
}

#[test]
fn second_sigint_exits_at_once() {
    use nix::sys::signal::Signal::SIGINT;
    let ip = pod_ip();
    let holder = Holder::start(ip, 2);
    let mut agent = Agent::start(ip, holder.port, &["--drain-timeout", "20s"]);
    common::signal(agent.proc.pid(), SIGINT);
    agent.wait_draining();
    assert_eq!(agent.get("/readyz").0, 503, "first SIGINT drains");
    assert!(
        agent.proc.child.try_wait().unwrap().is_none(),
        "still draining"
    );
    common::signal(agent.proc.pid(), SIGINT);
    let status = agent
        .proc
        .wait_timeout(Duration::from_secs(3))
        .expect("exits at once");
    assert_eq!(status.code(), Some(130));
    drop(holder);
}

fn prestop_cmd(api: SocketAddr, extra: &[&str]) -> Command {
    let mut cmd = Command::new(wsdrain_bin());
    cmd.args([
        "prestop",
        "--agent-url",
        &format!("http://{api}"),
        "--log-format",
        "text",
    ])
    .args(extra);
    cmd
}

#[test]
fn prestop_client_waits_for_the_agent_and_for_the_drain() {
    let ip = pod_ip();
    let mut holder = Holder::start(ip, 2);
    let api = SocketAddr::new(ip, free_port(ip));
    // The hook starts before the agent is up: it retries, then waits for the drain.
    let mut child = prestop_cmd(api, &["--wait-agent", "10s", "--token", "tok"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let hook_log = LogTail::follow(child.stderr.take().unwrap());
    let hook = thread::spawn(move || child.wait_with_output().unwrap());
    hook_log.wait_for("retrying", Duration::from_secs(10));
    let mut cmd = Command::new(wsdrain_bin());
    cmd.arg("agent")
        .args([
            "--listen",
            &api.to_string(),
            "--ports",
            &holder.port.to_string(),
        ])
        .args([
            "--address",
            &ip.to_string(),
            "--token",
            "tok",
            "--termination-log",
            "",
        ])
        .args(FAST)
        .stderr(std::process::Stdio::null());
    let _agent = Proc::spawn("agent", &mut cmd);
    wait_listening(api, Duration::from_secs(10));
    wait_until(
        "the hook's drain to wait for clients",
        Duration::from_secs(10),
        || {
            let body = http("GET", api, "/status", &[]).1;
            serde_json::from_str::<Value>(&body).unwrap_or_default()["status"]["state"] == "Waiting"
        },
    );
    assert!(
        !hook.is_finished(),
        "prestop returned before the pod was empty"
    );
    holder.drop_all();
    let out = hook.join().unwrap();
    assert!(out.status.success(), "{}", hook_log.text());
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary on stdout");
    assert_eq!(summary["outcome"], "Drained");
    assert_eq!(summary["trigger"], "prestop");

    // Wrong token: a clear refusal, non-zero.
    let out = prestop_cmd(api, &["--token", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    // Nobody listening: bounded retries, then a message.
    let dead = SocketAddr::new(ip, free_port(ip));
    let t = Instant::now();
    let out = prestop_cmd(dead, &["--wait-agent", "600ms"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reachable"));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_closed_stderr_does_not_kill_the_agent() {
    use nix::sys::signal::Signal::SIGTERM;
    // A log collector that went away: every later log line hits EPIPE.
    let ip = pod_ip();
    let holder = Holder::start(ip, 1);
    let api = SocketAddr::new(ip, free_port(ip));
    let mut cmd = Command::new(wsdrain_bin());
    cmd.arg("agent")
        .args([
            "--listen",
            &api.to_string(),
            "--ports",
            &holder.port.to_string(),
        ])
        .args(["--address", &ip.to_string(), "--termination-log", ""])
        .args(["--drain-timeout", "1s"])
        .args(FAST)
        .stderr(std::process::Stdio::piped());
    let mut agent = Proc::spawn("agent", &mut cmd);
    wait_listening(api, Duration::from_secs(10));
    drop(agent.child.stderr.take());
    // The drain logs as it goes; the hook must still get its answer.
    let (code, body) = http("GET", api, "/prestop", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "agent died on EPIPE"
    );
    common::signal(agent.pid(), SIGTERM);
    let status = agent.wait_timeout(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
    drop(holder);
}

#[test]
fn websocket_clients_ignoring_the_close_frame_hit_the_deadline() {
    // The app sends every close frame, the clients (Python websockets, close replies
    // suppressed) never answer and keep their sockets: the hook answers at the deadline.
    let pod = EchoPod::start_with(
        &["--close-timeout", "30s"],
        &["--close-window", "500ms", "--drain-timeout", "3s"],
    );
    let url = format!("ws://{}/", pod.app);
    let mut clients = Command::new(common::venv_python())
        .arg(common::repo_path("tests/clients/ws_client.py"))
        .args([url.as_str(), "20", "15", "ignore-close"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python client");
    let mut out = std::io::BufReader::new(clients.stdout.take().expect("stdout"));
    let mut line = String::new();
    use std::io::BufRead;
    out.read_line(&mut line).expect("READY");
    assert_eq!(line.trim(), "READY");

    let t0 = Instant::now();
    let (answered, code, summary) = pod.agent.prestop_async(vec![]).join().unwrap();
    let took = answered - t0;
    let _ = clients.kill();
    let _ = clients.wait();
    assert_eq!(code, 200);
    assert_eq!(summary["outcome"], "DeadlineExceeded", "{summary}");
    assert_eq!(summary["remaining"], 20, "{summary}");
    assert_eq!(
        summary["sessions_closed"], 20,
        "every close frame was sent: {summary}"
    );
    assert!(took >= Duration::from_millis(2900), "early: {took:?}");
    assert!(took <= Duration::from_millis(3300), "late: {took:?}");
    assert_eq!(pod.agent.status()["status"]["state"], "DeadlineExceeded");
    assert_eq!(pod.agent.metric("wsdrain_forced_remaining"), Some(20.0));
    assert_eq!(pod.agent.metric("wsdrain_drain_state"), Some(5.0));
}
