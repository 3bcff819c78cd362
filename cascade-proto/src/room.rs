//! Room messages: client intents the edge relays to the origin, and the origin's ordered events.
//!
//! Every intent that expects an answer carries a [`RequestId`] chosen by the edge; the origin
//! answers each with exactly one [`OriginToEdge::Reply`]. Room events carry a per-room sequence
//! number ([`RoomEvent::seq`]) so an edge (and through it, a client) can tell when it missed one.
//! Events meant for one participant or for the moderators ([`Audience`]) do not advance the
//! sequence: a participant who is not told about them must not see a gap.
//!
//! The message enums are deliberately exhaustive: a new variant must be handled by every node.

use crate::ids::{Identity, ParticipantId, Role, RoomId, TrackId, TrackKind, TrackSource};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// A moderator muted it: not forwarded, and its owner may not unmute it.
    #[serde(rename = "hostMuted")]
    pub host_muted: bool,
}

/// One chat message in the room's total order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Room-wide, increasing: the order every participant sees.
    pub id: u64,
    /// Origin's clock, Unix milliseconds.
    pub ts: u64,
    pub from: ParticipantId,
    #[serde(rename = "fromName")]
    pub from_name: String,
    /// The recipient of a direct message; `None` for the whole room.
    pub to: Option<ParticipantId>,
    pub text: String,
}

/// The room-wide view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Grid,
    Speaker,
}

/// Room settings moderators change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSettings {
    /// New joins refused (moderators and invited identities excepted).
    pub locked: bool,
    /// New guests wait until a moderator admits them.
    pub lobby: bool,
    pub layout: Layout,
    pub spotlight: Option<ParticipantId>,
    /// A live stream is running (always false until the egress exists).
    pub streaming: bool,
}

impl Default for RoomSettings {
    fn default() -> Self {
        Self {
            locked: false,
            lobby: false,
            layout: Layout::Grid,
            spotlight: None,
            streaming: false,
        }
    }
}

/// Whether a participant's connection is up (a dropped one is kept for a while for resuming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    Connected,
    Reconnecting,
}

/// How a room tells its participants about each other (docs/protocol.md, "Presence").
///
/// A room starts in [`PresenceMode::Full`]: every join and leave is listed to everyone, in
/// batches. Once it has more participants than its threshold (`full_presence_up_to` of the
/// origin's room config) it turns [`PresenceMode::Interesting`] for the rest of its life (the
/// mode latches: a room that shrinks again keeps it, so a client never has to rebuild a roster
/// it was told not to keep): joins and leaves are listed only for *announced* participants
/// (hosts, co-hosts, presenters, publishers, raised hands, and anyone once announced), and the
/// room's size goes out as [`RoomEventBody::ParticipantCount`], at most once a second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceMode {
    #[default]
    Full,
    Interesting,
}

/// The room as a joining participant first sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSnapshot {
    pub you: ParticipantInfo,
    /// Full presence: the first page of the roster, by id (the rest via [`Intent::Members`]).
    /// Interesting presence: the announced participants (interesting ones first when there
    /// are more than a page), by id.
    pub participants: Vec<ParticipantInfo>,
    pub participant_count: u32,
    /// Which presence mode holds (absent from older origins: full).
    #[serde(default)]
    pub presence: PresenceMode,
    pub tracks: Vec<TrackInfo>,
    /// The last messages the participant may see, oldest first.
    pub chat: Vec<ChatMessage>,
    /// Raised hands, oldest first.
    pub hands: Vec<ParticipantId>,
    pub settings: RoomSettings,
    /// Those waiting in the lobby (for moderators; empty for others).
    pub lobby: Vec<ParticipantInfo>,
    /// Sequence number of the last room event included in this view.
    pub seq: u64,
}

