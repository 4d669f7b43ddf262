//! Event-driven counting: the kernel's sock_diag notifications of destroyed TCP sockets.
//!
//! A netlink socket that joins the `SKNLGRP_INET_TCP_DESTROY` and
//! `SKNLGRP_INET6_TCP_DESTROY` multicast groups gets one message per TCP socket the
//! kernel frees in this network namespace. Joining needs no privilege (the groups are
//! flagged for unprivileged receivers). Only sockets on the app ports matter; every other
//! socket's destruction is ignored here. When the kernel drops notifications (ENOBUFS,
//! a burst bigger than the receive buffer) the watcher reports a change anyway, so the
//! counter resyncs by counting again.

use bytes::BytesMut;
use netlink_packet_core::{NLMSG_ERROR, NLMSG_OVERRUN, NetlinkBuffer, Parseable};
use netlink_packet_sock_diag::{SOCK_DIAG_BY_FAMILY, inet::InetResponseHeader};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_SOCK_DIAG};
use tokio::sync::watch;

use super::{ConnError, Filter, matches_address};

/// `enum sknetlink_groups` in `linux/sock_diag.h`.
const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SKNLGRP_INET6_TCP_DESTROY: u32 = 3;
/// Room for bursts: 2000 closes at once are ~250 KiB of notifications.
const RCV_BUF: usize = 1 << 20;
const RECV_CHUNK: usize = 64 * 1024;

/// What one datagram of notifications means for the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// At least one socket on the app ports was destroyed.
    Matched,
    /// Only other sockets.
    Ignored,
}

/// Whether a datagram of destroy notifications names a socket that matches `filter`.
/// Malformed messages are skipped, never trusted to mean "nothing happened": a datagram
/// that cannot be read at all counts as a match so the counter re-counts.
pub fn classify(mut data: &[u8], filter: &Filter) -> Seen {
    while !data.is_empty() {
        let Ok(msg) = NetlinkBuffer::new_checked(data) else {
            return Seen::Matched;
        };
        let len = msg.length() as usize;
        match msg.message_type() {
            SOCK_DIAG_BY_FAMILY => match InetResponseHeader::parse(msg.payload()) {
                Ok(h) => {
                    let id = &h.socket_id;
                    if filter.ports.contains(&id.source_port)
                        && filter
                            .address
                            .is_none_or(|a| matches_address(id.source_address, a))
                    {
                        return Seen::Matched;
                    }
                }
                Err(_) => return Seen::Matched,
            },
            NLMSG_ERROR | NLMSG_OVERRUN => return Seen::Matched,
            _ => {}
        }
        data = data.get(len.next_multiple_of(4).max(4)..).unwrap_or(&[]);
    }
    Seen::Ignored
}

/// A subscription to destroy notifications.
pub struct DestroyWatch {
    socket: TokioSocket,
    buf: BytesMut,
}

impl DestroyWatch {
    /// Joins both TCP destroy groups. Must be called inside a tokio runtime.
    pub fn open() -> Result<Self, ConnError> {
        let mut socket = TokioSocket::new(NETLINK_SOCK_DIAG)?;
        let s = socket.socket_mut();
        s.bind_auto()?;
        s.add_membership(SKNLGRP_INET_TCP_DESTROY)?;
        s.add_membership(SKNLGRP_INET6_TCP_DESTROY)?;
        // Best effort: the default buffer only drops more often (ENOBUFS → resync).
        let _ = s.set_rx_buf_sz(RCV_BUF);
        Ok(Self {
            socket,
            buf: BytesMut::with_capacity(RECV_CHUNK),
        })
    }

    /// Waits for the next notification datagram. `Ok(Seen::Matched)` also for an overflow
    /// (ENOBUFS): some notifications were lost, so the caller must count again.
    pub async fn next(&mut self, filter: &Filter) -> Result<Seen, ConnError> {
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf).await {
                Ok(()) => return Ok(classify(&self.buf, filter)),
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                    return Ok(Seen::Matched);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Starts watching: the returned receiver's value goes up by one for every datagram
/// that may have changed the count. The watcher ends (and the receiver sees the sender
/// gone) when every receiver is dropped or the socket fails.
pub fn spawn(filter: Filter) -> Result<watch::Receiver<u64>, ConnError> {
    let mut w = DestroyWatch::open()?;
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                seen = w.next(&filter) => match seen {
                    Ok(Seen::Matched) => {
                        tx.send_modify(|g| *g = g.wrapping_add(1));
                    }
                    Ok(Seen::Ignored) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "socket destroy notifications failed; counting on the poll only");
                        return;
                    }
                },
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::inet::{InetResponse, SocketId};
    use proptest::prelude::*;

    fn filter(ports: &[u16]) -> Filter {
        Filter {
            ports: ports.to_vec(),
            address: Some("127.0.0.7".parse().unwrap()),
        }
    }

    /// One destroy notification as the kernel sends it.
    fn notification(addr: &str, port: u16) -> Vec<u8> {
        let mut id = SocketId::new_v4();
        id.source_port = port;
        id.source_address = addr.parse().unwrap();
        let header = InetResponseHeader {
            family: 2,
            state: 7,
            timer: None,
            socket_id: id,
            recv_queue: 0,
            send_queue: 0,
            uid: 0,
            inode: 0,
        };
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            SockDiagMessage::InetResponse(Box::new(InetResponse {
                header,
                nlas: Default::default(),
            }))
            .into(),
        );
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        out
    }

    #[test]
    fn only_app_sockets_on_the_address_match() {
        let f = filter(&[8080]);
        assert_eq!(
            classify(&notification("127.0.0.7", 8080), &f),
            Seen::Matched
        );
        assert_eq!(
            classify(&notification("127.0.0.7", 19901), &f),
            Seen::Ignored
        );
        assert_eq!(
            classify(&notification("127.0.0.8", 8080), &f),
            Seen::Ignored
        );
        // Several messages in one datagram: any match counts.
        let mut both = notification("127.0.0.7", 1);
        both.extend(notification("127.0.0.7", 8080));
        assert_eq!(classify(&both, &f), Seen::Matched);
        assert_eq!(classify(&[], &f), Seen::Ignored);
    }

    #[test]
    fn unreadable_datagrams_mean_count_again() {
        let f = filter(&[8080]);
        assert_eq!(classify(&[1, 2, 3], &f), Seen::Matched);
        let mut cut = notification("127.0.0.7", 1);
        cut.truncate(20);
        assert_eq!(classify(&cut, &f), Seen::Matched);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(512)))]
        /// Bytes from the kernel are outside input: never a panic or a hang.
        #[test]
        fn any_bytes_classify(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = classify(&data, &filter(&[8080]));
        }
    }
}
