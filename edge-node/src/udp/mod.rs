//! The media shell: one thread per shard, each with its own `SO_REUSEPORT` socket on the edge's
//! one UDP port, driving a [`ShardCore`].
//!
//! Packets go socket -> classify (RFC 7983) -> core -> `sendmmsg` in one pass on the shard's
//! thread: no task or channel per packet (architecture rule 3). Rooms are placed on shards by
//! hash, so everything of one room is touched by one thread. The kernel spreads peers over the
//! shards' sockets by flow hash, which need not be the room's shard: a datagram that arrives on
//! the wrong shard is handed to the right one in batches through its bounded inbox ([`Router`]
//! says which; a lookup happens only when the local core does not know the sender).
//!
//! DTLS is the one per-peer task: the handshake runs in the shard's runtime, fed the DTLS
//! datagrams of its peer, and its exported keys come back to the core as [`Command::SetKeys`].

pub mod batch;

use crate::metrics::Metrics;
use crate::sfu::{CascadeRequest, Command, Event, SessionId, ShardCore, TransportId, TICK};
use crate::transport::demux::{classify, rtp_ssrc, PacketClass};
use crate::transport::dtls::{self, DtlsCertificate, DtlsSession, SrtpKeys};
use kcs_media::residence::Residence;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// Inbox depth per shard. Commands are few; handed-off datagrams come in batches of up to 32.
const INBOX: usize = 4096;
/// Socket buffers: ~4 MB absorbs a burst of keyframes to many subscribers.
const SOCKET_BUFFER: usize = 4 << 20;
/// A DTLS handshake that has not finished by then is abandoned (browsers give up after ~30 s).
const DTLS_TIMEOUT: Duration = Duration::from_secs(20);
/// DTLS datagrams queued per handshake before we drop (a handshake flight is a few packets).
const DTLS_INBOUND: usize = 64;
/// When the copies queued while the shard works through its socket or inbox are sent, before
/// the next datagram is processed: once at least this many are queued and the next media
/// packet is of another stream (its SSRC, or a relayed publication's layer), or once
/// [`MAX_QUEUED_TRANSMITS`] are.
///
/// Why: a stream's packets come back to back, a frame at a time (a keyframe is tens of them),
/// and each subscriber's copies of one frame leave as one GSO message when they are sent
/// together ([`batch::SendBatch`]): for a 21-packet keyframe to 60 subscribers that is 60
/// messages instead of 1,260 datagrams, sent in less than half the time. Sending at every change of
/// stream keeps what waited short: without a bound a wake-up's first packet would wait until
/// up to 64 x 32 datagrams were processed, thousands of encryptions with fan-out.
const FLUSH_TRANSMITS: usize = batch::BATCH;
/// The most copies queued before they are sent, one stream or not: a full `sendmmsg` of full
/// GSO messages.
const MAX_QUEUED_TRANSMITS: usize = batch::BATCH * batch::MAX_SEGMENTS;
/// Subscribers whose copies of the queued packets are made before those copies are sent, and
/// the next subscribers' made.
///
/// Why: a keyframe to 60 subscribers is over a thousand encryptions; made all before the
/// first send, the first subscriber's copies waited for the last subscriber's. With GSO each
/// subscriber's copies of a stream's burst are one message, so a step is one full `sendmmsg`:
/// the same calls as sending the whole fan-out at once, and the copies' wait, averaged over
/// the subscribers, no longer includes the encryptions of the subscribers after them.
const FAN_OUT_STEP: usize = batch::BATCH;

/// What the rest of the edge sends a shard.
#[derive(Debug)]
pub enum ShardInput {
    Command(Command),
    /// Events of transports owned by this session go to this sender.
    Register {
        session: SessionId,
        events: mpsc::Sender<Event>,
    },
    Unregister {
        session: SessionId,
    },
    /// The remote DTLS fingerprint to verify for a transport (from its SDP).
    ExpectDtls {
        transport: TransportId,
        fingerprint: String,
    },
    /// Datagrams another shard received for this one.
    Datagrams(Vec<(SocketAddr, Vec<u8>)>),
    /// Packets of relayed publications read from cascade links (see `crate::cascade`).
    Relayed(Vec<RelayedPacket>),
}