/// Permission-checked actions that need no state change of their own: asked before the client
/// starts capturing (so a refused user is told before a browser prompt), and live streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Publish(TrackSource),
    LiveStream,
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
    /// Leave (or the connection is gone, or a waiting guest gave up).
    Leave {
        participant: ParticipantId,
    },
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
    /// Is this participant allowed to do this? (Answers `Done` or a refusal.)
    Authorize {
        participant: ParticipantId,
        action: Action,
    },
    /// A page of the roster: participants with ids above `after`.
    Members {
        participant: ParticipantId,
        after: ParticipantId,
        limit: u32,
    },
    /// The participant's connection dropped or came back.
    SetStatus {
        participant: ParticipantId,
        status: PresenceStatus,
    },
    /// End the meeting for everyone.
    Close {
        participant: ParticipantId,
    },
    SetLocked {
        participant: ParticipantId,
        locked: bool,
    },
    SetLobby {
        participant: ParticipantId,
        enabled: bool,
    },
    Admit {
        participant: ParticipantId,
        waiting: ParticipantId,
    },
    Deny {
        participant: ParticipantId,
        waiting: ParticipantId,
    },
    SetRole {
        participant: ParticipantId,
        target: ParticipantId,
        role: Role,
    },
    Remove {
        participant: ParticipantId,
        target: ParticipantId,
    },
    /// Let `identity` in without the lobby and through the lock (participant:add).
    Invite {
        participant: ParticipantId,
        identity: Identity,
        role: Role,
    },
    /// Mute (or allow unmuting) all of `target`'s tracks of one kind.
    MuteRemote {
        participant: ParticipantId,
        target: ParticipantId,
        kind: TrackKind,
        muted: bool,
    },
    RaiseHand {
        participant: ParticipantId,
    },
    LowerHand {
        participant: ParticipantId,
        target: ParticipantId,
    },
    Chat {
        participant: ParticipantId,
        text: String,
        to: Option<ParticipantId>,
    },
    React {
        participant: ParticipantId,
        emoji: String,
    },
    SetLayout {
        participant: ParticipantId,
        layout: Option<Layout>,
        /// `Some(None)` clears the spotlight; `None` leaves it.
        spotlight: Option<Option<ParticipantId>>,
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
    #[error("the meeting is locked")]
    Locked,
    #[error("no such participant")]
    NoSuchParticipant,
    #[error("a moderator muted this track")]
    MutedByHost,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} is not available yet")]
    NotAvailable(String),
    #[error("waiting in the lobby")]
    InLobby,
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
            RoomError::Locked => "room_locked",
            RoomError::NoSuchParticipant => "no_such_participant",
            RoomError::MutedByHost => "muted_by_host",
            RoomError::BadRequest(_) => "bad_request",
            RoomError::NotAvailable(_) => "not_available",
            RoomError::InLobby => "in_lobby",
        }
    }
}

/// The origin's answer to one intent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Joined: who you are and the room as it stands (events after `seq` follow on the link).
    Joined(Box<RoomSnapshot>),
    /// Waiting in the lobby; [`RoomEventBody::Admitted`] or [`RoomEventBody::Denied`] follows.
    Waiting {
        you: ParticipantInfo,
    },
    Published {
        track: TrackInfo,
    },
    Members {
        participants: Vec<ParticipantInfo>,
        next: Option<ParticipantId>,
        count: u32,
    },
    Chat {
        message: ChatMessage,
    },
    Done,
    Refused(RoomError),
}

/// Who an event is for. Only [`Audience::All`] events advance the room's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Audience {
    All,
    Participant(ParticipantId),
    /// Hosts and co-hosts (edges filter by the role they know).
    Moderators,
}

/// One change to a room, in the room's total order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEvent {
    pub room: RoomId,
    /// Per-room sequence number, starting at 1, without gaps among [`Audience::All`] events;
    /// personal events carry the sequence number of the last room event before them.
    pub seq: u64,
    pub audience: Audience,
    pub body: RoomEventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RoomEventBody {
    /// Joins batched over a short window (presence that scales: one event for many joins).
    ParticipantsJoined(Vec<ParticipantInfo>),
    ParticipantsLeft(Vec<ParticipantId>),
    /// The room's size, in [`PresenceMode::Interesting`] only: coalesced to at most one a
    /// second, and never sent when unchanged. The first one tells clients the mode changed.
    ParticipantCount {
        count: u32,
    },
    ParticipantStatus {
        participant: ParticipantId,
        status: PresenceStatus,
    },
    RoleChanged {
        participant: ParticipantId,
        role: Role,
        by: ParticipantId,
    },
    TrackPublished(TrackInfo),
    TrackUnpublished {
        track: TrackId,
        participant: ParticipantId,
    },
    TrackMuted {
        track: TrackId,
        muted: bool,
        host_muted: bool,
        by: ParticipantId,
    },
    ScreenShare {
        participant: ParticipantId,
        track: TrackId,
        active: bool,
    },
    Hand {
        participant: ParticipantId,
        by: ParticipantId,
        raised: bool,
        hands: Vec<ParticipantId>,
    },
    Chat(ChatMessage),
    Reaction {
        participant: ParticipantId,
        emoji: String,
        counts: BTreeMap<String, u64>,
    },
    Layout {
        layout: Layout,
        spotlight: Option<ParticipantId>,
        by: ParticipantId,
    },
    Settings {
        settings: RoomSettings,
        by: ParticipantId,
    },
    /// The room ended: the last participant left (no audience), or a host ended it.
    RoomClosed {
        by: Option<ParticipantId>,
    },
    /// Personal: a moderator admitted you from the lobby.
    Admitted(Box<RoomSnapshot>),
    /// Personal: a moderator denied you entry.
    Denied,
    /// Moderators: the lobby after a change.
    Lobby(Vec<ParticipantInfo>),
    /// Personal: please mute (the SFU already stopped forwarding), or you may unmute again.
    MuteRequest {
        kind: TrackKind,
        muted: bool,
        by: ParticipantId,
    },
    /// Personal: you were removed.
    Removed {
        by: ParticipantId,
    },
    /// The room was rebuilt on a new origin from its edges' replicas, and some client may hold
    /// other settings or another hand queue than the rebuilt room (the replicas disagreed, or
    /// the room dropped the hands and spotlight of those who never came back): what the room
    /// holds now, replacing what clients hold. It has no actor: a merge is nobody's action.
    Restored {
        settings: RoomSettings,
        hands: Vec<ParticipantId>,
    },
}

