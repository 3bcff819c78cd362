//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)`, one syscall per batch.
//!
//! A forwarder sends one packet to many different peers, which `sendmmsg` batches; and a frame's
//! several packets to each of them, which UDP GSO sends as one message per peer
//! ([`SendBatch`]). Buffers are allocated once per shard and reused.
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

/// Control buffer per datagram: room for an `SCM_TIMESTAMPNS` and an `IP_PKTINFO`
/// (CMSG_SPACE(16) + CMSG_SPACE(12) = 64 bytes on 64-bit Linux) with margin; `u64`s keep it
/// aligned for `cmsghdr`.
const CONTROL_WORDS: usize = 10;
type ControlBuf = [u64; CONTROL_WORDS];

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

/// Asks the kernel to tell, for every datagram `fd` receives, the local IPv4 address it was
/// sent to (`IP_PKTINFO`, see [`RecvBatch::destination`]): one wildcard-bound socket can then
/// serve many addresses, as the load tester's simulated participants share one.
pub fn enable_rx_destination(fd: RawFd) -> io::Result<()> {
    set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
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
            controls: vec![[0; CONTROL_WORDS]; BATCH],
            msgs: vec![unsafe { zeroed() }; BATCH],
            len: 0,
        };
        // The headers point into the vectors' heap buffers, which never move or grow (moving
        // the struct moves only the vectors' handles), so this is done once. Every pointer
        // derives from one `as_mut_ptr` per buffer (which takes no reference to the elements),
        // so none is invalidated by a later borrow of its vector.
        let (bufs, addrs) = (b.bufs.as_mut_ptr(), b.addrs.as_mut_ptr());
        let (iovecs, controls) = (b.iovecs.as_mut_ptr(), b.controls.as_mut_ptr());
        for (i, m) in b.msgs.iter_mut().enumerate() {
            // SAFETY: i < BATCH, the length of every vector here.
            unsafe {
                iovecs.add(i).write(libc::iovec {
                    iov_base: bufs.add(i).cast(),
                    iov_len: MAX_DATAGRAM,
                });
                m.msg_hdr.msg_name = addrs.add(i).cast();
                m.msg_hdr.msg_iov = iovecs.add(i);
                m.msg_hdr.msg_control = controls.add(i).cast();
            }
            m.msg_hdr.msg_iovlen = 1;
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
        let ts: libc::timespec = self.control(i, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS)?;
        Some(SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// The local IPv4 address datagram `i` of the last batch was sent to, if the socket reports
    /// it ([`enable_rx_destination`]).
    pub fn destination(&self, i: usize) -> Option<Ipv4Addr> {
        let info: libc::in_pktinfo = self.control(i, libc::IPPROTO_IP, libc::IP_PKTINFO)?;
        Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)))
    }

    /// The payload of datagram `i`'s control message `level`/`kind`, read as a `T`.
    fn control<T: Copy>(&self, i: usize, level: libc::c_int, kind: libc::c_int) -> Option<T> {
        if i >= self.len {
            return None;
        }
        let hdr = &self.msgs[i].msg_hdr;
        // SAFETY: the kernel filled msg_control up to msg_controllen with well-formed cmsgs in
        // our own buffer; the CMSG_* macros stay inside it, a payload is read (unaligned) only
        // when its cmsg is long enough for a `T`, and `T` is a plain C struct.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(hdr);
            while !c.is_null() {
                if (*c).cmsg_level == level
                    && (*c).cmsg_type == kind
                    && (*c).cmsg_len as usize >= libc::CMSG_LEN(size_of::<T>() as u32) as usize
                {
                    return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<T>()));
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

/// Most datagrams one GSO send carries (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send carries: a UDP datagram's limit (65,507 over IPv4) with
/// margin.
const MAX_GSO_BYTES: usize = 65_000;

/// Whether this kernel segments UDP for us (`UDP_SEGMENT`, Linux 4.18+): asks `fd`.
pub fn gso_supported(fd: RawFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which outlives the call.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0
}

/// A send the kernel refused: the error, and how many datagrams of the caller's list it was
/// for (one message: a single datagram, or one GSO run to one destination). The caller skips
/// those and sends the rest; on `WouldBlock` it waits for writability instead.
#[derive(Debug)]
pub struct SendError {
    pub error: io::Error,
    pub datagrams: usize,
}

/// Reusable buffers for sending datagrams with as few `sendmmsg(2)` calls as possible, and,
/// where the kernel can, with one message per run of datagrams to the same destination (UDP
/// GSO, `UDP_SEGMENT`).
///
/// Why GSO: on a forwarder most of a packet's cost is the kernel's per-datagram send path
/// (routing, socket buffer accounting, the IP output, and on loopback the delivery too). A
/// video frame is several packets of one size (the packetizer splits it evenly) to each
/// subscriber, and a keyframe tens: as one message the kernel walks that path once and
/// splits the payload at the end (or the NIC does). On loopback, a 21-packet keyframe to 60
/// subscribers takes 2.3-2.5x less time to send as 60 GSO messages than as 1,260 datagrams,
/// a 2-packet frame 1.4-1.6x (`cargo bench -p edge-node --bench send`, BENCHMARKS.md).
///
/// A run is consecutive datagrams with one destination and one size, the last of them possibly
/// shorter (the kernel cuts the payload every `size` bytes); callers put each destination's
/// datagrams side by side in the order they should arrive.
pub struct SendBatch {
    gso: bool,
    addrs: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    controls: Box<[ControlBuf]>,
    msgs: Box<[libc::mmsghdr]>,
    /// Datagrams and messages the kernel took since [`take_sent`](Self::take_sent).
    sent: (u64, u64),
}

// The raw pointers inside point only into the struct's own buffers and, during `send`, into
// the caller's datagrams; none outlives the call.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// Buffers for one `sendmmsg` of [`BATCH`] messages; with `gso`, each message may carry up
    /// to [`MAX_SEGMENTS`] datagrams (see [`gso_supported`]).
    pub fn new(gso: bool) -> Self {
        let segments = if gso { MAX_SEGMENTS } else { 1 };
        // SAFETY (the `zeroed` calls): plain C structs, for which all-zero is valid.
        Self {
            gso,
            addrs: vec![unsafe { zeroed() }; BATCH].into_boxed_slice(),
            iovecs: vec![unsafe { zeroed() }; BATCH * segments].into_boxed_slice(),
            controls: vec![[0; CONTROL_WORDS]; BATCH].into_boxed_slice(),
            msgs: vec![unsafe { zeroed() }; BATCH].into_boxed_slice(),
            sent: (0, 0),
        }
    }

    /// Datagrams and messages (a GSO message is several datagrams) the kernel took since the
    /// last call.
    pub fn take_sent(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.sent)
    }

    /// Whether runs go as single GSO messages (false when built without, or after the kernel
    /// refused segmentation on this socket's device).
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Sends `items` in order. Returns how many were sent, from the front; stops early at the
    /// first message the kernel does not take, which leads the next call, whose error then
    /// says what happened to it (see [`SendError`]).
    pub fn send(&mut self, fd: RawFd, items: &[(SocketAddr, &[u8])]) -> Result<usize, SendError> {
        let mut sent = 0;
        // Datagrams before this index go one per message: their GSO send was refused for its
        // size (a segment larger than the device's MTU), which alone they may still pass.
        let mut plain_until = 0;
        while sent < items.len() {
            // Each message's datagrams, destination and length first; then the headers, with
            // pointers all derived from one `as_mut_ptr` per buffer taken after the last write
            // through an index (a later index borrow would invalidate earlier pointers).
            let mut runs = [0usize; BATCH];
            let mut namelens = [0 as libc::socklen_t; BATCH];
            let (mut msgs, mut iovs, mut next) = (0, 0, sent);
            while msgs < BATCH && next < items.len() {
                let run = if self.gso && next >= plain_until {
                    gso_run(&items[next..])
                } else {
                    1
                };
                for (k, (_, data)) in items[next..next + run].iter().enumerate() {
                    self.iovecs[iovs + k] = libc::iovec {
                        iov_base: data.as_ptr() as *mut _,
                        iov_len: data.len(),
                    };
                }
                namelens[msgs] = to_storage(&items[next].0, &mut self.addrs[msgs]);
                runs[msgs] = run;
                msgs += 1;
                iovs += run;
                next += run;
            }
            let (addrs, iovecs) = (self.addrs.as_mut_ptr(), self.iovecs.as_mut_ptr());
            let controls = self.controls.as_mut_ptr();
            let mut iov = 0;
            for (m, (msg, &run)) in self.msgs[..msgs].iter_mut().zip(&runs).enumerate() {
                let hdr = &mut msg.msg_hdr;
                // SAFETY: m < msgs <= BATCH, the length of `addrs` and `controls`, and
                // iov + run <= iovs, within `iovecs` (as filled above).
                unsafe {
                    hdr.msg_name = addrs.add(m).cast();
                    hdr.msg_iov = iovecs.add(iov);
                }
                hdr.msg_namelen = namelens[m];
                hdr.msg_iovlen = run as _;
                if run > 1 {
                    // SAFETY: CMSG_SPACE(2) (24) fits the 64-byte control buffer `msg_control`
                    // points at; the header and its u16 are written inside it. The segment
                    // size is the message's first datagram's length.
                    unsafe {
                        hdr.msg_control = controls.add(m).cast();
                        hdr.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                        let c = libc::CMSG_FIRSTHDR(hdr);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                        std::ptr::write_unaligned(
                            libc::CMSG_DATA(c).cast::<u16>(),
                            (*iovecs.add(iov)).iov_len as u16,
                        );
                    }
                } else {
                    hdr.msg_control = std::ptr::null_mut();
                    hdr.msg_controllen = 0;
                }
                iov += run;
            }
            // SAFETY: the headers point at our buffers and the caller's data, both valid for
            // the call.
            match unsafe { send_mmsg(fd, &mut self.msgs[..msgs]) } {
                Ok(n) => {
                    let datagrams = runs[..n].iter().sum::<usize>();
                    sent += datagrams;
                    self.sent.0 += datagrams as u64;
                    self.sent.1 += n as u64;
                    if n < msgs {
                        return Ok(sent);
                    }
                }
                Err(e) if runs[0] > 1 && refused_segmentation(&e) => {
                    if e.raw_os_error() == Some(libc::EIO) {
                        // The device cannot checksum segments (as quinn does, stop asking).
                        tracing::warn!(error = %e, "UDP GSO refused by the device: sending datagrams one by one from now on");
                        self.gso = false;
                    } else {
                        plain_until = sent + runs[0];
                    }
                }
                // Report what went before the failing message; it then leads the caller's
                // next call, which reports its error.
                Err(_) if sent > 0 => return Ok(sent),
                Err(error) => {
                    return Err(SendError {
                        error,
                        datagrams: runs[0],
                    })
                }
            }
        }
        Ok(sent)
    }
}