/// One RTP packet from a cascade link for a relayed publication of this shard.
#[derive(Debug)]
pub struct RelayedPacket {
    pub publication: crate::sfu::PublicationId,
    pub layer: u8,
    pub flags: crate::sfu::MediaFlags,
    /// The plaintext RTP packet (a slice of the received datagram, not a copy).
    pub rtp: bytes::Bytes,
    /// When quinn delivered the datagram to the link reader: the start of its stay in
    /// `kcs_cascade_residence_seconds`.
    pub received: Instant,
}

/// Cascade datagrams handled since the last flush, by where their copies go, and the shard's
/// tallies of how long they stayed (`kcs_cascade_residence_seconds`, folded into [`Metrics`]
/// on every tick). A datagram counts in a series only if it made copies of that kind.
#[derive(Debug, Default)]
pub(crate) struct CascadeStays {
    /// Delivery instants of datagrams that queued copies for links (child edges).
    pub(crate) to_links: Vec<Instant>,
    /// Delivery instants of datagrams that queued SRTP copies for local subscribers.
    pub(crate) to_subscribers: Vec<Instant>,
    pub(crate) links: Residence,
    pub(crate) subscribers: Residence,
    /// From quinn's delivery to the shard taking the datagram from its inbox
    /// (`kcs_cascade_shard_wait_seconds`): the part of a stay spent waiting for the shard.
    pub(crate) shard_wait: Residence,
}

impl CascadeStays {
    /// One relayed packet into the core, noting which copies it made.
    pub(crate) fn relay(&mut self, core: &mut ShardCore, p: RelayedPacket, now: Instant) {
        self.shard_wait
            .observe(now.saturating_duration_since(p.received));
        let (links, transmits) = (core.queued_link_datagrams(), core.queued_transmits());
        core.handle_relayed(p.publication, p.layer, p.flags, &p.rtp, now);
        if core.queued_link_datagrams() > links {
            self.to_links.push(p.received);
        }
        if core.queued_transmits() > transmits {
            self.to_subscribers.push(p.received);
        }
    }
}

/// Which shard owns which ICE ufrag and peer address (written on the cold path only).
#[derive(Debug, Default)]
pub struct Router {
    by_ufrag: RwLock<HashMap<String, usize>>,
    by_addr: RwLock<HashMap<SocketAddr, usize>>,
}

impl Router {
    pub fn add_ufrag(&self, ufrag: &str, shard: usize) {
        write(&self.by_ufrag).insert(ufrag.to_string(), shard);
    }
    pub fn remove_ufrag(&self, ufrag: &str) {
        write(&self.by_ufrag).remove(ufrag);
    }
    fn add_addr(&self, addr: SocketAddr, shard: usize) {
        write(&self.by_addr).insert(addr, shard);
    }
    fn remove_addr(&self, addr: &SocketAddr) {
        write(&self.by_addr).remove(addr);
    }
    fn shard_for(&self, from: &SocketAddr, datagram: &[u8]) -> Option<usize> {
        if let Some(s) = read(&self.by_addr).get(from) {
            return Some(*s);
        }
        if classify(datagram) == PacketClass::Stun {
            let (local, _) = crate::transport::ice::stun_username(datagram)?;
            return read(&self.by_ufrag).get(&local).copied();
        }
        None
    }
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    // A poisoned lock means a panic elsewhere; the map itself is intact.
    l.write().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Handle to all shards, cloned into every signaling session.
#[derive(Clone)]
pub struct Shards {
    inboxes: Arc<Vec<mpsc::Sender<ShardInput>>>,
    pub router: Arc<Router>,
    /// Each shard's socket address (all equal unless a port range is configured).
    pub local_addrs: Vec<SocketAddr>,
    /// Cascade links' media channels: shards send their queued link datagrams through it.
    pub links: Arc<crate::cascade::LinkChannels>,
}

impl Shards {
    /// The shard a room lives on.
    pub fn shard_of(&self, room: &str) -> usize {
        // FNV-1a: stable across runs, so a room lands on the same shard after a restart.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in room.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.inboxes.len() as u64) as usize
    }

    pub fn count(&self) -> usize {
        self.inboxes.len()
    }

    /// Sends to a shard, waiting if its inbox is full (signaling back-pressure, never media).
    pub async fn send(&self, shard: usize, input: ShardInput) {
        if self.inboxes[shard].send(input).await.is_err() {
            tracing::error!(shard, "shard is gone");
        }
    }

