//! Primary counter: netlink `sock_diag` (NETLINK_SOCK_DIAG, `inet_diag` dumps).
//!
//! One dump request per (family, port) with the source port set in the request, so the
//! kernel skips every other socket, and the states mask set to ESTABLISHED only. Works
//! unprivileged. Each socket's id is its kernel cookie: 64-bit, never reused.

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

/// A connected sock_diag socket, reused across snapshots.
pub struct SockDiag {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
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
        })
    }

    /// Established sockets matching `filter` (ids sorted, unique).
    pub fn snapshot(&mut self, filter: &Filter) -> Result<Snapshot, ConnError> {
        let mut ports = filter.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        // Port 0 in the request means "any port": it can match nothing, so skip it.
        ports.retain(|&p| p != 0);
        let mut ids = Vec::new();
        for &family in families(filter.address) {
            for &port in &ports {
                self.dump(family, port, filter.address, &mut ids)?;
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(Snapshot { ids })
    }

    /// Sends one dump request and reads its multi-part answer up to NLMSG_DONE.
    fn dump(
        &mut self,
        family: u8,
        port: u16,
        address: Option<IpAddr>,
        ids: &mut Vec<u64>,
    ) -> Result<(), ConnError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
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
                    SOCK_DIAG_BY_FAMILY if ours => {
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