/// How many datagrams from the front of `items` one GSO message can carry: same destination,
/// same size, the last possibly shorter, within the kernel's limits.
fn gso_run(items: &[(SocketAddr, &[u8])]) -> usize {
    let (to, first) = items[0];
    let size = first.len();
    if size == 0 || size > usize::from(u16::MAX) {
        return 1;
    }
    let (mut n, mut total) = (1, size);
    while n < items.len().min(MAX_SEGMENTS) {
        let (next_to, data) = items[n];
        if next_to != to
            || data.len() > size
            || data.is_empty()
            || total + data.len() > MAX_GSO_BYTES
        {
            break;
        }
        total += data.len();
        n += 1;
        if data.len() < size {
            break;
        }
    }
    n
}

/// Whether a GSO send failed for the segmentation itself (the device cannot, or a segment
/// does not fit its MTU) rather than for its destination.
fn refused_segmentation(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)
    )
}

/// Sends datagrams one per message with as few `sendmmsg` calls as possible. Returns how many
/// were sent, from the front; stops early at the first datagram the kernel does not take. An
/// error means the first datagram was not sent: on `WouldBlock` the caller waits for
/// writability and calls again; any other error (EPERM from a firewall drop, ECONNREFUSED)
/// belongs to that one datagram, which the caller skips before sending the rest.
pub fn send_batch(fd: RawFd, items: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    thread_local! {
        static PLAIN: std::cell::RefCell<SendBatch> = std::cell::RefCell::new(SendBatch::new(false));
    }
    PLAIN.with(|b| b.borrow_mut().send(fd, items).map_err(|e| e.error))
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
pub(crate) mod tests {
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
    fn each_datagram_names_the_local_address_it_was_sent_to_when_asked() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let port = b.local_addr().unwrap().port();
        let mut batch = RecvBatch::new();

        a.send_to(b"untold", ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.destination(0), None);

        // With both control messages on, each is found whatever the other.
        enable_rx_destination(b.as_raw_fd()).unwrap();
        enable_rx_timestamps(b.as_raw_fd()).unwrap();
        let to: Vec<Ipv4Addr> = (1..=3).map(|n| Ipv4Addr::new(127, 100, 0, n)).collect();
        for ip in &to {
            a.send_to(&ip.octets(), (*ip, port)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap(), 3);
        for (i, ip) in to.iter().enumerate() {
            assert_eq!(batch.get(i).unwrap().1, ip.octets(), "datagram {i}");
            assert_eq!(batch.destination(i), Some(*ip), "datagram {i}");
            assert!(batch.arrival(i).is_some(), "datagram {i} is stamped too");
        }
        assert_eq!(batch.destination(3), None, "past the batch");
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

    /// A socket that takes a GSO message whole (`UDP_GRO`): one read per message sent, with
    /// its segment size, so a test sees how the datagrams were grouped.
    pub(crate) fn coalescing_receiver() -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_int_option(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Every message waiting on `s` (a [`coalescing_receiver`]): its bytes and segment size
    /// (the whole length when it came as one plain datagram).
    pub(crate) fn messages(s: &std::net::UdpSocket, want: usize) -> Vec<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut control = [0u64; 8];
        while out.len() < want {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_iov = &mut iov;
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = size_of::<[u64; 8]>() as _;
            // SAFETY: the header points at buffers that outlive the call.
            let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut hdr, 0) };
            assert!(n >= 0, "{}", io::Error::last_os_error());
            let mut segment = n as usize;
            // SAFETY: the kernel wrote well-formed cmsgs into our control buffer.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        segment =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u16>()) as usize;
                    }
                    c = libc::CMSG_NXTHDR(&hdr, c);
                }
            }
            out.push((buf[..n as usize].to_vec(), segment));
        }
        out
    }

    fn payloads(sizes: &[usize], tag: u8) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![tag.wrapping_add(i as u8); n])
            .collect()
    }

    #[test]
    fn runs_to_one_destination_go_as_one_gso_message_each_and_arrive_whole_in_order() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(gso_supported(tx.as_raw_fd()), "this kernel segments UDP");
        let (b, c) = (coalescing_receiver(), coalescing_receiver());
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        // A frame of five equal packets and a shorter last one; two to c; one more to b, of
        // another size; then 70 equal ones to c, more than one message may carry.
        let frame = payloads(&[1000, 1000, 1000, 1000, 1000, 300], 1);
        let two = payloads(&[800, 800], 50);
        let single = payloads(&[1200], 90);
        let many = payloads(&[100; 70], 100);
        let mut items: Vec<(SocketAddr, &[u8])> = Vec::new();
        items.extend(frame.iter().map(|p| (to_b, p.as_slice())));
        items.extend(two.iter().map(|p| (to_c, p.as_slice())));
        items.extend(single.iter().map(|p| (to_b, p.as_slice())));
        items.extend(many.iter().map(|p| (to_c, p.as_slice())));
        let mut sender = SendBatch::new(true);
        assert_eq!(sender.send(tx.as_raw_fd(), &items).unwrap(), items.len());
        assert_eq!(sender.take_sent(), (79, 5));
        assert_eq!(sender.take_sent(), (0, 0));

        let at_b = messages(&b, 2);
        assert_eq!(at_b[0], (frame.concat(), 1000), "the frame is one message");
        assert_eq!(at_b[1], (single.concat(), 1200));
        let at_c = messages(&c, 3);
        assert_eq!(at_c[0], (two.concat(), 800));
        assert_eq!(
            at_c[1],
            (many[..MAX_SEGMENTS].concat(), 100),
            "at most 64 per message"
        );
        assert_eq!(at_c[2], (many[MAX_SEGMENTS..].concat(), 100));

        // Without GSO the same list is 79 datagrams.
        let mut plain = SendBatch::new(false);
        assert_eq!(plain.send(tx.as_raw_fd(), &items).unwrap(), items.len());
        let at_b = messages(&b, 7);
        let want: Vec<(Vec<u8>, usize)> = frame
            .iter()
            .chain(&single)
            .map(|p| (p.clone(), p.len()))
            .collect();
        assert_eq!(at_b, want);
    }

    #[test]
    fn a_run_to_a_refused_destination_is_skipped_whole_and_the_rest_still_go() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = coalescing_receiver();
        let to_b = b.local_addr().unwrap();
        // An IPv6 destination on an IPv4 socket: the kernel refuses it (EAFNOSUPPORT).
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        let before = payloads(&[500, 500], 1);
        let refused = payloads(&[700; 3], 10);
        let after = payloads(&[600, 600, 600], 20);
        let mut items: Vec<(SocketAddr, &[u8])> = Vec::new();
        items.extend(before.iter().map(|p| (to_b, p.as_slice())));
        items.extend(refused.iter().map(|p| (bad, p.as_slice())));
        items.extend(after.iter().map(|p| (to_b, p.as_slice())));
        let mut sender = SendBatch::new(true);
        let mut next = 0;
        let mut skipped = Vec::new();
        while next < items.len() {
            match sender.send(tx.as_raw_fd(), &items[next..]) {
                Ok(n) => next += n,
                Err(e) => {
                    skipped.push((next, e.datagrams));
                    next += e.datagrams;
                }
            }
        }
        assert_eq!(skipped, vec![(2, 3)], "the bad destination's run, once");
        assert!(sender.gso());
        assert_eq!(
            messages(&b, 2),
            vec![(before.concat(), 500), (after.concat(), 600)]
        );
    }

    #[test]
    fn a_run_the_kernel_will_not_segment_goes_datagram_by_datagram() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Without UDP checksums the kernel refuses every GSO send (EINVAL), as it does for a
        // segment over the device's MTU; plain datagrams still go.
        set_int_option(tx.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        let b = coalescing_receiver();
        let to_b = b.local_addr().unwrap();
        let frame = payloads(&[900, 900, 900, 400], 1);
        let items: Vec<(SocketAddr, &[u8])> = frame.iter().map(|p| (to_b, p.as_slice())).collect();
        let mut sender = SendBatch::new(true);
        assert_eq!(sender.send(tx.as_raw_fd(), &items).unwrap(), 4);
        let want: Vec<(Vec<u8>, usize)> = frame.iter().map(|p| (p.clone(), p.len())).collect();
        assert_eq!(messages(&b, 4), want, "one datagram each, in order");
        assert!(sender.gso(), "only that run went without");
    }

    #[test]
    fn gso_runs_break_at_a_new_destination_a_larger_datagram_or_after_a_shorter_one() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let run = |list: &[(SocketAddr, usize)]| {
            let bufs: Vec<Vec<u8>> = list.iter().map(|&(_, n)| vec![0; n]).collect();
            let items: Vec<(SocketAddr, &[u8])> = list
                .iter()
                .zip(&bufs)
                .map(|(&(to, _), d)| (to, d.as_slice()))
                .collect();
            gso_run(&items)
        };
        assert_eq!(run(&[(a, 100), (a, 100), (b, 100)]), 2);
        assert_eq!(run(&[(a, 100), (a, 100), (a, 101)]), 2, "larger");
        assert_eq!(
            run(&[(a, 100), (a, 50), (a, 50)]),
            2,
            "a shorter one ends it"
        );
        assert_eq!(run(&[(a, 0), (a, 0)]), 1, "empty");
        assert_eq!(run(&[(a, 100); 100]), MAX_SEGMENTS);
        assert_eq!(run(&[(a, 1400); 60]), MAX_GSO_BYTES / 1400, "bytes");
    }

    #[test]
    fn ipv6_addresses_convert_both_ways() {
        let addr: SocketAddr = "[2001:db8::1]:4242".parse().unwrap();
        let mut s: libc::sockaddr_storage = unsafe { zeroed() };
        to_storage(&addr, &mut s);
        assert_eq!(from_storage(&s), Some(addr));
    }
}
