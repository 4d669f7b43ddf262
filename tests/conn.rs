//! Socket counting against real loopback sockets: sock_diag and /proc must agree, and
//! both must count exactly the ESTABLISHED sockets on the app port (and address).

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use wsdrain::conn::{Backend, Counter, Filter, Snapshot, procfs, sockdiag};

/// A listener plus the connections made to it; dropping closes everything.
struct Server {
    listener: TcpListener,
    /// (client side, server side)
    conns: Vec<(TcpStream, TcpStream)>,
}

impl Server {
    fn bind(addr: SocketAddr) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Server {
            listener,
            conns: Vec::new(),
        })
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    /// Opens `n` connections to `to` (this listener's port) and accepts each one.
    fn open(&mut self, to: SocketAddr, n: usize) {
        for _ in 0..n {
            let client = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
            let end = Instant::now() + Duration::from_secs(2);
            let server = loop {
                match self.listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            self.conns.push((client, server));
        }
    }
}

/// Binds `ip` on a port that is also free on every address in `also` (bounded retries).
fn bind_shared_port(ip: IpAddr, also: &[IpAddr]) -> (Server, Vec<Server>) {
    for _ in 0..50 {
        let port = common::free_port(ip);
        let Ok(first) = Server::bind(SocketAddr::new(ip, port)) else {
            continue;
        };
        let others: Result<Vec<_>, _> = also
            .iter()
            .map(|a| Server::bind(SocketAddr::new(*a, port)))
            .collect();
        if let Ok(others) = others {
            return (first, others);
        }
    }
    panic!("no port free on {ip} and {also:?} after 50 tries");
}

fn filter(ports: &[u16], address: Option<IpAddr>) -> Filter {
    Filter {
        ports: ports.to_vec(),
        address,
    }
}

/// Both backends' snapshots; asserts they agree on the count, and that sock_diag's one
/// walk for both families finds exactly what a dump per family finds.
fn both(f: &Filter) -> (Snapshot, Snapshot) {
    let mut once = sockdiag::SockDiag::open().expect("sock_diag socket");
    let nl = once.snapshot(f).expect("sock_diag snapshot");
    assert!(
        once.walks_once_for_both_families(),
        "this kernel takes the one-walk request"
    );
    let mut each = sockdiag::SockDiag::open().expect("sock_diag socket");
    each.dump_each_family();
    assert_eq!(
        each.snapshot(f).expect("per-family snapshot").ids,
        nl.ids,
        "one walk and a dump per family disagree for {f:?}"
    );
    let pr = procfs::snapshot(f).expect("/proc snapshot");
    assert_eq!(
        nl.ids.len(),
        pr.ids.len(),
        "sock_diag and /proc disagree for {f:?}"
    );
    (nl, pr)
}

fn count(f: &Filter) -> usize {
    both(f).0.ids.len()
}

const LOCALHOST6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[test]
fn sockdiag_and_proc_agree_on_v4_and_v6() {
    let ip = common::pod_ip();
    let (mut v4, mut v6) = bind_shared_port(ip, &[LOCALHOST6]);
    let mut v6 = v6.remove(0);
    let port = v4.port();
    v4.open(SocketAddr::new(ip, port), 50);
    v6.open(SocketAddr::new(LOCALHOST6, port), 50);

    let (nl, pr) = both(&filter(&[port], None));
    assert_eq!(nl.ids.len(), 100);
    // Ids are unique within a snapshot.
    assert_eq!(nl.ids.iter().collect::<BTreeSet<_>>().len(), 100);
    assert_eq!(pr.ids.iter().collect::<BTreeSet<_>>().len(), 100);

    assert_eq!(count(&filter(&[port], Some(ip))), 50);
    assert_eq!(count(&filter(&[port], Some(LOCALHOST6))), 50);
}

#[test]
fn other_port_and_other_address_are_not_counted() {
    let a = common::pod_ip();
    let b = common::pod_ip();
    let (mut on_a, mut on_b) = bind_shared_port(a, &[b]);
    let mut on_b = on_b.remove(0);
    let port = on_a.port();
    let mut other = Server::bind(SocketAddr::new(a, 0)).expect("bind other port");
    let other_port = other.port();

    on_a.open(SocketAddr::new(a, port), 3);
    on_b.open(SocketAddr::new(b, port), 2);
    other.open(SocketAddr::new(a, other_port), 4);

    assert_eq!(count(&filter(&[port], Some(a))), 3);
    assert_eq!(count(&filter(&[port], Some(b))), 2);
    assert_eq!(count(&filter(&[port], None)), 5);
    assert_eq!(count(&filter(&[other_port], Some(a))), 4);
    assert_eq!(count(&filter(&[port, other_port], Some(a))), 7);
    assert_eq!(
        count(&filter(&[port, port], Some(a))),
        3,
        "duplicate ports count once"
    );
    assert_eq!(count(&filter(&[], None)), 0);
    assert_eq!(count(&filter(&[0], None)), 0, "port 0 is not a wildcard");
}

#[test]
fn dual_stack_listener_v4_mapped_matches_v4_address() {
    let ip = common::pod_ip();
    let mut wild = None;
    for _ in 0..50 {
        let port = common::free_port(ip);
        if let Ok(s) = Server::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)) {
            wild = Some(s);
            break;
        }
    }
    let mut wild = wild.expect("bind [::]:port");
    let port = wild.port();
    wild.open(SocketAddr::new(ip, port), 4);
    let local = wild.conns[0].1.local_addr().unwrap().ip();
    assert_eq!(
        local,
        IpAddr::V6(ip_v4_mapped(ip)),
        "server side is a v4-mapped v6 socket"
    );

    assert_eq!(count(&filter(&[port], Some(ip))), 4);
    assert_eq!(
        count(&filter(&[port], Some(IpAddr::V6(ip_v4_mapped(ip))))),
        4
    );
    assert_eq!(count(&filter(&[port], Some(common::pod_ip()))), 0);
}

