//! What two nodes say to each other on a cascade link, as typed values.
//!
//! A link joins two nodes (edge ↔ origin, or edge ↔ edge along a room's fan-out tree). It has
//! one ordered, reliable *control stream* carrying [`ControlMessage`]s, and unordered,
//! unreliable *media datagrams* ([`MediaDatagram`]): RTP packets of the (track, layer) pairs the
//! receiving side subscribed to. [`crate::wire`] turns both into bytes and back; docs/cascade.md
//! has the byte layout. This module only defines the values and their limits; it does no I/O.
//!
//! ## Flows
//!
//! A link may carry many rooms, and track ids are only unique within a room, so media does not
//! name `(room, track)` in every datagram. Instead the *subscriber* picks a small link-local
//! [`FlowId`] in its [`ControlMessage::Subscribe`]; the sender then stamps that id on every
//! datagram of the track. Media always flows in answer to a subscription (the origin subscribes
//! to an edge's local publishers just as an edge subscribes to the origin), so a receiver only
//! ever sees flow ids it chose itself and an unknown flow id is simply dropped.

use crate::ids::{RoomId, TrackId};
use crate::room::{EdgeToOrigin, OriginToEdge};
use std::fmt;

/// The cascade protocol version this build speaks. Both ends send it in their [`Hello`]; a peer
/// with another version is refused with [`GoodbyeCode::VersionMismatch`] and a reason.
///
/// History: 2 added the room event `ParticipantCount` (large rooms' presence), which a
/// version-1 node cannot decode, so mixed clusters are refused at the handshake instead of
/// failing on the first large room. 3 added the room event `Restored` (a rebuilt room's
/// settings and hands, sent to clients that may hold others).
pub const PROTOCOL_VERSION: u16 = 3;

/// The QUIC ALPN of cascade links (RFC 7301). A TLS peer offering anything else fails the
/// handshake, so a stray HTTP/3 client never reaches our control stream.
pub const ALPN: &[u8] = b"kcs-cascade/1";

/// Highest simulcast layer index a link can name. Three spatial layers is what publishers send
/// today; eight leave room for temporal/spatial combinations and fit [`LayerSet`] in one byte.
pub const MAX_LAYER: u8 = 7;

/// Most NACK entries in one [`ControlMessage::Nack`]. Each entry covers 17 packets (RFC 4585
/// §6.2.1), so 64 entries name up to 1,088 lost packets: more than a video burst at 2 Mbit/s
/// over a full second. Larger losses are better served by a keyframe request.
pub const MAX_NACK_ENTRIES: usize = 64;

/// Longest free-text reason in a [`ControlMessage::Goodbye`], in bytes.
pub const MAX_REASON_LEN: usize = 1024;

/// Longest node id or region name: one DNS label (RFC 1035 §2.3.4), the same rule as the
/// control plane's node registry, so a hello names exactly the node the registry lists.
pub const MAX_LABEL_LEN: usize = 63;

/// Why a [`Label`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    #[error("must be 1 to {MAX_LABEL_LEN} bytes")]
    Length,
    #[error("character {0:?} not allowed (a-z, 0-9, '-', not at either end)")]
    BadChar(char),
}

/// A node id or region name: a lowercase DNS label, as registered with the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    pub fn new(s: impl Into<String>) -> Result<Self, LabelError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_LABEL_LEN {
            return Err(LabelError::Length);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(LabelError::BadChar(c));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(LabelError::BadChar('-'));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a node is on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    Edge,
    Origin,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Edge => "edge",
            NodeRole::Origin => "origin",
        }
    }
}

/// The first message each side sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node: Label,
    pub region: Label,
    pub role: NodeRole,
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u16,
}

/// A simulcast layer index, `0..=MAX_LAYER` (0 is the lowest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Layer(u8);

impl Layer {
    pub const LOWEST: Layer = Layer(0);

    /// `None` when above [`MAX_LAYER`].
    pub fn new(index: u8) -> Option<Self> {
        (index <= MAX_LAYER).then_some(Self(index))
    }

    pub fn index(self) -> u8 {
        self.0
    }
}

/// A set of layers (bit `i` = layer `i`): what a subscriber's side of the tree needs of a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LayerSet(pub u8);

impl LayerSet {
    pub fn contains(self, layer: Layer) -> bool {
        self.0 & (1 << layer.0) != 0
    }

    pub fn with(self, layer: Layer) -> Self {
        Self(self.0 | (1 << layer.0))
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The highest layer in the set.
    pub fn highest(self) -> Option<Layer> {
        (self.0 != 0).then(|| Layer(7 - self.0.leading_zeros() as u8))
    }
}

/// Link-local name of one `(room, track)`, chosen by the subscriber (see the module docs).
/// Values up to 2^30 - 1 keep datagram headers at most 6 bytes; smaller ones use fewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(u32);

impl FlowId {
    /// Largest flow id: the biggest 4-byte QUIC variable-length integer (RFC 9000 §16).
    pub const MAX: u32 = (1 << 30) - 1;