    /// Sends to a shard unless its inbox is full (media: dropping beats waiting); `false` when
    /// the input was dropped.
    pub fn try_send(&self, shard: usize, input: ShardInput) -> bool {
        self.inboxes[shard].try_send(input).is_ok()
    }
}

/// Starts the shard threads: `count` sockets sharing the configured UDP port (`SO_REUSEPORT`),
/// or, with a port range, one port per shard (as many shards as the range has ports, at most
/// `count`). Port 0 picks one free port for all of them.
pub fn start(
    config: &crate::config::EdgeConfig,
    count: usize,
    cert: Arc<DtlsCertificate>,
    metrics: Arc<Metrics>,
    room_events: mpsc::Sender<Event>,
) -> io::Result<Shards> {
    let range = config
        .port_range()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut sockets = Vec::new();
    match range {
        Some((first, last)) => {
            let n = count.clamp(1, usize::from(last - first) + 1);
            for i in 0..n {
                sockets.push(bind(SocketAddr::new(config.udp.ip(), first + i as u16))?);
            }
        }
        None => {
            let first = bind(config.udp)?;
            let shared = first.local_addr()?;
            sockets.push(first);
            for _ in 1..count.max(1) {
                sockets.push(bind(shared)?);
            }
        }
    }
    let count = sockets.len();
    let local_addrs = sockets
        .iter()
        .map(|s| s.local_addr())
        .collect::<io::Result<Vec<_>>>()?;
    let router = Arc::new(Router::default());
    let mut inboxes = Vec::with_capacity(count);
    let mut receivers = Vec::with_capacity(count);
    for _ in 0..count {
        let (tx, rx) = mpsc::channel(INBOX);
        inboxes.push(tx);
        receivers.push(rx);
    }
    let inboxes = Arc::new(inboxes);
    let links = Arc::new(crate::cascade::LinkChannels::new(metrics.clone()));
    let gso = config.gso && batch::gso_supported(sockets[0].as_raw_fd());
    if config.gso && !gso {
        tracing::info!("this kernel has no UDP GSO (UDP_SEGMENT): one datagram per message");
    }
    let fan_out_helpers = config.fan_out_helper_count();
    for (index, (socket, inbox)) in sockets.into_iter().zip(receivers).enumerate() {
        let shard = ShardShell {
            index,
            socket,
            inbox,
            peers: inboxes.clone(),
            router: router.clone(),
            cert: cert.clone(),
            metrics: metrics.clone(),
            room_events: room_events.clone(),
            links: links.clone(),
            gso,
            fan_out_helpers,
        };
        std::thread::Builder::new()
            .name(format!("kcs-shard-{index}"))
            .spawn(move || shard.run())?;
    }
    Ok(Shards {
        inboxes,
        router,
        local_addrs,
        links,
    })
}

fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.set_nonblocking(true)?;
    // Best effort too: without arrival stamps only the residence histogram stays empty.
    if let Err(e) = batch::enable_rx_timestamps(s.as_raw_fd()) {
        tracing::warn!(error = %e, "no SO_TIMESTAMPNS: kcs_media_residence_seconds stays empty");
    }
    if addr.is_ipv4() {
        // Best effort: without it the kernel only spends more per datagram sent.
        if let Err(e) = batch::set_dont_fragment(s.as_raw_fd()) {
            tracing::warn!(error = %e, "no IP_PMTUDISC_PROBE on the media socket");
        }
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

struct ShardShell {
    index: usize,
    socket: std::net::UdpSocket,
    inbox: mpsc::Receiver<ShardInput>,
    peers: Arc<Vec<mpsc::Sender<ShardInput>>>,
    router: Arc<Router>,
    cert: Arc<DtlsCertificate>,
    metrics: Arc<Metrics>,
    room_events: mpsc::Sender<Event>,
    links: Arc<crate::cascade::LinkChannels>,
    /// Whether copies to one destination go as GSO messages (configured, and the kernel can).
    gso: bool,
    /// Threads that help this shard make its large fan-outs (see [`crate::spread`]).
    fan_out_helpers: usize,
}

/// A finished DTLS handshake: the transport and its SRTP keys (or why it failed).
type HandshakeDone = (
    TransportId,
    Result<(SrtpKeys, DtlsSession), dtls::DtlsError>,
);

struct Handshake {
    inbound: mpsc::Sender<Vec<u8>>,
    /// Kept so the DTLS connection lives as long as the transport (close_notify on drop).
    session: Option<DtlsSession>,
}

impl ShardShell {
    fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(shard = self.index, error = %e, "cannot start shard runtime");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, self.run_loop());
    }