fn ip_v4_mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Sockets on `port` in /proc/net/tcp with TCP state `state`.
fn proc_state_count(port: u16, state: u8) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(procfs::parse_line)
        .filter(|e| e.local.port() == port && e.state == state)
        .count()
}

#[test]
fn listeners_and_time_wait_are_not_counted() {
    let ip = common::pod_ip();
    let mut s = Server::bind(SocketAddr::new(ip, 0)).unwrap();
    let port = s.port();
    let f = filter(&[port], Some(ip));
    assert_eq!(proc_state_count(port, 0x0A), 1, "the listener exists");
    assert_eq!(count(&f), 0, "a listener is not a connection");

    s.open(SocketAddr::new(ip, port), 5);
    assert_eq!(count(&f), 5);

    // Close two from the server side first: the server sockets end in TIME_WAIT.
    let closed: Vec<_> = s.conns.drain(..2).collect();
    for (client, server) in closed {
        drop(server);
        drop(client);
    }
    let end = Instant::now() + Duration::from_secs(5);
    while proc_state_count(port, 0x06) < 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        proc_state_count(port, 0x06),
        2,
        "two server sockets in TIME_WAIT"
    );
    assert_eq!(count(&f), 3);
}

#[test]
fn ids_are_stable_and_a_new_connection_has_a_new_id() {
    let ip = common::pod_ip();
    let mut s = Server::bind(SocketAddr::new(ip, 0)).unwrap();
    let port = s.port();
    let f = filter(&[port], Some(ip));
    s.open(SocketAddr::new(ip, port), 3);

    let (nl1, pr1) = both(&f);
    let (nl2, pr2) = both(&f);
    assert_eq!(nl1, nl2, "sock_diag ids stable");
    assert_eq!(pr1, pr2, "/proc ids stable");

    s.open(SocketAddr::new(ip, port), 1);
    let (nl3, pr3) = both(&f);
    for (before, after) in [(&nl1, &nl3), (&pr1, &pr3)] {
        let before: BTreeSet<_> = before.ids.iter().collect();
        let after: BTreeSet<_> = after.ids.iter().collect();
        assert!(before.is_subset(&after), "old ids kept");
        assert_eq!(after.difference(&before).count(), 1, "exactly one new id");
    }

    // A closed connection's id disappears, the others stay.
    drop(s.conns.remove(0));
    let (nl4, _) = both(&f);
    assert_eq!(nl4.ids.len(), 3);
    assert!(nl4.ids.iter().all(|id| nl3.ids.contains(id)));
}

#[test]
fn counter_prefers_sock_diag_and_counts() {
    // The agent moves it into a blocking task.
    fn assert_send<T: Send>() {}
    assert_send::<Counter>();

    let ip = common::pod_ip();
    let mut s = Server::bind(SocketAddr::new(ip, 0)).unwrap();
    let port = s.port();
    let mut c = Counter::new(filter(&[port], Some(ip)));
    assert_eq!(c.backend(), Backend::SockDiag);
    assert_eq!(c.snapshot().unwrap().ids.len(), 0);
    s.open(SocketAddr::new(ip, port), 7);
    assert_eq!(c.snapshot().unwrap().ids.len(), 7);
    assert_eq!(c.backend(), Backend::SockDiag);
}

/// Counting with no capabilities and a non-root uid, as the agent runs in the image.
#[test]
fn sock_diag_works_unprivileged() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    if status.lines().any(|l| l == "CapEff:\t0000000000000000") {
        // Already without capabilities (a non-root CI): the real thing, in process.
        return count_without_capabilities();
    }
    // With capabilities (root, as in `make test`): rerun this test's body under setpriv as
    // the distroless nonroot user with every capability gone. setpriv comes from
    // scripts/setup-deps.sh; without it the test fails rather than passing untested.
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65532",
            "--regid=65532",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(exe)
        .args(["--exact", "unprivileged_child", "--ignored", "--nocapture"])
        .output()
        .unwrap_or_else(|e| panic!("run setpriv (scripts/setup-deps.sh installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "child did not run:\n{text}");
}

#[test]
#[ignore = "run by sock_diag_works_unprivileged under setpriv"]
fn unprivileged_child() {
    count_without_capabilities();
}

/// sock_diag (and /proc) count our own loopback connections without any capability.
fn count_without_capabilities() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000000000"),
        "capabilities dropped"
    );
    assert!(
        !status.lines().any(|l| l.starts_with("Uid:\t0\t")),
        "not root"
    );
    let ip = common::pod_ip();
    let mut s = Server::bind(SocketAddr::new(ip, 0)).unwrap();
    let port = s.port();
    s.open(SocketAddr::new(ip, port), 2);
    let mut c = Counter::new(filter(&[port], Some(ip)));
    assert_eq!(c.backend(), Backend::SockDiag);
    assert_eq!(c.snapshot().unwrap().ids.len(), 2);
    assert_eq!(procfs::snapshot(c.filter()).unwrap().ids.len(), 2);
    // The one-walk request for both families needs no privilege either.
    let mut once = sockdiag::SockDiag::open().unwrap();
    assert_eq!(once.snapshot(c.filter()).unwrap().ids.len(), 2);
    assert!(once.walks_once_for_both_families());
}
