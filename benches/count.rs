//! Counting 10k ESTABLISHED connections on one port: sock_diag vs /proc/net/tcp{,6} vs `ss`.
//!
//! `cargo bench --bench count` (prints figures, asserts nothing but agreement of counts).
//! The open-file limit is 20000 per process, so the sockets live in helper processes
//! (this same binary, re-executed): two servers that share one listener (passed as their
//! stdin) and accept 5k each, and two clients that open 5k each. The measuring process
//! holds only a netlink socket. Everything is on loopback; children are killed at the end,
//! on panic, and kill themselves after CHILD_LIFETIME if this process dies.

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use wsdrain::conn::{Filter, procfs, sockdiag};

const CONNS: usize = 10_000;
const PER_CHILD: usize = 5_000;
const RUNS: usize = 15;
const SETUP_LIMIT: Duration = Duration::from_secs(30);
const CHILD_LIFETIME: Duration = Duration::from_secs(90);
const ROLE_ENV: &str = "WSDRAIN_BENCH_ROLE";

fn main() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("server") => server_child(),
        Ok(role) if role.starts_with("client ") => client_child(&role["client ".len()..]),
        _ => bench(),
    }
}

/// Accepts PER_CHILD connections on the listener inherited as stdin, then holds them.
fn server_child() {
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .expect("stdin fd");
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true).expect("nonblocking");
    let end = Instant::now() + SETUP_LIMIT;
    let mut held = Vec::with_capacity(PER_CHILD);
    while held.len() < PER_CHILD && Instant::now() < end {
        match listener.accept() {
            Ok((s, _)) => held.push(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    drop(listener);
    println!("ready {}", held.len());
    std::thread::sleep(CHILD_LIFETIME);
}

/// Opens PER_CHILD connections to `addr`, then holds them.
fn client_child(addr: &str) {
    let addr: SocketAddr = addr.parse().expect("client addr");
    let end = Instant::now() + SETUP_LIMIT;
    let mut held = Vec::with_capacity(PER_CHILD);
    while held.len() < PER_CHILD && Instant::now() < end {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("connect {addr}: {e}");
                break;
            }
        }
    }
    println!("ready {}", held.len());
    std::thread::sleep(CHILD_LIFETIME);
}

/// Kills and reaps the helper processes when dropped (normal end or panic).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a helper and returns a receiver for its "ready N" count.
fn spawn(kids: &mut Children, role: &str, stdin: Stdio) -> mpsc::Receiver<usize> {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .env(ROLE_ENV, role)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn helper");
    let out = child.stdout.take().expect("helper stdout");
    kids.0.push(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ready ").and_then(|n| n.parse().ok()) {
                let _ = tx.send(n);
                return;
            }
        }
    });
    rx
}

fn median_ms(mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut count = f(); // warm-up
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            count = f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2], count)
}

fn bench() {
    let started = Instant::now();
    // A loopback address of our own so nothing else on the machine shares the port.
    let pid = std::process::id();
    let ip = IpAddr::V4(Ipv4Addr::new(
        127,
        99,
        (pid >> 8) as u8,
        (pid % 250 + 2) as u8,
    ));
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let port = addr.port();

    let mut kids = Children(Vec::new());
    let mut ready = Vec::new();
    for _ in 0..CONNS / PER_CHILD {
        let fd = OwnedFd::from(listener.try_clone().expect("clone listener"));
        ready.push(spawn(&mut kids, "server", Stdio::from(fd)));
    }
    drop(listener);
    for _ in 0..CONNS / PER_CHILD {
        ready.push(spawn(&mut kids, &format!("client {addr}"), Stdio::null()));
    }
    let deadline = Instant::now() + SETUP_LIMIT + Duration::from_secs(5);
    let held: Vec<usize> = ready
        .iter()
        .map(|rx| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or(0)
        })
        .collect();
    let setup = started.elapsed();

    let filter = Filter {
        ports: vec![port],
        address: None,
    };
    let mut nl = sockdiag::SockDiag::open().expect("sock_diag socket");
    let (t_nl, n_nl) = median_ms(|| nl.snapshot(&filter).expect("sock_diag").ids.len());
    let (t_pr, n_pr) = median_ms(|| procfs::snapshot(&filter).expect("/proc").ids.len());
    let sport = format!("( sport = :{port} )");
    let (t_ss, n_ss) = median_ms(|| {
        let out = Command::new("ss")
            .args(["-Htn", "state", "established", &sport])
            .output()
            .expect("run ss");
        out.stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count()
    });
    // The empty-port case: what the agent pays per poll once drained.
    let empty = Filter {
        ports: vec![port.wrapping_add(1).max(1)],
        address: Some(ip),
    };
    let (t_nl0, n_nl0) = median_ms(|| nl.snapshot(&empty).expect("sock_diag").ids.len());
    let (t_pr0, n_pr0) = median_ms(|| procfs::snapshot(&empty).expect("/proc").ids.len());
    // What a kernel without the one-walk request costs: a dump per family.
    let mut each = sockdiag::SockDiag::open().expect("sock_diag socket");
    each.dump_each_family();
    let (t_each, n_each) = median_ms(|| each.snapshot(&filter).expect("sock_diag").ids.len());
    let (t_each0, _) = median_ms(|| each.snapshot(&empty).expect("sock_diag").ids.len());
    let one_walk = nl.walks_once_for_both_families();

    let sockets = std::fs::read_to_string("/proc/net/tcp")
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
        + std::fs::read_to_string("/proc/net/tcp6")
            .map(|t| t.lines().count().saturating_sub(1))
            .unwrap_or(0);
    let profile = if cfg!(debug_assertions) {
        "debug (unoptimized)"
    } else {
        "optimized"
    };
    println!(
        "count: {CONNS} ESTABLISHED connections to {addr} (helpers held {held:?}; setup {setup:.1?})"
    );
    println!(
        "       {sockets} TCP sockets in this network namespace; build {profile}; median of {RUNS} runs"
    );
    println!("{:<44} {:>9} {:>8} {:>7}", "method", "ms", "vs nl", "count");
    let row = |name: &str, ms: f64, base: f64, n: usize| {
        println!("{name:<44} {ms:>9.2} {:>7.1}x {n:>7}", ms / base);
    };
    row(
        if one_walk {
            "sock_diag, port in request, one walk (agent)"
        } else {
            "sock_diag, port in request (one walk refused)"
        },
        t_nl,
        t_nl,
        n_nl,
    );
    row("sock_diag, a dump per family", t_each, t_nl, n_each);
    row("/proc/net/tcp + tcp6 parse", t_pr, t_nl, n_pr);
    row(
        "ss -Htn state established (incl. fork+exec)",
        t_ss,
        t_nl,
        n_ss,
    );
    row("sock_diag, port with no connections", t_nl0, t_nl, n_nl0);
    row("sock_diag per family, no connections", t_each0, t_nl, 0);
    row("/proc parse, port with no connections", t_pr0, t_nl, n_pr0);
    let agree = n_nl == n_pr && n_pr == n_ss && n_nl == CONNS;
    println!(
        "counts agree: {agree}; /proc is {:.1}x slower than sock_diag (goal >= 5x); total {:.1?}",
        t_pr / t_nl,
        started.elapsed()
    );
    drop(kids);
}
