//! The forwarding core of one shard: every transport, publication and subscription of the rooms
//! this shard owns, driven sans-IO.
//!
//! A shard is one thread (architecture rule 3). Its shell (`crate::udp`) reads datagrams in
//! batches, classifies them (RFC 7983) and hands STUN, SRTP and SRTCP to this core; DTLS goes to
//! a handshake task in the shell, whose exported keys come back as [`Command::SetKeys`]. The core
//! decrypts each incoming packet once, updates the publication's layer state (NACK cache, loss
//! detection, bitrate, keyframe detection) and, for every subscription, lets its
//! [`LayerSelector`] decide, rewrites the header for that subscriber and encrypts one copy.
//! Everything the shell must send is queued as [`Transmit`]s; everything the signaling layer must
//! hear is queued as [`Event`]s. Time comes in as `now`; the core never reads a clock.
//!
//! Ids ([`TransportId`], [`PublicationId`], [`SubscriptionId`]) are chosen by the caller (the
//! signaling session that owns them), so commands can be sent without a round trip.
//!
//! Maps the packet path reads for every copy (by id, by nominated address, by SSRC) hash with
//! FxHash: SipHash was ~2.5% of a busy shard. Their keys are our ids or come from peers that
//! passed ICE and DTLS, and few per peer, so flooding them is not a way in; maps a stranger can
//! fill (by ICE ufrag) keep the std hasher.

#[cfg(test)]
mod cascade_tests;
pub mod harness;
mod rtp;
#[cfg(test)]
mod tests;
mod twcc;

pub use rtp::{RtpView, MAX_OUT_HEADER};

use crate::metrics::ShardCounters;
use crate::transport::dtls::SrtpKeys;
use crate::transport::ice::{IceCredentials, IceEvent, IceLite, StunOutcome};
use crate::transport::srtp::SrtpSession;
use bytes::Bytes;
pub use cascade_proto::link::{FlowId, LayerSet, MediaFlags};
pub use cascade_proto::relay::LinkId;
use kcs_media::bwe::{BweConfig, SendSideBwe};
use kcs_media::cache::{PacketCache, SentPacket, Sequencer};
use kcs_media::codec::{is_keyframe, VideoCodec};
use kcs_media::keyframe::{KeyframeRequestKind, KeyframeRequester, KeyframeRequesterConfig};
use kcs_media::meter::BitrateMeter;
use kcs_media::nack::{expand_nack_pairs, nack_pairs, NackGenerator};
use kcs_media::rewrite::{RewriteInput, RtpRewriter};
use kcs_media::selector::{Decision, LayerSelector, LayerSelectorConfig};
use kcs_media::seq::SeqUnwrapper;
use kcs_media::speaker::ActiveSpeakerDetector;
use kcs_media::stats::{ReceiveStats, SendStats};
use kcs_media::units::{Bitrate, SpatialLayer};
use kcs_media::vp8::Vp8Munger;
use rtcp::packet::Packet as RtcpPacket;
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// How often the core runs its periodic work (NACKs, keyframe requests, allocation). 10 ms keeps
/// NACK latency well under one video frame interval.
pub const TICK: Duration = Duration::from_millis(10);
/// Receiver and sender reports every second (RFC 3550 §6.2 allows more for few members).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// TWCC feedback to publishers every 100 ms, as browsers expect (libwebrtc sends at ~10 Hz).
const TWCC_FEEDBACK_INTERVAL: Duration = Duration::from_millis(100);
/// How often ICE consent deadlines are checked: a transport is closed at most this late after
/// its 30 s without a consent check ([`crate::transport::ice::CONSENT_TIMEOUT`]).
const CONSENT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Re-run the bandwidth allocation of each subscriber transport this often.
const ALLOCATION_INTERVAL: Duration = Duration::from_millis(200);
/// Packets kept per incoming layer for answering NACKs: ~2-4 s of 1.5 Mbit/s video.
const PACKET_CACHE_SIZE: usize = 1024;
/// Output packets remembered per subscription for mapping NACKs back to sources.
const SEQUENCER_SIZE: usize = 1024;
/// Budget set aside per audio subscription before video is allocated (Opus at its usual rate).
const AUDIO_RESERVE: Bitrate = Bitrate::kbps(64);
/// A probe aims this much above what the wanted upgrade needs, so that its measured rate (which
/// counts as a success from 85 % of the goal) still pays for the upgrade.
const PROBE_HEADROOM: f64 = 1.1;
/// A probe asks at most this multiple of the current estimate: a subscriber far below its wanted
/// layers climbs in steps, and a probe its link cannot carry only fills the bottleneck's queue
/// for a moment instead of overflowing it.
const PROBE_MAX_STEP: f64 = 2.0;
/// After a successful probe the next step may follow this soon (the upgrade it allowed is
/// under way).
const PROBE_AFTER_SUCCESS: Duration = Duration::from_secs(1);
/// After a failed probe, wait this long before the next; doubling on each failure up to
/// [`PROBE_BACKOFF_MAX`], so a capped link is probed rarely.
const PROBE_BACKOFF_INITIAL: Duration = Duration::from_secs(2);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Probe padding resends the subscription's most recent packets, cycling over this many.
const PADDING_WINDOW: u16 = 16;
/// Bound on the padding packets one tick may send per transport.
const PADDING_MAX_PACKETS: usize = 64;

/// One peer connection's transport (ICE-lite + DTLS-SRTP), owned by a signaling session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransportId(pub u64);
/// One incoming track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicationId(pub u64);
/// One (subscriber transport, publication) forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u64);
/// The signaling session that owns transports and receives their events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Header extension ids negotiated on one transport direction (as the SDP module reads them).
pub type ExtIds = crate::sdp::HeaderExtIds;

/// Audio or which video codec; decides keyframe detection and payload munging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaCodec {
    Audio,
    Video(VideoCodec),
}

/// One simulcast layer (or the only one) of a publication, as negotiated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerSpec {
    pub rid: Option<String>,
    pub ssrc: Option<u32>,
    pub rtx_ssrc: Option<u32>,
}

/// Everything the core needs to receive a publication.
#[derive(Debug, Clone)]
pub struct PublicationSpec {
    pub room: String,
    pub transport: TransportId,
    pub mid: String,
    pub codec: MediaCodec,
    pub clock_rate: u32,
    pub payload_type: u8,
    pub rtx_payload_type: Option<u8>,
    /// Lowest resolution first.
    pub layers: Vec<LayerSpec>,
    /// Prefer FIR over PLI for keyframe requests (when only `ccm fir` was negotiated).
    pub prefers_fir: bool,
}

/// Everything the core needs to forward a publication to one subscriber transport.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub transport: TransportId,
    pub publication: PublicationId,
    pub mid: String,
    pub ssrc: u32,
    pub rtx_ssrc: Option<u32>,
    pub payload_type: u8,
    pub rtx_payload_type: Option<u8>,
    pub max_layer: Option<SpatialLayer>,
    pub paused: bool,
}

/// Signaling -> core.
#[derive(Debug)]
pub enum Command {
    AddTransport {
        id: TransportId,
        owner: SessionId,
        local: IceCredentials,
        /// Known from the peer's offer; for our own offers it comes with the answer.
        remote: Option<IceCredentials>,
        /// Extension ids the peer uses on packets it sends us.
        ext_in: ExtIds,
        /// Extension ids we put on packets we send the peer.
        ext_out: ExtIds,
    },
    /// The peer's ICE credentials, once its answer arrived.
    SetRemote {
        id: TransportId,
        remote: IceCredentials,
    },
    /// Renegotiation changed the extension ids.
    SetExtensions {
        id: TransportId,
        ext_in: ExtIds,
        ext_out: ExtIds,
    },
    SetKeys {
        id: TransportId,
        keys: SrtpKeys,
    },
    RemoveTransport {
        id: TransportId,
    },
    AddPublication {
        id: PublicationId,
        spec: PublicationSpec,
    },
    RemovePublication {
        id: PublicationId,
    },
    /// Stop or restart forwarding a publication to everyone (host mute, publisher mute).
    SetPublicationMuted {
        id: PublicationId,
        muted: bool,
    },
    AddSubscription {
        id: SubscriptionId,
        spec: SubscriptionSpec,
    },
    RemoveSubscription {
        id: SubscriptionId,
    },
    SetPaused {
        id: SubscriptionId,
        paused: bool,
    },
    SetMaxLayer {
        id: SubscriptionId,
        max: Option<SpatialLayer>,
    },
    /// A publication whose packets come from a cascade link as plaintext RTP
    /// ([`ShardCore::handle_relayed`]) instead of a client transport. Subscriptions attach to it
    /// like to any publication; its NACKs and keyframe requests become [`CascadeRequest`]s.
    AddRelayedPublication {
        id: PublicationId,
        spec: RelayedPublicationSpec,
    },
    /// Queue copies of `layer` of a publication (local or relayed) for a cascade link, stamped
    /// with `flow` (the link peer's subscription).
    AddLinkSink {
        publication: PublicationId,
        layer: u8,
        link: LinkId,
        flow: FlowId,
    },
    RemoveLinkSink {
        publication: PublicationId,
        layer: u8,
        link: LinkId,
        flow: FlowId,
    },
    /// A link peer needs a keyframe of a layer of a publication (a PLI at a local publisher, or
    /// a [`CascadeRequest::Keyframe`] further up for a relayed one; rate-limited either way).
    RequestKeyframe {
        publication: PublicationId,
        layer: u8,
    },
    /// A link peer lost these packets of a layer (sequence numbers as the link carries them):
    /// resent from the layer's cache to `link` on `flow`, flagged as retransmissions.
    LinkNack {
        publication: PublicationId,
        layer: u8,
        link: LinkId,
        flow: FlowId,
        seqs: Vec<u16>,
    },
}

/// A relayed publication as the core needs it. The codec comes from the room state; the
/// payload type is the one the publisher's edge forwards (subscribers get their own).
#[derive(Debug, Clone)]
pub struct RelayedPublicationSpec {
    pub room: String,
    pub codec: MediaCodec,
    pub clock_rate: u32,
    /// Simulcast layers the publisher sends (1 for audio and single-layer video).
    pub layers: u8,
}

/// Core -> cascade: what a relayed publication needs from upstream (the cascade maps the
/// publication to its link and flow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CascadeRequest {
    Keyframe {
        publication: PublicationId,
        layer: u8,
    },
    Nack {
        publication: PublicationId,
        layer: u8,
        seqs: Vec<u16>,
    },
    /// The layers of a relayed publication wanted on this edge changed (see
    /// [`ShardCore::layer_demand`] for the rule); the cascade sends `layer_demand` upstream so
    /// the other layers stop crossing the link. Emitted only on change, never for a
    /// publication with one layer.
    LayerDemand {
        publication: PublicationId,
        layers: LayerSet,
    },
}

/// Stands for "no transport" in the spec of a relayed publication.
const RELAYED: TransportId = TransportId(u64::MAX);

/// A copy destination of one layer of a publication on a cascade link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkSink {
    layer: u8,
    link: LinkId,
    flow: FlowId,
}

/// Core -> signaling.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// ICE nominated an address and DTLS may start (the shell starts the handshake).
    Nominated {
        transport: TransportId,
        addr: SocketAddr,
    },
    /// SRTP keys installed: media flows.
    Connected { transport: TransportId },
    /// The transport is gone (consent expired). The owner should clean up.
    Closed {
        transport: TransportId,
        reason: &'static str,
    },
    LayerChanged {
        subscription: SubscriptionId,
        current: Option<SpatialLayer>,
        target: Option<SpatialLayer>,
    },
    /// The room's dominant speaker changed (None: silence).
    ActiveSpeaker {
        room: String,
        publication: Option<PublicationId>,
    },
}

/// A datagram to send.
#[derive(Debug, Clone)]
pub struct Transmit {
    pub to: SocketAddr,
    pub data: Bytes,
}

