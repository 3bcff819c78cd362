//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)`, one syscall per batch.
//!
//! A forwarder sends one packet to many different peers, which GSO (same destination only) does
//! not batch; `sendmmsg` does. Buffers are allocated once per shard and reused.
//!
//! With [`enable_rx_timestamps`] on the socket, each received datagram carries the kernel's
//! arrival time (`SO_TIMESTAMPNS`), so the shard can measure how long a packet stayed in the
//! edge, socket queue included, which a timestamp taken after `recvmmsg` would miss.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::time::{Duration, SystemTime};

/// Datagrams read per `recvmmsg` call. 32 keeps the buffers (64 KiB) in L2.
pub const BATCH: usize = 32;
/// Largest datagram we accept; anything longer is truncated by the kernel and dropped by us.
pub const MAX_DATAGRAM: usize = 2048;

/// Control buffer per datagram: room for one `SCM_TIMESTAMPNS` (CMSG_SPACE(16) = 32 on 64-bit
/// Linux) with margin; `u64`s keep it aligned for `cmsghdr`.
type ControlBuf = [u64; 8];

/// Sets the int socket option `level`/`name` of `fd` to `value`.
pub fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a plain setsockopt with an int option that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to stamp every datagram `fd` receives with its arrival time (see
/// [`RecvBatch::arrival`]).
pub fn enable_rx_timestamps(fd: RawFd) -> io::Result<()> {
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// Sets the don't-fragment bit on everything `fd` sends over IPv4, without path MTU discovery
/// (`IP_PMTUDISC_PROBE`: the kernel never refuses a send for the path's MTU).
///
/// Why: for a datagram that may be fragmented the kernel hashes a fresh IP id per packet
/// (`__ip_select_ident`, ~3% of a busy shard); with DF it writes 0. Media packets are sized by
/// their senders to fit any path (browsers keep RTP near 1,200 bytes) and a fragmented SRTP
/// packet is mostly a lost one, so DF costs nothing; QUIC and browsers set it too.
pub fn set_dont_fragment(fd: RawFd) -> io::Result<()> {
    set_int_option(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_PROBE,
    )
}

/// Reusable receive buffers for one shard.
pub struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    controls: Vec<ControlBuf>,
    msgs: Vec<libc::mmsghdr>,
    len: usize,
}

// The raw pointers inside point only into the struct's own heap buffers.
unsafe impl Send for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        let mut b = Self {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs; all-zero is valid.
            addrs: vec![unsafe { zeroed() }; BATCH],
            iovecs: vec![unsafe { zeroed() }; BATCH],
            controls: vec![[0; 8]; BATCH],
            msgs: vec![unsafe { zeroed() }; BATCH],
            len: 0,
        };
        // The headers point into the vectors' heap buffers, which never move or grow (moving
        // the struct moves only the vectors' handles), so this is done once.
        for i in 0..BATCH {
            b.iovecs[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            b.msgs[i].msg_hdr.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            b.msgs[i].msg_hdr.msg_iov = &mut b.iovecs[i];
            b.msgs[i].msg_hdr.msg_iovlen = 1;
            b.msgs[i].msg_hdr.msg_control = b.controls[i].as_mut_ptr().cast();
        }
        b
    }

    /// Reads up to [`BATCH`] datagrams without blocking. `WouldBlock` when none is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // The kernel writes back the address and control lengths and the flags (and
        // `msg_len`); the rest of each header stays as `new` set it.
        for m in &mut self.msgs {
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_controllen = size_of::<ControlBuf>() as _;
            m.msg_hdr.msg_flags = 0;
        }
        // SAFETY: msgs points at BATCH initialised headers whose buffers outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.len = 0;
            return Err(io::Error::last_os_error());
        }
        self.len = n as usize;
        Ok(self.len)
    }

    /// Datagram `i` of the last batch: sender and bytes. `None` for truncated datagrams or
    /// addresses of other families.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let (addr, len) = self.datagram(i)?;
        Some((addr, &self.bufs[i][..len]))
    }

    /// As [`get`](Self::get), mutable: for decrypting a datagram where it was received.
    pub fn get_mut(&mut self, i: usize) -> Option<(SocketAddr, &mut [u8])> {
        let (addr, len) = self.datagram(i)?;
        Some((addr, &mut self.bufs[i][..len]))
    }

    /// When the kernel received datagram `i` of the last batch, if the socket stamps arrivals
    /// ([`enable_rx_timestamps`]).
    pub fn arrival(&self, i: usize) -> Option<SystemTime> {
        if i >= self.len {
            return None;
        }
        let hdr = &self.msgs[i].msg_hdr;
        // SAFETY: the kernel filled msg_control up to msg_controllen with well-formed cmsgs in
        // our own buffer; the CMSG_* macros stay inside it, and the payload is read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    return Some(
                        SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
                    );
                }
                c = libc::CMSG_NXTHDR(hdr, c);
            }
        }
        None
    }

    /// Sender and length of datagram `i`, if it is whole and from an address we read.
    fn datagram(&self, i: usize) -> Option<(SocketAddr, usize)> {
        if i >= self.len {
            return None;
        }
        let m = &self.msgs[i];
        if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        Some((from_storage(&self.addrs[i])?, m.msg_len as usize))
    }
}

