//! Primary counter: netlink `sock_diag` (NETLINK_SOCK_DIAG, `inet_diag` dumps).
//!
//! One dump request per port with the source port set in the request, so the kernel
//! skips every other socket, and the states mask set to ESTABLISHED only. Works
//! unprivileged. Each socket's id is its kernel cookie: 64-bit, never reused.
//!
//! A dump's cost is the kernel's walk of the whole TCP hash table (262144 buckets on a
//! 24 GiB machine: ~1 ms), however few sockets match. The legacy `TCPDIAG_GETSOCK`
//! request walks it once for IPv4 and IPv6 together (the kernel asks for AF_UNSPEC),
//! where `SOCK_DIAG_BY_FAMILY` needs one walk per family; so the counter uses it when it
//! needs both, and dumps each family when a kernel refuses it.

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Parseable,
};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_ESTABLISHED},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::{ConnError, Filter, Snapshot, matches_address};

/// A dump reply datagram is at most ~32 KiB; 64 KiB leaves room so nothing is truncated.
const RECV_BUF: usize = 64 * 1024;

/// Upper bound on datagrams read for one dump: a runaway or confused stream ends in an
/// error instead of a hang (each datagram holds ~200+ sockets, so this is ~millions).
const MAX_DATAGRAMS: usize = 20_000;

/// `TCPDIAG_GETSOCK` in `linux/inet_diag.h`: the request whose dump covers both families.
const TCPDIAG_GETSOCK: u16 = 18;

/// What one dump request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dump {
    /// One family (`SOCK_DIAG_BY_FAMILY`).
    Family(u8),
    /// IPv4 and IPv6 in one walk of the table (`TCPDIAG_GETSOCK`).
    BothFamilies,
}

/// A connected sock_diag socket, reused across snapshots.
pub struct SockDiag {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Whether the one-walk request for both families works here (until refused once).
    one_walk: bool,
}

impl SockDiag {
    pub fn open() -> Result<Self, ConnError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUF],
            one_walk: true,
        })
    }

    /// Whether snapshots that need IPv4 and IPv6 walk the kernel's table once.
    pub fn walks_once_for_both_families(&self) -> bool {
        self.one_walk
    }

    /// Dumps each family separately from now on (what a kernel without the legacy
    /// request gets); for comparing both ways in tests.
    pub fn dump_each_family(&mut self) {
        self.one_walk = false;
    }

    /// Established sockets matching `filter` (ids sorted, unique).
    pub fn snapshot(&mut self, filter: &Filter) -> Result<Snapshot, ConnError> {
        let mut ports = filter.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        // Port 0 in the request means "any port": it can match nothing, so skip it.
        ports.retain(|&p| p != 0);
        let mut ids = Vec::new();
        let families = families(filter.address);
        let mut dumped = false;
        if families.len() == 2 && self.one_walk {
            let all = ports.iter().try_for_each(|&port| {
                self.dump(Dump::BothFamilies, port, filter.address, &mut ids)
            });
            match all {
                Ok(()) => dumped = true,
                Err(e) => {
                    tracing::info!(error = %e, "sock_diag: the one-walk dump of both families is refused; dumping each family");
                    self.one_walk = false;
                    ids.clear();
                }
            }
        }
        if !dumped {
            for &family in families {
                for &port in &ports {
                    self.dump(Dump::Family(family), port, filter.address, &mut ids)?;
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(Snapshot { ids })
    }

    /// Sends one dump request and reads its multi-part answer up to NLMSG_DONE.
    fn dump(
        &mut self,
        what: Dump,
        port: u16,
        address: Option<IpAddr>,
        ids: &mut Vec<u64>,
    ) -> Result<(), ConnError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let out = match what {
            Dump::Family(family) => family_request(family, port, seq),
            Dump::BothFamilies => both_families_request(port, seq),
        };
        self.socket.send(&out, 0)?;

        for _ in 0..MAX_DATAGRAMS {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                // A signal landed mid-dump: the rest of the dump is still queued.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let mut data = self
                .buf
                .get(..n)
                .ok_or_else(|| decode("datagram truncated"))?;
            while !data.is_empty() {
                let msg = NetlinkBuffer::new_checked(data).map_err(|e| decode(&e.to_string()))?;
                let len = msg.length() as usize;
                // Leftovers of an earlier dump that ended in an error are not ours.
                let ours = msg.sequence_number() == seq;
                match msg.message_type() {
                    // Only the fixed header of each reply is parsed (no attributes): that
                    // is all we need and keeps a 10k-socket dump cheap.
                    SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK if ours => {
                        let h = InetResponseHeader::parse(msg.payload())
                            .map_err(|e| decode(&e.to_string()))?;
                        // The kernel already filtered port and state; check anyway so a
                        // kernel that ignored the request fields cannot inflate the count.
                        if h.state == TCP_ESTABLISHED
                            && h.socket_id.source_port == port
                            && address
                                .is_none_or(|a| matches_address(h.socket_id.source_address, a))
                        {
                            ids.push(cookie(&h.socket_id.cookie));
                        }
                    }
                    NLMSG_DONE | NLMSG_ERROR if ours => {
                        let end = NetlinkMessage::<SockDiagMessage>::deserialize(data)
                            .map_err(|e| decode(&e.to_string()))?;
                        match end.payload {
                            NetlinkPayload::Done(d) if d.code < 0 => {
                                return Err(std::io::Error::from_raw_os_error(-d.code).into());
                            }
                            NetlinkPayload::Error(e) if e.code.is_some() => {
                                return Err(e.to_io().into());
                            }
                            // DONE, or an ACK (error code 0).
                            _ => return Ok(()),
                        }
                    }
                    NLMSG_OVERRUN => return Err(decode("netlink overrun")),
                    // No-ops and other dumps' messages carry none of our sockets.
                    _ => {}
                }
                // Messages are 4-byte aligned inside a datagram; new_checked ensured len
                // covers at least a header, so this always advances.
                data = data.get(len.next_multiple_of(4)..).unwrap_or(&[]);
            }
        }
        Err(decode("dump did not end"))
    }
}

/// `SOCK_DIAG_BY_FAMILY` for established sockets of `family` on source port `port`.
fn family_request(family: u8, port: u16, seq: u32) -> Vec<u8> {
    let mut socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    socket_id.source_port = port;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut req = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED,
            socket_id,
        })
        .into(),
    );
    req.finalize();
    let mut out = vec![0; req.buffer_len()];
    req.serialize(&mut out);
    out
}