    async fn run_loop(mut self) {
        let socket = match self
            .socket
            .try_clone()
            .and_then(tokio::net::UdpSocket::from_std)
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(shard = self.index, error = %e, "cannot register socket");
                return;
            }
        };
        let fd = socket.as_raw_fd();
        let mut core = ShardCore::new((Instant::now(), SystemTime::now()));
        let mut batch = batch::RecvBatch::new();
        let mut sender = batch::SendBatch::new(self.gso);
        let helpers = crate::spread::Helpers::start(
            self.fan_out_helpers,
            &format!("kcs-fan-out-{}", self.index),
        )
        .unwrap_or_else(|e| {
            tracing::warn!(shard = self.index, error = %e, "no fan-out helpers: large fan-outs stay on the shard's thread");
            crate::spread::Helpers::none()
        });
        let spread = (helpers.count() > 0).then(|| SpreadSend {
            helpers,
            fd,
            gso: self.gso,
            sent: Default::default(),
        });
        // The stream whose copies are queued: a packet of another sends them first.
        let mut burst: Option<u64> = None;
        let mut sessions: HashMap<SessionId, mpsc::Sender<Event>> = HashMap::new();
        let mut fingerprints: HashMap<TransportId, String> = HashMap::new();
        let mut handshakes: HashMap<TransportId, Handshake> = HashMap::new();
        let (dtls_out_tx, mut dtls_out) = mpsc::channel::<(SocketAddr, Vec<u8>)>(256);
        let (done_tx, mut done_rx) = mpsc::channel::<HandshakeDone>(64);
        let mut handoff: HashMap<usize, Vec<(SocketAddr, Vec<u8>)>> = HashMap::new();
        let mut transmits = Vec::new();
        // Kernel arrival stamps of the media datagrams processed since the last send.
        let mut arrivals: Vec<SystemTime> = Vec::with_capacity(batch::BATCH * 4);
        let mut residence = Residence::default();
        let mut cascade = CascadeStays::default();
        let mut next_tick = tokio::time::Instant::now() + TICK;

        loop {
            tokio::select! {
                biased;
                r = socket.readable() => {
                    if r.is_err() { continue; }
                    // Drain what is queued, a bounded number of batches per wake-up so timers
                    // and commands are not starved under flood.
                    for _ in 0..64 {
                        match socket.try_io(tokio::io::Interest::READABLE, || batch.recv(fd)) {
                            Ok(n) => {
                                let now = Instant::now();
                                for i in 0..n {
                                    let Some((from, data)) = batch.get(i) else { continue };
                                    let stream = rtp_ssrc(data).map(u64::from);
                                    if flush_before(core.queued_transmits(), &mut burst, stream) {
                                        make_and_send(&mut core, &socket, &mut sender, &mut transmits, spread.as_ref()).await;
                                        observe_residence(&mut arrivals, &mut residence);
                                    }
                                    // The residence histogram is about forwarded media, not
                                    // feedback, STUN or DTLS; this datagram's stay ends with
                                    // the next send, which carries its copies.
                                    if stream.is_some() {
                                        if let Some(t) = batch.arrival(i) { arrivals.push(t); }
                                    }
                                    self.dispatch(&mut core, from, data, now, &mut handshakes, &mut handoff, &fingerprints, &dtls_out_tx, &done_tx);
                                }
                                if n < batch::BATCH { break; }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => { tracing::debug!(error = %e, "recvmmsg"); break; }
                        }
                    }
                }
                Some(input) = self.inbox.recv() => {
                    // Take whatever else is queued in the same pass.
                    let mut next = Some(input);
                    while let Some(input) = next.take() {
                        let now = Instant::now();
                        let relayed = self.handle_input(input, &mut core, &mut sessions, &mut fingerprints, &mut handshakes, &mut handoff, &dtls_out_tx, &done_tx, now);
                        // Relayed media is sent a stream's burst at a time, as on the socket
                        // path (see FLUSH_TRANSMITS): what queued from a link while the shard
                        // was busy, to many local subscribers, is thousands of encryptions.
                        for p in relayed.into_iter().flatten() {
                            // Bit 63 keeps relayed streams apart from SSRCs.
                            let stream = Some(1 << 63 | p.publication.0 << 8 | u64::from(p.layer));
                            if flush_before(core.queued_transmits(), &mut burst, stream) {
                                make_and_send(&mut core, &socket, &mut sender, &mut transmits, spread.as_ref()).await;
                                cascade
                                    .subscribers
                                    .observe_handed_on(&mut cascade.to_subscribers, Instant::now);
                            }
                            cascade.relay(&mut core, p, now);
                        }
                        next = self.inbox.try_recv().ok();
                    }
                }
                Some((to, data)) = dtls_out.recv() => {
                    let _ = socket.try_send_to(&data, to);
                }
                Some((tid, result)) = done_rx.recv() => {
                    match result {
                        Ok((keys, session)) => {
                            if let Some(h) = handshakes.get_mut(&tid) { h.session = Some(session); }
                            core.handle_command(Command::SetKeys { id: tid, keys }, Instant::now());
                        }
                        Err(e) => {
                            tracing::info!(shard = self.index, transport = tid.0, error = %e, "DTLS handshake failed");
                            core.counters.rejected_dtls += 1;
                            handshakes.remove(&tid);
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_tick) => {
                    let now = Instant::now();
                    core.handle_timeout(now);
                    next_tick = tokio::time::Instant::now() + TICK;
                    let (mut datagrams, mut messages) = sender.take_sent();
                    if let Some(spread) = &spread {
                        let (d, m) = spread.take_sent();
                        (datagrams, messages) = (datagrams + d, messages + m);
                    }
                    core.counters.udp_datagrams_out += datagrams;
                    core.counters.udp_messages_out += messages;
                    self.metrics.absorb(&mut core.counters);
                    self.metrics.residence.absorb(&mut residence);
                    self.metrics.cascade_residence.links.absorb(&mut cascade.links);
                    self.metrics.cascade_residence.subscribers.absorb(&mut cascade.subscribers);
                    self.metrics.cascade_residence.shard_wait.absorb(&mut cascade.shard_wait);
                }
            }
            // Flush: handed-off datagrams, transmits, events.
            for (shard, items) in handoff.drain() {
                if self.peers[shard]
                    .try_send(ShardInput::Datagrams(items))
                    .is_err()
                {
                    tracing::debug!(shard, "peer shard inbox full: dropped handed-off datagrams");
                }
            }
            if core.queued_link_datagrams() > 0 {
                let links = &self.links;
                core.drain_link_datagrams(|link, bytes| links.send(link, bytes));
            }
            cascade
                .links
                .observe_handed_on(&mut cascade.to_links, Instant::now);
            while let Some(r) = core.poll_cascade_request() {
                if let Err(CascadeRequest::LayerDemand {
                    publication,
                    layers,
                }) = self.links.request(r)
                {
                    tracing::debug!(
                        room = core.publication_room(publication).unwrap_or("?"),
                        publication = publication.0,
                        layers = layers.0,
                        "layer demand dropped: the cascade's request queue is full; retried on the next tick"
                    );
                    core.layer_demand_dropped(publication);
                }
            }
            make_and_send(
                &mut core,
                &socket,
                &mut sender,
                &mut transmits,
                spread.as_ref(),
            )
            .await;
            burst = None;
            observe_residence(&mut arrivals, &mut residence);
            cascade
                .subscribers
                .observe_handed_on(&mut cascade.to_subscribers, Instant::now);
            while let Some((owner, event)) = core.poll_event() {
                match (&event, owner) {
                    (Event::Nominated { transport, addr }, _) => {
                        self.router.add_addr(*addr, self.index);
                        let _ = transport;
                    }
                    (Event::Closed { transport, .. }, _) => {
                        handshakes.remove(transport);
                        fingerprints.remove(transport);
                    }
                    _ => {}
                }
                match owner {
                    Some(session) => {
                        if let Some(tx) = sessions.get(&session) {
                            let _ = tx.try_send(event);
                        }
                    }
                    None => {
                        let _ = self.room_events.try_send(event);
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        core: &mut ShardCore,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
        handshakes: &mut HashMap<TransportId, Handshake>,
        handoff: &mut HashMap<usize, Vec<(SocketAddr, Vec<u8>)>>,
        fingerprints: &HashMap<TransportId, String>,
        dtls_out: &mpsc::Sender<(SocketAddr, Vec<u8>)>,
        done: &mpsc::Sender<HandshakeDone>,
    ) {
        let class = classify(data);
        let local = match class {
            PacketClass::Stun => {
                core.transport_at(from).is_some()
                    || crate::transport::ice::stun_username(data)
                        .is_some_and(|(l, _)| core.owns_ufrag(&l))
            }
            PacketClass::Unknown => {
                core.counters.rejected_garbage += 1;
                return;
            }
            _ => core.transport_at(from).is_some(),
        };
        if !local {
            match self.router.shard_for(&from, data) {
                Some(s) if s != self.index => {
                    handoff.entry(s).or_default().push((from, data.to_vec()));
                }
                _ => match class {
                    PacketClass::Stun => core.counters.rejected_stun_unknown += 1,
                    PacketClass::Dtls => core.counters.rejected_dtls += 1,
                    _ => core.counters.rejected_unknown_source += 1,
                },
            }
            return;
        }
        match class {
            PacketClass::Stun => core.handle_stun(from, data, now),
            PacketClass::Rtp => core.handle_srtp(from, data, false, now),
            PacketClass::Rtcp => core.handle_srtp(from, data, true, now),
            PacketClass::Dtls => {
                let Some(tid) = core.transport_at(from) else {
                    return;
                };
                let h = handshakes.entry(tid).or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(DTLS_INBOUND);
                    let cert = self.cert.clone();
                    let fp = fingerprints.get(&tid).cloned().unwrap_or_default();
                    let out = dtls_out.clone();
                    let done = done.clone();
                    tokio::task::spawn_local(async move {
                        let r = match dtls::Fingerprint::parse_sha256(&fp) {
                            Ok(fp) => dtls::accept(&cert, from, &fp, rx, out, DTLS_TIMEOUT).await,
                            Err(e) => Err(e),
                        };
                        let _ = done.send((tid, r)).await;
                    });
                    Handshake {
                        inbound: tx,
                        session: None,
                    }
                });
                if h.inbound.try_send(data.to_vec()).is_err() {
                    core.counters.rejected_dtls += 1;
                }
            }
            PacketClass::Unknown => {}
        }
    }

    /// Applies one input from the rest of the edge; relayed media is returned for the caller,
    /// which relays it and sends as it goes.
    #[allow(clippy::too_many_arguments)]
    fn handle_input(
        &self,
        input: ShardInput,
        core: &mut ShardCore,
        sessions: &mut HashMap<SessionId, mpsc::Sender<Event>>,
        fingerprints: &mut HashMap<TransportId, String>,
        handshakes: &mut HashMap<TransportId, Handshake>,
        handoff: &mut HashMap<usize, Vec<(SocketAddr, Vec<u8>)>>,
        dtls_out: &mpsc::Sender<(SocketAddr, Vec<u8>)>,
        done: &mpsc::Sender<HandshakeDone>,
        now: Instant,
    ) -> Option<Vec<RelayedPacket>> {
        match input {
            ShardInput::Command(cmd) => {
                if let Command::RemoveTransport { id } = &cmd {
                    handshakes.remove(id);
                    fingerprints.remove(id);
                    if let Some(addr) = core.transport_addr(*id) {
                        self.router.remove_addr(&addr);
                    }
                }
                core.handle_command(cmd, now);
            }
            ShardInput::Register { session, events } => {
                sessions.insert(session, events);
            }
            ShardInput::Unregister { session } => {
                sessions.remove(&session);
            }
            ShardInput::ExpectDtls {
                transport,
                fingerprint,
            } => {
                fingerprints.insert(transport, fingerprint);
            }
            ShardInput::Relayed(packets) => return Some(packets),
            ShardInput::Datagrams(items) => {
                for (from, data) in items {
                    // Dispatch as if received here; a datagram for nobody is dropped, not
                    // bounced again (the router would send it straight back).
                    if core.transport_at(from).is_none()
                        && !(classify(&data) == PacketClass::Stun
                            && crate::transport::ice::stun_username(&data)
                                .is_some_and(|(l, _)| core.owns_ufrag(&l)))
                    {
                        core.counters.rejected_unknown_source += 1;
                        continue;
                    }
                    self.dispatch(
                        core,
                        from,
                        &data,
                        now,
                        handshakes,
                        handoff,
                        fingerprints,
                        dtls_out,
                        done,
                    );
                }
            }
        }
        None
    }
}

/// Records how long each datagram in `arrivals` stayed, now that what it caused was sent.
fn observe_residence(arrivals: &mut Vec<SystemTime>, residence: &mut Residence) {
    if arrivals.is_empty() {
        return;
    }
    let sent = SystemTime::now();
    for t in arrivals.drain(..) {
        // A stamp after `sent` is a clock step; count it as no wait rather than drop it.
        residence.observe(sent.duration_since(t).unwrap_or_default());
    }
}

/// Whether the queued copies go before the next datagram, of media `stream` (`None` for
/// feedback, STUN, DTLS): see [`FLUSH_TRANSMITS`]. Notes the stream whose copies are queued.
fn flush_before(queued: usize, burst: &mut Option<u64>, stream: Option<u64>) -> bool {
    let other_stream = stream.is_some() && stream != *burst;
    if other_stream {
        *burst = stream;
    }
    queued >= MAX_QUEUED_TRANSMITS || (queued >= FLUSH_TRANSMITS && other_stream)
}

/// Makes the queued copies and sends them, [`FAN_OUT_STEP`] subscribers' copies at a time:
/// each part leaves before the next is encrypted.
async fn make_and_send(
    core: &mut ShardCore,
    socket: &tokio::net::UdpSocket,
    sender: &mut batch::SendBatch,
    transmits: &mut Vec<crate::sfu::Transmit>,
    spread: Option<&SpreadSend>,
) {
    if let Some(spread) = spread {
        let send = |t: &mut Vec<crate::sfu::Transmit>| spread.send(t);
        core.fan_out_spread(&spread.helpers, FAN_OUT_STEP, &send);
        return;
    }
    loop {
        let more = core.poll_transmits_upto(transmits, FAN_OUT_STEP);
        if !transmits.is_empty() {
            send_all(socket, sender, transmits).await;
            transmits.clear();
        }
        if !more {
            return;
        }
    }
}

/// How a spread fan-out's parts send ([`ShardCore::fan_out_spread`]), from whichever thread
/// made them: with that thread's own [`batch::SendBatch`] on the shard's socket, waiting in
/// `poll(2)` when the socket's buffer is full, as [`send_all`] waits for writability.
struct SpreadSend {
    helpers: crate::spread::Helpers,
    fd: std::os::fd::RawFd,
    gso: bool,
    /// Datagrams and messages the parts' sends handed to the kernel, for the shard's counters.
    sent: [std::sync::atomic::AtomicU64; 2],
}

thread_local! {
    /// A fan-out thread's send buffers, kept from part to part.
    static SPREAD_SENDER: std::cell::RefCell<Option<batch::SendBatch>> =
        const { std::cell::RefCell::new(None) };
}

impl SpreadSend {
    fn send(&self, transmits: &[crate::sfu::Transmit]) {
        use std::sync::atomic::Ordering::Relaxed;
        SPREAD_SENDER.with_borrow_mut(|sender| {
            let sender = sender.get_or_insert_with(|| batch::SendBatch::new(self.gso));
            send_blocking(self.fd, sender, transmits);
            let (datagrams, messages) = sender.take_sent();
            self.sent[0].fetch_add(datagrams, Relaxed);
            self.sent[1].fetch_add(messages, Relaxed);
        });
    }

    fn take_sent(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.sent[0].swap(0, Relaxed), self.sent[1].swap(0, Relaxed))
    }
}

/// Each destination's copies side by side, in the order they were queued, so a frame's
/// packets to one subscriber go as one GSO message.
fn send_items<'a>(
    sender: &batch::SendBatch,
    transmits: &'a [crate::sfu::Transmit],
) -> Vec<(SocketAddr, &'a [u8])> {
    let mut items: Vec<(SocketAddr, &[u8])> =
        transmits.iter().map(|t| (t.to, &t.data[..])).collect();
    if sender.gso() {
        // Stable: each destination's packets keep their order.
        items.sort_by_key(|&(to, _)| to);
    }
    items
}

/// [`send_all`] for a thread outside the shard's runtime: waits for writability in `poll(2)`,
/// a millisecond at a time, as long as `send_all` waits.
fn send_blocking(
    fd: std::os::fd::RawFd,
    sender: &mut batch::SendBatch,
    transmits: &[crate::sfu::Transmit],
) {
    let items = send_items(sender, transmits);
    let mut done = 0;
    let mut spins = 0;
    while done < items.len() {
        match sender.send(fd, &items[done..]) {
            Ok(n) => done += n,
            Err(e) if e.error.kind() == io::ErrorKind::WouldBlock => {
                spins += 1;
                if spins > 16 {
                    break;
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid `pollfd` for the call's duration.
                unsafe { libc::poll(&mut pfd, 1, 1) };
            }
            Err(refused) => {
                tracing::trace!(error = %refused.error, datagrams = refused.datagrams, "sendmmsg");
                done += refused.datagrams.max(1);
            }
        }
    }
}

/// Sends every transmit, waiting for writability when the socket buffer is full. Each
/// destination's copies are put side by side, in the order they were queued, so a frame's
/// packets to one subscriber go as one GSO message.
async fn send_all(
    socket: &tokio::net::UdpSocket,
    sender: &mut batch::SendBatch,
    transmits: &[crate::sfu::Transmit],
) {
    let items = send_items(sender, transmits);
    let fd = socket.as_raw_fd();
    let mut done = 0;
    let mut spins = 0;
    while done < items.len() {
        let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
            match sender.send(fd, &items[done..]) {
                Ok(n) => Ok(Ok(n)),
                Err(e) if e.error.kind() == io::ErrorKind::WouldBlock => Err(e.error),
                Err(refused) => Ok(Err(refused)),
            }
        });
        match sent {
            Ok(Ok(n)) => done += n,
            Ok(Err(refused)) => {
                // One bad destination (e.g. unreachable) must not block the rest: skip its
                // datagrams.
                tracing::trace!(error = %refused.error, datagrams = refused.datagrams, "sendmmsg");
                done += refused.datagrams.max(1);
            }
            Err(_) => {
                spins += 1;
                // Bounded: a socket that stays full this long means the host is overloaded;
                // dropping is better than stalling the shard.
                if spins > 16 || socket.writable().await.is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtu_discover(socket: &std::net::UdpSocket) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, which outlives the call.
        let r = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        value
    }

    #[test]
    fn copies_queue_across_a_stream_burst_and_go_at_the_next_stream_or_the_bound() {
        let mut burst = None;
        let (video, audio) = (Some(1), Some(2));
        assert!(!flush_before(0, &mut burst, video), "nothing queued");
        // A frame's packets: the copies of the first ones wait for the rest.
        assert!(!flush_before(60, &mut burst, video));
        assert!(!flush_before(120, &mut burst, video));
        // Feedback or STUN in between does not end the burst.
        assert!(!flush_before(180, &mut burst, None));
        assert!(!flush_before(180, &mut burst, video));
        // Another stream's packet sends them first.
        assert!(flush_before(240, &mut burst, audio));
        assert!(!flush_before(0, &mut burst, audio));
        // A few copies wait for more, whatever the stream: one `sendmmsg` carries them all.
        assert!(!flush_before(FLUSH_TRANSMITS - 1, &mut burst, video));
        // However long one stream's burst, no more than the bound waits.
        assert!(flush_before(MAX_QUEUED_TRANSMITS, &mut burst, video));
    }

    #[tokio::test]
    async fn a_frames_copies_to_each_subscriber_leave_as_one_message_in_order() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = (
            batch::tests::coalescing_receiver(),
            batch::tests::coalescing_receiver(),
        );
        // Queued packet after packet, each to every subscriber in turn, as the core fans out.
        let mut transmits = Vec::new();
        for packet in 0..4u8 {
            for (sub, to) in [(0u8, a.local_addr().unwrap()), (1, b.local_addr().unwrap())] {
                transmits.push(crate::sfu::Transmit {
                    to,
                    data: bytes::Bytes::from(vec![packet * 2 + sub; 1000]),
                });
            }
        }
        let mut sender = batch::SendBatch::new(true);
        send_all(&socket, &mut sender, &transmits).await;
        let frame = |sub: u8| {
            (0..4u8)
                .flat_map(|p| vec![p * 2 + sub; 1000])
                .collect::<Vec<u8>>()
        };
        assert_eq!(batch::tests::messages(&a, 1), vec![(frame(0), 1000)]);
        assert_eq!(batch::tests::messages(&b, 1), vec![(frame(1), 1000)]);
    }

    #[test]
    fn the_media_socket_sends_with_dont_fragment_and_never_refuses_for_the_path_mtu() {
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The default (WANT) lets the kernel fragment a UDP datagram, so it hashes an IP id.
        assert_ne!(mtu_discover(&plain), libc::IP_PMTUDISC_PROBE);
        let media = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(mtu_discover(&media), libc::IP_PMTUDISC_PROBE);
        // PROBE, not DO: a datagram over the device's MTU is still sent (loopback's is 64 KiB).
        let to = plain.local_addr().unwrap();
        media.send_to(&[7u8; 9000], to).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 10_000];
        assert_eq!(plain.recv(&mut buf).unwrap(), 9000);
    }
}
