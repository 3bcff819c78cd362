//! One simulated peer connection: its UDP socket, ICE (controlling), DTLS client, SRTP and RTCP.
//!
//! The protocol pieces are the edge's own ([`edge_node::transport`]): Binding requests from
//! [`ice::binding_request`], the DTLS client [`dtls::connect`] over channels, [`SrtpSession`]
//! and the panic-free RTCP parser. This module is the thin async shell around them:
//!
//! - a 5-tuple per peer connection, as a browser has. Toward a server on loopback (the
//!   benchmarks) each peer gets its own loopback address (127.100.0.0/10 and up) on one of
//!   the run's shared sockets, the [`Hub`] (one socket per [`PEERS_PER_SOCKET`] peers):
//!   wildcard-bound sockets that learn each datagram's destination address (`IP_PKTINFO`)
//!   and send from the peer's address ([`crate::send_from`]). One
//!   `recvmmsg` then reads up to 32 datagrams for as many viewers, where a socket per peer
//!   costs an epoll wakeup and a syscall per datagram (half the tool's CPU). The destination
//!   address is the peer's number in its socket's table, so a datagram finds its peer without
//!   a lock or a hash; what a burst leaves to send for all of the socket's peers goes in one
//!   `sendmmsg`. The hub's sockets are read by reader threads of their own ([`HubReader`]),
//!   not by runtime tasks: under load a reader sweeps its sockets once a millisecond, as a
//!   NIC driver polls (NAPI), because an edge's copies arrive a few at a time and waking the
//!   runtime for each few cost the tool an `epoll_wait` per read, 15% of its CPU. While a burst's
//!   datagram is handled, the state of the next ones' viewers is prefetched
//!   ([`crate::prefetch`]): each is another viewer's, cold.
//!   Otherwise (another host, a relay in the path, Janus in its namespace) each peer binds its
//!   own socket on the given address;
//! - a receive task per peer with its own socket, a reader per share of the hub's sockets (not
//!   per packet): woken once per burst, it reads every queued datagram with one `recvmmsg`
//!   (the edge's [`RecvBatch`], one per thread, so a thousand peers do not hold a thousand
//!   64 KiB buffers), classifies each (RFC 7983), feeds
//!   DTLS, decrypts SRTP where the datagram was received (no copy, no allocation), runs the
//!   [`Receiver`] (subscriber) or handles NACK/PLI/FIR (publisher), and sends the NACKs, PLIs
//!   and retransmissions that result once per burst. A read shorter than the batch means the
//!   socket was drained, so the task goes back to waiting without the extra `recvmmsg` that
//!   would return `EAGAIN` (a syscall per packet saved: viewers mostly get one packet per
//!   wakeup);
//! - each datagram is timed by the kernel's arrival stamp (`SO_TIMESTAMPNS`), not by when
//!   the tool reads it: delay, jitter and transport-wide feedback are then the server's and
//!   the network's even while the tool is busy, and the wait between the two is the tool's
//!   own receive lag, reported beside its send lag (`Arrival`);
//! - no timer per peer: one [`Ticker`] per run drives every peer's periodic work (TWCC
//!   feedback, receiver reports, ICE consent every [`CONSENT_INTERVAL`] as browsers do,
//!   RFC 7675, and flushing measurements), a tenth of the peers every 10 ms so their RTCP is
//!   spread over time as independent browsers' is, not sent in one burst. Transport-wide
//!   feedback and receiver reports come from the tick only (a browser sends them on a timer
//!   too), and a tick's RTCP for the peers of one hub socket leaves with one `sendmmsg`;
//! - publishers encrypt into a per-thread arena (one allocation per 64 KiB of packets) and
//!   send each wakeup's packets with one `sendmmsg` ([`Peer::send_rtp_batch`]), on a hub
//!   socket too.
//!
//! State shared by these tasks and the participant's media task sits behind one short
//! `std::sync::Mutex` per peer, never held across an `.await`.

use crate::media::{read_rtp, unix_micros};
use crate::prefetch::{prefetch_line, Hints};
use crate::recv::{Receiver, RtcpPackets};
use crate::sdp::RemoteDescription;
use crate::send_from::{send_all_or_drop, send_from, Datagram, SEND_BATCH};
use crate::stats::{Pending, Shared};
use bytes::{Bytes, BytesMut};
use edge_node::transport::demux::{classify, rtp_ssrc, PacketClass};
use edge_node::transport::dtls::{self, DtlsCertificate, DtlsSession, Fingerprint};
use edge_node::transport::ice;
use edge_node::transport::srtp::SrtpSession;
use edge_node::udp::batch::{
    enable_rx_destination, enable_rx_timestamps, send_batch, RecvBatch, BATCH,
};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// Browsers send a consent check every 5 s or so (RFC 7675 §5.1 says 4-6 s, randomized).
const CONSENT_INTERVAL: Duration = Duration::from_secs(5);
/// ICE: retransmit the Binding request this often until answered.
const ICE_RETRY: Duration = Duration::from_millis(100);
/// Packets a publisher keeps for answering NACKs: 1 s of the top layer and some.
const HISTORY: usize = 1024;

/// Peers are ticked in this many groups, one group per tick of [`Ticker`].
const TICK_GROUPS: usize = 10;
/// Each arena allocation of encrypted media holds about 50 full-size packets.
const TX_ARENA: usize = 64 * 1024;

thread_local! {
    /// Receive buffers of this runtime thread, shared by its peers: each use is synchronous
    /// (no `.await` while borrowed).
    static RECV_BATCH: RefCell<RecvBatch> = RefCell::new(RecvBatch::new());
    /// Where this thread's publishers encrypt media and its peers their RTCP: packets are
    /// split off as `Bytes` (sent, and media kept in the NACK history) without an allocation
    /// each.
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(TX_ARENA));
}

/// Peers per shared socket. All of a socket's peers share its receive buffer: at the 8 MiB we
/// ask for (`rmem_max` permitting) that is still ~0.5 s of 128 viewers' top layer, far more
/// than a reader's millisecond between sweeps, while each read takes a burst for many viewers
/// (13 datagrams a read at 400 viewers, against 3 with a socket per 32).
const PEERS_PER_SOCKET: u32 = 128;

/// Once its sockets are busy, a hub reader sweeps them this often (see [`HubReader`]).
const SWEEP_PERIOD: Duration = Duration::from_millis(1);

/// Datagrams per [`SWEEP_PERIOD`] at which a reader's sockets count as busy: at this rate or
/// more it waits out the rest of the period after a sweep instead of waiting for the next
/// datagram.
const BUSY_SWEEP: u128 = 4;

/// The run's shared loopback sockets (see the module docs). Dropping it stops their readers.
pub struct Hub {
    sockets: Mutex<Vec<Arc<HubInner>>>,
    next_ip: AtomicU32,
    readers: Vec<HubReader>,
}