    pub fn new(id: u32) -> Option<Self> {
        (id <= Self::MAX).then_some(Self(id))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "f{}", self.0)
    }
}

/// One generic NACK entry (RFC 4585 §6.2.1): packet `pid` lost, and `pid + i + 1` lost for
/// every bit `i` set in `blp`. Sequence numbers are the RTP sequence numbers of the flow's
/// layer as the sender sent them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NackEntry {
    pub pid: u16,
    pub blp: u16,
}

/// Counters one side reports about the link, so both ends' metrics show both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Smoothed round-trip time as the sender's QUIC stack measures it, in microseconds.
    pub rtt_micros: u32,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// Datagrams received but dropped (unknown flow, malformed, queue full).
    pub datagrams_dropped: u64,
    pub bytes_sent: u64,
}

/// Why a side ends the link (or refuses it at hello).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GoodbyeCode {
    /// Planned shutdown; nothing is wrong.
    Normal,
    /// The peer's [`Hello::version`] is not ours.
    VersionMismatch,
    /// The peer's hello was missing, out of place, or named a role this side cannot link with.
    BadHello,
    /// The peer sent a frame this side cannot decode or that breaks the protocol.
    ProtocolError,
    /// This side is going away after a drain.
    Draining,
    /// Any code this build does not know (kept so a newer peer's code can be logged).
    Other(u16),
}

impl GoodbyeCode {
    pub fn to_u16(self) -> u16 {
        match self {
            GoodbyeCode::Normal => 0,
            GoodbyeCode::VersionMismatch => 1,
            GoodbyeCode::BadHello => 2,
            GoodbyeCode::ProtocolError => 3,
            GoodbyeCode::Draining => 4,
            GoodbyeCode::Other(c) => c,
        }
    }

    pub fn from_u16(code: u16) -> Self {
        match code {
            0 => GoodbyeCode::Normal,
            1 => GoodbyeCode::VersionMismatch,
            2 => GoodbyeCode::BadHello,
            3 => GoodbyeCode::ProtocolError,
            4 => GoodbyeCode::Draining,
            c => GoodbyeCode::Other(c),
        }
    }
}

/// One message on a link's control stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlMessage {
    /// First message of each side.
    Hello(Hello),
    /// Stop sending new work this way: the sender leaves within `deadline_ms` and the receiver
    /// should move its subscriptions elsewhere (its new tree parent) before then.
    Drain {
        deadline_ms: u32,
    },
    /// Last message of a side: why it closes. `reason` is for logs and operators.
    Goodbye {
        code: GoodbyeCode,
        reason: String,
    },
    /// Room protocol, edge → origin (the origin's room state machine, unchanged).
    ToOrigin(EdgeToOrigin),
    /// Room protocol, origin → edge: replies and the room's ordered events.
    ToEdge(OriginToEdge),
    /// Send me `track` of `room` at `layer`, stamped with `flow`. The first subscribe of a flow
    /// binds it to the track; further ones add layers. Rebinding a bound flow to another track
    /// is a protocol error.
    Subscribe {
        flow: FlowId,
        room: RoomId,
        track: TrackId,
        layer: Layer,
    },
    /// Stop sending `layer` of `flow`; the flow is unbound when its last layer goes.
    Unsubscribe {
        flow: FlowId,
        layer: Layer,
    },
    /// The subscriber's side needs a keyframe of this layer (coalesced on the way up the tree).
    KeyframeRequest {
        flow: FlowId,
        layer: Layer,
    },
    /// The layers the subscriber's side of the tree currently wants of a flow (aggregated from
    /// its own subscribers); the sender may stop forwarding layers outside the set.
    LayerDemand {
        flow: FlowId,
        layers: LayerSet,
    },
    /// Packets of `layer` of `flow` the subscriber did not get.
    Nack {
        flow: FlowId,
        layer: Layer,
        entries: Vec<NackEntry>,
    },
    Stats(LinkStats),
    /// The sender will not serve `flow` (sent instead of media to a `subscribe` it refuses: a
    /// room or track it does not know, a track the subscriber itself sends). The flow stays
    /// unbound; the link and its other flows go on. `reason` is for logs and operators.
    SubscribeRefused {
        flow: FlowId,
        reason: String,
    },
}

