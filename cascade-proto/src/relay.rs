//! The forwarding core of a node that relays media flows between cascade links: the room's
//! origin today, a relay edge of a fan-out tree later. Sans-IO: no sockets, no tasks, no clock
//! (time comes in as `now`), so it is the same code with QUIC links, in-memory links and in
//! simulated tests.
//!
//! ## What it does
//!
//! The room state tells the relay which link each track comes from
//! ([`Relay::set_track_source`], [`Relay::remove_track`]). Peers subscribe to `(track, layer)`
//! pairs with [`ControlMessage::Subscribe`] on their link, naming a flow id of their choosing
//! (docs/cascade.md "Flows"). The relay then:
//!
//! - subscribes **upstream**, on the track's source link, to exactly the union of the layers its
//!   downstream links subscribed to, with one flow id of its own per `(link, track)`; the last
//!   downstream unsubscribe of a layer unsubscribes it upstream. So each link carries each
//!   `(track, layer)` at most once, whatever the number of subscribers behind it;
//! - forwards every datagram from the source to each downstream link subscribed to (and
//!   demanding) its layer, re-stamped with that link's flow id: only the datagram header is
//!   rewritten; the RTP packet is copied as bytes, never parsed beyond its sequence number;
//! - sends layer demand upstream as the union of the downstream demands, when it changes;
//! - coalesces keyframe requests: at most one upstream per `(track, layer)` per
//!   [`RelayConfig::keyframe_interval`];
//! - answers NACKs from a small per-layer packet cache and forwards only the misses upstream;
//! - drops and counts datagrams on a flow it did not subscribe (a peer sending media it was not
//!   asked for, or for a track it is not the source of) and layers it did not ask for.
//!
//! When a source link goes down its tracks stall: the relay keeps the downstream subscriptions
//! and subscribes again when the link comes back ([`Relay::handle_link_up`] with the same id) or
//! the room names a new source ([`Relay::set_track_source`]), asking for a keyframe.
//!
//! ## Driving it
//!
//! Inputs: `handle_link_up`, `handle_link_down`, `handle_control` (the media control messages of
//! a link: subscribe, unsubscribe, keyframe_request, layer_demand, nack; anything else is
//! ignored), `handle_datagram` (the bytes of one QUIC datagram), `set_track_source`,
//! `remove_track`. Outputs: [`Relay::poll_control`] (a control message for a link) and
//! [`Relay::drain_datagrams`] (encoded datagrams for links; the relay keeps one reusable buffer
//! for them, so forwarding allocates nothing per copy once warm).
//!
//! Errors from `handle_control` are the peer's protocol violations ([`RelayError`]); the shell
//! logs them and, for [`RelayError::is_fatal`] ones, closes the link with a goodbye.

use crate::ids::{RoomId, TrackId};
use crate::link::{
    ControlMessage, FlowId, Layer, LayerSet, MediaDatagram, MediaFlags, NackEntry, MAX_LAYER,
    MAX_NACK_ENTRIES,
};
use crate::wire;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};

/// A link as the node's shell names it (one per QUIC connection; stable across a reconnect if
/// the shell reuses it, which lets the relay resume the link's subscriptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link{}", self.0)
    }
}

/// Plain data for a [`Relay`], with the defaults documented.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// At most one keyframe request upstream per `(track, layer)` this often (default 300 ms:
    /// about one round trip to a far publisher plus the time its encoder takes to produce the
    /// keyframe; requests in between would only make it produce another).
    pub keyframe_interval: Duration,
    /// Packets remembered per `(track, layer)` to answer NACKs (default 256: about 1.2 s of
    /// 2 Mbit/s video, longer than a NACK is worth answering across a few hops; a layer's cache
    /// holds up to 256 packets' bytes, ~300 KB, allocated on its first packet).
    pub packet_cache: usize,
    /// Flows one link may subscribe (default 4,096: a thousand participants' camera, screen and
    /// audio through one link). More is refused as a protocol error, so a peer cannot make us
    /// keep unbounded state.
    pub max_flows_per_link: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            keyframe_interval: Duration::from_millis(300),
            packet_cache: 256,
            max_flows_per_link: 4096,
        }
    }
}