struct HubInner {
    /// In no epoll set: arrivals would wake the runtime, and a socket in one has a waiter that
    /// every datagram delivered to it, and every one it sent, calls back (a lock taken in the
    /// edge's sends). The hub's reader thread reads it
    /// ([`HubReader`]); sends that find its buffer full wait with [`send_waiting`].
    socket: std::net::UdpSocket,
    state: quinn_udp::UdpSocketState,
    port: u16,
    /// The number ([`Hub::assign`]) of the socket's first peer; peer `n` is in slot
    /// `n - first`. Numbers are handed out once and in order, so a slot is set once and its
    /// datagrams find their peer without a lock or a hash.
    first: u32,
    peers: Vec<Slot>,
}

/// A peer's place in its hub socket's table.
#[derive(Default)]
struct Slot {
    peer: OnceLock<Weak<Peer>>,
    /// Where the peer's next packet will read, for the prefetch one datagram ahead.
    hints: Hints,
}

/// Peer numbers wrap past this (22 bits: 127.100.0.0 to 127.163.255.255).
const NUMBER_MASK: u32 = 0x3f_ffff;

/// The loopback address of peer number `n`.
fn hub_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 100 + ((n >> 16) & 0x3f) as u8, (n >> 8) as u8, n as u8)
}

/// The peer number of a hub address, the inverse of [`hub_ip`] (modulo [`NUMBER_MASK`]).
fn hub_number(ip: Ipv4Addr) -> Option<u32> {
    match ip.octets() {
        [127, b, c, d] if (100..164).contains(&b) => {
            Some(u32::from(b - 100) << 16 | u32::from(c) << 8 | u32::from(d))
        }
        _ => None,
    }
}

/// When a datagram arrived: the kernel's stamp (`SO_TIMESTAMPNS`) in both clocks the receiver
/// uses, and how long the datagram then waited in its socket for the tool to read it.
///
/// Why the kernel's time: one-way delay, jitter and the transport-wide feedback's arrival
/// times are the network's and the server's, and must not grow when the tool itself is busy
/// (a keyframe's burst to a thousand viewers takes the tool milliseconds to read too). The
/// wait is the tool's own receive lag, reported beside its send lag.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    at: Instant,
    unix_us: u64,
    read_lag_us: u32,
}

impl Arrival {
    /// Datagram `i` of a batch read at `read_at` (`read_us` on the unix clock); the read
    /// time when the datagram carries no stamp.
    fn of(batch: &RecvBatch, i: usize, read_at: Instant, read_us: u64) -> Arrival {
        let stamped = batch
            .arrival(i)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_micros() as u64);
        let Some(unix_us) = stamped.filter(|&us| us <= read_us) else {
            return Arrival::read_at(read_at, read_us);
        };
        let lag = read_us - unix_us;
        Arrival {
            at: read_at
                .checked_sub(Duration::from_micros(lag))
                .unwrap_or(read_at),
            unix_us,
            read_lag_us: lag.min(u64::from(u32::MAX)) as u32,
        }
    }

    fn read_at(at: Instant, unix_us: u64) -> Arrival {
        Arrival {
            at,
            unix_us,
            read_lag_us: 0,
        }
    }
}

/// Encrypted datagrams of a hub's peers waiting for one batched send: (from, to, datagram).
type HubSends = Vec<(Ipv4Addr, SocketAddr, Bytes)>;

impl Hub {
    /// An empty hub: sockets are bound as peers arrive and shared out among `readers` reader
    /// threads (at least one; as many as the runtime has workers spreads the receive work as
    /// the tasks it replaces were). Fails when the wildcard address cannot be bound.
    pub fn start(readers: usize) -> io::Result<Arc<Hub>> {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let readers = (0..readers.max(1))
            .map(HubReader::spawn)
            .collect::<io::Result<_>>()?;
        Ok(Arc::new(Hub {
            sockets: Mutex::new(Vec::new()),
            next_ip: AtomicU32::new(1),
            readers,
        }))
    }

    /// Binds one wildcard socket for peers `first..first + PEERS_PER_SOCKET`.
    fn open_socket(first: u32) -> io::Result<Arc<HubInner>> {
        let std_socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        std_socket.set_nonblocking(true)?;
        let state = quinn_udp::UdpSocketState::new((&std_socket).into())?;
        let _ = state.set_recv_buffer_size((&std_socket).into(), 8 << 20);
        // quinn-udp asks for each datagram's TOS byte (ECN); nothing here reads it, and the
        // control message costs the kernel a `put_cmsg` per datagram.
        let _ = edge_node::udp::batch::set_int_option(
            std_socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVTOS,
            0,
        );
        // quinn-udp also turns GRO on, which hands a GSO message from the edge over whole,
        // larger than a receive buffer here; a browser takes it one datagram at a time too.
        let _ = edge_node::udp::batch::set_int_option(
            std_socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            0,
        );
        // Each datagram's destination (the peer it is for) and its kernel arrival time, read
        // with the edge's `RecvBatch` (see `Arrival`).
        enable_rx_destination(std_socket.as_raw_fd())?;
        enable_rx_timestamps(std_socket.as_raw_fd())?;
        let port = std_socket.local_addr()?.port();
        Ok(Arc::new(HubInner {
            socket: std_socket,
            state,
            port,
            first,
            peers: (0..PEERS_PER_SOCKET).map(|_| Slot::default()).collect(),
        }))
    }

