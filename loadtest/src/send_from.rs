//! Batched UDP sends, each datagram from its own source address: `sendmmsg(2)` with an
//! `IP_PKTINFO` control message per datagram.
//!
//! The run's shared sockets ([`crate::peer`]'s hub) are wildcard-bound and carry many peer
//! connections, each with its own loopback address; every datagram must leave from its peer's
//! address, which `IP_PKTINFO`'s `ipi_spec_dst` chooses (what quinn-udp does for one datagram
//! per `sendmsg`). Sending a receive burst's or a tick's RTCP for all the socket's peers in one
//! call saves a syscall per datagram; the kernel still routes and delivers each one.
//!
//! IPv4 only, as the hub is. Linux only, as the rest of the tool.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

/// Datagrams per `sendmmsg` call (the kernel's own cap is `UIO_MAXIOV`, 1024); larger batches
/// take several calls.
pub const SEND_BATCH: usize = 64;

/// One datagram to send: from `from` (a local address of the socket's host) to `to`.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    pub from: Ipv4Addr,
    pub to: SocketAddrV4,
    pub data: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// `None` for an IPv6 destination, which the IPv4 sockets this serves cannot reach.
    pub fn new(from: Ipv4Addr, to: SocketAddr, data: &'a [u8]) -> Option<Self> {
        match to {
            SocketAddr::V4(to) => Some(Self { from, to, data }),
            SocketAddr::V6(_) => None,
        }
    }
}

/// `CMSG_SPACE(sizeof(struct in_pktinfo))` is 32 on 64-bit Linux; `u64`s keep the buffer
/// aligned for `cmsghdr`.
type ControlBuf = [u64; 4];

/// Sends datagrams from the front of `items` with one `sendmmsg` (up to [`SEND_BATCH`] of them)
/// and returns how many the kernel took. An error means the first one was not sent: on
/// `WouldBlock` the socket buffer is full; any other error (EPERM from a firewall drop,
/// ECONNREFUSED after an ICMP unreachable) belongs to that one datagram.
pub fn send_from(fd: RawFd, items: &[Datagram<'_>]) -> io::Result<usize> {
    let chunk = &items[..items.len().min(SEND_BATCH)];
    if chunk.is_empty() {
        return Ok(0);
    }
    // SAFETY (all `zeroed` below): plain C structs for which all-zero is a valid value.
    let mut addrs: [libc::sockaddr_in; SEND_BATCH] = unsafe { zeroed() };
    let mut iovecs: [libc::iovec; SEND_BATCH] = unsafe { zeroed() };
    let mut controls: [ControlBuf; SEND_BATCH] = [[0; 4]; SEND_BATCH];
    let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { zeroed() };
    for (i, d) in chunk.iter().enumerate() {
        addrs[i] = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: d.to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(d.to.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        iovecs[i] = libc::iovec {
            iov_base: d.data.as_ptr() as *mut _,
            iov_len: d.data.len(),
        };
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
        hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        hdr.msg_iov = &mut iovecs[i];
        hdr.msg_iovlen = 1;
        hdr.msg_control = controls[i].as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as _;
        let pktinfo = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from_ne_bytes(d.from.octets()),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        // SAFETY: the control buffer holds CMSG_SPACE(in_pktinfo) bytes (asserted by the
        // compile-time check below), so the first header and its data are inside it; the data
        // is written unaligned.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(hdr);
            (*c).cmsg_level = libc::IPPROTO_IP;
            (*c).cmsg_type = libc::IP_PKTINFO;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), pktinfo);
        }
    }
    // SAFETY: the headers point at stack arrays and caller-owned data that outlive the call.
    unsafe { edge_node::udp::batch::send_mmsg(fd, &mut msgs[..chunk.len()]) }
}

const _: () = assert!(
    size_of::<ControlBuf>() >= 32,
    "room for one in_pktinfo cmsg"
);

/// Sends every datagram it can without waiting, with as few calls as possible: one the kernel
/// refuses is skipped, and a full socket buffer (`WouldBlock`) drops the rest, as a
/// non-blocking `send` per datagram would. `send` is [`send_from`], or it wrapped in the
/// runtime's readiness (`try_io`). Returns how many were sent.
///
/// A call that stops short of its batch hit an error on the datagram after the last it sent,
/// and `sendmmsg` does not say which: that datagram is skipped, not tried again, so a
/// firewall's drop (EPERM) stays a loss, as it is for a browser.
pub fn send_all_or_drop(
    items: &[Datagram<'_>],
    mut send: impl FnMut(&[Datagram<'_>]) -> io::Result<usize>,
) -> usize {
    let (mut next, mut sent) = (0, 0);
    while next < items.len() {
        let batch = (items.len() - next).min(SEND_BATCH);
        match send(&items[next..]) {
            Ok(0) => break,
            Ok(n) => {
                next += n;
                sent += n;
                if n < batch {
                    next += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => next += 1,
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A wildcard-bound socket sends a batch from three loopback addresses to two receivers:
    /// each datagram arrives intact, in order, from its own source address and the socket's
    /// port.
    #[test]
    fn each_datagram_leaves_from_its_own_address() {
        let tx = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = tx.local_addr().unwrap().port();
        let rx: Vec<std::net::UdpSocket> = (0..2)
            .map(|_| std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        let froms = [
            Ipv4Addr::new(127, 100, 0, 1),
            Ipv4Addr::new(127, 100, 0, 2),
            Ipv4Addr::new(127, 100, 1, 3),
        ];
        let payloads: Vec<Vec<u8>> = (0..70u8).map(|i| vec![i; 20 + usize::from(i)]).collect();
        let items: Vec<Datagram<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Datagram::new(froms[i % 3], rx[i % 2].local_addr().unwrap(), p).unwrap())
            .collect();
        // 70 datagrams: more than one call's worth.
        let sent = send_all_or_drop(&items, |rest| send_from(tx.as_raw_fd(), rest));
        assert_eq!(sent, items.len());
        let mut buf = [0u8; 256];
        for (i, p) in payloads.iter().enumerate() {
            let (n, from) = rx[i % 2].recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &p[..], "datagram {i}");
            assert_eq!(from, SocketAddr::from((froms[i % 3], port)), "datagram {i}");
        }
    }

    /// A refused datagram (a source address the host does not have) is skipped and the rest
    /// of the batch still goes.
    #[test]
    fn a_refused_datagram_does_not_stop_the_batch() {
        let tx = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let rx = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let to = rx.local_addr().unwrap();
        // 203.0.113.1 (a documentation address) is not one of this host's: EINVAL for it.
        let items = [
            Datagram::new(Ipv4Addr::new(127, 0, 0, 1), to, b"one").unwrap(),
            Datagram::new(Ipv4Addr::new(203, 0, 113, 1), to, b"refused").unwrap(),
            Datagram::new(Ipv4Addr::new(127, 0, 0, 2), to, b"three").unwrap(),
        ];
        let sent = send_all_or_drop(&items, |rest| send_from(tx.as_raw_fd(), rest));
        assert_eq!(sent, 2);
        let mut buf = [0u8; 64];
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"three");
        assert_eq!(from.ip(), std::net::IpAddr::from([127, 0, 0, 2]));
    }
}