/// A peer's control message the relay refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("{0} is not up")]
    UnknownLink(LinkId),
    #[error("flow {flow} is bound to another track; rebinding is a protocol error")]
    FlowRebound { flow: FlowId },
    #[error("flow {flow}: {what} for a flow that is not subscribed")]
    UnknownFlow { flow: FlowId, what: &'static str },
    #[error("subscribe to track {track} of room {room} from the link that publishes it")]
    SubscribeToOwnTrack { room: RoomId, track: TrackId },
    #[error("link subscribed more than {max} flows")]
    TooManyFlows { max: usize },
}

impl RelayError {
    /// Whether the peer broke the protocol (close the link) rather than raced a change (log it).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            RelayError::FlowRebound { .. }
                | RelayError::SubscribeToOwnTrack { .. }
                | RelayError::TooManyFlows { .. }
        )
    }
}

/// Counters for the shell's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    pub datagrams_in: u64,
    /// Copies queued for downstream links (one incoming datagram may make many).
    pub datagrams_out: u64,
    /// Datagrams that did not decode.
    pub malformed: u64,
    /// Datagrams on a flow this node never subscribed on that link: media it did not ask for,
    /// or for a track the sending node is not the source of.
    pub unsolicited: u64,
    /// Datagrams of a layer this node did not subscribe upstream.
    pub unwanted_layer: u64,
    pub keyframe_requests_in: u64,
    pub keyframe_requests_up: u64,
    /// Keyframe requests absorbed by an upstream request sent less than the interval ago.
    pub keyframe_requests_coalesced: u64,
    /// Packets NACKed by downstream links.
    pub nacked: u64,
    /// NACKed packets answered from the cache.
    pub retransmitted: u64,
    /// NACKed packets asked for upstream.
    pub nacks_up: u64,
}

/// Index of a track in the relay's table (internal; stable while the track lives).
type TrackKey = u64;

#[derive(Debug)]
struct LinkState {
    up: bool,
    /// Flows the peer subscribed on this link (it chose the ids): what we send it.
    downstream: HashMap<FlowId, TrackKey>,
    /// Flows we subscribed on this link (we chose the ids): what it sends us.
    upstream: HashMap<FlowId, TrackKey>,
    next_flow: u32,
}

impl LinkState {
    fn new() -> Self {
        Self {
            up: true,
            downstream: HashMap::new(),
            upstream: HashMap::new(),
            next_flow: 1,
        }
    }
}

/// One downstream link's subscription to a track.
#[derive(Debug, Clone, Copy)]
struct Downstream {
    link: LinkId,
    flow: FlowId,
    subscribed: LayerSet,
    /// What the link's side of the tree wants now; `None` until it says (then: all subscribed).
    demand: Option<LayerSet>,
}

impl Downstream {
    fn wants(&self) -> LayerSet {
        LayerSet(self.subscribed.0 & self.demand.map_or(u8::MAX, |d| d.0))
    }
}

/// A packet remembered for NACKs: its bytes live in a reused buffer.
#[derive(Debug, Default)]
struct CachedPacket {
    seq: Option<u16>,
    flags: MediaFlags,
    rtp: Vec<u8>,
}

#[derive(Debug)]
struct TrackState {
    room: RoomId,
    track: TrackId,
    source: Option<LinkId>,
    /// Our flow on the source link while subscribed there.
    upstream_flow: Option<FlowId>,
    /// Layers subscribed upstream.
    upstream_layers: LayerSet,
    /// Demand last sent upstream.
    upstream_demand: Option<LayerSet>,
    downstream: Vec<Downstream>,
    last_keyframe_request: [Option<Instant>; MAX_LAYER as usize + 1],
    /// Per layer, a ring indexed by sequence number (allocated on first packet of the layer).
    cache: [Vec<CachedPacket>; MAX_LAYER as usize + 1],
}

impl TrackState {
    fn wanted_layers(&self) -> LayerSet {
        LayerSet(
            self.downstream
                .iter()
                .fold(0, |acc, d| acc | d.subscribed.0),
        )
    }

    fn demanded_layers(&self) -> LayerSet {
        LayerSet(self.downstream.iter().fold(0, |acc, d| acc | d.wants().0))
    }
}