/// What one edge knows of a room: sent whenever the edge's link to the room's origin comes up,
/// so an origin that replaces a failed one rebuilds the room from its edges, and one that only
/// lost the link learns the edge's new link. Built by [`crate::replica::ReplicaTracker`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoomReplica {
    /// Last room-wide event the edge saw.
    pub seq: u64,
    pub settings: RoomSettings,
    /// Raised hands, oldest first, as of `seq`.
    pub hands: Vec<ParticipantId>,
    /// Chat the edge saw, by id: room-wide messages and direct messages to or from its
    /// participants.
    pub chat: Vec<ChatMessage>,
    /// The edge's own participants, with their current roles.
    pub participants: Vec<ParticipantInfo>,
    /// The edge's participants waiting in the lobby.
    pub waiting: Vec<ParticipantInfo>,
    /// Tracks of the edge's participants.
    pub tracks: Vec<TrackInfo>,
    /// Everyone the edge believes is in the room (its roster view): a participant listed here by
    /// some edge but announced by none is gone, and the rebuilt room says so.
    pub known: Vec<ParticipantId>,
    /// Above every participant, track and chat id the edge has seen: a rebuilt room never
    /// reuses an id clients already hold.
    pub next_participant: u64,
    pub next_track: u64,
    pub next_chat: u64,
    /// Invitations (`participant:add`) this edge's participants made, with the role each grants:
    /// they let those identities past the lobby and the lock in the rebuilt room too.
    #[serde(default)]
    pub invited: Vec<(Identity, Role)>,
    /// The presence mode the edge last saw (absent from older edges: full).
    #[serde(default)]
    pub presence: PresenceMode,
    /// Participants whose entries this edge's clients were sent (in a join snapshot or a
    /// `participant:joined`) and who have not left since: a rebuilt room in the interesting
    /// mode lists the leaves of these, and of no one else.
    #[serde(default)]
    pub announced: Vec<ParticipantId>,
}

/// Edge -> origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EdgeToOrigin {
    Request {
        id: RequestId,
        room: RoomId,
        intent: Intent,
    },
    /// The edge's view of `room` (answered by `Done`). Idempotent: sent on every link-up.
    Restore {
        id: RequestId,
        room: RoomId,
        replica: Box<RoomReplica>,
    },
    /// First message of an edge on every new cascade link (before any request): the edge
    /// process's incarnation, random per process start. The same incarnation on a new link
    /// resumes the edge's participants and queued events (a reconnect within the origin's grace
    /// period); another one means the edge restarted, so its old participants leave. The
    /// in-process link of dev mode never sends it.
    Attach { incarnation: u64 },
}

/// Origin -> edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OriginToEdge {
    Reply {
        id: RequestId,
        reply: Reply,
    },
    Event(RoomEvent),
    /// The answer to [`EdgeToOrigin::Attach`]. `resumed`: the origin still holds this edge's
    /// participants and sends the events they missed next. Otherwise the origin knows none of
    /// them (it restarted, or the grace period ran out) and the edge ends their sessions.
    Attached {
        resumed: bool,
    },
}