    /// A fresh loopback address for a peer, on the socket whose turn it is.
    fn assign(&self) -> io::Result<(Arc<HubInner>, Ipv4Addr)> {
        let n = self.next_ip.fetch_add(1, Ordering::Relaxed);
        let ip = hub_ip(n);
        let shard = ((n - 1) / PEERS_PER_SOCKET) as usize;
        let mut sockets = self.sockets.lock().expect("hub lock");
        while sockets.len() <= shard {
            let first = sockets.len() as u32 * PEERS_PER_SOCKET + 1;
            let socket = Self::open_socket(first)?;
            self.readers[sockets.len() % self.readers.len()].add(socket.clone());
            sockets.push(socket);
        }
        Ok((sockets[shard].clone(), ip))
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.shared.stop.store(true, Ordering::Release);
            reader.wake();
        }
        for reader in &mut self.readers {
            if let Some(thread) = reader.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// A thread that reads a share of the hub's sockets, the way a NIC driver polls under load
/// (NAPI): while datagrams trickle in it waits for the next one (`poll(2)` on its sockets), but
/// once datagrams come at [`BUSY_SWEEP`] a period or more it sweeps them once per
/// [`SWEEP_PERIOD`] and sleeps in between. Under load the edge's copies arrive a few at a time
/// (one subscriber's at a time), and waking for each few costs the tool an `epoll_wait` and a
/// task wakeup per read; a sweep a millisecond reads them in full batches. The wait changes no
/// figure: each datagram is timed by its kernel arrival stamp, and the wait shows as the tool's
/// receive lag (about a millisecond). Its sockets are in no epoll set, or every arrival would
/// still wake the runtime.
struct HubReader {
    shared: Arc<ReaderShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct ReaderShared {
    sockets: Mutex<Vec<Arc<HubInner>>>,
    /// How many sockets `sockets` holds, read without the lock once a sweep.
    count: AtomicU32,
    stop: AtomicBool,
    /// A datagram here ends the reader's wait at once: a new socket's first datagrams (its
    /// peers' ICE answers, timed as join time) must not wait out the poll's timeout, nor the
    /// stop.
    wake: std::os::unix::net::UnixDatagram,
}

impl HubReader {
    fn spawn(n: usize) -> io::Result<HubReader> {
        let (wake, woken) = std::os::unix::net::UnixDatagram::pair()?;
        wake.set_nonblocking(true)?;
        woken.set_nonblocking(true)?;
        let shared = Arc::new(ReaderShared {
            sockets: Mutex::default(),
            count: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            wake,
        });
        let thread = std::thread::Builder::new()
            .name(format!("hub-reader-{n}"))
            .spawn({
                let shared = shared.clone();
                move || Self::run(&shared, &woken)
            })?;
        Ok(HubReader {
            shared,
            thread: Some(thread),
        })
    }

    fn add(&self, socket: Arc<HubInner>) {
        let mut sockets = self.shared.sockets.lock().expect("hub reader lock");
        sockets.push(socket);
        self.shared
            .count
            .store(sockets.len() as u32, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        // A full wake queue already holds a wake-up.
        let _ = self.shared.wake.send(&[1]);
    }

    fn run(shared: &ReaderShared, woken: &std::os::unix::net::UnixDatagram) {
        let mut sockets: Vec<Arc<HubInner>> = Vec::new();
        let waker = libc::pollfd {
            fd: woken.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut polls = vec![waker];
        let mut batch = RecvBatch::new();
        let mut out = Outgoing::default();
        let mut sends = HubSends::new();
        let mut last_sweep = Instant::now();
        loop {
            // Wake-ups first: one sent after this is still queued for the poll below.
            while woken.recv(&mut [0u8; 8]).is_ok() {}
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if shared.count.load(Ordering::Acquire) as usize != sockets.len() {
                sockets = shared.sockets.lock().expect("hub reader lock").clone();
                polls = std::iter::once(waker)
                    .chain(sockets.iter().map(|s| libc::pollfd {
                        fd: s.socket.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    }))
                    .collect();
            }
            let sweep = Instant::now();
            let mut read = 0;
            for hub in &sockets {
                read += hub.drain(&mut batch, &mut out, &mut sends);
            }
            let since = sweep.duration_since(last_sweep);
            last_sweep = sweep;
            if busy(read, since) {
                std::thread::sleep(SWEEP_PERIOD.saturating_sub(sweep.elapsed()));
            } else {
                // Until a datagram arrives, a socket is added or the hub stops.
                // SAFETY: `polls` is a live array of pollfds of its stated length.
                unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
            }
        }
    }
}

/// Runs a send on a hub socket until its buffer takes it. Hub sockets are in no epoll set
/// (see [`HubInner::socket`]), so a full buffer is tried again each millisecond; toward a
/// server on loopback it does not fill, as the kernel delivers each datagram within the call.
async fn send_waiting<R>(mut send: impl FnMut() -> io::Result<R>) -> io::Result<R> {
    loop {
        match send() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(SWEEP_PERIOD).await;
            }
            sent => return sent,
        }
    }
}

/// Whether `read` datagrams in a sweep `since` the last one are [`BUSY_SWEEP`] a period or
/// more. The rate, not the count: woken by one datagram of many, a sweep reads few.
fn busy(read: usize, since: Duration) -> bool {
    read > 0 && read as u128 * SWEEP_PERIOD.as_nanos() >= BUSY_SWEEP * since.as_nanos()
}

impl HubInner {
    /// Reads the socket until it is drained, handing each datagram to its peer, and sends
    /// what that leaves to send for all of its peers. Returns the datagrams read.
    fn drain(&self, batch: &mut RecvBatch, out: &mut Outgoing, sends: &mut HubSends) -> usize {
        let mut total = 0;
        loop {
            let got = match batch.recv(self.socket.as_raw_fd()) {
                Ok(got) => got,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::debug!(error = %e, "hub socket read failed");
                    }
                    0
                }
            };
            self.handle_burst(batch, got, out, sends);
            // The burst's RTCP and retransmissions for all of the socket's peers: one call.
            self.send_queued(sends);
            total += got;
            // A short batch drained the socket: no extra read to learn `EAGAIN`.
            if got < BATCH {
                return total;
            }
        }
    }

    /// Hands the batch's first `got` datagrams to their peers; what that leaves to send is
    /// queued on `sends`.
    fn handle_burst(
        &self,
        batch: &mut RecvBatch,
        got: usize,
        out: &mut Outgoing,
        sends: &mut HubSends,
    ) {
        if got == 0 {
            return;
        }
        let (now, now_us) = (Instant::now(), unix_micros());
        let slot = |batch: &RecvBatch, i: usize| {
            let ip = batch.destination(i)?;
            self.slot(IpAddr::V4(ip))
        };
        let stream_ahead = |batch: &RecvBatch, i: usize| {
            if let (Some(slot), Some((_, datagram))) = (slot(batch, i), batch.get(i)) {
                if let Some(ssrc) = rtp_ssrc(datagram) {
                    slot.hints.prefetch_stream(ssrc);
                }
            }
        };
        let peer_ahead = |batch: &RecvBatch, i: usize| {
            if let Some(slot) = slot(batch, i) {
                if let Some(peer) = slot.peer.get() {
                    // The reference counts sit just before the peer in its allocation.
                    prefetch_line((peer.as_ptr() as usize).saturating_sub(16));
                }
                slot.hints.prefetch_fixed();
            }
        };
        peer_ahead(batch, 0);
        peer_ahead(batch, 1);
        stream_ahead(batch, 0);
        let mut lag_recorded = false;
        for i in 0..got {
            // What the next datagrams need loads while this one is handled.
            peer_ahead(batch, i + 2);
            stream_ahead(batch, i + 1);
            let Some(peer) = batch
                .destination(i)
                .and_then(|ip| self.peer(IpAddr::V4(ip)))
            else {
                continue;
            };
            let arrival = Arrival::of(batch, i, now, now_us);
            let Some((from, data)) = batch.get_mut(i) else {
                continue;
            };
            // The read's lag is its oldest datagram's wait: one sample per read.
            if !lag_recorded {
                peer.record_read_lag(arrival.read_lag_us);
                lag_recorded = true;
            }
            peer.handle_datagram(data, from, arrival, out);
            peer.queue_outgoing(out, sends);
        }
    }

    /// The peer's place in the receive table.
    fn register(&self, ip: Ipv4Addr, peer: &Arc<Peer>) {
        if let Some(slot) = self.slot(IpAddr::V4(ip)) {
            let _ = slot.peer.set(Arc::downgrade(peer));
        }
    }

    /// The table slot of the peer at `ip`.
    fn slot(&self, ip: IpAddr) -> Option<&Slot> {
        let IpAddr::V4(ip) = ip else { return None };
        let slot = (hub_number(ip)?.wrapping_sub(self.first) & NUMBER_MASK) as usize;
        self.peers.get(slot)
    }

    /// The live peer a datagram to `ip` is for.
    fn peer(&self, ip: IpAddr) -> Option<Arc<Peer>> {
        self.slot(ip)?.peer.get()?.upgrade()
    }

    /// Sends the queued datagrams with as few `sendmmsg` calls as possible, each from its
    /// peer's address, without waiting: what the socket buffer has no room for is dropped, as
    /// RTCP over UDP may be (see [`Peer::send_rtcp`]).
    fn send_queued(&self, sends: &mut HubSends) {
        if sends.is_empty() {
            return;
        }
        let items: Vec<Datagram<'_>> = sends
            .iter()
            .filter_map(|(from, to, data)| Datagram::new(*from, *to, data))
            .collect();
        let fd = self.socket.as_raw_fd();
        send_all_or_drop(&items, |rest| send_from(fd, rest));
        sends.clear();
    }
}

/// Where a peer's datagrams come in and go out.
enum Endpoint {
    /// Its own socket.
    Own(Arc<UdpSocket>),
    /// Its own loopback address on the run's [`Hub`].
    Shared { hub: Arc<HubInner>, ip: Ipv4Addr },
}

impl Endpoint {
    fn local_addr(&self) -> SocketAddr {
        match self {
            Endpoint::Own(s) => s
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
            Endpoint::Shared { hub, ip } => SocketAddr::new(IpAddr::V4(*ip), hub.port),
        }
    }