struct Transport {
    owner: SessionId,
    ice: IceLite,
    addr: Option<SocketAddr>,
    srtp: Option<SrtpSession>,
    ext_in: ExtIds,
    ext_out: ExtIds,
    /// Our SSRC as sender of RTCP feedback on this transport.
    rtcp_ssrc: u32,
    /// Incoming SSRC -> (publication, layer, is_rtx).
    ssrc_routes: FxHashMap<u32, (PublicationId, u8, bool)>,
    /// mid -> publication, to learn SSRCs of rid-based simulcast.
    mids: HashMap<String, PublicationId>,
    /// Outgoing SSRC (and RTX SSRC) -> subscription, for RTCP from subscribers.
    out_ssrcs: FxHashMap<u32, SubscriptionId>,
    subscriptions: Vec<SubscriptionId>,
    twcc_recorder: interceptor::twcc::Recorder,
    twcc_pending: bool,
    twcc_out_seq: u16,
    bwe: SendSideBwe,
    last_allocation: Option<Instant>,
    /// Earliest time of the next bandwidth probe (`None`: now).
    probe_at: Option<Instant>,
    probe_backoff: Duration,
    /// The subscription whose recent packets pad the running probe, and the next to resend.
    padding: Option<(SubscriptionId, u16)>,
}

struct Layer {
    spec: LayerSpec,
    unwrapper: SeqUnwrapper,
    cache: PacketCache,
    nack: NackGenerator,
    meter: BitrateMeter,
    stats: ReceiveStats,
    keyframes: KeyframeRequester,
    received_any: bool,
}

struct Publication {
    spec: PublicationSpec,
    layers: Vec<Layer>,
    subscribers: Vec<SubscriptionId>,
    muted: bool,
    /// Packets come from a cascade link ([`Command::AddRelayedPublication`]).
    relayed: bool,
    sinks: Vec<LinkSink>,
    /// Of a relayed publication: the layer demand last emitted ([`CascadeRequest::LayerDemand`]);
    /// `None` until the first (upstream then sends every layer).
    demand: Option<LayerSet>,
}

struct Subscription {
    spec: SubscriptionSpec,
    selector: LayerSelector,
    rewriter: RtpRewriter,
    sequencer: Sequencer,
    vp8: Option<Vp8Munger>,
    stats: SendStats,
    rtx_seq: u16,
    /// Sequence number of the newest packet sent (probe padding resends from here back).
    last_out_seq: Option<u16>,
    reported: (Option<SpatialLayer>, Option<SpatialLayer>),
    started: bool,
    audio: bool,
    /// Drop the current layer until the switch down (see `run_allocation`).
    shed: bool,
    /// On the shard's `layer_watch` list.
    watched: bool,
}

impl Subscription {
    /// Puts a video subscription on `watch` when its layers moved since last reported or it
    /// waits for a switch; call after anything that may move its selector.
    fn watch_layers(&mut self, id: SubscriptionId, watch: &mut Vec<SubscriptionId>) {
        if self.watched || self.audio {
            return;
        }
        let layers = (self.selector.current(), self.selector.target());
        if layers != self.reported || layers.0 != layers.1 {
            self.watched = true;
            watch.push(id);
        }
    }
}

/// The shard's forwarding state. See the module docs.
pub struct ShardCore {
    transports: FxHashMap<TransportId, Transport>,
    by_addr: FxHashMap<SocketAddr, TransportId>,
    by_ufrag: HashMap<String, TransportId>,
    publications: FxHashMap<PublicationId, Publication>,
    subscriptions: FxHashMap<SubscriptionId, Subscription>,
    speakers: HashMap<String, ActiveSpeakerDetector>,
    transmits: Vec<Transmit>,
    events: Vec<(SessionId, Event)>,
    room_events: Vec<Event>,
    /// (Instant, wall clock) pair fixed at start, to turn `now` into NTP and abs-send-time.
    epoch: (Instant, SystemTime),
    last_reports: Option<Instant>,
    last_twcc: Option<Instant>,
    last_consent_check: Option<Instant>,
    bufs: PacketBuffers,
    /// Encoded cascade datagrams waiting for the shell: bytes in one reused buffer.
    link_bytes: Vec<u8>,
    link_out: Vec<(LinkId, std::ops::Range<usize>)>,
    cascade_requests: Vec<CascadeRequest>,
    /// Relayed publications whose last layer demand the cascade's queue dropped: sent again on
    /// the next timeout, since a demand only goes out when it changes.
    demand_retries: Vec<PublicationId>,
    /// Transports whose BWE runs or awaits a probe: the only ones `run_probes` visits (a tick
    /// touching every transport's cold BWE to find none was 3% of a busy shard).
    probing: Vec<TransportId>,
    /// Video subscriptions whose layers changed since last reported or that wait for a switch
    /// (a keyframe on their target layer): the only ones the per-tick keyframe polls and
    /// layer-change notices visit (a sweep over every subscription was 3% of a busy shard).
    layer_watch: Vec<SubscriptionId>,
    /// Packets taken in whose copies are not made yet: the fan-out runs when the shell polls
    /// the transmits, a burst at a time (see [`ShardCore::fan_out`]).
    pending: PendingFanOut,
    /// Copies made on this thread since they were last folded into `counters`.
    tallies: CopyTallies,
    pub counters: ShardCounters,
}

/// Packets waiting for their fan-out, in arrival order, with their bytes back to back.
///
/// Why wait: the shell sends a stream's burst (a frame, a keyframe) together so each
/// subscriber's copies leave as one GSO message (`crate::udp`). Made subscriber after
/// subscriber, a burst's copies to the first subscribers are ready after their own
/// encryption instead of after every subscriber's copy of the packets before theirs, and each
/// subscriber's state (subscription, transport, SRTP stream, BWE) is loaded once per burst
/// instead of once per packet.
///
/// The shell may take the copies a few subscribers at a time
/// ([`ShardCore::poll_transmits_upto`]) and send each part before the next is made; the
/// fan-out then stops between two subscribers and resumes there.
#[derive(Default)]
struct PendingFanOut {
    packets: Vec<PendingPacket>,
    bytes: Vec<u8>,
    /// Copies the waiting packets will make at most: their publications' subscribers.
    copies: usize,
    /// Where a fan-out stopped part way: the first packet of the run in progress and the
    /// index of the next subscriber in its publication's list. While it is set, nothing that
    /// could change a subscriber list runs: every input finishes the fan-out first.
    resume: Option<(usize, usize)>,
}

struct PendingPacket {
    publication: PublicationId,
    layer: u8,
    ext_seq: u64,
    keyframe: bool,
    audio_level: Option<u8>,
    /// The `now` the packet was taken in with: what its copies are timed by, as if made then.
    now: Instant,
    bytes: std::ops::Range<usize>,
}

/// The shard's reused packet buffers: with them the packet path allocates nothing per packet.
struct PacketBuffers {
    /// Where outgoing RTP is assembled before encryption.
    scratch: Vec<u8>,
    /// Where incoming SRTP is decrypted in place.
    rx: Vec<u8>,
    /// Encrypted packets are appended here and split off as `Bytes` for the transmit queue:
    /// one allocation per [`TX_ARENA`] bytes of packets (none once sent packets are dropped
    /// and `BytesMut` reclaims its buffer), where the SRTP crate allocated per packet.
    arena: bytes::BytesMut,
}

/// Size of each transmit arena allocation: ~50 full-size packets.
const TX_ARENA: usize = 64 * 1024;

impl PacketBuffers {
    fn new() -> Self {
        Self {
            scratch: vec![0u8; 2048],
            rx: Vec::with_capacity(2048),
            arena: bytes::BytesMut::with_capacity(TX_ARENA),
        }
    }
}

impl ShardCore {
    /// `epoch` pairs an `Instant` with the wall clock at the same moment (read once by the shell).
    pub fn new(epoch: (Instant, SystemTime)) -> Self {
        Self {
            transports: FxHashMap::default(),
            by_addr: FxHashMap::default(),
            by_ufrag: HashMap::new(),
            publications: FxHashMap::default(),
            subscriptions: FxHashMap::default(),
            speakers: HashMap::new(),
            transmits: Vec::new(),
            events: Vec::new(),
            room_events: Vec::new(),
            epoch,
            last_reports: None,
            last_twcc: None,
            last_consent_check: None,
            bufs: PacketBuffers::new(),
            link_bytes: Vec::new(),
            link_out: Vec::new(),
            cascade_requests: Vec::new(),
            demand_retries: Vec::new(),
            probing: Vec::new(),
            layer_watch: Vec::new(),
            pending: PendingFanOut::default(),
            tallies: CopyTallies::default(),
            counters: ShardCounters::default(),
        }
    }

    // ---- inputs -------------------------------------------------------------------------

    pub fn handle_command(&mut self, cmd: Command, now: Instant) {
        // What was taken in before the command is copied under the state it came in.
        self.fan_out(usize::MAX);
        match cmd {
            Command::AddTransport {
                id,
                owner,
                local,
                remote,
                ext_in,
                ext_out,
            } => {
                self.by_ufrag.insert(local.ufrag.clone(), id);
                let ice = IceLite::new(local, remote, now);
                self.transports.insert(
                    id,
                    Transport {
                        owner,
                        ice,
                        addr: None,
                        srtp: None,
                        ext_in,
                        ext_out,
                        rtcp_ssrc: rand::random(),
                        ssrc_routes: FxHashMap::default(),
                        mids: HashMap::new(),
                        out_ssrcs: FxHashMap::default(),
                        subscriptions: Vec::new(),
                        twcc_recorder: interceptor::twcc::Recorder::new(0),
                        twcc_pending: false,
                        twcc_out_seq: 0,
                        bwe: SendSideBwe::new(BweConfig::default(), now),
                        last_allocation: None,
                        probe_at: None,
                        probe_backoff: PROBE_BACKOFF_INITIAL,
                        padding: None,
                    },
                );
                if let Some(t) = self.transports.get_mut(&id) {
                    t.twcc_recorder = interceptor::twcc::Recorder::new(t.rtcp_ssrc);
                }
                self.counters.transports_added += 1;
            }
            Command::SetRemote { id, remote } => {
                if let Some(t) = self.transports.get_mut(&id) {
                    t.ice.set_remote(remote);
                }
            }
            Command::SetExtensions {
                id,
                ext_in,
                ext_out,
            } => {
                if let Some(t) = self.transports.get_mut(&id) {
                    t.ext_in = ext_in;
                    t.ext_out = ext_out;
                }
            }
            Command::SetKeys { id, keys } => {
                let Some(t) = self.transports.get_mut(&id) else {
                    return;
                };
                match SrtpSession::new(&keys) {
                    Ok(s) => {
                        t.srtp = Some(s);
                        self.events
                            .push((t.owner, Event::Connected { transport: id }));
                    }
                    Err(e) => {
                        tracing::warn!(transport = id.0, error = %e, "SRTP setup failed");
                        let owner = t.owner;
                        self.remove_transport(id);
                        self.events.push((
                            owner,
                            Event::Closed {
                                transport: id,
                                reason: "srtp_setup_failed",
                            },
                        ));
                    }
                }
            }
            Command::RemoveTransport { id } => self.remove_transport(id),
            Command::AddPublication { id, spec } => self.add_publication(id, spec, now),
            Command::RemovePublication { id } => self.remove_publication(id),
            Command::SetPublicationMuted { id, muted } => {
                if let Some(p) = self.publications.get_mut(&id) {
                    p.muted = muted;
                }
            }
            Command::AddSubscription { id, spec } => self.add_subscription(id, spec, now),
            Command::RemoveSubscription { id } => self.remove_subscription(id),
            Command::SetPaused { id, paused } => {
                if let Some(s) = self.subscriptions.get_mut(&id) {
                    s.spec.paused = paused;
                    s.selector
                        .set_max_layer(if paused { None } else { s.spec.max_layer });
                    s.watch_layers(id, &mut self.layer_watch);
                    let publication = s.spec.publication;
                    self.update_layer_demand(publication);
                }
            }
            Command::SetMaxLayer { id, max } => {
                if let Some(s) = self.subscriptions.get_mut(&id) {
                    s.spec.max_layer = max;
                    if !s.spec.paused {
                        s.selector.set_max_layer(max);
                    }
                    s.watch_layers(id, &mut self.layer_watch);
                    let publication = s.spec.publication;
                    self.update_layer_demand(publication);
                }
            }
            Command::AddRelayedPublication { id, spec } => self.add_relayed_publication(id, spec),
            Command::AddLinkSink {
                publication,
                layer,
                link,
                flow,
            } => {
                if let Some(p) = self.publications.get_mut(&publication) {
                    let sink = LinkSink { layer, link, flow };
                    if !p.sinks.contains(&sink) {
                        p.sinks.push(sink);
                    }
                }
                self.update_layer_demand(publication);
            }
            Command::RemoveLinkSink {
                publication,
                layer,
                link,
                flow,
            } => {
                if let Some(p) = self.publications.get_mut(&publication) {
                    p.sinks.retain(|s| *s != LinkSink { layer, link, flow });
                }
                self.update_layer_demand(publication);
            }
            Command::RequestKeyframe { publication, layer } => {
                if let Some(l) = self
                    .publications
                    .get_mut(&publication)
                    .and_then(|p| p.layers.get_mut(usize::from(layer)))
                {
                    l.keyframes.handle_request(now);
                }
            }
            Command::LinkNack {
                publication,
                layer,
                link,
                flow,
                seqs,
            } => self.handle_link_nack(publication, layer, link, flow, &seqs),
        }
    }