/// `TCPDIAG_GETSOCK` for established sockets of both families on source port `port`:
/// `struct nlmsghdr` then `struct inet_diag_req` (the netlink crates only build the newer
/// request). Host byte order except the ports.
fn both_families_request(port: u16, seq: u32) -> Vec<u8> {
    const REQ_LEN: usize = 4 + 48 + 8;
    let mut out = Vec::with_capacity(16 + REQ_LEN);
    out.extend_from_slice(&((16 + REQ_LEN) as u32).to_ne_bytes());
    out.extend_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // idiag_family (the kernel dumps both), idiag_src_len, idiag_dst_len, idiag_ext.
    out.extend_from_slice(&[0; 4]);
    // inet_diag_sockid: sport, dport, src[4], dst[4], if, cookie[2]; only sport is set.
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&[0; 2 + 16 + 16 + 4 + 8]);
    // idiag_states, idiag_dbs.
    out.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

/// Established sockets matching `filter`, on a fresh sock_diag socket.
pub fn snapshot(filter: &Filter) -> Result<Snapshot, ConnError> {
    SockDiag::open()?.snapshot(filter)
}

/// Families to dump. Dual-stack sockets with IPv4-mapped addresses live in AF_INET6, so
/// an IPv4 filter still needs the v6 dump; a plain IPv6 filter cannot match AF_INET.
fn families(address: Option<IpAddr>) -> &'static [u8] {
    match address.map(|a| a.to_canonical()) {
        Some(IpAddr::V6(_)) => &[AF_INET6],
        _ => &[AF_INET, AF_INET6],
    }
}

/// The kernel stores the cookie as two host-order u32 words, low word first.
fn cookie(raw: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let hi = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

fn decode(what: &str) -> ConnError {
    ConnError::Netlink(what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// `struct nlmsghdr` (16 bytes), then `struct inet_diag_req` (60): the port in network
    /// order at the start of the socket id, the states mask after the 48-byte id.
    #[test]
    fn both_families_request_is_a_legacy_inet_diag_req() {
        let r = both_families_request(8080, 7);
        assert_eq!(r.len(), 76);
        assert_eq!(word(&r, 0), 76);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), TCPDIAG_GETSOCK);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(word(&r, 8), 7);
        assert_eq!(r[16..20], [0; 4], "family unset: both");
        assert_eq!(r[20..22], 8080u16.to_be_bytes());
        assert!(r[22..68].iter().all(|&b| b == 0));
        assert_eq!(word(&r, 68), 1 << TCP_ESTABLISHED);
        assert_eq!(word(&r, 72), 0);
    }
}