    fn try_send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        match self {
            Endpoint::Own(s) => s.try_send_to(data, to).map(|_| ()),
            Endpoint::Shared { hub, ip } => hub
                .state
                .try_send((&hub.socket).into(), &shared_transmit(data, to, *ip)),
        }
    }

    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        match self {
            Endpoint::Own(s) => s.send_to(data, to).await.map(|_| ()),
            Endpoint::Shared { hub, ip } => {
                send_waiting(|| {
                    hub.state
                        .try_send((&hub.socket).into(), &shared_transmit(data, to, *ip))
                })
                .await
            }
        }
    }
}

fn shared_transmit(data: &[u8], to: SocketAddr, from: Ipv4Addr) -> quinn_udp::Transmit<'_> {
    quinn_udp::Transmit {
        destination: to,
        ecn: None,
        contents: data,
        segment_size: None,
        src_ip: Some(IpAddr::V4(from)),
    }
}

/// The run's one timer for the periodic work of all its peer connections (see the module
/// docs). Dropping it stops the task.
pub struct Ticker {
    peers: Arc<Mutex<Vec<Weak<Peer>>>>,
    task: JoinHandle<()>,
}

impl Ticker {
    /// Starts the tick task on the current runtime.
    pub fn start() -> Arc<Ticker> {
        let peers: Arc<Mutex<Vec<Weak<Peer>>>> = Arc::default();
        let registry = peers.clone();
        let task = tokio::spawn(async move {
            let period = crate::recv::TWCC_INTERVAL / TICK_GROUPS as u32;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut group = 0usize;
            let mut due: Vec<Arc<Peer>> = Vec::new();
            let mut hubs: Vec<(Arc<HubInner>, HubSends)> = Vec::new();
            let mut rtcp = RtcpPackets::default();
            loop {
                tick.tick().await;
                {
                    let mut peers = registry.lock().expect("ticker lock");
                    // Once a round: reading every peer's count every tick touches a thousand
                    // peers' memory a hundred times a second for nothing.
                    if group == 0 {
                        peers.retain(|p| p.strong_count() > 0);
                    }
                    due.extend(
                        peers
                            .iter()
                            .skip(group)
                            .step_by(TICK_GROUPS)
                            .filter_map(Weak::upgrade),
                    );
                }
                group = (group + 1) % TICK_GROUPS;
                let now = Instant::now();
                for p in due.drain(..) {
                    p.tick(now, &mut hubs, &mut rtcp);
                }
                // The group's RTCP: one batched send per hub socket.
                for (hub, sends) in hubs.drain(..) {
                    let mut sends = sends;
                    hub.send_queued(&mut sends);
                }
            }
        });
        Arc::new(Ticker { peers, task })
    }

    fn register(&self, peer: &Arc<Peer>) {
        self.peers
            .lock()
            .expect("ticker lock")
            .push(Arc::downgrade(peer));
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Ticker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticker").finish_non_exhaustive()
    }
}

/// What handling a burst of datagrams leaves to send: plain RTCP (to encrypt) and SRTP
/// packets to retransmit (already encrypted).
#[derive(Default)]
struct Outgoing {
    rtcp: RtcpPackets,
    resend: Vec<Bytes>,
}

