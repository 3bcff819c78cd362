//! Room messages: client intents the edge relays to the origin, and the origin's ordered events.
//!
//! Every intent that expects an answer carries a [`RequestId`] chosen by the edge; the origin
//! answers each with exactly one [`OriginToEdge::Reply`]. Room events carry a per-room sequence
//! number ([`RoomEvent::seq`]) so an edge (and through it, a client) can tell when it missed one.
//!
//! The message enums are deliberately exhaustive: a new variant must be handled by every node.

use crate::ids::{Identity, ParticipantId, Role, RoomId, TrackId, TrackKind, TrackSource};
use serde::{Deserialize, Serialize};

/// Identifies one edge node on the link (in dev mode there is one, `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EdgeId(pub u32);

/// Correlates an intent with its reply; unique per edge while the request is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// A participant as everyone in the room sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    pub id: ParticipantId,
    pub identity: Identity,
    pub name: String,
    pub role: Role,
    /// Edge the participant is connected to (the origin routes media demand by it).
    pub edge: EdgeId,
}

/// A published track as everyone in the room sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    pub id: TrackId,
    pub participant: ParticipantId,
    pub source: TrackSource,
    pub kind: TrackKind,
    /// Codec name as in SDP (`opus`, `VP8`, `H264`, `VP9`).
    pub codec: String,
    /// Simulcast layers published (1 when not simulcast).
    pub layers: u8,
    pub muted: bool,
}

/// What a participant asks of the room, relayed by its edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Intent {
    /// Join with the identity and role the (already verified) token grants.
    Join {
        identity: Identity,
        role: Role,
        name: String,
    },
    /// Leave (or the connection is gone).
    Leave { participant: ParticipantId },
    /// Announce a new published track.
    Publish {
        participant: ParticipantId,
        source: TrackSource,
        codec: String,
        layers: u8,
    },
    /// Withdraw a published track.
    Unpublish {
        participant: ParticipantId,
        track: TrackId,
    },
    /// Mute or unmute one's own track.
    SetMuted {
        participant: ParticipantId,
        track: TrackId,
        muted: bool,
    },
}

/// Why the origin refused an intent. Codes are what clients see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    #[error("not a participant of this room")]
    NotInRoom,
    #[error("role {0} may not do this")]
    Forbidden(Role),
    #[error("no such track")]
    NoSuchTrack,
    #[error("the room is full ({0} participants)")]
    RoomFull(u32),
    #[error("too many tracks published by this participant (limit {0})")]
    TooManyTracks(u32),
    #[error("already publishing a {0:?} track")]
    SourceInUse(TrackSource),
}

impl RoomError {
    pub fn code(&self) -> &'static str {
        match self {
            RoomError::NotInRoom => "not_in_room",
            RoomError::Forbidden(_) => "forbidden",
            RoomError::NoSuchTrack => "no_such_track",
            RoomError::RoomFull(_) => "room_full",
            RoomError::TooManyTracks(_) => "too_many_tracks",
            RoomError::SourceInUse(_) => "source_in_use",
        }
    }
}

/// The origin's answer to one intent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Joined: who you are and the room as it stands (events after `seq` follow on the link).
    Joined {
        you: ParticipantInfo,
        participants: Vec<ParticipantInfo>,
        tracks: Vec<TrackInfo>,
        seq: u64,
    },
    Published {
        track: TrackInfo,
    },
    Done,
    Refused(RoomError),
}

/// One change to a room, in the room's total order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEvent {
    pub room: RoomId,
    /// Per-room sequence number, starting at 1, without gaps.
    pub seq: u64,
    pub body: RoomEventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RoomEventBody {
    ParticipantJoined(ParticipantInfo),
    ParticipantLeft {
        participant: ParticipantId,
    },
    TrackPublished(TrackInfo),
    TrackUnpublished {
        track: TrackId,
        participant: ParticipantId,
    },
    TrackMuted {
        track: TrackId,
        muted: bool,
    },
    /// The last participant left: the room is gone.
    RoomClosed,
}

/// Edge -> origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EdgeToOrigin {
    Request {
        id: RequestId,
        room: RoomId,
        intent: Intent,
    },
}

/// Origin -> edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OriginToEdge {
    Reply { id: RequestId, reply: Reply },
    Event(RoomEvent),
}