/// The relay: see the module docs.
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    links: HashMap<LinkId, LinkState>,
    tracks: HashMap<TrackKey, TrackState>,
    track_index: HashMap<(RoomId, TrackId), TrackKey>,
    next_track: TrackKey,
    control_out: VecDeque<(LinkId, ControlMessage)>,
    /// Encoded datagrams waiting for the shell: bytes in one reused buffer.
    datagram_bytes: Vec<u8>,
    datagram_out: Vec<(LinkId, Range<usize>)>,
    pub counters: RelayCounters,
}

impl Relay {
    pub fn new(config: RelayConfig) -> Self {
        Self {
            config,
            links: HashMap::new(),
            tracks: HashMap::new(),
            track_index: HashMap::new(),
            next_track: 0,
            control_out: VecDeque::new(),
            datagram_bytes: Vec::new(),
            datagram_out: Vec::new(),
            counters: RelayCounters::default(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Room state

    /// Track `track` of `room` is published by the node behind `source`. Subscribes upstream if
    /// anyone downstream wants it (moving the subscription if the source changed).
    pub fn set_track_source(&mut self, room: RoomId, track: TrackId, source: LinkId) {
        let key = self.track_key(room, track);
        let t = self.tracks.get_mut(&key).expect("track_key inserts");
        if t.source == Some(source) && t.upstream_flow.is_some() {
            return;
        }
        // Downstream subscribers on the new source link itself would make a loop: drop them.
        let looped: Vec<FlowId> = t
            .downstream
            .iter()
            .filter(|d| d.link == source)
            .map(|d| d.flow)
            .collect();
        t.downstream.retain(|d| d.link != source);
        if let Some(link) = self.links.get_mut(&source) {
            for flow in looped {
                link.downstream.remove(&flow);
            }
        }
        self.drop_upstream(key);
        let old = self
            .tracks
            .get_mut(&key)
            .expect("present")
            .source
            .replace(source);
        if let Some(old) = old.filter(|o| *o != source) {
            self.forget_link_if_dead(old);
        }
        self.sync_upstream(key);
    }

    /// A link that is down and no longer the source of any track is forgotten (a reconnect
    /// under a new id leaves the old one behind once the room moved its tracks).
    fn forget_link_if_dead(&mut self, link: LinkId) {
        let dead = self.links.get(&link).is_some_and(|l| !l.up);
        if dead && !self.tracks.values().any(|t| t.source == Some(link)) {
            self.links.remove(&link);
        }
    }

    /// The track is gone (unpublished): unsubscribes upstream and forgets it. Downstream links
    /// learn it from the room events and unsubscribe; their flows stay bound until then.
    pub fn remove_track(&mut self, room: &RoomId, track: TrackId) {
        let Some(&key) = self.track_index.get(&(room.clone(), track)) else {
            return;
        };
        self.drop_upstream(key);
        let t = self.tracks.get_mut(&key).expect("indexed");
        let old = t.source.take();
        if t.downstream.is_empty() {
            self.forget_track(key);
        }
        if let Some(old) = old {
            self.forget_link_if_dead(old);
        }
    }

    /// The link a track comes from, if known.
    pub fn track_source(&self, room: &RoomId, track: TrackId) -> Option<LinkId> {
        let key = self.track_index.get(&(room.clone(), track))?;
        self.tracks[key].source
    }

    /// Layers of a track currently subscribed upstream (empty when none or unknown).
    pub fn upstream_layers(&self, room: &RoomId, track: TrackId) -> LayerSet {
        self.track_index
            .get(&(room.clone(), track))
            .map_or(LayerSet::default(), |k| self.tracks[k].upstream_layers)
    }

    // -----------------------------------------------------------------------------------------
    // Links

    /// A link is up (new, or the same id again after a reconnect: subscriptions of tracks it is
    /// the source of are sent again).
    pub fn handle_link_up(&mut self, link: LinkId) {
        match self.links.get_mut(&link) {
            Some(l) => l.up = true,
            None => {
                self.links.insert(link, LinkState::new());
            }
        }
        let sourced: Vec<TrackKey> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.source == Some(link))
            .map(|(k, _)| *k)
            .collect();
        for key in sourced {
            self.sync_upstream(key);
        }
    }

    /// A link is gone: its downstream subscriptions end (which may unsubscribe upstream); tracks
    /// it was the source of stall until it comes back or the room names another source.
    pub fn handle_link_down(&mut self, link: LinkId) {
        let Some(state) = self.links.get_mut(&link) else {
            return;
        };
        state.up = false;
        let downstream: Vec<(FlowId, TrackKey)> = state.downstream.drain().collect();
        let upstream: Vec<TrackKey> = state.upstream.drain().map(|(_, k)| k).collect();
        for key in upstream {
            if let Some(t) = self.tracks.get_mut(&key) {
                t.upstream_flow = None;
                t.upstream_layers = LayerSet::default();
                t.upstream_demand = None;
            }
        }
        for (flow, key) in downstream {
            if let Some(t) = self.tracks.get_mut(&key) {
                t.downstream.retain(|d| !(d.link == link && d.flow == flow));
            }
            self.after_downstream_change(key);
        }
        self.control_out.retain(|(l, _)| *l != link);
        // Links that are neither up nor the source of any track are forgotten.
        if !self.tracks.values().any(|t| t.source == Some(link)) {
            self.links.remove(&link);
        }
    }

    /// One media control message from `link`. Messages that are not media control (hello,
    /// room messages, stats, goodbye, drain) are ignored: the link task handles those.
    pub fn handle_control(
        &mut self,
        link: LinkId,
        msg: ControlMessage,
        now: Instant,
    ) -> Result<(), RelayError> {
        if !self.links.get(&link).is_some_and(|l| l.up) {
            return Err(RelayError::UnknownLink(link));
        }
        match msg {
            ControlMessage::Subscribe {
                flow,
                room,
                track,
                layer,
            } => self.handle_subscribe(link, flow, room, track, layer, now),
            ControlMessage::Unsubscribe { flow, layer } => {
                let key = self.downstream_track(link, flow, "unsubscribe")?;
                let t = self
                    .tracks
                    .get_mut(&key)
                    .expect("bound flows name live tracks");
                let Some(d) = t
                    .downstream
                    .iter_mut()
                    .find(|d| d.link == link && d.flow == flow)
                else {
                    return Err(RelayError::UnknownFlow {
                        flow,
                        what: "unsubscribe",
                    });
                };
                d.subscribed = LayerSet(d.subscribed.0 & !(1 << layer.index()));
                if d.subscribed.is_empty() {
                    t.downstream.retain(|d| !(d.link == link && d.flow == flow));
                    self.links
                        .get_mut(&link)
                        .expect("checked above")
                        .downstream
                        .remove(&flow);
                }
                self.after_downstream_change(key);
                Ok(())
            }
            ControlMessage::LayerDemand { flow, layers } => {
                let key = self.downstream_track(link, flow, "layer demand")?;
                let t = self
                    .tracks
                    .get_mut(&key)
                    .expect("bound flows name live tracks");
                if let Some(d) = t
                    .downstream
                    .iter_mut()
                    .find(|d| d.link == link && d.flow == flow)
                {
                    d.demand = Some(layers);
                }
                self.after_downstream_change(key);
                Ok(())
            }
            ControlMessage::KeyframeRequest { flow, layer } => {
                let key = self.downstream_track(link, flow, "keyframe request")?;
                self.counters.keyframe_requests_in += 1;
                self.request_keyframe(key, layer, now);
                Ok(())
            }
            ControlMessage::Nack {
                flow,
                layer,
                entries,
            } => {
                let key = self.downstream_track(link, flow, "nack")?;
                self.handle_nack(key, link, flow, layer, &entries);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn downstream_track(
        &self,
        link: LinkId,
        flow: FlowId,
        what: &'static str,
    ) -> Result<TrackKey, RelayError> {
        self.links
            .get(&link)
            .and_then(|l| l.downstream.get(&flow))
            .copied()
            .ok_or(RelayError::UnknownFlow { flow, what })
    }

    fn handle_subscribe(
        &mut self,
        link: LinkId,
        flow: FlowId,
        room: RoomId,
        track: TrackId,
        layer: Layer,
        now: Instant,
    ) -> Result<(), RelayError> {
        let key = self.track_key(room.clone(), track);
        let max_flows = self.config.max_flows_per_link;
        let state = self.links.get_mut(&link).expect("checked by caller");
        match state.downstream.get(&flow) {
            Some(&bound) if bound != key => {
                self.forget_if_unused(key);
                return Err(RelayError::FlowRebound { flow });
            }
            Some(_) => {}
            None if state.downstream.len() >= max_flows => {
                self.forget_if_unused(key);
                return Err(RelayError::TooManyFlows { max: max_flows });
            }
            None => {}
        }
        let t = self.tracks.get_mut(&key).expect("track_key inserts");
        if t.source == Some(link) {
            self.forget_if_unused(key);
            return Err(RelayError::SubscribeToOwnTrack { room, track });
        }
        state.downstream.insert(flow, key);
        match t
            .downstream
            .iter_mut()
            .find(|d| d.link == link && d.flow == flow)
        {
            Some(d) => {
                d.subscribed = d.subscribed.with(layer);
                if let Some(demand) = d.demand.as_mut() {
                    *demand = demand.with(layer);
                }
            }
            None => t.downstream.push(Downstream {
                link,
                flow,
                subscribed: LayerSet::default().with(layer),
                demand: None,
            }),
        }
        self.after_downstream_change(key);
        // A new subscriber needs a keyframe to start decoding, whether the layer was flowing
        // already or is subscribed upstream just now (coalesced with everyone else's).
        self.request_keyframe(key, layer, now);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Media

    /// One datagram received on `link`. Invalid or unsolicited ones are dropped and counted.
    pub fn handle_datagram(&mut self, link: LinkId, bytes: &[u8]) {
        self.counters.datagrams_in += 1;
        let d = match wire::decode_datagram(bytes) {
            Ok(d) => d,
            Err(_) => {
                self.counters.malformed += 1;
                return;
            }
        };
        let Some(&key) = self
            .links
            .get(&link)
            .filter(|l| l.up)
            .and_then(|l| l.upstream.get(&d.flow))
        else {
            self.counters.unsolicited += 1;
            return;
        };
        let t = self
            .tracks
            .get_mut(&key)
            .expect("upstream flows name live tracks");
        if t.source != Some(link) {
            self.counters.unsolicited += 1;
            return;
        }
        if !t.upstream_layers.contains(d.layer) {
            self.counters.unwanted_layer += 1;
            return;
        }
        // Remember it for NACKs (retransmissions too: the cache answers the next NACK).
        if let Some(seq) = rtp_seq(d.rtp) {
            let slots = &mut t.cache[usize::from(d.layer.index())];
            if slots.is_empty() {
                slots.resize_with(self.config.packet_cache.max(1), CachedPacket::default);
            }
            let slot = &mut slots[usize::from(seq) % self.config.packet_cache.max(1)];
            slot.seq = Some(seq);
            slot.flags = d.flags;
            slot.rtp.clear();
            slot.rtp.extend_from_slice(d.rtp);
        }
        for down in &t.downstream {
            if down.wants().contains(d.layer) {
                let start = self.datagram_bytes.len();
                wire::encode_datagram(
                    &MediaDatagram {
                        flow: down.flow,
                        layer: d.layer,
                        flags: d.flags,
                        rtp: d.rtp,
                    },
                    &mut self.datagram_bytes,
                );
                self.datagram_out
                    .push((down.link, start..self.datagram_bytes.len()));
                self.counters.datagrams_out += 1;
            }
        }
    }

    fn handle_nack(
        &mut self,
        key: TrackKey,
        link: LinkId,
        flow: FlowId,
        layer: Layer,
        entries: &[NackEntry],
    ) {
        let cache_len = self.config.packet_cache.max(1);
        let t = self
            .tracks
            .get_mut(&key)
            .expect("bound flows name live tracks");
        let slots = &t.cache[usize::from(layer.index())];
        let mut missing: Vec<u16> = Vec::new();
        for seq in entries.iter().flat_map(expand_nack) {
            self.counters.nacked += 1;
            match slots.get(usize::from(seq) % cache_len) {
                Some(p) if p.seq == Some(seq) => {
                    let start = self.datagram_bytes.len();
                    wire::encode_datagram(
                        &MediaDatagram {
                            flow,
                            layer,
                            flags: MediaFlags {
                                retransmission: true,
                                ..p.flags
                            },
                            rtp: &p.rtp,
                        },
                        &mut self.datagram_bytes,
                    );
                    self.datagram_out
                        .push((link, start..self.datagram_bytes.len()));
                    self.counters.retransmitted += 1;
                }
                _ => missing.push(seq),
            }
        }
        if missing.is_empty() {
            return;
        }
        let (Some(source), Some(up_flow)) = (t.source, t.upstream_flow) else {
            return;
        };
        if !t.upstream_layers.contains(layer) {
            return;
        }
        self.counters.nacks_up += missing.len() as u64;
        let entries = pack_nack(&missing);
        for chunk in entries.chunks(MAX_NACK_ENTRIES) {
            self.control_out.push_back((
                source,
                ControlMessage::Nack {
                    flow: up_flow,
                    layer,
                    entries: chunk.to_vec(),
                },
            ));
        }
    }

    fn request_keyframe(&mut self, key: TrackKey, layer: Layer, now: Instant) {
        let interval = self.config.keyframe_interval;
        let t = self.tracks.get_mut(&key).expect("live track");
        let (Some(source), Some(up_flow)) = (t.source, t.upstream_flow) else {
            return;
        };
        if !t.upstream_layers.contains(layer) {
            return;
        }
        let last = &mut t.last_keyframe_request[usize::from(layer.index())];
        if last.is_some_and(|at| now.saturating_duration_since(at) < interval) {
            self.counters.keyframe_requests_coalesced += 1;
            return;
        }
        *last = Some(now);
        self.counters.keyframe_requests_up += 1;
        self.control_out.push_back((
            source,
            ControlMessage::KeyframeRequest {
                flow: up_flow,
                layer,
            },
        ));
    }

    // -----------------------------------------------------------------------------------------
    // Outputs

    /// The next control message to send, and on which link.
    pub fn poll_control(&mut self) -> Option<(LinkId, ControlMessage)> {
        self.control_out.pop_front()
    }

    /// Hands every queued datagram (encoded, ready for `MediaChannel::send_encoded`) to `send`,
    /// then empties the queue (keeping its buffer).
    pub fn drain_datagrams(&mut self, mut send: impl FnMut(LinkId, &[u8])) {
        for (link, range) in self.datagram_out.drain(..) {
            send(link, &self.datagram_bytes[range]);
        }
        self.datagram_bytes.clear();
    }

    /// Datagrams waiting in [`drain_datagrams`](Self::drain_datagrams).
    pub fn queued_datagrams(&self) -> usize {
        self.datagram_out.len()
    }

    // -----------------------------------------------------------------------------------------
    // Upstream bookkeeping

    fn track_key(&mut self, room: RoomId, track: TrackId) -> TrackKey {
        if let Some(&k) = self.track_index.get(&(room.clone(), track)) {
            return k;
        }
        let k = self.next_track;
        self.next_track += 1;
        self.track_index.insert((room.clone(), track), k);
        self.tracks.insert(
            k,
            TrackState {
                room,
                track,
                source: None,
                upstream_flow: None,
                upstream_layers: LayerSet::default(),
                upstream_demand: None,
                downstream: Vec::new(),
                last_keyframe_request: [None; MAX_LAYER as usize + 1],
                cache: Default::default(),
            },
        );
        k
    }

    fn forget_if_unused(&mut self, key: TrackKey) {
        let t = &self.tracks[&key];
        if t.downstream.is_empty() && t.source.is_none() {
            self.forget_track(key);
        }
    }

    fn forget_track(&mut self, key: TrackKey) {
        if let Some(t) = self.tracks.remove(&key) {
            self.track_index.remove(&(t.room, t.track));
        }
    }

    /// Forgets the upstream subscription (the link is gone or the source moved) without sending
    /// anything to the old source except unsubscribes when it is still up.
    fn drop_upstream(&mut self, key: TrackKey) {
        let t = self.tracks.get_mut(&key).expect("live track");
        let (Some(source), Some(flow)) = (t.source, t.upstream_flow.take()) else {
            return;
        };
        let layers = std::mem::take(&mut t.upstream_layers);
        t.upstream_demand = None;
        if let Some(link) = self.links.get_mut(&source) {
            link.upstream.remove(&flow);
            if link.up {
                for layer in layers_of(layers) {
                    self.control_out
                        .push_back((source, ControlMessage::Unsubscribe { flow, layer }));
                }
            }
        }
    }

    fn after_downstream_change(&mut self, key: TrackKey) {
        self.sync_upstream(key);
        self.forget_if_unused(key);
    }

    /// Makes the upstream subscription match the downstream union.
    fn sync_upstream(&mut self, key: TrackKey) {
        let t = self.tracks.get_mut(&key).expect("live track");
        let Some(source) = t.source else {
            return;
        };
        let Some(link) = self.links.get_mut(&source).filter(|l| l.up) else {
            return;
        };
        let wanted = t.wanted_layers();
        let flow = match t.upstream_flow {
            Some(f) => f,
            None if wanted.is_empty() => return,
            None => {
                // Cannot fail before a peer hits `max_flows_per_link`: 2^30 ids per link.
                let Some(f) = allocate_flow(link) else {
                    return;
                };
                link.upstream.insert(f, key);
                t.upstream_flow = Some(f);
                f
            }
        };
        let have = t.upstream_layers;
        for layer in layers_of(LayerSet(wanted.0 & !have.0)) {
            self.control_out.push_back((
                source,
                ControlMessage::Subscribe {
                    flow,
                    room: t.room.clone(),
                    track: t.track,
                    layer,
                },
            ));
        }
        for layer in layers_of(LayerSet(have.0 & !wanted.0)) {
            self.control_out
                .push_back((source, ControlMessage::Unsubscribe { flow, layer }));
        }
        t.upstream_layers = wanted;
        if wanted.is_empty() {
            t.upstream_flow = None;
            t.upstream_demand = None;
            link.upstream.remove(&flow);
            return;
        }
        let demand = t.demanded_layers();
        // Demand goes up only once someone narrowed it; until then "everything subscribed".
        let narrowed = t.downstream.iter().any(|d| d.demand.is_some());
        if (narrowed || t.upstream_demand.is_some()) && t.upstream_demand != Some(demand) {
            t.upstream_demand = Some(demand);
            self.control_out.push_back((
                source,
                ControlMessage::LayerDemand {
                    flow,
                    layers: demand,
                },
            ));
        }
    }
}

fn allocate_flow(link: &mut LinkState) -> Option<FlowId> {
    for _ in 0..=FlowId::MAX {
        let candidate = FlowId::new(link.next_flow)?;
        link.next_flow = if link.next_flow >= FlowId::MAX {
            1
        } else {
            link.next_flow + 1
        };
        if !link.upstream.contains_key(&candidate) {
            return Some(candidate);
        }
    }
    None
}

fn layers_of(set: LayerSet) -> impl Iterator<Item = Layer> {
    (0..=MAX_LAYER)
        .filter_map(Layer::new)
        .filter(move |l| set.contains(*l))
}

/// The RTP sequence number (RFC 3550 §5.1, bytes 2-3): the only field the relay reads.
fn rtp_seq(rtp: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*rtp.get(2)?, *rtp.get(3)?]))
}

/// RFC 4585 §6.2.1: `pid`, and `pid + i + 1` for each bit `i` of `blp`.
fn expand_nack(e: &NackEntry) -> impl Iterator<Item = u16> + '_ {
    std::iter::once(e.pid).chain(
        (0..16u16)
            .filter(move |i| e.blp & (1 << i) != 0)
            .map(move |i| e.pid.wrapping_add(i + 1)),
    )
}

/// Packs sequence numbers (in NACK order) into RFC 4585 entries.
fn pack_nack(seqs: &[u16]) -> Vec<NackEntry> {
    let mut out: Vec<NackEntry> = Vec::new();
    for &seq in seqs {
        if let Some(last) = out.last_mut() {
            let diff = seq.wrapping_sub(last.pid);
            if (1..=16).contains(&diff) {
                last.blp |= 1 << (diff - 1);
                continue;
            }
        }
        out.push(NackEntry { pid: seq, blp: 0 });
    }
    out
}

#[cfg(test)]
mod tests;