impl ControlMessage {
    /// Short name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Hello(_) => "hello",
            ControlMessage::Drain { .. } => "drain",
            ControlMessage::Goodbye { .. } => "goodbye",
            ControlMessage::ToOrigin(_) => "to_origin",
            ControlMessage::ToEdge(_) => "to_edge",
            ControlMessage::Subscribe { .. } => "subscribe",
            ControlMessage::Unsubscribe { .. } => "unsubscribe",
            ControlMessage::KeyframeRequest { .. } => "keyframe_request",
            ControlMessage::LayerDemand { .. } => "layer_demand",
            ControlMessage::Nack { .. } => "nack",
            ControlMessage::Stats(_) => "stats",
            ControlMessage::SubscribeRefused { .. } => "subscribe_refused",
        }
    }
}

/// Per-packet flags of a media datagram, set by the node that first received the packet from
/// its publisher (which parsed the codec payload), so relays never parse payloads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MediaFlags {
    /// The packet belongs to a keyframe (a receiver may switch to this layer here).
    pub keyframe: bool,
    /// The packet ends a frame (the RTP marker bit, copied so relays need not read RTP).
    pub end_of_frame: bool,
    /// A retransmission answering a NACK (not counted as new media).
    pub retransmission: bool,
}

/// One media datagram: a header naming the flow and layer, then one whole RTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDatagram<'a> {
    pub flow: FlowId,
    pub layer: Layer,
    pub flags: MediaFlags,
    /// The RTP packet as the publisher's edge decrypted it (RFC 3550 §5.1, version 2).
    pub rtp: &'a [u8],
}

/// Why a side refuses its peer's hello: sent as a [`ControlMessage::Goodbye`] and as the QUIC
/// connection close, so the peer's operator reads the same reason either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: GoodbyeCode,
    pub reason: String,
}

impl Hello {
    /// Checks the peer's hello against ours (sans-IO half of the link handshake): same protocol
    /// version, and a role this node can link with (an origin links only with edges; edges link
    /// with origins and, along a fan-out tree, with other edges).
    pub fn check_peer(&self, peer: &Hello) -> Result<(), Refusal> {
        if peer.version != self.version {
            return Err(Refusal {
                code: GoodbyeCode::VersionMismatch,
                reason: format!(
                    "cascade protocol version mismatch: {} {} speaks version {}, {} {} speaks version {}",
                    peer.role.as_str(),
                    peer.node,
                    peer.version,
                    self.role.as_str(),
                    self.node,
                    self.version
                ),
            });
        }
        if self.role == NodeRole::Origin && peer.role == NodeRole::Origin {
            return Err(Refusal {
                code: GoodbyeCode::BadHello,
                reason: format!(
                    "origin {} does not link with origin {}",
                    self.node, peer.node
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(node: &str, role: NodeRole, version: u16) -> Hello {
        Hello {
            node: Label::new(node).unwrap(),
            region: Label::new("eu").unwrap(),
            role,
            version,
        }
    }

    #[test]
    fn handshake_checks_version_and_roles() {
        let origin = hello("origin-1", NodeRole::Origin, PROTOCOL_VERSION);
        assert_eq!(
            origin.check_peer(&hello("edge-1", NodeRole::Edge, PROTOCOL_VERSION)),
            Ok(())
        );
        let refusal = origin
            .check_peer(&hello("edge-1", NodeRole::Edge, 2))
            .unwrap_err();
        assert_eq!(refusal.code, GoodbyeCode::VersionMismatch);
        assert!(refusal.reason.contains("edge edge-1 speaks version 2"));
        assert!(refusal.reason.contains("origin origin-1 speaks version 3"));
        let refusal = origin
            .check_peer(&hello("origin-2", NodeRole::Origin, PROTOCOL_VERSION))
            .unwrap_err();
        assert_eq!(refusal.code, GoodbyeCode::BadHello);
        let edge = hello("edge-2", NodeRole::Edge, PROTOCOL_VERSION);
        assert_eq!(
            edge.check_peer(&hello("edge-1", NodeRole::Edge, PROTOCOL_VERSION)),
            Ok(())
        );
    }

    #[test]
    fn labels_follow_the_registry_rule() {
        assert!(Label::new("edge-fra-1").is_ok());
        assert_eq!(Label::new(""), Err(LabelError::Length));
        assert_eq!(Label::new("a".repeat(64)), Err(LabelError::Length));
        assert_eq!(Label::new("Edge"), Err(LabelError::BadChar('E')));
        assert_eq!(Label::new("-a"), Err(LabelError::BadChar('-')));
    }

    #[test]
    fn layer_sets() {
        let s = LayerSet::default()
            .with(Layer::new(0).unwrap())
            .with(Layer::new(2).unwrap());
        assert!(s.contains(Layer::new(2).unwrap()));
        assert!(!s.contains(Layer::new(1).unwrap()));
        assert_eq!(s.highest(), Layer::new(2));
        assert_eq!(LayerSet(0x80).highest(), Layer::new(7));
        assert_eq!(LayerSet::default().highest(), None);
        assert!(Layer::new(8).is_none());
    }
}