    /// One plaintext RTP packet of a relayed publication, from a cascade link. `flags` are the
    /// datagram's: its keyframe bit is trusted (the publisher's edge parsed the payload), so the
    /// codec payload is not parsed again here.
    pub fn handle_relayed(
        &mut self,
        publication: PublicationId,
        layer: u8,
        flags: MediaFlags,
        rtp: &[u8],
        now: Instant,
    ) {
        self.finish_interrupted_fan_out();
        let Ok(view) = RtpView::parse(rtp) else {
            self.counters.relayed_rejected += 1;
            return;
        };
        if !self
            .publications
            .get(&publication)
            .is_some_and(|p| p.relayed && usize::from(layer) < p.layers.len())
        {
            self.counters.relayed_rejected += 1;
            return;
        }
        self.counters.relayed_in += 1;
        self.handle_media(publication, layer, &view, None, Some(flags.keyframe), now);
    }

    fn handle_link_nack(
        &mut self,
        publication: PublicationId,
        layer: u8,
        link: LinkId,
        flow: FlowId,
        seqs: &[u16],
    ) {
        let Some(l) = self
            .publications
            .get(&publication)
            .and_then(|p| p.layers.get(usize::from(layer)))
        else {
            return;
        };
        let Some(layer_id) = cascade_proto::link::Layer::new(layer) else {
            return;
        };
        for &seq in seqs {
            let Some(bytes) = l.unwrapper.peek(seq).and_then(|ext| l.cache.get(ext)) else {
                self.counters.nacks_missed += 1;
                continue;
            };
            let start = self.link_bytes.len();
            cascade_proto::wire::encode_datagram(
                &cascade_proto::link::MediaDatagram {
                    flow,
                    layer: layer_id,
                    flags: MediaFlags {
                        retransmission: true,
                        end_of_frame: bytes.get(1).is_some_and(|b| b & 0x80 != 0),
                        keyframe: false,
                    },
                    rtp: bytes,
                },
                &mut self.link_bytes,
            );
            self.link_out.push((link, start..self.link_bytes.len()));
            self.counters.link_retransmits_out += 1;
        }
    }

    /// Which transport a datagram from `from` belongs to, for the shell's DTLS routing.
    pub fn transport_at(&self, from: SocketAddr) -> Option<TransportId> {
        self.by_addr.get(&from).copied()
    }

    /// The nominated peer address of a transport.
    pub fn transport_addr(&self, id: TransportId) -> Option<SocketAddr> {
        self.transports.get(&id).and_then(|t| t.addr)
    }

    /// Whether this shard owns a transport with this local ICE ufrag.
    pub fn owns_ufrag(&self, ufrag: &str) -> bool {
        self.by_ufrag.contains_key(ufrag)
    }

    pub fn handle_stun(&mut self, from: SocketAddr, msg: &[u8], now: Instant) {
        self.finish_interrupted_fan_out();
        let id = match self.by_addr.get(&from) {
            Some(id) => *id,
            None => match crate::transport::ice::stun_username(msg)
                .and_then(|(local, _)| self.by_ufrag.get(&local).copied())
            {
                Some(id) => id,
                None => {
                    self.counters.rejected_stun_unknown += 1;
                    return;
                }
            },
        };
        let Some(t) = self.transports.get_mut(&id) else {
            return;
        };
        match t.ice.handle_stun(from, msg, now) {
            Ok(StunOutcome::Reply { to, bytes }) => self.transmits.push(Transmit {
                to,
                data: Bytes::from(bytes),
            }),
            Ok(StunOutcome::Ignore) => {}
            Err(e) => {
                self.counters.rejected_stun_integrity += 1;
                tracing::debug!(transport = id.0, %from, error = %e, "STUN refused");
                if let Some(reply) = e.reply() {
                    self.transmits.push(Transmit {
                        to: from,
                        data: Bytes::copy_from_slice(reply),
                    });
                }
            }
        }
        self.drain_ice_events(id);
    }

    fn drain_ice_events(&mut self, id: TransportId) {
        let Some(t) = self.transports.get_mut(&id) else {
            return;
        };
        while let Some(ev) = t.ice.poll_event() {
            match ev {
                IceEvent::Nominated(addr) => {
                    if let Some(old) = t.addr.replace(addr) {
                        self.by_addr.remove(&old);
                    }
                    self.by_addr.insert(addr, id);
                    self.events.push((
                        t.owner,
                        Event::Nominated {
                            transport: id,
                            addr,
                        },
                    ));
                }
                IceEvent::ConsentExpired => {
                    let owner = t.owner;
                    self.events.push((
                        owner,
                        Event::Closed {
                            transport: id,
                            reason: "consent_expired",
                        },
                    ));
                    self.remove_transport(id);
                    return;
                }
            }
        }
    }

    /// An SRTP or SRTCP datagram from `from`.
    pub fn handle_srtp(&mut self, from: SocketAddr, data: &[u8], is_rtcp: bool, now: Instant) {
        self.finish_interrupted_fan_out();
        let Some(&id) = self.by_addr.get(&from) else {
            self.counters.rejected_unknown_source += 1;
            return;
        };
        let Some(t) = self.transports.get_mut(&id) else {
            return;
        };
        let Some(srtp) = t.srtp.as_mut() else {
            self.counters.rejected_before_keys += 1;
            return;
        };
        if is_rtcp {
            match srtp.decrypt_rtcp(data) {
                Ok(plain) => self.handle_rtcp(id, &plain, now),
                Err(_) => self.counters.rejected_srtcp += 1,
            }
        } else {
            // Decrypted in place in the shard's buffer (taken out while the packet is handled).
            let mut rx = std::mem::take(&mut self.bufs.rx);
            rx.clear();
            rx.extend_from_slice(data);
            match srtp.decrypt_rtp_in_place(&mut rx) {
                Ok(n) => {
                    self.counters.packets_in += 1;
                    self.counters.bytes_in += data.len() as u64;
                    self.handle_rtp(id, &rx[..n], now);
                }
                Err(_) => self.counters.rejected_srtp += 1,
            }
            self.bufs.rx = rx;
        }
    }

    fn handle_rtp(&mut self, tid: TransportId, plain: &[u8], now: Instant) {
        let Ok(view) = RtpView::parse(plain) else {
            self.counters.rejected_rtp += 1;
            return;
        };
        let Some(t) = self.transports.get_mut(&tid) else {
            return;
        };
        if let Some(seq) = t
            .ext_in
            .transport_cc
            .and_then(|id| view.extension(id))
            .filter(|v| v.len() == 2)
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
        {
            let us = now.duration_since(self.epoch.0).as_micros() as i64;
            t.twcc_recorder.record(view.ssrc, seq, us);
            t.twcc_pending = true;
        }
        let route = match t.ssrc_routes.get(&view.ssrc) {
            Some(r) => Some(*r),
            None => {
                let learnt = learn_route(t, &self.publications, &view);
                if let Some((pid, layer, is_rtx)) = learnt {
                    if let Some(l) = self
                        .publications
                        .get_mut(&pid)
                        .and_then(|p| p.layers.get_mut(layer as usize))
                    {
                        let slot = if is_rtx {
                            &mut l.spec.rtx_ssrc
                        } else {
                            &mut l.spec.ssrc
                        };
                        *slot = Some(view.ssrc);
                    }
                }
                learnt
            }
        };
        let Some((pid, layer, is_rtx)) = route else {
            self.counters.rejected_unknown_ssrc += 1;
            return;
        };
        if is_rtx {
            // RFC 4588 §4: the payload starts with the original sequence number.
            let payload = view.payload();
            if payload.len() < 2 {
                self.counters.rejected_rtp += 1;
                return;
            }
            let Some(p) = self.publications.get(&pid) else {
                return;
            };
            let Some(media_ssrc) = p.layers.get(layer as usize).and_then(|l| l.spec.ssrc) else {
                return; // media SSRC not learnt yet: nothing to repair
            };
            let osn = u16::from_be_bytes([payload[0], payload[1]]);
            let mut rebuilt = Vec::with_capacity(plain.len());
            let ext = rtp::OutExtensions::default();
            let mut hdr = [0u8; MAX_OUT_HEADER];
            let n = rtp::write_header(
                &mut hdr,
                view.marker,
                p.spec.payload_type,
                osn,
                view.timestamp,
                media_ssrc,
                &ext,
            );
            rebuilt.extend_from_slice(&hdr[..n]);
            rebuilt.extend_from_slice(&payload[2..]);
            self.counters.rtx_in += 1;
            if let Ok(orig) = RtpView::parse(&rebuilt) {
                self.handle_media(pid, layer, &orig, None, None, now);
            }
        } else {
            let level = self
                .transports
                .get(&tid)
                .and_then(|t| t.ext_in.audio_level)
                .and_then(|id| view.extension(id))
                .and_then(|v| v.first().copied());
            self.handle_media(pid, layer, &view, level, None, now);
        }
    }

    /// One media packet of publication `pid`, layer `layer` (retransmissions already unwrapped).
    /// `keyframe`: known by the caller (a relayed packet's flag), else parsed from the payload.
    fn handle_media(
        &mut self,
        pid: PublicationId,
        layer_idx: u8,
        view: &RtpView<'_>,
        audio_level: Option<u8>,
        keyframe: Option<bool>,
        now: Instant,
    ) {
        let Some(p) = self.publications.get_mut(&pid) else {
            return;
        };
        // A relayed publication carries only media its publisher's edge already filtered (RTX
        // unwrapped, other payload types dropped); its payload type is that edge's.
        if !p.relayed && view.payload_type != p.spec.payload_type {
            // Another codec of the m-line (e.g. comfort noise, FEC): not forwarded.
            self.counters.rejected_payload_type += 1;
            return;
        }
        let clock_rate = p.spec.clock_rate;
        let codec = p.spec.codec;
        let Some(layer) = p.layers.get_mut(layer_idx as usize) else {
            return;
        };
        layer.received_any = true;
        let ext_seq = layer.unwrapper.extend(view.seq);
        if layer.cache.get(ext_seq).is_some() {
            self.counters.duplicates_in += 1;
            return; // duplicate (or an RTX of something we had)
        }
        layer.cache.insert(ext_seq, view.bytes(), now);
        layer.nack.handle_packet(ext_seq, now);
        let newly_available = layer.meter.bitrate(now).is_none();
        layer.meter.handle_packet(view.bytes().len(), now);
        layer
            .stats
            .handle_packet(ext_seq, view.timestamp, now, clock_rate);
        let keyframe = match (keyframe, codec) {
            (Some(k), _) => k,
            (None, MediaCodec::Video(c)) => is_keyframe(c, view.payload()),
            (None, MediaCodec::Audio) => false,
        };
        if keyframe {
            layer.keyframes.handle_keyframe(now);
            self.counters.keyframes_in += 1;
        }
        if let (Some(level), MediaCodec::Audio) = (audio_level, codec) {
            // Look up before inserting: no String clone per audio packet.
            if !self.speakers.contains_key(&p.spec.room) {
                self.speakers
                    .insert(p.spec.room.clone(), ActiveSpeakerDetector::default());
            }
            if let Some(det) = self.speakers.get_mut(&p.spec.room) {
                det.handle_level(pid.0, level & 0x7f, level & 0x80 != 0, now);
            }
        }
        if p.muted {
            return;
        }
        if !p.sinks.is_empty() {
            if let Some(layer_id) = cascade_proto::link::Layer::new(layer_idx) {
                let flags = MediaFlags {
                    keyframe,
                    end_of_frame: view.marker,
                    retransmission: false,
                };
                for sink in p.sinks.iter().filter(|s| s.layer == layer_idx) {
                    let start = self.link_bytes.len();
                    cascade_proto::wire::encode_datagram(
                        &cascade_proto::link::MediaDatagram {
                            flow: sink.flow,
                            layer: layer_id,
                            flags,
                            rtp: view.bytes(),
                        },
                        &mut self.link_bytes,
                    );
                    self.link_out
                        .push((sink.link, start..self.link_bytes.len()));
                    self.counters.link_packets_out += 1;
                }
            }
        }
        if newly_available && matches!(codec, MediaCodec::Video(_)) {
            // A layer (re)appeared: let selectors see it now, so this very packet (often the
            // keyframe that starts the layer) can be forwarded before the next allocation round.
            let rates: Vec<Option<Bitrate>> =
                p.layers.iter().map(|l| l.meter.bitrate(now)).collect();
            for sid in &p.subscribers {
                if let Some(s) = self.subscriptions.get_mut(sid) {
                    if let Some(t) = self.transports.get(&s.spec.transport) {
                        s.selector.handle_allocation(t.bwe.estimate(), &rates, now);
                    }
                    s.watch_layers(*sid, &mut self.layer_watch);
                }
            }
        }
        if p.subscribers.is_empty() {
            return;
        }
        let pending = &mut self.pending;
        pending.copies += p.subscribers.len();
        let start = pending.bytes.len();
        pending.bytes.extend_from_slice(view.bytes());
        pending.packets.push(PendingPacket {
            publication: pid,
            layer: layer_idx,
            ext_seq,
            keyframe,
            audio_level,
            now,
            bytes: start..pending.bytes.len(),
        });
    }

