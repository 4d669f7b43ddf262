//! Fallback counter: parses `/proc/net/tcp` and `/proc/net/tcp6` of this network namespace.
//!
//! Slower than sock_diag (the kernel prints every socket, TIME_WAIT included, and we parse
//! text) but needs nothing but a readable procfs.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{ConnError, Filter, Snapshot, matches_address};

/// `TCP_ESTABLISHED` as printed in the `st` column.
const ESTABLISHED: u8 = 0x01;

/// Marks ids made from the 4-tuple (inode 0): real inodes are 32-bit, so no clash.
const TUPLE_ID_BIT: u64 = 1 << 63;

/// One parsed line of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

impl Entry {
    /// The inode, stable for the socket's life. A socket still in the accept queue has no
    /// file yet (inode 0): it gets an id from its 4-tuple instead, which changes once
    /// the app accepts it (the drain then sees one extra "new" connection, harmless).
    pub fn id(&self) -> u64 {
        if self.inode != 0 {
            return self.inode;
        }
        let mut h = DefaultHasher::new();
        (self.local, self.remote).hash(&mut h);
        h.finish() | TUPLE_ID_BIT
    }
}

/// Established sockets matching `filter`, read from `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn snapshot(filter: &Filter) -> Result<Snapshot, ConnError> {
    let mut ids = Vec::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // tcp6 is missing when the kernel has IPv6 disabled.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        collect(&text, filter, &mut ids);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(Snapshot { ids })
}

/// Adds the ids of matching established sockets in one file's text.
fn collect(text: &str, filter: &Filter, ids: &mut Vec<u64>) {
    // The first line is the column header; unparsable lines are skipped.
    for line in text.lines().skip(1) {
        // Cheap checks first: most lines in a busy namespace are not ours.
        if !quick_match(line, &filter.ports) {
            continue;
        }
        let Some(e) = parse_line(line) else { continue };
        if e.state == ESTABLISHED
            && filter.ports.contains(&e.local.port())
            && filter
                .address
                .is_none_or(|a| matches_address(e.local.ip(), a))
        {
            ids.push(e.id());
        }
    }
}

/// State 01 and a wanted local port, without parsing addresses.
fn quick_match(line: &str, ports: &[u16]) -> bool {
    let mut f = line.split_ascii_whitespace();
    let (Some(local), Some(st)) = (f.nth(1), f.nth(1)) else {
        return false;
    };
    if st != "01" {
        return false;
    }
    local
        .rsplit_once(':')
        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        .is_some_and(|p| ports.contains(&p))
}

/// Parses one socket line: `sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ...`.
pub fn parse_line(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split_ascii_whitespace().take(10).collect();
    if f.len() < 10 {
        return None;
    }
    Some(Entry {
        local: parse_addr(f[1])?,
        remote: parse_addr(f[2])?,
        state: u8::from_str_radix(f[3], 16).ok()?,
        inode: f[9].parse().ok()?,
    })
}

/// `0100007F:1F90` (v4) or 32 hex digits `:PORT` (v6). The kernel prints each 32-bit word
/// of the address as a host-order integer, so the bytes come back via `to_ne_bytes`.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?.to_ne_bytes())),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn word(hex: &str) -> Option<u32> {
    u32::from_str_radix(hex, 16).ok()
}

// The sample lines are what a little-endian kernel prints.
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    const V4_EST: &str = "   3: 0500007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 20 4 30 10 -1";
    const V4_LISTEN: &str = "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 77 1 0000000000000000 100 0 0 10 0";
    const V4_TW: &str = "   9: 0500007F:1F90 0100007F:D2F2 06 00000000:00000000 03:00000F9C 00000000     0        0 0 3 0000000000000000";
    // [::1]:8080 <- [::1]:40000
    const V6_EST: &str = "   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 5151 1 0000000000000000 20 4 31 10 -1";
    // [::ffff:127.0.0.5]:8080 <- [::ffff:127.0.0.1]:53000, no inode yet (accept queue)
    const V6_MAPPED: &str = "   2: 0000000000000000FFFF00000500007F:1F90 0000000000000000FFFF00000100007F:CF08 01 00000000:00000000 00:00000000 00000000  1000        0 0 1 0000000000000000 20 4 31 10 -1";
    // [2001:db8::1]:443
    const V6_DOC: &str = "   4: B80D0120000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_v4_line() {
        let e = parse_line(V4_EST).unwrap();
        assert_eq!(e.local, sa("127.0.0.5:8080"));
        assert_eq!(e.remote, sa("127.0.0.1:54000"));
        assert_eq!(e.state, 1);
        assert_eq!(e.inode, 4242);
        assert_eq!(e.id(), 4242);
        assert_eq!(parse_line(V4_LISTEN).unwrap().state, 0x0A);
    }

    #[test]
    fn parses_v6_lines() {
        let e = parse_line(V6_EST).unwrap();
        assert_eq!(e.local, sa("[::1]:8080"));
        assert_eq!(e.remote, sa("[::1]:40000"));
        assert_eq!(e.inode, 5151);
        let d = parse_line(V6_DOC).unwrap();
        assert_eq!(d.local, sa("[2001:db8::1]:443"));
        let m = parse_line(V6_MAPPED).unwrap();
        assert_eq!(m.local, sa("[::ffff:127.0.0.5]:8080"));
        assert_eq!(m.remote.port(), 53000);
    }

    #[test]
    fn inode_zero_gets_stable_tuple_id() {
        let m = parse_line(V6_MAPPED).unwrap();
        assert_eq!(m.inode, 0);
        assert_ne!(m.id() & TUPLE_ID_BIT, 0);
        assert_eq!(m.id(), parse_line(V6_MAPPED).unwrap().id());
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_line(""), None);
        assert_eq!(
            parse_line(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
            ),
            None
        );
        assert_eq!(parse_line("   3: 0500007F:1F90 0100007F"), None);
        assert_eq!(
            parse_line(&V4_EST.replace("0500007F:1F90", "05007F:1F90")),
            None
        );
        assert_eq!(
            parse_line(&V4_EST.replace("0500007F:1F90", "0500007F:XYZ")),
            None
        );
    }

    #[test]
    fn collect_filters_state_port_and_address() {
        let text =
            format!("header\n{V4_EST}\n{V4_LISTEN}\n{V4_TW}\n{V6_EST}\n{V6_MAPPED}\n{V6_DOC}\n");
        let run = |ports: &[u16], address: Option<&str>| {
            let f = Filter {
                ports: ports.to_vec(),
                address: address.map(|a| a.parse().unwrap()),
            };
            let mut ids = Vec::new();
            collect(&text, &f, &mut ids);
            ids.len()
        };
        assert_eq!(run(&[8080], None), 3); // v4, v6, v4-mapped; not LISTEN, not TIME_WAIT
        assert_eq!(run(&[443], None), 0); // only a listener there
        assert_eq!(run(&[9999], None), 0);
        assert_eq!(run(&[8080], Some("127.0.0.5")), 2); // v4 and the v4-mapped one
        assert_eq!(run(&[8080], Some("::ffff:127.0.0.5")), 2);
        assert_eq!(run(&[8080], Some("::1")), 1);
        assert_eq!(run(&[8080], Some("127.0.0.6")), 0);
    }
}