/// Why a peer connection did not come up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("binding a UDP socket on {0} failed: {1}")]
    Bind(IpAddr, std::io::Error),
    #[error("ICE: no Binding response from {0} within {1:?}")]
    IceTimeout(SocketAddr, Duration),
    #[error("DTLS with {0}: {1}")]
    Dtls(SocketAddr, #[source] dtls::DtlsError),
    #[error("bad remote fingerprint: {0}")]
    Fingerprint(#[source] dtls::DtlsError),
    #[error("SRTP setup failed: {0}")]
    Srtp(String),
}

/// What a publisher needs to answer the edge's RTCP.
#[derive(Debug, Default)]
pub struct SenderState {
    /// SSRCs we send, in layer order (audio has its own entry with layer 255).
    pub ssrcs: Vec<(u32, u8)>,
    history: VecDeque<(u32, u16, Bytes)>,
    /// Layers for which a keyframe was asked (PLI/FIR), drained by the media task.
    pub keyframe_requests: Vec<u8>,
    /// Answer NACKs with retransmissions (off when a run measures unrepaired loss).
    pub retransmit: bool,
}

#[derive(Default)]
struct State {
    srtp: Option<SrtpSession>,
    dtls_in: Option<mpsc::Sender<Vec<u8>>>,
    receiver: Option<Receiver>,
    sender: Option<SenderState>,
    twcc_id: Option<u8>,
    pending: Pending,
}

/// One peer connection.
pub struct Peer {
    endpoint: Endpoint,
    remote: Mutex<Option<SocketAddr>>,
    state: Mutex<State>,
    ice_ok: Notify,
    ice_done: AtomicBool,
    /// Our ICE password, when the server is a full ICE agent whose checks we answer
    /// ([`crate::ice_responder`]); `None` toward the ICE-lite edge.
    answer_checks_with: Mutex<Option<String>>,
    /// We are the controlling agent (we offered, or the server is ICE-lite): we nominate and
    /// send consent checks. The controlled side waits for the server's nomination instead.
    controlling: AtomicBool,
    /// We answered at least one of the server's checks (full-ICE servers only).
    answered_check: AtomicBool,
    closed: AtomicBool,
    /// Milliseconds since `epoch` of the last authenticated datagram from the edge.
    last_rx_ms: AtomicU64,
    /// Milliseconds since `epoch` when the next consent check is due.
    next_consent_ms: AtomicU64,
    epoch: Instant,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    dtls: tokio::sync::Mutex<Option<DtlsSession>>,
    collector: Shared,
    /// ICE credentials for consent checks: (username, remote password).
    ice_creds: Mutex<Option<(String, String)>>,
}

/// Durations of the connection phases.
#[derive(Debug, Clone, Copy)]
pub struct ConnectTimes {
    pub ice: Duration,
    pub dtls: Duration,
}

impl Peer {
    /// Takes a loopback address on `hub` when given, else binds a socket on `ip` (port chosen
    /// by the OS) with its own receive task; the `ticker` drives its periodic work.
    /// `receiver`: this peer receives media (subscriber); otherwise it sends (publisher).
    pub async fn bind(
        ip: IpAddr,
        receiver: Option<Receiver>,
        collector: Shared,
        ticker: &Ticker,
        hub: Option<&Hub>,
    ) -> Result<Arc<Peer>, PeerError> {
        let endpoint = match hub {
            Some(h) => {
                let (hub, ip) = h.assign().map_err(|e| PeerError::Bind(ip, e))?;
                Endpoint::Shared { hub, ip }
            }
            None => {
                let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
                    .await
                    .map_err(|e| PeerError::Bind(ip, e))?;
                enable_rx_timestamps(socket.as_raw_fd()).map_err(|e| PeerError::Bind(ip, e))?;
                Endpoint::Own(Arc::new(socket))
            }
        };
        let is_sender = receiver.is_none();
        let peer = Arc::new(Peer {
            endpoint,
            remote: Mutex::new(None),
            state: Mutex::new(State {
                receiver,
                sender: is_sender.then(|| SenderState {
                    retransmit: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ice_ok: Notify::new(),
            ice_done: AtomicBool::new(false),
            answer_checks_with: Mutex::new(None),
            controlling: AtomicBool::new(true),
            answered_check: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_rx_ms: AtomicU64::new(0),
            next_consent_ms: AtomicU64::new(CONSENT_INTERVAL.as_millis() as u64),
            epoch: Instant::now(),
            tasks: Mutex::new(Vec::new()),
            dtls: tokio::sync::Mutex::new(None),
            collector,
            ice_creds: Mutex::new(None),
        });
        match &peer.endpoint {
            Endpoint::Shared { hub, ip } => hub.register(*ip, &peer),
            Endpoint::Own(_) => {
                let rx = tokio::spawn(Self::receive_loop(peer.clone()));
                peer.tasks.lock().expect("tasks lock").push(rx);
            }
        }
        ticker.register(&peer);
        Ok(peer)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Toward a full ICE agent (Janus): answer its connectivity checks with our password
    /// `local_pwd`, and take the `controlling` role or, when not, wait for its nomination in
    /// [`connect`](Self::connect) instead of nominating. Call before `connect`.
    pub fn answer_checks(&self, local_pwd: &str, controlling: bool) {
        *self.answer_checks_with.lock().expect("peer lock") = Some(local_pwd.to_owned());
        self.controlling.store(controlling, Ordering::Release);
    }

    /// The header-extension id of transport-wide sequence numbers in the negotiated SDP.
    pub fn set_twcc_id(&self, id: Option<u8>) {
        self.state.lock().expect("peer lock").twcc_id = id;
    }

    /// Whether a publisher answers the edge's NACKs (default yes).
    pub fn set_retransmit(&self, on: bool) {
        if let Some(s) = self.state.lock().expect("peer lock").sender.as_mut() {
            s.retransmit = on;
        }
    }

    pub fn set_sender_ssrcs(&self, ssrcs: Vec<(u32, u8)>) {
        if let Some(s) = self.state.lock().expect("peer lock").sender.as_mut() {
            s.ssrcs = ssrcs;
        }
    }

    /// Since when nothing authenticated came from the edge (since connect when nothing ever).
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub fn first_media(&self) -> Option<Instant> {
        self.state
            .lock()
            .expect("peer lock")
            .receiver
            .as_ref()
            .and_then(|r| r.first_media)
    }

    /// ICE (controlling: we nominate at once, as the edge is ICE-lite; controlled, see
    /// [`answer_checks`](Self::answer_checks): we wait for the server's nomination) and then the
    /// DTLS client handshake; SRTP is ready when this returns.
    pub async fn connect(
        self: &Arc<Self>,
        remote: SocketAddr,
        desc: &RemoteDescription,
        local_ufrag: &str,
        cert: &DtlsCertificate,
        timeout: Duration,
    ) -> Result<ConnectTimes, PeerError> {
        let (remote_ufrag, remote_pwd) = (&desc.ufrag, &desc.pwd);
        let fp = Fingerprint::parse_sha256(&desc.fingerprint).map_err(PeerError::Fingerprint)?;
        *self.remote.lock().expect("peer lock") = Some(remote);
        let username = format!("{remote_ufrag}:{local_ufrag}");
        *self.ice_creds.lock().expect("peer lock") =
            Some((username.clone(), remote_pwd.to_owned()));

        // ICE: RFC 8445 §7.2.5.3 — the check is done when a success response arrives.
        let started = Instant::now();
        let deadline = started + timeout;
        let controlling = self.controlling.load(Ordering::Acquire);
        loop {
            if controlling {
                let req = ice::binding_request(&username, remote_pwd, true);
                let _ = self.endpoint.send_to(&req, remote).await;
            }
            let wait = tokio::time::sleep(ICE_RETRY);
            tokio::select! {
                _ = self.ice_ok.notified() => break,
                _ = wait => {}
            }
            if self.ice_done.load(Ordering::Acquire) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(PeerError::IceTimeout(remote, timeout));
            }
        }
        // A full-ICE server (Janus) that we nominate starts DTLS only once its own check of
        // the pair succeeded: wait until we have answered one, or our ClientHello is dropped
        // and the handshake waits a whole DTLS retransmission (1 s).
        let full_ice = self.answer_checks_with.lock().expect("peer lock").is_some();
        if controlling && full_ice {
            while !self.answered_check.load(Ordering::Acquire) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ice_time = started.elapsed();

        // DTLS: the client (`a=setup:active`) side, fed through channels by the receive task.
        let dtls_started = Instant::now();
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(64);
        self.state.lock().expect("peer lock").dtls_in = Some(in_tx);
        let me = Arc::downgrade(self);
        let writer = tokio::spawn(async move {
            while let Some((to, data)) = out_rx.recv().await {
                let Some(peer) = me.upgrade() else { return };
                let _ = peer.endpoint.send_to(&data, to).await;
            }
        });
        self.tasks.lock().expect("tasks lock").push(writer);
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let (keys, session) = dtls::connect(cert, remote, &fp, in_rx, out_tx, left)
            .await
            .map_err(|e| PeerError::Dtls(remote, e))?;
        let srtp = SrtpSession::new(&keys).map_err(|e| PeerError::Srtp(e.to_string()))?;
        self.state.lock().expect("peer lock").srtp = Some(srtp);
        *self.dtls.lock().await = Some(session);
        Ok(ConnectTimes {
            ice: ice_time,
            dtls: dtls_started.elapsed(),
        })
    }

    /// Encrypts one RTP packet (into this thread's arena) and keeps it for NACKs; `None`
    /// before SRTP is up or when encryption fails. Send with [`send_rtp_batch`](Self::send_rtp_batch).
    pub fn protect_rtp(&self, plain: &[u8], ssrc: u32, seq: u16) -> Option<Bytes> {
        let mut st = self.state.lock().expect("peer lock");
        let srtp = st.srtp.as_mut()?;
        let protected = ARENA.with(|arena| srtp.encrypt_rtp_into(plain, &mut arena.borrow_mut()));
        let Ok(p) = protected else {
            st.pending.counters.srtp_errors += 1;
            return None;
        };
        // Bytes: the history keeps a reference to the same buffer, no copy.
        st.pending.counters.tx_packets += 1;
        st.pending.counters.tx_bytes += p.len() as u64;
        if let Some(s) = st.sender.as_mut() {
            if s.history.len() >= HISTORY {
                s.history.pop_front();
            }
            s.history.push_back((ssrc, seq, p.clone()));
        }
        Some(p)
    }

    /// Sends protected packets to the edge with as few `sendmmsg` calls as possible, waiting
    /// for the socket when its buffer is full. Returns the bytes sent.
    pub async fn send_rtp_batch(&self, packets: &[Bytes]) -> usize {
        let Some(remote) = *self.remote.lock().expect("peer lock") else {
            return 0;
        };
        let socket = match &self.endpoint {
            Endpoint::Own(s) => s,
            // From the peer's address on the hub's socket, with the same batching and the same
            // handling of refused packets as below.
            Endpoint::Shared { hub, ip } => {
                let items: Vec<Datagram<'_>> = packets
                    .iter()
                    .filter_map(|p| Datagram::new(*ip, remote, p))
                    .collect();
                let fd = hub.socket.as_raw_fd();
                let (mut next, mut bytes) = (0, 0);
                while next < items.len() {
                    match send_waiting(|| send_from(fd, &items[next..])).await {
                        Ok(n) => {
                            bytes += items[next..next + n]
                                .iter()
                                .map(|d| d.data.len())
                                .sum::<usize>();
                            // A short batch stopped at a refused datagram: skip it, as
                            // `send_all_or_drop` does (a retry would undo a firewall's drop).
                            if n < (items.len() - next).min(SEND_BATCH) {
                                next += 1;
                            }
                            next += n;
                        }
                        Err(_) => next += 1,
                    }
                }
                return bytes;
            }
        };
        let items: Vec<(SocketAddr, &[u8])> = packets.iter().map(|p| (remote, &p[..])).collect();
        let fd = socket.as_raw_fd();
        let (mut next, mut bytes) = (0, 0);
        while next < items.len() {
            match socket
                .async_io(Interest::WRITABLE, || send_batch(fd, &items[next..]))
                .await
            {
                Ok(n) => {
                    bytes += items[next..next + n]
                        .iter()
                        .map(|(_, p)| p.len())
                        .sum::<usize>();
                    next += n;
                }
                // `sendmmsg` stops at the first packet the kernel refuses (EPERM from a firewall
                // drop, ECONNREFUSED after an ICMP unreachable) and reports its error: that one
                // packet is lost on the way, the rest of the batch still goes.
                Err(_) => next += 1,
            }
        }
        bytes
    }

    /// Layers the edge asked keyframes for since the last call.
    pub fn take_keyframe_requests(&self) -> Vec<u8> {
        let mut st = self.state.lock().expect("peer lock");
        st.sender
            .as_mut()
            .map(|s| std::mem::take(&mut s.keyframe_requests))
            .unwrap_or_default()
    }

    /// Stops the tasks and sends DTLS close_notify. Idempotent.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(d) = self.dtls.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), d.close()).await;
        }
        self.flush();
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }

    fn flush(&self) {
        let mut st = self.state.lock().expect("peer lock");
        let st = &mut *st;
        if let Some(r) = st.receiver.as_mut() {
            if !r.pending.is_empty() {
                self.collector
                    .lock()
                    .expect("collector lock")
                    .flush(&mut r.pending);
            }
        }
        if !st.pending.is_empty() || st.pending.counters.nack_received > 0 {
            self.collector
                .lock()
                .expect("collector lock")
                .flush(&mut st.pending);
        }
    }

    /// Encrypts RTCP; each protected packet goes to `sink`.
    fn protect_rtcp(&self, plain: &RtcpPackets, mut sink: impl FnMut(Bytes)) {
        let mut st = self.state.lock().expect("peer lock");
        let Some(srtp) = st.srtp.as_mut() else {
            return;
        };
        ARENA.with(|arena| {
            let mut arena = arena.borrow_mut();
            for p in plain.iter() {
                if let Ok(b) = srtp.encrypt_rtcp_into(p, &mut arena) {
                    sink(b);
                }
            }
        });
    }

    /// Encrypts and sends RTCP without waiting: a datagram the socket buffer has no room for
    /// is dropped, as RTCP over UDP may be (the next report carries the same information).
    /// Peers on a hub have theirs batched instead ([`Self::queue_outgoing`], [`Self::tick`]),
    /// with the same dropping.
    fn send_rtcp(&self, plain: &RtcpPackets) {
        if plain.is_empty() {
            return;
        }
        let Some(remote) = *self.remote.lock().expect("peer lock") else {
            return;
        };
        let mut protected = Vec::with_capacity(plain.len());
        self.protect_rtcp(plain, |b| protected.push(b));
        for b in protected {
            let _ = self.endpoint.try_send_to(&b, remote);
        }
    }

    /// After a receive burst on a hub: queues what handling it left to send (RTCP, encrypted
    /// here, and retransmissions) on the hub's batch, from this peer's address.
    fn queue_outgoing(&self, out: &mut Outgoing, sends: &mut HubSends) {
        if out.rtcp.is_empty() && out.resend.is_empty() {
            return;
        }
        let remote = *self.remote.lock().expect("peer lock");
        if let (Endpoint::Shared { ip, .. }, Some(remote)) = (&self.endpoint, remote) {
            self.protect_rtcp(&out.rtcp, |b| sends.push((*ip, remote, b)));
            sends.extend(out.resend.drain(..).map(|p| (*ip, remote, p)));
        }
        out.rtcp.clear();
        out.resend.clear();
    }

    /// The periodic work, called by the run's [`Ticker`] every [`crate::recv::TWCC_INTERVAL`].
    /// A hub peer's RTCP joins its hub's batch in `hubs`, which the ticker sends after the
    /// group; a peer on its own socket sends its own. `rtcp` is the ticker's scratch buffer.
    fn tick(
        &self,
        now: Instant,
        hubs: &mut Vec<(Arc<HubInner>, HubSends)>,
        rtcp: &mut RtcpPackets,
    ) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        rtcp.clear();
        {
            let mut st = self.state.lock().expect("peer lock");
            let connected = st.srtp.is_some();
            if let Some(r) = st.receiver.as_mut().filter(|_| connected) {
                r.poll_rtcp(now, rtcp);
            }
        }
        match &self.endpoint {
            Endpoint::Shared { hub, ip } if !rtcp.is_empty() => {
                if let Some(remote) = *self.remote.lock().expect("peer lock") {
                    let at = match hubs.iter().position(|(h, _)| Arc::ptr_eq(h, hub)) {
                        Some(at) => at,
                        None => {
                            hubs.push((hub.clone(), HubSends::new()));
                            hubs.len() - 1
                        }
                    };
                    let sends = &mut hubs[at].1;
                    self.protect_rtcp(rtcp, |b| sends.push((*ip, remote, b)));
                }
            }
            _ => self.send_rtcp(rtcp),
        }
        self.flush();
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        if now_ms >= self.next_consent_ms.load(Ordering::Relaxed)
            && self.ice_done.load(Ordering::Acquire)
            && self.controlling.load(Ordering::Acquire)
        {
            self.next_consent_ms.store(
                now_ms + CONSENT_INTERVAL.as_millis() as u64,
                Ordering::Relaxed,
            );
            let creds = self.ice_creds.lock().expect("peer lock").clone();
            let remote = *self.remote.lock().expect("peer lock");
            if let (Some((user, pwd)), Some(remote)) = (creds, remote) {
                let _ = self
                    .endpoint
                    .try_send_to(&ice::binding_request(&user, &pwd, true), remote);
            }
        }
    }

    /// The receive task of a peer with its own socket.
    async fn receive_loop(self: Arc<Self>) {
        let Endpoint::Own(socket) = &self.endpoint else {
            return;
        };
        let socket = socket.clone();
        let fd = socket.as_raw_fd();
        let mut out = Outgoing::default();
        loop {
            if socket.readable().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            // One wakeup per burst: read every queued datagram, a batch per syscall, until the
            // socket is empty. `try_io` clears readiness on WouldBlock; a short batch means the
            // queue was empty at that moment, so it reports WouldBlock without asking the kernel
            // again. A datagram arriving after the read is a new edge-triggered event for the
            // reactor, which clearing the readiness of the event we consumed does not lose.
            let read = socket.try_io(Interest::READABLE, || {
                RECV_BATCH.with(|batch| {
                    let mut batch = batch.borrow_mut();
                    let n = batch.recv(fd)?;
                    let (now, now_us) = (Instant::now(), unix_micros());
                    for i in 0..n {
                        let arrival = Arrival::of(&batch, i, now, now_us);
                        if i == 0 {
                            self.record_read_lag(arrival.read_lag_us);
                        }
                        if let Some((from, data)) = batch.get_mut(i) {
                            self.handle_datagram(data, from, arrival, &mut out);
                        }
                    }
                    if n < BATCH {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(())
                    }
                })
            });
            match read {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ICMP port unreachable surfaces as an error on Linux: keep reading.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            if !out.rtcp.is_empty() {
                self.send_rtcp(&out.rtcp);
                out.rtcp.clear();
            }
            if !out.resend.is_empty() {
                self.send_rtp_batch(&out.resend).await;
                out.resend.clear();
            }
        }
    }

    /// Answers a full ICE server's connectivity check (a rare packet: a non-blocking send is
    /// enough, the server retries a check it gets no answer to).
    fn answer_check(&self, data: &[u8], from: SocketAddr) {
        let pwd = self.answer_checks_with.lock().expect("peer lock").clone();
        let Some(answer) = pwd.and_then(|p| crate::ice_responder::answer_check(data, from, &p))
        else {
            return;
        };
        let _ = self.endpoint.try_send_to(&answer.reply, from);
        self.answered_check.store(true, Ordering::Release);
        self.mark_alive();
        // The controlled side is connected once the server nominated a pair.
        if answer.nominated
            && !self.controlling.load(Ordering::Acquire)
            && !self.ice_done.swap(true, Ordering::AcqRel)
        {
            self.ice_ok.notify_waiters();
        }
    }

    fn handle_datagram(
        &self,
        data: &mut [u8],
        from: SocketAddr,
        arrival: Arrival,
        out: &mut Outgoing,
    ) {
        match classify(data) {
            PacketClass::Stun => {
                // A full ICE server checks us too (Binding request, 0x0001).
                if data.len() >= 2 && data[0] == 0x00 && data[1] == 0x01 {
                    self.answer_check(data, from);
                }
                // A Binding success response (0x0101) is all we wait for.
                if data.len() >= 2 && data[0] == 0x01 && data[1] == 0x01 {
                    self.mark_alive();
                    if !self.ice_done.swap(true, Ordering::AcqRel) {
                        self.ice_ok.notify_waiters();
                    }
                }
            }
            PacketClass::Dtls => {
                let tx = self.state.lock().expect("peer lock").dtls_in.clone();
                if let Some(tx) = tx {
                    let _ = tx.try_send(data.to_vec());
                }
            }
            PacketClass::Rtp => self.handle_rtp(data, arrival, out),
            PacketClass::Rtcp => self.handle_rtcp(data, out),
            PacketClass::Unknown => {}
        }
    }

    fn mark_alive(&self) {
        self.mark_alive_at(Instant::now());
    }

    /// [`Self::mark_alive`] with the receive batch's clock (no clock read per packet).
    fn mark_alive_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the oldest datagram of a read waited for it, for a subscriber's report.
    fn record_read_lag(&self, lag_us: u32) {
        let mut st = self.state.lock().expect("peer lock");
        if st.receiver.is_some() {
            st.pending.read_lag_us.push(lag_us);
        }
    }

    fn handle_rtp(&self, data: &mut [u8], arrival: Arrival, out: &mut Outgoing) {
        let now = arrival.at;
        {
            let mut st = self.state.lock().expect("peer lock");
            let st = &mut *st;
            let Some(srtp) = st.srtp.as_mut() else { return };
            let plain = match srtp.decrypt_rtp_in_place(data) {
                Ok(n) => &data[..n],
                Err(_) => {
                    st.pending.counters.srtp_errors += 1;
                    return;
                }
            };
            let Some(r) = st.receiver.as_mut() else {
                return;
            };
            let Some(pkt) = read_rtp(plain, st.twcc_id) else {
                return;
            };
            let ssrc = pkt.ssrc;
            r.handle_rtp(pkt, now, arrival.unix_us);
            // NACK and PLI go out at once; the periodic feedback waits for the tick.
            if r.feedback_due() {
                r.poll_feedback(&mut out.rtcp);
            }
            if let Some(hints) = self.hints() {
                let [key, table, stream, window] = srtp.inbound_rtp_lines(ssrc);
                let [counters, seen, arrivals, delays] = r.hot_lines(ssrc);
                let lock = (std::ptr::from_ref(&self.state) as usize, 64);
                let receiver = (std::ptr::from_ref(&*r) as usize, size_of::<Receiver>());
                hints.record(
                    [lock, key, table, receiver],
                    ssrc,
                    [stream, window, counters, seen, arrivals, delays],
                );
            }
        }
        self.mark_alive_at(now);
    }

    /// Where this peer's prefetch hints go: its hub slot's (none on a socket of its own).
    fn hints(&self) -> Option<&Hints> {
        match &self.endpoint {
            Endpoint::Shared { hub, ip } => hub.slot(IpAddr::V4(*ip)).map(|s| &s.hints),
            Endpoint::Own(_) => None,
        }
    }

    fn handle_rtcp(&self, data: &[u8], out: &mut Outgoing) {
        use rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
        use rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
        use rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
        use rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
        let resend = &mut out.resend;
        let resent_before = resend.len();
        {
            let mut st = self.state.lock().expect("peer lock");
            let st = &mut *st;
            let Some(srtp) = st.srtp.as_mut() else { return };
            let Ok(plain) = srtp.decrypt_rtcp(data) else {
                st.pending.counters.srtp_errors += 1;
                return;
            };
            let Ok(packets) = edge_node::transport::parse::parse_rtcp(&plain) else {
                return;
            };
            let Some(sender) = st.sender.as_mut() else {
                self.mark_alive();
                return;
            };
            let c = &mut st.pending.counters;
            for p in &packets {
                let any = p.as_any();
                if let Some(n) = any.downcast_ref::<TransportLayerNack>() {
                    c.nack_received += 1;
                    if !sender.retransmit {
                        continue;
                    }
                    for pair in &n.nacks {
                        for seq in pair.packet_list() {
                            if let Some((_, _, bytes)) = sender
                                .history
                                .iter()
                                .rev()
                                .find(|(s, q, _)| *s == n.media_ssrc && *q == seq)
                            {
                                resend.push(bytes.clone());
                            }
                        }
                    }
                } else if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                    c.pli_received += 1;
                    if let Some(&(_, layer)) =
                        sender.ssrcs.iter().find(|(s, _)| *s == pli.media_ssrc)
                    {
                        sender.keyframe_requests.push(layer);
                    }
                } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                    c.pli_received += 1;
                    for e in &fir.fir {
                        if let Some(&(_, layer)) = sender.ssrcs.iter().find(|(s, _)| *s == e.ssrc) {
                            sender.keyframe_requests.push(layer);
                        }
                    }
                } else if any.downcast_ref::<TransportLayerCc>().is_some() {
                    c.twcc_received += 1;
                }
            }
            c.retransmitted += (resend.len() - resent_before) as u64;
        }
        self.mark_alive();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .map(|t| t.drain(..))
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_is_timed_at_its_kernel_arrival_and_the_wait_for_the_read_is_the_lag() {
        use std::os::fd::AsRawFd;
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let to = rx.local_addr().unwrap();
        let mut batch = RecvBatch::new();

        // Unstamped: timed at the read, no lag.
        tx.send_to(b"a", to).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 1);
        let (read_at, read_us) = (Instant::now(), unix_micros());
        let a = Arrival::of(&batch, 0, read_at, read_us);
        assert_eq!((a.at, a.unix_us, a.read_lag_us), (read_at, read_us, 0));

        // Stamped: the datagram waits 40 ms in the socket before the tool reads it (a busy
        // tool); its time is when it came, and the 40 ms are the tool's lag, not delay. The
        // kernel may stamp the first datagrams after the option is set at the read instead
        // (it turns stamping on with deferred work), so a few tries cover that.
        enable_rx_timestamps(rx.as_raw_fd()).unwrap();
        let mut last = None;
        for _ in 0..20 {
            let sent_us = unix_micros();
            tx.send_to(b"b", to).unwrap();
            std::thread::sleep(Duration::from_millis(40));
            assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 1);
            let (read_at, read_us) = (Instant::now(), unix_micros());
            let a = Arrival::of(&batch, 0, read_at, read_us);
            last = Some((sent_us, read_at, read_us, a));
            if a.read_lag_us >= 35_000 {
                break;
            }
        }
        let (sent_us, read_at, read_us, a) = last.unwrap();
        assert!(a.read_lag_us >= 35_000, "waited {} µs", a.read_lag_us);
        assert!(
            a.unix_us >= sent_us && a.unix_us - sent_us < 5_000,
            "arrived {} µs after it was sent",
            a.unix_us - sent_us
        );
        assert_eq!(read_us - a.unix_us, u64::from(a.read_lag_us));
        assert_eq!(
            read_at.duration_since(a.at).as_micros() as u32,
            a.read_lag_us
        );
    }

    #[test]
    fn a_reader_sweeps_on_a_clock_only_while_datagrams_come_fast() {
        let ms = Duration::from_millis;
        assert!(!busy(0, ms(0)), "nothing read");
        assert!(
            busy(1, Duration::from_micros(100)),
            "one datagram 100 µs after the last sweep"
        );
        assert!(busy(4, ms(1)));
        assert!(!busy(3, ms(1)));
        assert!(busy(40, ms(10)));
        assert!(
            !busy(1, ms(10)),
            "a handshake's trickle is read as it comes"
        );
    }

    /// A socket a peer joins is read by the hub's reader thread until it is drained, and
    /// dropping the hub stops the thread. The readers start with no socket and wait without a
    /// timeout, so only the wake-up on each new socket (and on the stop) gets them going.
    #[tokio::test]
    async fn the_hub_reader_drains_every_socket_it_is_given() {
        let hub = Hub::start(2).unwrap();
        let mut sockets = Vec::new();
        for _ in 0..2 * PEERS_PER_SOCKET {
            let (socket, _) = hub.assign().unwrap();
            if !sockets.iter().any(|s| Arc::ptr_eq(s, &socket)) {
                sockets.push(socket);
            }
        }
        assert_eq!(sockets.len(), 2, "one socket per {PEERS_PER_SOCKET} peers");
        // Datagrams for peers that were never registered: read, then dropped.
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for (k, socket) in sockets.iter().enumerate() {
            for n in 0..3 * BATCH as u32 + 5 {
                let ip = hub_ip(socket.first + n % PEERS_PER_SOCKET);
                tx.send_to(&[k as u8; 100], (ip, socket.port)).unwrap();
            }
        }
        let queued = |s: &HubInner| {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            unsafe { libc::ioctl(s.socket.as_raw_fd(), libc::FIONREAD, &mut n) };
            n
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while sockets.iter().any(|s| queued(s) > 0) {
            assert!(Instant::now() < deadline, "a hub socket was never drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(hub); // joins the readers
    }

    #[test]
    fn hub_addresses_map_back_to_their_numbers() {
        for n in [1, 2, 255, 256, 32_768, 65_535, 65_536, NUMBER_MASK] {
            let ip = hub_ip(n);
            assert_eq!(hub_number(ip), Some(n), "{ip}");
        }
        assert_eq!(hub_ip(1), Ipv4Addr::new(127, 100, 0, 1));
        assert_eq!(hub_number(Ipv4Addr::new(127, 0, 0, 1)), None);
        assert_eq!(hub_number(Ipv4Addr::new(10, 100, 0, 1)), None);
    }

    /// What a burst or a tick queued for a hub's peers leaves the hub's socket in one batch,
    /// each datagram from its own peer's address and the socket's port, to its own remote.
    #[tokio::test]
    async fn queued_datagrams_leave_from_each_peers_address() {
        let hub = Hub::open_socket(1).unwrap();
        let edges: Vec<std::net::UdpSocket> = (0..2)
            .map(|_| std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        let mut sends = HubSends::new();
        for n in 1..=40u32 {
            let to = edges[n as usize % 2].local_addr().unwrap();
            sends.push((hub_ip(n), to, Bytes::from(n.to_be_bytes().to_vec())));
        }
        // Sends never wait: what finds the buffer full is dropped, as RTCP may be.
        hub.send_queued(&mut sends);
        assert!(sends.is_empty(), "the queue is drained");
        let mut buf = [0u8; 16];
        for n in 1..=40u32 {
            let (len, from) = edges[n as usize % 2].recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], &n.to_be_bytes(), "datagram {n} in order");
            assert_eq!(from, SocketAddr::from((hub_ip(n), hub.port)));
        }
    }
}