/// Sends datagrams with as few `sendmmsg` calls as possible. Returns how many were sent, from
/// the front; stops early at the first datagram the kernel does not take. An error means the
/// first datagram was not sent: on `WouldBlock` the caller waits for writability and calls
/// again; any other error (EPERM from a firewall drop, ECONNREFUSED) belongs to that one
/// datagram, which the caller skips before sending the rest.
pub fn send_batch(fd: RawFd, items: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < items.len() {
        let chunk = &items[sent..(sent + BATCH).min(items.len())];
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovecs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (i, (to, data)) in chunk.iter().enumerate() {
            let len = to_storage(to, &mut addrs[i]);
            iovecs[i] = libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            };
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = len;
            msgs[i].msg_hdr.msg_iov = &mut iovecs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point at stack arrays and caller-owned data that outlive the call.
        let n = match unsafe { send_mmsg(fd, &mut msgs[..chunk.len()]) } {
            Ok(n) => n,
            // Report what went before the failing datagram; it then leads the caller's next
            // call, which reports its error.
            Err(_) if sent > 0 => return Ok(sent),
            Err(e) => return Err(e),
        };
        sent += n;
        if n < chunk.len() {
            return Ok(sent);
        }
    }
    Ok(sent)
}

/// One non-blocking `sendmmsg(2)` of `msgs`: how many datagrams the kernel took, or the error
/// of the first one.
///
/// # Safety
/// Every header's name, iovecs and control buffer must point at memory valid for the call.
pub unsafe fn send_mmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    // SAFETY: the caller vouches for the headers; the length is the slice's.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_storage(addr: &SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let out: &mut libc::sockaddr_in =
                unsafe { &mut *(s as *mut _ as *mut libc::sockaddr_in) };
            out.sin_family = libc::AF_INET as libc::sa_family_t;
            out.sin_port = a.port().to_be();
            out.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let out: &mut libc::sockaddr_in6 =
                unsafe { &mut *(s as *mut _ as *mut libc::sockaddr_in6) };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_refused_datagram_mid_batch_is_reported_alone_and_the_rest_still_go() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let to = b.local_addr().unwrap();
        // An IPv6 destination on an IPv4 socket: the kernel refuses that one datagram.
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        for at in [0usize, 5, 32, 39] {
            let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10]).collect();
            let items: Vec<(SocketAddr, &[u8])> = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| (if i == at { bad } else { to }, p.as_slice()))
                .collect();
            let mut next = 0;
            let mut refused = Vec::new();
            while next < items.len() {
                match send_batch(a.as_raw_fd(), &items[next..]) {
                    Ok(n) => next += n,
                    Err(_) => {
                        refused.push(next);
                        next += 1;
                    }
                }
            }
            assert_eq!(refused, vec![at], "only the bad datagram fails");
            let mut got = Vec::new();
            let mut batch = RecvBatch::new();
            while let Ok(n) = batch.recv(b.as_raw_fd()) {
                got.extend((0..n).map(|i| batch.get(i).unwrap().1[0]));
            }
            let want: Vec<u8> = (0..40u8).filter(|&i| i as usize != at).collect();
            assert_eq!(got, want, "each other datagram arrives once, in order");
        }
    }

    #[test]
    fn arrivals_are_stamped_by_the_kernel_only_when_asked() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let to = b.local_addr().unwrap();
        let mut batch = RecvBatch::new();

        a.send_to(b"unstamped", to).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.arrival(0), None);

        enable_rx_timestamps(b.as_raw_fd()).unwrap();
        // The kernel turns arrival stamping on with deferred work, so the first datagrams after
        // the first socket asks may be stamped when read instead; a few tries cover that.
        let mut queued_for = Duration::ZERO;
        for _ in 0..20 {
            let before = SystemTime::now();
            a.send_to(b"stamped", to).unwrap();
            // The datagram waits in the socket queue; its stamp is its arrival, not our read.
            std::thread::sleep(Duration::from_millis(30));
            let read_at = SystemTime::now();
            assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 1);
            assert_eq!(batch.get(0).unwrap().1, b"stamped");
            let arrived = batch.arrival(0).expect("stamped");
            assert!(
                arrived >= before - Duration::from_millis(1),
                "{arrived:?} vs {before:?}"
            );
            queued_for = read_at.duration_since(arrived).unwrap_or_default();
            if queued_for >= Duration::from_millis(25) {
                break;
            }
        }
        assert!(
            queued_for >= Duration::from_millis(25),
            "the stamp is when the kernel queued it, {queued_for:?} before the read"
        );
        assert_eq!(batch.arrival(1), None, "past the batch");
    }

    #[test]
    fn batch_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + i as usize]).collect();
        let items: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, p.as_slice())).collect();
        assert_eq!(send_batch(a.as_raw_fd(), &items).unwrap(), 40);
        let mut batch = RecvBatch::new();
        let mut got = Vec::new();
        for _ in 0..100 {
            match batch.recv(b.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (from, data) = batch.get(i).unwrap();
                        assert_eq!(from, a.local_addr().unwrap());
                        got.push(data.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got.len() == 40 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
    }

    #[test]
    fn ipv6_addresses_convert_both_ways() {
        let addr: SocketAddr = "[2001:db8::1]:4242".parse().unwrap();
        let mut s: libc::sockaddr_storage = unsafe { zeroed() };
        to_storage(&addr, &mut s);
        assert_eq!(from_storage(&s), Some(addr));
    }
}