    /// Makes the copies of the packets taken in since the last fan-out, for at most
    /// `subscribers` subscribers (each served whole: all its copies of a run), and says whether
    /// copies are left to make. For each run of packets of one publication's layer it goes
    /// subscriber after subscriber, each subscriber's copies in arrival order (so a
    /// subscriber's layer switches see the layers' packets in the order they came, as when
    /// each packet was fanned out on arrival). A fan-out stopped by the bound resumes with the
    /// next subscriber.
    fn fan_out(&mut self, subscribers: usize) -> bool {
        if self.pending.packets.is_empty() {
            return false;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let (mut start, mut next) = pending.resume.take().unwrap_or((0, 0));
        let mut served = 0;
        while start < pending.packets.len() {
            let (pid, layer) = (
                pending.packets[start].publication,
                pending.packets[start].layer,
            );
            let len = pending.packets[start..]
                .iter()
                .take_while(|p| p.publication == pid && p.layer == layer)
                .count();
            let run = &pending.packets[start..start + len];
            // Parsed when taken in: the bytes are what that view was made of.
            let views: Vec<(&PendingPacket, RtpView<'_>)> = run
                .iter()
                .filter_map(|p| Some((p, RtpView::parse(&pending.bytes[p.bytes.clone()]).ok()?)))
                .collect();
            let Some(p) = self.publications.get_mut(&pid) else {
                (start, next) = (start + len, 0);
                continue;
            };
            let list = std::mem::take(&mut p.subscribers);
            while next < list.len() && served < subscribers {
                self.prefetch_ahead(&list, next);
                for (packet, view) in &views {
                    self.forward(
                        list[next],
                        layer,
                        packet.ext_seq,
                        view,
                        packet.keyframe,
                        packet.audio_level,
                        packet.now,
                    );
                }
                pending.copies = pending.copies.saturating_sub(len);
                (next, served) = (next + 1, served + 1);
            }
            let done = next >= list.len();
            if let Some(p) = self.publications.get_mut(&pid) {
                p.subscribers = list;
            }
            if !done {
                pending.resume = Some((start, next));
                self.pending = pending;
                self.tallies.fold_into(&mut self.counters);
                return true;
            }
            (start, next) = (start + len, 0);
        }
        // Keep the buffers' capacity for the next bursts.
        pending.packets.clear();
        pending.bytes.clear();
        pending.copies = 0;
        self.pending = pending;
        self.tallies.fold_into(&mut self.counters);
        false
    }

    /// Makes what a fan-out stopped by the shell's bound still owes, before an input that
    /// could change whom it goes to.
    fn finish_interrupted_fan_out(&mut self) {
        if self.pending.resume.is_some() {
            self.fan_out(usize::MAX);
        }
    }

    /// Starts loading what forwarding to the subscribers after `sids[i]` will read, while the
    /// copy for `sids[i]` is made. In a fan-out every copy goes to another subscriber whose
    /// state the previous packet's hundreds of copies pushed out of the cache, and a copy's
    /// loads form chains (the subscription's key, then its transport's key, then the SRTP
    /// stream the transport points to...) that the core cannot overlap by itself. So only the
    /// heads of those chains are asked for: two ahead, the subscription's key and the line
    /// naming its transport; one ahead (those have arrived by now), the transport's key, its
    /// SRTP stream, and the slots behind pointers the copy will write (sequencer, bandwidth
    /// estimator). Fields read straight from an entry need no help, and more lines than the
    /// core has fill buffers make the prefetches themselves wait ([`kcs_media::prefetch`]).
    fn prefetch_ahead(&self, sids: &[SubscriptionId], i: usize) {
        use kcs_media::prefetch::{prefetch, range_of};
        if let Some((id, s)) = sids
            .get(i + 2)
            .and_then(|id| self.subscriptions.get_key_value(id))
        {
            prefetch(range_of(id), 1);
            prefetch(range_of(&s.spec.transport), 1);
        }
        let Some(s) = sids.get(i + 1).and_then(|id| self.subscriptions.get(id)) else {
            return;
        };
        prefetch(s.sequencer.next_slot(), 1);
        let Some((id, t)) = self.transports.get_key_value(&s.spec.transport) else {
            return;
        };
        prefetch(range_of(id), 1);
        if let Some(srtp) = &t.srtp {
            for r in srtp.outbound_rtp_lines(s.spec.ssrc) {
                prefetch(r, 1);
            }
        }
        for r in t.bwe.next_entries() {
            prefetch(r, 1);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        sid: SubscriptionId,
        layer: u8,
        ext_seq: u64,
        view: &RtpView<'_>,
        keyframe: bool,
        audio_level: Option<u8>,
        now: Instant,
    ) {
        let Some(s) = self.subscriptions.get_mut(&sid) else {
            return;
        };
        let Some(t) = self.transports.get_mut(&s.spec.transport) else {
            return;
        };
        let mut out = CopyOut {
            scratch: &mut self.bufs.scratch,
            arena: &mut self.bufs.arena,
            transmits: &mut self.transmits,
            tallies: &mut self.tallies,
            watch: &mut self.layer_watch,
        };
        let packet = CopyOf {
            layer,
            ext_seq,
            view,
            keyframe,
            audio_level,
            now,
        };
        make_copy(sid, s, t, &packet, self.epoch, &mut out);
    }

    fn handle_rtcp(&mut self, tid: TransportId, plain: &[u8], now: Instant) {
        // Through the guarded parser: the rtcp crate over-reads some malformed packets.
        let Ok(packets) = crate::transport::parse::parse_rtcp(plain) else {
            self.counters.rejected_rtcp += 1;
            return;
        };
        for pkt in packets {
            let any = pkt.as_any();
            if let Some(nack) =
                any.downcast_ref::<rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack>()
            {
                let pairs: Vec<(u16, u16)> = nack
                    .nacks
                    .iter()
                    .map(|n| (n.packet_id, n.lost_packets))
                    .collect();
                self.handle_nack(tid, nack.media_ssrc, &expand_nack_pairs(&pairs), now);
            } else if let Some(pli) =
                any.downcast_ref::<rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication>()
            {
                self.handle_keyframe_request(tid, pli.media_ssrc, now);
            } else if let Some(fir) =
                any.downcast_ref::<rtcp::payload_feedbacks::full_intra_request::FullIntraRequest>()
            {
                for e in &fir.fir {
                    self.handle_keyframe_request(tid, e.ssrc, now);
                }
            } else if let Some(fb) = any
                .downcast_ref::<rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc>()
            {
                if let Some(t) = self.transports.get_mut(&tid) {
                    let before = t.bwe.estimate();
                    t.bwe.handle_feedback(&twcc::statuses(fb), now);
                    // A sharp drop re-allocates at the next tick instead of within 200 ms:
                    // every millisecond over the bottleneck's rate is queueing or loss.
                    if t.bwe.estimate().as_bps() < before.as_bps() / 10 * 9 {
                        t.last_allocation = None;
                    }
                }
            } else if let Some(sr) =
                any.downcast_ref::<rtcp::sender_report::SenderReport>()
            {
                self.handle_sender_report(tid, sr.ssrc, sr.ntp_time, now);
            } else if let Some(rr) =
                any.downcast_ref::<rtcp::receiver_report::ReceiverReport>()
            {
                for r in &rr.reports {
                    self.counters.receiver_reports += 1;
                    if r.fraction_lost > 0 {
                        tracing::trace!(transport = tid.0, ssrc = r.ssrc, lost = r.fraction_lost, "subscriber reports loss");
                    }
                }
            }
        }
    }

    fn handle_sender_report(&mut self, tid: TransportId, ssrc: u32, ntp: u64, now: Instant) {
        let Some(t) = self.transports.get(&tid) else {
            return;
        };
        let Some(&(pid, layer, false)) = t.ssrc_routes.get(&ssrc) else {
            return;
        };
        if let Some(l) = self
            .publications
            .get_mut(&pid)
            .and_then(|p| p.layers.get_mut(layer as usize))
        {
            l.stats.handle_sender_report(ntp, now);
        }
    }

    fn handle_keyframe_request(&mut self, tid: TransportId, media_ssrc: u32, now: Instant) {
        let Some(sid) = self
            .transports
            .get(&tid)
            .and_then(|t| t.out_ssrcs.get(&media_ssrc).copied())
        else {
            return;
        };
        self.counters.plis_in += 1;
        let Some(s) = self.subscriptions.get(&sid) else {
            return;
        };
        let layer = s
            .selector
            .current()
            .or(s.selector.target())
            .map(|l| l.0)
            .unwrap_or(0);
        if let Some(l) = self
            .publications
            .get_mut(&s.spec.publication)
            .and_then(|p| p.layers.get_mut(layer as usize))
        {
            l.keyframes.handle_request(now);
        }
    }

    fn handle_nack(&mut self, tid: TransportId, media_ssrc: u32, seqs: &[u16], now: Instant) {
        let Some(sid) = self
            .transports
            .get(&tid)
            .and_then(|t| t.out_ssrcs.get(&media_ssrc).copied())
        else {
            return;
        };
        self.counters.nacks_in += seqs.len() as u64;
        let Some(s) = self.subscriptions.get_mut(&sid) else {
            return;
        };
        let Some(p) = self.publications.get(&s.spec.publication) else {
            return;
        };
        let Some(t) = self.transports.get_mut(&s.spec.transport) else {
            return;
        };
        for &seq in seqs {
            match retransmit(s, p, t, seq, now, &mut self.bufs, &mut self.transmits) {
                Some(_) => self.counters.retransmits_out += 1,
                None => self.counters.nacks_missed += 1,
            }
        }
    }

    // ---- timers -------------------------------------------------------------------------

    /// When [`Self::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        now + TICK
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.fan_out(usize::MAX);
        // ICE consent freshness: a 30 s deadline needs no 10 ms sweep, and the sweep touches
        // every transport (a cold 3 KB entry each on a busy shard).
        let consent_due = self
            .last_consent_check
            .is_none_or(|t| now.saturating_duration_since(t) >= CONSENT_CHECK_INTERVAL);
        if consent_due {
            self.last_consent_check = Some(now);
            let ids: Vec<TransportId> = self.transports.keys().copied().collect();
            for id in &ids {
                if let Some(t) = self.transports.get_mut(id) {
                    t.ice.handle_timeout(now);
                }
                self.drain_ice_events(*id);
            }
        }
        self.run_feedback(now);
        self.run_probes(now);
        self.run_allocation(now);
        for id in std::mem::take(&mut self.demand_retries) {
            self.update_layer_demand(id);
        }
        let reports_due = self
            .last_reports
            .is_none_or(|t| now.duration_since(t) >= REPORT_INTERVAL);
        if reports_due {
            self.last_reports = Some(now);
            self.send_reports(now);
        }
        let twcc_due = self
            .last_twcc
            .is_none_or(|t| now.duration_since(t) >= TWCC_FEEDBACK_INTERVAL);
        if twcc_due {
            self.last_twcc = Some(now);
            self.send_twcc_feedback();
        }
        for (room, det) in self.speakers.iter_mut() {
            if let Some(change) = det.poll_change(now) {
                self.room_events.push(Event::ActiveSpeaker {
                    room: room.clone(),
                    publication: change.map(PublicationId),
                });
            }
        }
        // Layer change notifications; a subscription leaves the watch list once reported and
        // not waiting for a switch.
        let mut watch = std::mem::take(&mut self.layer_watch);
        watch.retain(|sid| {
            let Some(s) = self.subscriptions.get_mut(sid) else {
                return false;
            };
            let now_layers = (s.selector.current(), s.selector.target());
            if now_layers != s.reported {
                s.reported = now_layers;
                if let Some(t) = self.transports.get(&s.spec.transport) {
                    tracing::debug!(
                        subscription = sid.0,
                        current = ?now_layers.0,
                        target = ?now_layers.1,
                        estimate = %t.bwe.estimate(),
                        loss = t.bwe.loss_fraction(),
                        "layer change"
                    );
                    self.counters.layer_switches += 1;
                    self.events.push((
                        t.owner,
                        Event::LayerChanged {
                            subscription: *sid,
                            current: now_layers.0,
                            target: now_layers.1,
                        },
                    ));
                }
            }
            let keep = now_layers.1.is_some() && now_layers.0 != now_layers.1;
            s.watched = keep;
            keep
        });
        self.layer_watch = watch;
    }

    /// NACKs and keyframe requests towards publishers.
    fn run_feedback(&mut self, now: Instant) {
        // Subscribers' selectors wanting a keyframe on a layer.
        let mut wanted: Vec<(PublicationId, u8)> = Vec::new();
        for id in &self.layer_watch {
            let Some(s) = self.subscriptions.get_mut(id) else {
                continue;
            };
            if let Some(l) = s.selector.poll_keyframe_request(now) {
                wanted.push((s.spec.publication, l.0));
            }
        }
        for (pid, layer) in wanted {
            if let Some(l) = self
                .publications
                .get_mut(&pid)
                .and_then(|p| p.layers.get_mut(layer as usize))
            {
                l.keyframes.handle_request(now);
            }
        }
        let mut out: Vec<(TransportId, Box<dyn RtcpPacket + Send + Sync>)> = Vec::new();
        for (pid, p) in self.publications.iter_mut() {
            if p.relayed {
                // Its publisher is behind a link: NACKs and keyframe requests go up the link.
                for (i, l) in p.layers.iter_mut().enumerate() {
                    if let Some(seqs) = l.nack.poll_nacks(now) {
                        self.counters.link_nacks_out += seqs.len() as u64;
                        self.cascade_requests.push(CascadeRequest::Nack {
                            publication: *pid,
                            layer: i as u8,
                            seqs,
                        });
                    }
                    if l.nack.poll_keyframe_needed() {
                        l.keyframes.handle_request(now);
                    }
                    if l.keyframes.poll_send(now).is_some() {
                        self.counters.link_keyframe_requests_out += 1;
                        self.cascade_requests.push(CascadeRequest::Keyframe {
                            publication: *pid,
                            layer: i as u8,
                        });
                    }
                }
                continue;
            }
            let Some(t) = self.transports.get(&p.spec.transport) else {
                continue;
            };
            for l in p.layers.iter_mut() {
                let Some(ssrc) = l.spec.ssrc else { continue };
                if let Some(seqs) = l.nack.poll_nacks(now) {
                    self.counters.nacks_out += seqs.len() as u64;
                    let nacks = nack_pairs(&seqs)
                        .into_iter()
                        .map(|(packet_id, lost_packets)| {
                            rtcp::transport_feedbacks::transport_layer_nack::NackPair {
                                packet_id,
                                lost_packets,
                            }
                        })
                        .collect();
                    out.push((
                        p.spec.transport,
                        Box::new(
                            rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack {
                                sender_ssrc: t.rtcp_ssrc,
                                media_ssrc: ssrc,
                                nacks,
                            },
                        ),
                    ));
                }
                if l.nack.poll_keyframe_needed() {
                    l.keyframes.handle_request(now);
                }
                if let Some(kind) = l.keyframes.poll_send(now) {
                    self.counters.plis_out += 1;
                    let pkt: Box<dyn RtcpPacket + Send + Sync> = match kind {
                        KeyframeRequestKind::Pli => Box::new(
                            rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
                                sender_ssrc: t.rtcp_ssrc,
                                media_ssrc: ssrc,
                            },
                        ),
                        KeyframeRequestKind::Fir { seq_nr: seq } => Box::new(
                            rtcp::payload_feedbacks::full_intra_request::FullIntraRequest {
                                sender_ssrc: t.rtcp_ssrc,
                                media_ssrc: ssrc,
                                fir: vec![rtcp::payload_feedbacks::full_intra_request::FirEntry {
                                    ssrc,
                                    sequence_number: seq,
                                }],
                            },
                        ),
                    };
                    out.push((p.spec.transport, pkt));
                }
            }
        }
        for (tid, pkt) in out {
            self.send_rtcp(tid, &[pkt]);
        }
    }

    /// Splits each subscriber transport's estimate over its subscriptions.
    fn run_allocation(&mut self, now: Instant) {
        for (&tid, t) in self.transports.iter_mut() {
            if t.subscriptions.is_empty()
                || t.last_allocation
                    .is_some_and(|l| now.duration_since(l) < ALLOCATION_INTERVAL)
            {
                continue;
            }
            t.last_allocation = Some(now);
            let estimate = t.bwe.estimate().as_bps();
            let mut budget = estimate;
            // What the allocation spends, and the cheapest upgrade it could not afford.
            let mut allocated = 0u64;
            let mut wanted: Option<(SubscriptionId, u64)> = None;
            // Audio first, then video subscriptions in order: screen shares and earlier
            // subscriptions get their share first (the meetings issue adds pin/speaker priority).
            let mut video: Vec<(SubscriptionId, Vec<Option<Bitrate>>)> = Vec::new();
            for sid in &t.subscriptions {
                let Some(s) = self.subscriptions.get(sid) else {
                    continue;
                };
                let Some(p) = self.publications.get(&s.spec.publication) else {
                    continue;
                };
                match p.spec.codec {
                    MediaCodec::Audio => {
                        budget = budget.saturating_sub(AUDIO_RESERVE.as_bps());
                        allocated += AUDIO_RESERVE.as_bps();
                    }
                    MediaCodec::Video(_) => {
                        if s.spec.paused {
                            continue;
                        }
                        let rates = p.layers.iter().map(|l| l.meter.bitrate(now)).collect();
                        video.push((*sid, rates));
                    }
                }
            }
            let n = video.len().max(1) as u64;
            for (i, (sid, rates)) in video.into_iter().enumerate() {
                // Equal split of what is left, the remainder rolling to later tracks.
                let share = budget / (n - i as u64).max(1);
                let Some(s) = self.subscriptions.get_mut(&sid) else {
                    continue;
                };
                s.selector
                    .handle_allocation(Bitrate::bps(share), &rates, now);
                s.watch_layers(sid, &mut self.layer_watch);
                // Over budget on the layer being forwarded and waiting for a lower layer's
                // keyframe: shed the current layer now (a short freeze) rather than keep
                // overfilling the subscriber's bottleneck until the keyframe comes (loss for
                // every stream on that link, audio included).
                let current_rate = s
                    .selector
                    .current()
                    .and_then(|l| rates.get(l.0 as usize).copied().flatten())
                    .map(|b| b.as_bps())
                    .unwrap_or(0);
                s.shed = s.selector.target() < s.selector.current() && current_rate > share;
                let used = s
                    .selector
                    .target()
                    .and_then(|l| rates.get(l.0 as usize).copied().flatten())
                    .map(|b| b.as_bps())
                    .unwrap_or(0);
                budget = budget.saturating_sub(used.min(share));
                allocated += used;
                if wanted.is_none() {
                    wanted = upgrade_cost(&s.selector, &rates).map(|extra| (sid, extra));
                }
            }
            // Not enough for what the subscriber wants: probe whether the link carries more
            // (the estimate only rises above what is sent on a probe's evidence).
            let Some((sid, extra)) = wanted else {
                continue;
            };
            let needed = (allocated + extra) as f64 * PROBE_HEADROOM;
            let goal = needed.min(estimate as f64 * PROBE_MAX_STEP) as u64;
            if goal > estimate
                && t.probe_at.is_none_or(|at| now >= at)
                && t.bwe.start_probe(Bitrate::bps(goal), now).is_some()
            {
                tracing::debug!(
                    subscription = sid.0,
                    estimate = %Bitrate::bps(estimate),
                    goal = %Bitrate::bps(goal),
                    "bandwidth probe"
                );
                t.padding = Some((sid, 0));
                self.probing.push(tid);
            }
        }
    }

    /// Subscriptions the per-tick keyframe polls and layer-change notices visit.
    #[cfg(test)]
    pub(crate) fn watched_subscriptions(&self) -> usize {
        self.layer_watch.len()
    }

    /// Transports the probe sweep visits on the next tick.
    #[cfg(test)]
    pub(crate) fn probing_transports(&self) -> usize {
        self.probing.len()
    }

    /// Sends the running probes' padding and acts on their verdicts.
    fn run_probes(&mut self, now: Instant) {
        let mut probing = std::mem::take(&mut self.probing);
        probing.retain(|id| {
            self.transports
                .get(id)
                .is_some_and(|t| t.bwe.probing() || t.padding.is_some())
        });
        for &id in &probing {
            let Some(t) = self.transports.get_mut(&id) else {
                continue;
            };
            let due = t.bwe.probe_bytes_due(now);
            while let Some(r) = t.bwe.poll_probe_result() {
                tracing::debug!(
                    goal = %r.goal,
                    measured = ?r.measured.map(|m| m.to_string()),
                    success = r.success,
                    estimate = %t.bwe.estimate(),
                    "probe verdict"
                );
                if r.success {
                    t.probe_backoff = PROBE_BACKOFF_INITIAL;
                    t.probe_at = Some(now + PROBE_AFTER_SUCCESS);
                    t.last_allocation = None;
                } else {
                    t.probe_at = Some(now + t.probe_backoff);
                    t.probe_backoff = (t.probe_backoff * 2).min(PROBE_BACKOFF_MAX);
                }
            }
            let Some((sid, mut cursor)) = t.padding else {
                continue;
            };
            if !t.bwe.probing() {
                t.padding = None;
                continue;
            }
            // Pad with the subscription that wants the upgrade, or any video one sending.
            let pad = [sid]
                .into_iter()
                .chain(t.subscriptions.iter().copied())
                .find(|id| {
                    self.subscriptions
                        .get(id)
                        .is_some_and(|s| !s.audio && !s.spec.paused && s.last_out_seq.is_some())
                });
            let Some(pad) = pad else {
                continue;
            };
            let Some(s) = self.subscriptions.get_mut(&pad) else {
                continue;
            };
            let Some(p) = self.publications.get(&s.spec.publication) else {
                continue;
            };
            let newest = s.last_out_seq.unwrap_or_default();
            let (mut sent, mut misses, mut packets) = (0usize, 0u16, 0usize);
            while sent < due && packets < PADDING_MAX_PACKETS && misses < PADDING_WINDOW {
                let seq = newest.wrapping_sub(cursor % PADDING_WINDOW);
                cursor = cursor.wrapping_add(1);
                match retransmit(s, p, t, seq, now, &mut self.bufs, &mut self.transmits) {
                    Some(n) if n > 0 => {
                        sent += n;
                        packets += 1;
                        self.counters.probe_packets_out += 1;
                    }
                    _ => misses += 1,
                }
            }
            t.padding = Some((sid, cursor));
        }
        self.probing = probing;
    }

    fn send_reports(&mut self, now: Instant) {
        let ntp = ntp_at(self.epoch, now);
        let mut out: Vec<(TransportId, Box<dyn RtcpPacket + Send + Sync>)> = Vec::new();
        // Receiver reports to publishers.
        for p in self.publications.values_mut() {
            let Some(t) = self.transports.get(&p.spec.transport) else {
                continue;
            };
            let mut reports = Vec::new();
            for l in p.layers.iter_mut() {
                let (Some(ssrc), true) = (l.spec.ssrc, l.received_any) else {
                    continue;
                };
                let Some(b) = l.stats.report_block(now) else {
                    continue;
                };
                reports.push(rtcp::reception_report::ReceptionReport {
                    ssrc,
                    fraction_lost: b.fraction_lost,
                    total_lost: b.total_lost,
                    last_sequence_number: b.ext_highest_seq,
                    jitter: b.jitter,
                    last_sender_report: b.lsr,
                    delay: b.dlsr,
                });
            }
            if !reports.is_empty() {
                out.push((
                    p.spec.transport,
                    Box::new(rtcp::receiver_report::ReceiverReport {
                        ssrc: t.rtcp_ssrc,
                        reports,
                        profile_extensions: Bytes::new(),
                    }),
                ));
            }
        }
        // Sender reports to subscribers, for lip sync and RTT.
        for s in self.subscriptions.values_mut() {
            let Some(p) = self.publications.get(&s.spec.publication) else {
                continue;
            };
            if let Some(info) = s.stats.sender_info(ntp, now, p.spec.clock_rate) {
                out.push((
                    s.spec.transport,
                    Box::new(rtcp::sender_report::SenderReport {
                        ssrc: s.spec.ssrc,
                        ntp_time: info.ntp,
                        rtp_time: info.rtp_ts,
                        packet_count: info.packets,
                        octet_count: info.octets,
                        reports: vec![],
                        profile_extensions: Bytes::new(),
                    }),
                ));
            }
        }
        for (tid, pkt) in out {
            self.send_rtcp(tid, &[pkt]);
        }
    }

    fn send_twcc_feedback(&mut self) {
        let mut out = Vec::new();
        for (id, t) in self.transports.iter_mut() {
            if t.twcc_pending {
                t.twcc_pending = false;
                let pkts = t.twcc_recorder.build_feedback_packet();
                if !pkts.is_empty() {
                    out.push((*id, pkts));
                }
            }
        }
        for (id, pkts) in out {
            self.send_rtcp(id, &pkts);
        }
    }

    fn send_rtcp(&mut self, tid: TransportId, pkts: &[Box<dyn RtcpPacket + Send + Sync>]) {
        let Some(t) = self.transports.get_mut(&tid) else {
            return;
        };
        let (Some(addr), Some(srtp)) = (t.addr, t.srtp.as_mut()) else {
            return;
        };
        let Ok(plain) = rtcp::packet::marshal(pkts) else {
            return;
        };
        if let Ok(data) = srtp.encrypt_rtcp(&plain) {
            self.counters.rtcp_out += 1;
            self.transmits.push(Transmit { to: addr, data });
        }
    }

    // ---- outputs ------------------------------------------------------------------------

    /// Datagrams waiting for [`poll_transmits`](Self::poll_transmits), counting the copies
    /// the packets taken in will make (at most: a paused or dropping subscription makes none).
    pub fn queued_transmits(&self) -> usize {
        self.transmits.len() + self.pending.copies
    }

    /// Makes the copies of the packets taken in since the last call and moves every queued
    /// datagram into `out`.
    pub fn poll_transmits(&mut self, out: &mut Vec<Transmit>) {
        self.fan_out(usize::MAX);
        out.append(&mut self.transmits);
    }

    /// As [`poll_transmits`](Self::poll_transmits), but makes copies for at most
    /// `subscribers` subscribers (whole: every copy one subscriber gets of a run) before
    /// returning; `true` when copies are left for the next call. The shell sends each part
    /// before the next is made, so the first subscribers' copies of a large fan-out leave
    /// while the others' are still being encrypted instead of after all of them.
    pub fn poll_transmits_upto(&mut self, out: &mut Vec<Transmit>, subscribers: usize) -> bool {
        let more = self.fan_out(subscribers.max(1));
        out.append(&mut self.transmits);
        more
    }

    /// Makes every copy still owed and hands them to `send` (from whichever thread made them),
    /// like [`poll_transmits_upto`](Self::poll_transmits_upto) called with `step` until done,
    /// but with the copies of one publication layer's run to many subscribers shared with
    /// `helpers`: from [`SPREAD_MIN_COPIES`] copies on, the run's subscribers are cut into parts
    /// that this thread and any helper that wakes in time claim one by one
    /// ([`crate::spread::Helpers::run`]), each part making and sending its subscribers' copies
    /// `step` subscribers at a time. The call returns when every part is sent; everything
    /// queued besides the copies goes to `send` too.
    ///
    /// Why: a keyframe to a large room is thousands of copies, and on one thread the last
    /// subscribers wait for all of them: that span is what bounds a busy edge's p99
    /// (BENCHMARKS.md, "The fan-out span"). Each part borrows its own subscriptions and their
    /// transports, so no state is shared between threads, and a subscriber's copies keep their
    /// order (one part makes all of a subscriber's copies of a run, and a run is sent before
    /// the next is made).
    pub fn fan_out_spread(
        &mut self,
        helpers: &crate::spread::Helpers,
        step: usize,
        send: &(dyn Fn(&mut Vec<Transmit>) + Sync),
    ) {
        let step = step.max(1);
        let mut pending = std::mem::take(&mut self.pending);
        let (mut start, mut next) = pending.resume.take().unwrap_or((0, 0));
        let mut transports = Vec::new();
        while start < pending.packets.len() {
            let (pid, layer) = (
                pending.packets[start].publication,
                pending.packets[start].layer,
            );
            let len = pending.packets[start..]
                .iter()
                .take_while(|p| p.publication == pid && p.layer == layer)
                .count();
            let views: Vec<(&PendingPacket, RtpView<'_>)> = pending.packets[start..start + len]
                .iter()
                .filter_map(|p| Some((p, RtpView::parse(&pending.bytes[p.bytes.clone()]).ok()?)))
                .collect();
            let Some(p) = self.publications.get_mut(&pid) else {
                (start, next) = (start + len, 0);
                continue;
            };
            let list = std::mem::take(&mut p.subscribers);
            let rest = &list[next.min(list.len())..];
            let spread = rest.len() * views.len() >= SPREAD_MIN_COPIES
                && helpers.count() > 0
                && self.spread_run(helpers, rest, &views, layer, step, send, &mut transports);
            if !spread {
                for chunk in rest.chunks(step) {
                    for (i, &sid) in chunk.iter().enumerate() {
                        self.prefetch_ahead(chunk, i);
                        for (packet, view) in &views {
                            self.forward(
                                sid,
                                layer,
                                packet.ext_seq,
                                view,
                                packet.keyframe,
                                packet.audio_level,
                                packet.now,
                            );
                        }
                    }
                    if !self.transmits.is_empty() {
                        send(&mut self.transmits);
                        self.transmits.clear();
                    }
                }
            }
            if let Some(p) = self.publications.get_mut(&pid) {
                p.subscribers = list;
            }
            (start, next) = (start + len, 0);
        }
        pending.packets.clear();
        pending.bytes.clear();
        pending.copies = 0;
        self.pending = pending;
        self.tallies.fold_into(&mut self.counters);
        if !self.transmits.is_empty() {
            send(&mut self.transmits);
            self.transmits.clear();
        }
    }

    /// The spread part of [`fan_out_spread`](Self::fan_out_spread) for one run: `false`, with
    /// nothing made, when two of `sids` share a transport (their copies must then be made by
    /// one thread; the caller makes the run on its own).
    #[allow(clippy::too_many_arguments)]
    fn spread_run(
        &mut self,
        helpers: &crate::spread::Helpers,
        sids: &[SubscriptionId],
        views: &[(&PendingPacket, RtpView<'_>)],
        layer: u8,
        step: usize,
        send: &(dyn Fn(&mut Vec<Transmit>) + Sync),
        transports: &mut Vec<TransportId>,
    ) -> bool {
        let Some(mut entries) = borrow_disjoint(
            &mut self.subscriptions,
            &mut self.transports,
            sids,
            transports,
        ) else {
            return false;
        };
        // What was queued before the run (RTCP, retransmissions) leaves first, as it would have.
        if !self.transmits.is_empty() {
            send(&mut self.transmits);
            self.transmits.clear();
        }
        // Parts small enough that a helper waking late still finds some, and that the wait
        // for one a helper is making stays short.
        let part = SPREAD_PART_COPIES
            .div_ceil(views.len().max(1))
            .max(SPREAD_PART_MIN_SUBSCRIBERS);
        let epoch = self.epoch;
        let parts: Vec<Mutex<Option<&mut [SpreadEntry<'_>]>>> = entries
            .chunks_mut(part)
            .map(|chunk| Mutex::new(Some(chunk)))
            .collect();
        let made: Vec<Mutex<PartMade>> = parts.iter().map(|_| Mutex::default()).collect();
        self.counters.fan_out_parts += parts.len() as u64;
        self.counters.fan_out_parts_helped += helpers.run(parts.len(), &|i| {
            let Some(chunk) = lock(&parts[i]).take() else {
                return;
            };
            *lock(&made[i]) = make_part(chunk, views, layer, epoch, step, send);
        }) as u64;
        for part in made {
            let mut part = part.into_inner().unwrap_or_else(PoisonError::into_inner);
            part.tallies.fold_into(&mut self.counters);
            self.layer_watch.append(&mut part.watch);
        }
        true
    }

    /// Hands every queued cascade datagram (encoded, for `MediaChannel::send_encoded`) to
    /// `send`, then empties the queue (keeping its buffer).
    pub fn drain_link_datagrams(&mut self, mut send: impl FnMut(LinkId, &[u8])) {
        for (link, range) in self.link_out.drain(..) {
            send(link, &self.link_bytes[range]);
        }
        self.link_bytes.clear();
    }

    /// Cascade datagrams waiting for [`drain_link_datagrams`](Self::drain_link_datagrams).
    pub fn queued_link_datagrams(&self) -> usize {
        self.link_out.len()
    }

    /// The room of a publication (local or relayed), for logs.
    pub fn publication_room(&self, id: PublicationId) -> Option<&str> {
        self.publications.get(&id).map(|p| p.spec.room.as_str())
    }

    /// The cascade could not take this publication's layer demand (its request queue was
    /// full): it is sent again, as it then stands, on the next [`ShardCore::handle_timeout`].
    pub fn layer_demand_dropped(&mut self, id: PublicationId) {
        if let Some(p) = self.publications.get_mut(&id) {
            p.demand = None;
            if !self.demand_retries.contains(&id) {
                self.demand_retries.push(id);
            }
        }
    }

    /// The next request a relayed publication sends upstream.
    pub fn poll_cascade_request(&mut self) -> Option<CascadeRequest> {
        if self.cascade_requests.is_empty() {
            None
        } else {
            Some(self.cascade_requests.remove(0))
        }
    }

    /// Next event for a session, or a room-wide event (owner `None`).
    pub fn poll_event(&mut self) -> Option<(Option<SessionId>, Event)> {
        if let Some((owner, ev)) = self.events.pop() {
            return Some((Some(owner), ev));
        }
        self.room_events.pop().map(|e| (None, e))
    }

    /// Current layers of a subscription (for stats and tests).
    pub fn subscription_layers(
        &self,
        id: SubscriptionId,
    ) -> Option<(Option<SpatialLayer>, Option<SpatialLayer>)> {
        self.subscriptions
            .get(&id)
            .map(|s| (s.selector.current(), s.selector.target()))
    }

    /// Bandwidth estimate of a transport.
    pub fn transport_estimate(&self, id: TransportId) -> Option<Bitrate> {
        self.transports.get(&id).map(|t| t.bwe.estimate())
    }

    pub fn transport_count(&self) -> usize {
        self.transports.len()
    }
    pub fn publication_count(&self) -> usize {
        self.publications.len()
    }
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    // ---- bookkeeping --------------------------------------------------------------------

    fn add_publication(&mut self, id: PublicationId, spec: PublicationSpec, now: Instant) {
        let Some(t) = self.transports.get_mut(&spec.transport) else {
            return;
        };
        t.mids.insert(spec.mid.clone(), id);
        for (i, l) in spec.layers.iter().enumerate() {
            if let Some(ssrc) = l.ssrc {
                t.ssrc_routes.insert(ssrc, (id, i as u8, false));
            }
            if let Some(ssrc) = l.rtx_ssrc {
                t.ssrc_routes.insert(ssrc, (id, i as u8, true));
            }
        }
        let layers = spec
            .layers
            .iter()
            .map(|l| Layer {
                spec: l.clone(),
                unwrapper: SeqUnwrapper::new(),
                cache: PacketCache::new(PACKET_CACHE_SIZE),
                nack: NackGenerator::default(),
                meter: BitrateMeter::new(),
                stats: ReceiveStats::new(),
                keyframes: KeyframeRequester::new(KeyframeRequesterConfig {
                    prefer_fir: spec.prefers_fir,
                    ..Default::default()
                }),
                received_any: false,
            })
            .collect();
        let _ = now;
        self.publications.insert(
            id,
            Publication {
                spec,
                layers,
                subscribers: Vec::new(),
                muted: false,
                relayed: false,
                sinks: Vec::new(),
                demand: None,
            },
        );
    }

    fn add_relayed_publication(&mut self, id: PublicationId, spec: RelayedPublicationSpec) {
        let layers = (0..spec.layers.max(1))
            .map(|_| Layer {
                spec: LayerSpec::default(),
                unwrapper: SeqUnwrapper::new(),
                cache: PacketCache::new(PACKET_CACHE_SIZE),
                nack: NackGenerator::default(),
                meter: BitrateMeter::new(),
                stats: ReceiveStats::new(),
                keyframes: KeyframeRequester::new(KeyframeRequesterConfig::default()),
                received_any: false,
            })
            .collect();
        self.publications.insert(
            id,
            Publication {
                spec: PublicationSpec {
                    room: spec.room,
                    transport: RELAYED,
                    mid: String::new(),
                    codec: spec.codec,
                    clock_rate: spec.clock_rate,
                    payload_type: 0,
                    rtx_payload_type: None,
                    layers: Vec::new(),
                    prefers_fir: false,
                },
                layers,
                subscribers: Vec::new(),
                muted: false,
                relayed: true,
                sinks: Vec::new(),
                demand: None,
            },
        );
    }

    fn remove_publication(&mut self, id: PublicationId) {
        let Some(p) = self.publications.remove(&id) else {
            return;
        };
        if let Some(t) = self.transports.get_mut(&p.spec.transport) {
            t.ssrc_routes.retain(|_, r| r.0 != id);
            t.mids.retain(|_, pid| *pid != id);
        }
        for sid in p.subscribers {
            self.remove_subscription(sid);
        }
        if let Some(det) = self.speakers.get_mut(&p.spec.room) {
            det.remove(id.0);
        }
        // The room's last publication on this shard: drop its detector too.
        if !self
            .publications
            .values()
            .any(|q| q.spec.room == p.spec.room)
        {
            self.speakers.remove(&p.spec.room);
        }
    }

    fn add_subscription(&mut self, id: SubscriptionId, spec: SubscriptionSpec, now: Instant) {
        let publication = spec.publication;
        let (Some(p), Some(t)) = (
            self.publications.get_mut(&spec.publication),
            self.transports.get_mut(&spec.transport),
        ) else {
            return;
        };
        p.subscribers.push(id);
        t.subscriptions.push(id);
        t.out_ssrcs.insert(spec.ssrc, id);
        if let Some(r) = spec.rtx_ssrc {
            t.out_ssrcs.insert(r, id);
        }
        let mut selector = LayerSelector::new(p.layers.len().max(1) as u8);
        selector.set_max_layer(if spec.paused { None } else { spec.max_layer });
        let rates: Vec<Option<Bitrate>> = p.layers.iter().map(|l| l.meter.bitrate(now)).collect();
        selector.handle_allocation(t.bwe.estimate(), &rates, now);
        let vp8 = matches!(p.spec.codec, MediaCodec::Video(VideoCodec::Vp8)).then(Vp8Munger::new);
        let clock_rate = p.spec.clock_rate;
        let audio = p.spec.codec == MediaCodec::Audio;
        // A new subscriber needs a keyframe to start decoding.
        for l in p.layers.iter_mut() {
            if matches!(p.spec.codec, MediaCodec::Video(_)) {
                l.keyframes.handle_request(now);
            }
        }
        self.subscriptions.insert(
            id,
            Subscription {
                spec,
                selector,
                rewriter: RtpRewriter::new(clock_rate),
                sequencer: Sequencer::new(SEQUENCER_SIZE),
                vp8,
                stats: SendStats::new(),
                rtx_seq: rand::random(),
                last_out_seq: None,
                reported: (None, None),
                started: false,
                audio,
                shed: false,
                watched: false,
            },
        );
        if let Some(s) = self.subscriptions.get_mut(&id) {
            s.watch_layers(id, &mut self.layer_watch);
        }
        self.update_layer_demand(publication);
    }

    fn remove_subscription(&mut self, id: SubscriptionId) {
        let Some(s) = self.subscriptions.remove(&id) else {
            return;
        };
        if let Some(p) = self.publications.get_mut(&s.spec.publication) {
            p.subscribers.retain(|x| *x != id);
        }
        if let Some(t) = self.transports.get_mut(&s.spec.transport) {
            t.subscriptions.retain(|x| *x != id);
            t.out_ssrcs.retain(|_, x| *x != id);
        }
        self.update_layer_demand(s.spec.publication);
    }

    /// The layers of a relayed publication wanted downstream of this edge, or `None` for a
    /// local publication or one with a single layer (audio, plain video: nothing to narrow).
    ///
    /// The rule (after LiveKit's dynacast): layers `0..=M`, where `M` is the highest
    /// `max_layer` among the publication's subscriptions that are not paused, united with the
    /// layers child edges' link sinks take. Every layer below `M` is wanted, not only `M`,
    /// because a subscriber's selector chooses among the layers *being received* (bitrate
    /// known): asking only for what selectors currently forward would deadlock, as a layer not
    /// demanded is not received, so no selector ever targets it, so it is never demanded. The
    /// max layer is the subscriber's wish (its tile), not the bandwidth allocator's choice, for
    /// the same reason. Layer 0 is wanted whenever anyone consumes the track (the down-switch
    /// fallback); nobody consuming (all paused, no sinks) is the empty set.
    pub fn layer_demand(&self, id: PublicationId) -> Option<LayerSet> {
        let p = self.publications.get(&id)?;
        if !p.relayed || p.layers.len() <= 1 {
            return None;
        }
        let top = p.layers.len() as u8 - 1;
        let local = p
            .subscribers
            .iter()
            .filter_map(|sid| self.subscriptions.get(sid))
            .filter(|s| !s.spec.paused)
            .filter_map(|s| s.spec.max_layer)
            .map(|m| m.0.min(top))
            .max();
        let mut bits = local.map_or(0u8, |m| ((1u16 << (m + 1)) - 1) as u8);
        for sink in &p.sinks {
            if sink.layer <= top {
                bits |= 1 << sink.layer;
            }
        }
        if bits != 0 {
            bits |= 1;
        }
        Some(LayerSet(bits))
    }

    /// Emits a [`CascadeRequest::LayerDemand`] when a relayed publication's demand changed.
    fn update_layer_demand(&mut self, id: PublicationId) {
        let Some(demand) = self.layer_demand(id) else {
            return;
        };
        let Some(p) = self.publications.get_mut(&id) else {
            return;
        };
        if p.demand == Some(demand) {
            return;
        }
        p.demand = Some(demand);
        self.cascade_requests.push(CascadeRequest::LayerDemand {
            publication: id,
            layers: demand,
        });
    }

    fn remove_transport(&mut self, id: TransportId) {
        let Some(t) = self.transports.remove(&id) else {
            return;
        };
        if let Some(a) = t.addr {
            self.by_addr.remove(&a);
        }
        self.by_ufrag.retain(|_, x| *x != id);
        let pubs: Vec<PublicationId> = self
            .publications
            .iter()
            .filter(|(_, p)| p.spec.transport == id)
            .map(|(k, _)| *k)
            .collect();
        for p in pubs {
            self.remove_publication(p);
        }
        for s in t.subscriptions {
            self.remove_subscription(s);
        }
    }
}

/// Learns the SSRC of a rid-based simulcast layer (or an unsignalled stream) from the mid / rid /
/// repaired-rid header extensions of its first packets (RFC 8852 §3.3).
/// What upgrading the subscription one layer would cost on top of what it gets now (with the
/// selector's upgrade margin), if it wants a higher layer than its target and one is received.
fn upgrade_cost(selector: &LayerSelector, rates: &[Option<Bitrate>]) -> Option<u64> {
    let max = selector.max_layer()?.0 as usize;
    let target = selector.target().map(|l| l.0 as usize);
    let rate = |l: usize| rates.get(l).copied().flatten().map(|b| b.as_bps());
    let next = (target.map_or(0, |t| t + 1)..=max).find(|&l| rate(l).is_some())?;
    let current = target.and_then(rate).unwrap_or(0);
    let margin = LayerSelectorConfig::default().upgrade_margin_percent;
    Some((rate(next)? * margin / 100).saturating_sub(current))
}

/// A run is spread over threads ([`ShardCore::fan_out_spread`]) from this many copies on.
/// Below it, handing part of it to another thread (a wake-up, tens of microseconds on a busy
/// host) would cost about what it saves: a copy is ~2-5 µs of rewriting, encryption and send.
pub const SPREAD_MIN_COPIES: usize = 128;
/// A spread run is cut into parts of about this many copies (~0.2-0.5 ms of work): small
/// enough that a helper that wakes late still finds parts left and that waiting for a part a
/// helper is making is short, large enough that claiming one is nothing beside it.
const SPREAD_PART_COPIES: usize = 64;
/// ... and of at least this many subscribers (a run of many packets to few subscribers).
const SPREAD_PART_MIN_SUBSCRIBERS: usize = 4;

/// One subscriber of a spread run, with its subscription and transport borrowed for the part
/// that makes its copies.
struct SpreadEntry<'a> {
    sid: SubscriptionId,
    s: &'a mut Subscription,
    t: &'a mut Transport,
}

/// What a part of a spread run leaves for its shard: tallies and the subscriptions whose
/// layers moved.
#[derive(Default)]
struct PartMade {
    tallies: CopyTallies,
    watch: Vec<SubscriptionId>,
}

/// A lock that a panic elsewhere left poisoned is still usable: each part's slot is taken or
/// written whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Borrows, for each of `sids` that has a subscription and transport, both at once; `None`
/// when two of them share a transport. `seen` is scratch, kept by the caller.
fn borrow_disjoint<'a>(
    subscriptions: &'a mut FxHashMap<SubscriptionId, Subscription>,
    transports: &'a mut FxHashMap<TransportId, Transport>,
    sids: &[SubscriptionId],
    seen: &mut Vec<TransportId>,
) -> Option<Vec<SpreadEntry<'a>>> {
    seen.clear();
    let mut found = Vec::with_capacity(sids.len());
    for &sid in sids {
        let Some(s) = subscriptions.get_mut(&sid) else {
            continue;
        };
        let tid = s.spec.transport;
        let s: *mut Subscription = s;
        let Some(t) = transports.get_mut(&tid) else {
            continue;
        };
        seen.push(tid);
        found.push((sid, s, std::ptr::from_mut(t)));
    }
    // Each subscription has one transport, so distinct transports mean distinct subscriptions.
    seen.sort_unstable();
    if seen.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    Some(
        found
            .into_iter()
            // SAFETY: the pointers come from `get_mut` on maps borrowed mutably for 'a, so
            // nothing else reads or moves their entries while the references live; every
            // subscription and every transport is pointed to once (checked above), so no two
            // of the references alias.
            .map(|(sid, s, t)| unsafe {
                SpreadEntry {
                    sid,
                    s: &mut *s,
                    t: &mut *t,
                }
            })
            .collect(),
    )
}

/// Makes and sends the copies of `entries`, one part of a spread run, `step` subscribers at a
/// time, on whichever thread claimed it.
fn make_part(
    entries: &mut [SpreadEntry<'_>],
    views: &[(&PendingPacket, RtpView<'_>)],
    layer: u8,
    epoch: (Instant, SystemTime),
    step: usize,
    send: &(dyn Fn(&mut Vec<Transmit>) + Sync),
) -> PartMade {
    let mut made = PartMade::default();
    PART_BUFFERS.with_borrow_mut(|bufs| {
        for chunk in entries.chunks_mut(step) {
            for i in 0..chunk.len() {
                if let Some(next) = chunk.get(i + 1) {
                    prefetch_copy_state(next.s, next.t);
                }
                let e = &mut chunk[i];
                let mut out = CopyOut {
                    scratch: &mut bufs.scratch,
                    arena: &mut bufs.arena,
                    transmits: &mut bufs.transmits,
                    tallies: &mut made.tallies,
                    watch: &mut made.watch,
                };
                for (packet, view) in views {
                    let copy = CopyOf {
                        layer,
                        ext_seq: packet.ext_seq,
                        view,
                        keyframe: packet.keyframe,
                        audio_level: packet.audio_level,
                        now: packet.now,
                    };
                    make_copy(e.sid, e.s, e.t, &copy, epoch, &mut out);
                }
            }
            if !bufs.transmits.is_empty() {
                send(&mut bufs.transmits);
                bufs.transmits.clear();
            }
        }
    });
    made
}

thread_local! {
    /// The buffers a fan-out thread makes its parts' copies in, kept from part to part.
    static PART_BUFFERS: std::cell::RefCell<PartBuffers> = std::cell::RefCell::new(PartBuffers {
        scratch: vec![0u8; 2048],
        arena: bytes::BytesMut::with_capacity(TX_ARENA),
        transmits: Vec::new(),
    });
}

struct PartBuffers {
    scratch: Vec<u8>,
    arena: bytes::BytesMut,
    transmits: Vec<Transmit>,
}

/// Starts loading what making the next subscriber's copy reads first (see
/// [`ShardCore::prefetch_ahead`], whose one-ahead part this is).
fn prefetch_copy_state(s: &Subscription, t: &Transport) {
    use kcs_media::prefetch::prefetch;
    prefetch(s.sequencer.next_slot(), 1);
    if let Some(srtp) = &t.srtp {
        for r in srtp.outbound_rtp_lines(s.spec.ssrc) {
            prefetch(r, 1);
        }
    }
    for r in t.bwe.next_entries() {
        prefetch(r, 1);
    }
}

/// One packet of a fan-out, as every copy of it is made.
struct CopyOf<'a> {
    layer: u8,
    ext_seq: u64,
    view: &'a RtpView<'a>,
    keyframe: bool,
    audio_level: Option<u8>,
    /// The `now` the packet was taken in with.
    now: Instant,
}

/// Where making a copy writes, besides its subscription and transport: the shard's own
/// buffers and lists on its thread, a [`Lane`]'s on a fan-out thread.
struct CopyOut<'a> {
    scratch: &'a mut Vec<u8>,
    arena: &'a mut bytes::BytesMut,
    transmits: &'a mut Vec<Transmit>,
    tallies: &'a mut CopyTallies,
    watch: &'a mut Vec<SubscriptionId>,
}

/// Copies made and bytes queued, folded into [`ShardCounters`] after a fan-out.
#[derive(Debug, Default, Clone, Copy)]
struct CopyTallies {
    packets: u64,
    bytes: u64,
    encrypt_failures: u64,
}

impl CopyTallies {
    fn fold_into(&mut self, counters: &mut ShardCounters) {
        counters.packets_out += self.packets;
        counters.bytes_out += self.bytes;
        counters.encrypt_failures += self.encrypt_failures;
        *self = CopyTallies::default();
    }
}

/// Makes subscription `sid`'s copy of `packet`: its layer decision, the rewritten header,
/// the VP8 munging and the SRTP encryption, queued on `out.transmits`. It touches only `s`,
/// `t` and `out`, which is what lets a fan-out give disjoint subscribers to several threads.
fn make_copy(
    sid: SubscriptionId,
    s: &mut Subscription,
    t: &mut Transport,
    packet: &CopyOf<'_>,
    epoch: (Instant, SystemTime),
    out: &mut CopyOut<'_>,
) {
    let CopyOf {
        layer,
        ext_seq,
        view,
        keyframe,
        audio_level,
        now,
    } = *packet;
    let (Some(addr), Some(srtp)) = (t.addr, t.srtp.as_mut()) else {
        return;
    };
    if s.spec.paused {
        return;
    }
    let input = RewriteInput {
        layer: SpatialLayer(layer),
        ext_seq,
        timestamp: view.timestamp,
        arrival: now,
    };
    // Audio has no layers and no keyframes: every packet is forwarded.
    let decision = if s.audio {
        Decision::Forward { switch: false }
    } else {
        let d = s.selector.handle_packet(SpatialLayer(layer), keyframe, now);
        s.watch_layers(sid, out.watch);
        d
    };
    let decision = match decision {
        Decision::Forward { switch: false } if s.shed => Decision::Drop,
        d => d,
    };
    let switch = match decision {
        Decision::Drop => {
            if s.selector.current() == Some(SpatialLayer(layer)) {
                s.rewriter.skip(&input);
            }
            return;
        }
        Decision::Forward { switch } => switch || !s.started,
    };
    let Some(rewritten) = s.rewriter.rewrite(&input, switch) else {
        return;
    };
    s.started = true;
    let twcc = t.ext_out.transport_cc.map(|id| {
        let seq = t.twcc_out_seq;
        t.twcc_out_seq = t.twcc_out_seq.wrapping_add(1);
        (id, seq)
    });
    let ext = rtp::OutExtensions {
        abs_send_time: t
            .ext_out
            .abs_send_time
            .map(|id| (id, rtp::abs_send_time(micros_since(epoch, now)))),
        transport_cc: twcc,
        audio_level: t.ext_out.audio_level.zip(audio_level),
        mid: None,
    };
    let payload = view.payload();
    let buf = &mut *out.scratch;
    if buf.len() < MAX_OUT_HEADER + payload.len() {
        buf.resize(MAX_OUT_HEADER + payload.len(), 0);
    }
    let n = rtp::write_header(
        buf,
        view.marker,
        s.spec.payload_type,
        rewritten.seq,
        rewritten.timestamp,
        s.spec.ssrc,
        &ext,
    );
    buf[n..n + payload.len()].copy_from_slice(payload);
    if let Some(m) = s.vp8.as_mut() {
        // A payload the munger cannot parse is forwarded as it came.
        let _ = m.rewrite(&mut buf[n..n + payload.len()], switch);
    }
    let len = n + payload.len();
    match srtp.encrypt_rtp_into(&buf[..len], out.arena) {
        Ok(data) => {
            if let Some((_, seq)) = twcc {
                t.bwe.handle_sent(seq, data.len(), now);
            }
            s.stats.handle_sent(payload.len(), rewritten.timestamp, now);
            s.last_out_seq = Some(rewritten.seq);
            s.sequencer.record(
                rewritten.seq,
                SentPacket {
                    layer: SpatialLayer(layer),
                    ext_seq,
                    timestamp: rewritten.timestamp,
                },
            );
            out.tallies.packets += 1;
            out.tallies.bytes += data.len() as u64;
            out.transmits.push(Transmit { to: addr, data });
        }
        Err(_) => out.tallies.encrypt_failures += 1,
    }
}

/// Resends what subscription `s` sent as `seq`: on its RTX stream when negotiated, else as it
/// was. Returns the bytes put on the wire, `None` when the packet is no longer cached.
fn retransmit(
    s: &mut Subscription,
    p: &Publication,
    t: &mut Transport,
    seq: u16,
    now: Instant,
    bufs: &mut PacketBuffers,
    transmits: &mut Vec<Transmit>,
) -> Option<usize> {
    let sent = s.sequencer.lookup(seq)?;
    let original = p
        .layers
        .get(sent.layer.0 as usize)
        .and_then(|l| l.cache.get(sent.ext_seq))?;
    let view = RtpView::parse(original).ok()?;
    let (Some(addr), Some(srtp)) = (t.addr, t.srtp.as_mut()) else {
        return Some(0);
    };
    let payload = view.payload();
    let twcc = t.ext_out.transport_cc.map(|id| {
        let seq = t.twcc_out_seq;
        t.twcc_out_seq = t.twcc_out_seq.wrapping_add(1);
        (id, seq)
    });
    let ext = rtp::OutExtensions {
        transport_cc: twcc,
        ..Default::default()
    };
    // The shard's reused buffer: no allocation per resent packet (probes send many).
    let out = &mut bufs.scratch;
    out.clear();
    out.resize(MAX_OUT_HEADER + 2 + payload.len(), 0);
    let (n, body_at) = match (s.spec.rtx_ssrc, s.spec.rtx_payload_type) {
        (Some(rtx_ssrc), Some(rtx_pt)) => {
            let rtx_seq = s.rtx_seq;
            s.rtx_seq = s.rtx_seq.wrapping_add(1);
            let n = rtp::write_header(
                out,
                view.marker,
                rtx_pt,
                rtx_seq,
                sent.timestamp,
                rtx_ssrc,
                &ext,
            );
            out[n..n + 2].copy_from_slice(&seq.to_be_bytes());
            (n + 2, n + 2)
        }
        _ => {
            let n = rtp::write_header(
                out,
                view.marker,
                s.spec.payload_type,
                seq,
                sent.timestamp,
                s.spec.ssrc,
                &ext,
            );
            (n, n)
        }
    };
    out[body_at..body_at + payload.len()].copy_from_slice(payload);
    if let Some(m) = s.vp8.as_mut() {
        let _ = m.rewrite(&mut out[body_at..body_at + payload.len()], false);
    }
    out.truncate(n + payload.len());
    let Ok(data) = srtp.encrypt_rtp_into(out, &mut bufs.arena) else {
        return Some(0);
    };
    let len = data.len();
    if let Some((_, tseq)) = twcc {
        t.bwe.handle_sent(tseq, len, now);
    }
    transmits.push(Transmit { to: addr, data });
    Some(len)
}

fn learn_route(
    t: &mut Transport,
    publications: &FxHashMap<PublicationId, Publication>,
    view: &RtpView<'_>,
) -> Option<(PublicationId, u8, bool)> {
    let mid = t.ext_in.mid.and_then(|id| view.extension(id))?;
    let mid = std::str::from_utf8(mid).ok()?;
    let pid = *t.mids.get(mid)?;
    let p = publications.get(&pid)?;
    let rrid = t.ext_in.repaired_rid.and_then(|id| view.extension(id));
    let rid = t.ext_in.rid.and_then(|id| view.extension(id));
    let (rid, is_rtx) = match (rrid, rid) {
        (Some(r), _) => (Some(r), true),
        (None, Some(r)) => (Some(r), p.spec.rtx_payload_type == Some(view.payload_type)),
        (None, None) => (None, p.spec.rtx_payload_type == Some(view.payload_type)),
    };
    let layer = match rid {
        Some(r) => p
            .layers
            .iter()
            .position(|l| l.spec.rid.as_deref().map(str::as_bytes) == Some(r))?,
        None if p.layers.len() == 1 => 0,
        None => return None,
    };
    t.ssrc_routes.insert(view.ssrc, (pid, layer as u8, is_rtx));
    Some((pid, layer as u8, is_rtx))
}

fn micros_since(epoch: (Instant, SystemTime), now: Instant) -> u64 {
    let wall = epoch.1 + now.saturating_duration_since(epoch.0);
    wall.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// NTP timestamp (RFC 3550 §4: seconds since 1900 in 32.32 fixed point) at `now`.
fn ntp_at(epoch: (Instant, SystemTime), now: Instant) -> u64 {
    kcs_media::stats::ntp_from_system_time(epoch.1 + now.saturating_duration_since(epoch.0))
}
