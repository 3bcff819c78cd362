//! One room's state machine: roster, roles and permissions, tracks, lobby, chat, hands and the
//! event sequence.
//!
//! Everything a participant may change about a room goes through [`Room::handle`], which checks
//! the one permission matrix ([`allowed`]) and either applies the intent and emits events, or
//! refuses it and changes nothing. Joins and leaves are not broadcast one by one: they collect
//! in a pending batch that goes out as one event at the next [`Room::flush_presence`] (the
//! origin calls it on a short tick), or just before any other room event so order holds. A room
//! of N participants thus costs O(N) presence messages per batch window rather than O(N²).
//!
//! Batching alone is not enough for a town hall: at 180 joins a second into 10,000 sessions
//! the batches still carry joins/s x sessions entries. So a room with more participants than
//! [`RoomConfig::full_presence_up_to`] turns *large* ([`PresenceMode::Interesting`]) for the
//! rest of its life. Then only *interesting* participants (hosts, co-hosts, presenters,
//! publishers, raised hands) have their joins listed; everyone else is counted, in a
//! `ParticipantCount` event at most once per [`COUNT_INTERVAL_MS`]. The room remembers whom
//! it has *announced* (whose entry went out): someone who becomes interesting later is
//! announced just before the event that made them so, an announced participant's leave is
//! always listed, and nobody else's ever is. The mode latches (a room that shrinks stays
//! large) so a client never has to rebuild a roster it was told not to keep; `room:members`
//! pages through everyone in either mode.

use cascade_proto::room::{
    Action, Audience, ChatMessage, EdgeId, Intent, ParticipantInfo, PresenceMode, Reply, RoomError,
    RoomEvent, RoomEventBody, RoomSettings, RoomSnapshot, TrackInfo,
};
use cascade_proto::{Identity, ParticipantId, Role, RoomId, TrackId, TrackKind, TrackSource};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

mod restore;
pub use restore::{RESTORE_GRACE_MS, RESTORE_ID_MARGIN};

/// Limits for one room. Plain data with the defaults documented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomConfig {
    /// Participants at most (default 10,000: the meeting size the project is built for).
    pub max_participants: u32,
    /// Tracks one participant may publish at once (default 4: mic, camera, screen, screen audio).
    pub max_tracks_per_participant: u32,
    /// Chat messages kept for history (default 200).
    pub chat_history: usize,
    /// Messages of history a joiner gets (default 50).
    pub chat_on_join: usize,
    /// Roster entries in a join snapshot; the rest is paged (default 100).
    pub roster_page: u32,
    /// Guests waiting in the lobby at most (default 1,000).
    pub max_waiting: u32,
    /// Participants up to which every join and leave is listed to everyone (default 500).
    /// Beyond it the room is large for the rest of its life: only interesting participants
    /// are listed and the size goes out as a count (see the module docs). 500 keeps a meeting
    /// people actually look down the list of on full presence, while a town hall's join storm
    /// (joins/s x sessions entries) stops long before it costs an edge megabits per second.
    pub full_presence_up_to: u32,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            max_participants: 10_000,
            max_tracks_per_participant: 4,
            chat_history: 200,
            chat_on_join: 50,
            roster_page: 100,
            max_waiting: 1_000,
            full_presence_up_to: 500,
        }
    }
}

/// Longest chat message, in characters.
pub const MAX_CHAT_CHARS: usize = 2000;
/// Largest roster page a client may ask for.
pub const MAX_ROSTER_PAGE: u32 = 500;
/// Least time between two `ParticipantCount` events of a large room: a join storm then costs
/// each session one small event a second, while a count a second behind is still one a
/// person reads as current.
pub const COUNT_INTERVAL_MS: u64 = 1_000;
/// The reactions a client may send.
pub const REACTIONS: [&str; 6] = ["👍", "❤️", "😂", "😮", "👏", "🎉"];

/// Everything a role may or may not do: the one permission matrix (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Publish(TrackSource),
    Chat,
    MuteOthers,
    Remove,
    ChangeRoles,
    Admit,
    Lock,
    LowerOthersHands,
    Layout,
    Invite,
    EndForAll,
    LiveStream,
}

/// Whether `role` may do `what`. Targets (who is muted, removed...) get further checks in
/// [`outranks`].
pub fn allowed(role: Role, what: Permission) -> bool {
    use Permission::*;
    let moderator = is_moderator(role);
    match what {
        Publish(TrackSource::Microphone | TrackSource::Camera) => role != Role::Viewer,
        Publish(TrackSource::Screen | TrackSource::ScreenAudio) => {
            matches!(role, Role::Host | Role::CoHost | Role::Presenter)
        }
        Chat => true,
        MuteOthers | Remove | Admit | Lock | LowerOthersHands | Layout | Invite | LiveStream => {
            moderator
        }
        ChangeRoles | EndForAll => role == Role::Host,
    }
}

pub fn is_moderator(role: Role) -> bool {
    matches!(role, Role::Host | Role::CoHost)
}

/// Whether a moderator of role `actor` may mute (`remove: false`) or remove a participant of
/// role `target`: hosts anyone; co-hosts may not mute hosts nor remove hosts or co-hosts.
fn outranks(actor: Role, target: Role, remove: bool) -> bool {
    match actor {
        Role::Host => true,
        Role::CoHost => match target {
            Role::Host => false,
            Role::CoHost => !remove,
            _ => true,
        },
        _ => false,
    }
}

#[derive(Debug)]
struct Member {
    info: ParticipantInfo,
    /// Kinds a moderator muted: tracks of these kinds are (and start) host-muted.
    host_muted: [bool; 2],
}

fn kind_index(k: TrackKind) -> usize {
    match k {
        TrackKind::Audio => 0,
        TrackKind::Video => 1,
    }
}

/// One room.
#[derive(Debug)]
pub struct Room {
    id: RoomId,
    config: RoomConfig,
    participants: BTreeMap<ParticipantId, Member>,
    waiting: BTreeMap<ParticipantId, ParticipantInfo>,
    /// Identities let in without the lobby and through the lock.
    invited: HashMap<Identity, Role>,
    tracks: BTreeMap<TrackId, TrackInfo>,
    hands: Vec<ParticipantId>,
    chat: VecDeque<ChatMessage>,
    reactions: BTreeMap<String, u64>,
    settings: RoomSettings,
    pending_joined: Vec<ParticipantInfo>,
    pending_left: Vec<ParticipantId>,
    /// Latches to `Interesting` once the room outgrows `full_presence_up_to`.
    presence: PresenceMode,
    /// Participants whose entry went out (in a batch or a join snapshot) and who are still
    /// here: exactly those whose leave is listed.
    announced: BTreeSet<ParticipantId>,
    /// The last `ParticipantCount` sent and when (`None`: none yet in this mode, the next
    /// flush sends one at once).
    count_sent: Option<(u32, u64)>,
    /// Latest time an input carried (Unix ms), for count coalescing outside the tick.
    clock_ms: u64,
    next_participant: u64,
    next_track: u64,
    next_chat: u64,
    last_chat_ts: u64,
    seq: u64,
    closed: bool,
    /// Set while a room rebuilt from edge replicas waits for the rest of its edges.
    restoring: Option<restore::Restoring>,
}

type Events = Vec<(RoomEvent, Vec<EdgeId>)>;

impl Room {
    pub fn new(id: RoomId, config: RoomConfig) -> Self {
        Self {
            id,
            config,
            participants: BTreeMap::new(),
            waiting: BTreeMap::new(),
            invited: HashMap::new(),
            tracks: BTreeMap::new(),
            hands: Vec::new(),
            chat: VecDeque::new(),
            reactions: BTreeMap::new(),
            settings: RoomSettings::default(),
            pending_joined: Vec::new(),
            pending_left: Vec::new(),
            presence: PresenceMode::Full,
            announced: BTreeSet::new(),
            count_sent: None,
            clock_ms: 0,
            next_participant: 1,
            next_track: 1,
            next_chat: 1,
            last_chat_ts: 0,
            seq: 0,
            closed: false,
            restoring: None,
        }
    }

    /// No one in it nor waiting, or a host ended it: the origin may forget it. A room being
    /// rebuilt is kept until its restore window closes.
    pub fn is_finished(&self) -> bool {
        self.closed
            || (self.participants.is_empty() && self.waiting.is_empty() && self.restoring.is_none())
    }

    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    pub fn participants(&self) -> impl Iterator<Item = &ParticipantInfo> {
        self.participants.values().map(|m| &m.info)
    }

    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    /// Which presence mode holds (see the module docs).
    pub fn presence(&self) -> PresenceMode {
        self.presence
    }

    /// Participants whose entries went out and who have not left.
    pub fn announced(&self) -> impl Iterator<Item = ParticipantId> + '_ {
        self.announced.iter().copied()
    }

    /// Guests waiting in the lobby.
    pub fn waiting(&self) -> impl Iterator<Item = &ParticipantInfo> {
        self.waiting.values()
    }

    pub fn tracks(&self) -> impl Iterator<Item = &TrackInfo> {
        self.tracks.values()
    }

    pub fn settings(&self) -> &RoomSettings {
        &self.settings
    }

    /// Raised hands, oldest first.
    pub fn hands(&self) -> &[ParticipantId] {
        &self.hands
    }

    /// Last event sequence number issued.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Applies one intent from `edge` at `now_ms` (Unix milliseconds, for chat timestamps).
    /// A refused intent changes nothing and emits no event.
    pub fn handle(&mut self, edge: EdgeId, intent: Intent, now_ms: u64) -> (Reply, Events) {
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut events = Vec::new();
        let reply = match self.apply(edge, intent, now_ms, &mut events) {
            Ok(reply) => reply,
            Err(e) => {
                debug_assert!(events.is_empty(), "refused intents emit nothing");
                Reply::Refused(e)
            }
        };
        (reply, events)
    }

    /// Sends the pending joins and leaves as (at most) two batched events and, in a large room,
    /// the room's size if it changed and the last count is [`COUNT_INTERVAL_MS`] old at
    /// `now_ms` (Unix milliseconds; the origin's tick).
    pub fn flush_presence(&mut self, now_ms: u64) -> Events {
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut events = Vec::new();
        self.flush_into(&mut events);
        if let Some((sent, at)) = self.count_sent {
            let count = self.participants.len() as u32;
            if count != sent
                && self.clock_ms >= at + COUNT_INTERVAL_MS
                && !self.participants.is_empty()
            {
                self.push_count(&mut events);
            }
        }
        events
    }

    /// Whether a participant's presence matters to everyone in a large room: a moderator or
    /// presenter, a publisher, or a raised hand.
    fn is_interesting(&self, p: ParticipantId) -> bool {
        self.participants.get(&p).is_some_and(|m| {
            matches!(m.info.role, Role::Host | Role::CoHost | Role::Presenter)
                || self.hands.contains(&p)
                || self.tracks.values().any(|t| t.participant == p)
        })
    }

    /// Makes sure everyone knows the name behind `p` before an event that names them: in a
    /// large room someone not yet announced gets a `ParticipantsJoined` entry in the next
    /// flush (which the caller's `emit` does at once).
    fn announce(&mut self, p: ParticipantId) {
        if self.presence == PresenceMode::Full || !self.announced.insert(p) {
            return;
        }
        if self.pending_joined.iter().any(|q| q.id == p) {
            return;
        }
        if let Some(m) = self.participants.get(&p) {
            self.pending_joined.push(m.info.clone());
        }
    }

    /// Turns the room large once it outgrows the threshold (for good: see the module docs).
    fn check_size(&mut self) {
        if self.presence == PresenceMode::Full
            && self.participants.len() > self.config.full_presence_up_to as usize
        {
            tracing::info!(room = %self.id, participants = self.participants.len(),
                threshold = self.config.full_presence_up_to,
                "room is large: listing interesting participants only, counting the rest");
            self.presence = PresenceMode::Interesting;
        }
    }

    fn push_count(&mut self, events: &mut Events) {
        let count = self.participants.len() as u32;
        self.count_sent = Some((count, self.clock_ms));
        self.push_to(
            RoomEventBody::ParticipantCount { count },
            Audience::All,
            self.edges(),
            events,
        );
    }

    fn flush_into(&mut self, events: &mut Events) {
        if self.presence == PresenceMode::Interesting
            && self.count_sent.is_none()
            && self.restoring.is_none()
            && !self.participants.is_empty()
        {
            // The first count tells clients the mode changed, before any entry they would
            // otherwise count as a newcomer.
            self.push_count(events);
        }
        if self.pending_joined.is_empty() && self.pending_left.is_empty() {
            return;
        }
        let left = std::mem::take(&mut self.pending_left);
        let mut joined = std::mem::take(&mut self.pending_joined);
        let full = self.presence == PresenceMode::Full;
        // Pending joins are of present participants only (a leave takes its pending join
        // back); a large room lists the interesting ones and those announced on purpose.
        joined.retain(|p| {
            self.participants.contains_key(&p.id)
                && (full || self.announced.contains(&p.id) || self.is_interesting(p.id))
        });
        // Refresh roles changed since the join was queued.
        for p in &mut joined {
            if let Some(m) = self.participants.get(&p.id) {
                *p = m.info.clone();
            }
            self.announced.insert(p.id);
        }
        if !joined.is_empty() {
            self.push_to(
                RoomEventBody::ParticipantsJoined(joined),
                Audience::All,
                self.edges(),
                events,
            );
        }
        if !left.is_empty() {
            self.push_to(
                RoomEventBody::ParticipantsLeft(left),
                Audience::All,
                self.edges(),
                events,
            );
        }
    }

    fn apply(
        &mut self,
        edge: EdgeId,
        intent: Intent,
        now_ms: u64,
        events: &mut Events,
    ) -> Result<Reply, RoomError> {
        match intent {
            Intent::Join {
                identity,
                role,
                name,
            } => self.join(edge, identity, role, name, events),
            Intent::Leave { participant } => {
                if self.waiting.remove(&participant).is_some() {
                    self.emit_lobby(events);
                    return Ok(Reply::Done);
                }
                self.member(participant)?;
                self.remove_member(participant, events);
                Ok(Reply::Done)
            }
            Intent::Publish {
                participant,
                source,
                codec,
                layers,
            } => {
                let me = self.member(participant)?;
                let role = me.info.role;
                if !allowed(role, Permission::Publish(source)) {
                    return Err(RoomError::Forbidden(role));
                }
                let host_muted = me.host_muted[kind_index(source.kind())];
                let mine = self
                    .tracks
                    .values()
                    .filter(|t| t.participant == participant);
                let mut count = 0;
                for t in mine {
                    if t.source == source {
                        return Err(RoomError::SourceInUse(source));
                    }
                    count += 1;
                }
                if count >= self.config.max_tracks_per_participant {
                    return Err(RoomError::TooManyTracks(
                        self.config.max_tracks_per_participant,
                    ));
                }
                let track = TrackInfo {
                    id: TrackId(self.next_track),
                    participant,
                    source,
                    kind: source.kind(),
                    codec,
                    layers: layers.clamp(1, 3),
                    muted: host_muted,
                    host_muted,
                };
                self.next_track += 1;
                self.tracks.insert(track.id, track.clone());
                self.announce(participant);
                self.emit(RoomEventBody::TrackPublished(track.clone()), events);
                if source == TrackSource::Screen {
                    self.emit(
                        RoomEventBody::ScreenShare {
                            participant,
                            track: track.id,
                            active: true,
                        },
                        events,
                    );
                }
                Ok(Reply::Published { track })
            }
            Intent::Unpublish { participant, track } => {
                self.member(participant)?;
                self.own_track(participant, track)?;
                self.unpublish(track, events);
                Ok(Reply::Done)
            }
            Intent::SetMuted {
                participant,
                track,
                muted,
            } => {
                self.member(participant)?;
                self.own_track(participant, track)?;
                let t = &self.tracks[&track];
                if !muted && t.host_muted {
                    return Err(RoomError::MutedByHost);
                }
                if t.muted != muted {
                    self.set_track_muted(track, muted, t.host_muted, participant, events);
                }
                Ok(Reply::Done)
            }
            Intent::Authorize {
                participant,
                action,
            } => {
                let role = self.member(participant)?.info.role;
                let what = match action {
                    Action::Publish(source) => Permission::Publish(source),
                    Action::LiveStream => Permission::LiveStream,
                };
                if !allowed(role, what) {
                    return Err(RoomError::Forbidden(role));
                }
                if action == Action::LiveStream {
                    return Err(RoomError::NotAvailable("live streaming".into()));
                }
                Ok(Reply::Done)
            }
            Intent::Members {
                participant,
                after,
                limit,
            } => {
                self.member(participant)?;
                let limit = limit.clamp(1, MAX_ROSTER_PAGE) as usize;
                let mut page: Vec<ParticipantInfo> = self
                    .participants
                    .range(ParticipantId(after.0.saturating_add(1))..)
                    .take(limit + 1)
                    .map(|(_, m)| m.info.clone())
                    .collect();
                let next = if page.len() > limit {
                    page.pop();
                    page.last().map(|p| p.id)
                } else {
                    None
                };
                Ok(Reply::Members {
                    participants: page,
                    next,
                    count: self.participants.len() as u32,
                })
            }
            Intent::SetStatus {
                participant,
                status,
            } => {
                self.member(participant)?;
                if self.presence == PresenceMode::Interesting
                    && !self.announced.contains(&participant)
                {
                    // Nobody was told of this participant, so nobody needs its connection's
                    // state (and a large room's reconnect wave would be presence again).
                    return Ok(Reply::Done);
                }
                self.emit(
                    RoomEventBody::ParticipantStatus {
                        participant,
                        status,
                    },
                    events,
                );
                Ok(Reply::Done)
            }
            Intent::Close { participant } => {
                self.require(participant, Permission::EndForAll)?;
                self.flush_into(events);
                let mut to = self.edges();
                to.extend(self.waiting.values().map(|w| w.edge));
                to.sort_by_key(|e| e.0);
                to.dedup();
                self.push_to(
                    RoomEventBody::RoomClosed {
                        by: Some(participant),
                    },
                    Audience::All,
                    to,
                    events,
                );
                self.closed = true;
                self.participants.clear();
                self.waiting.clear();
                self.tracks.clear();
                Ok(Reply::Done)
            }
            Intent::SetLocked {
                participant,
                locked,
            } => {
                self.require(participant, Permission::Lock)?;
                if let Some(here) = self.acknowledged_here() {
                    here.settings.locked = true;
                }
                if self.settings.locked != locked {
                    self.settings.locked = locked;
                    self.emit_settings(participant, events);
                }
                Ok(Reply::Done)
            }
            Intent::SetLobby {
                participant,
                enabled,
            } => {
                self.require(participant, Permission::Lock)?;
                if let Some(here) = self.acknowledged_here() {
                    here.settings.lobby = true;
                }
                if self.settings.lobby != enabled {
                    self.settings.lobby = enabled;
                    self.emit_settings(participant, events);
                }
                Ok(Reply::Done)
            }
            Intent::Admit {
                participant,
                waiting,
            } => {
                self.require(participant, Permission::Admit)?;
                if !self.waiting.contains_key(&waiting) {
                    return Err(RoomError::NoSuchParticipant);
                }
                self.admit(waiting, events)?;
                Ok(Reply::Done)
            }
            Intent::Deny {
                participant,
                waiting,
            } => {
                self.require(participant, Permission::Admit)?;
                let Some(w) = self.waiting.remove(&waiting) else {
                    return Err(RoomError::NoSuchParticipant);
                };
                self.personal(w.id, w.edge, RoomEventBody::Denied, events);
                self.emit_lobby(events);
                Ok(Reply::Done)
            }
            Intent::SetRole {
                participant,
                target,
                role,
            } => {
                self.require(participant, Permission::ChangeRoles)?;
                if target == participant {
                    return Err(RoomError::BadRequest(
                        "use another host to change your own role".into(),
                    ));
                }
                let old = self
                    .participants
                    .get(&target)
                    .ok_or(RoomError::NoSuchParticipant)?
                    .info
                    .role;
                if old == role {
                    return Ok(Reply::Done);
                }
                self.participants
                    .get_mut(&target)
                    .expect("checked above")
                    .info
                    .role = role;
                self.announce(target);
                self.emit(
                    RoomEventBody::RoleChanged {
                        participant: target,
                        role,
                        by: participant,
                    },
                    events,
                );
                // Tracks the new role may not publish go.
                let revoked: Vec<TrackId> = self
                    .tracks
                    .values()
                    .filter(|t| {
                        t.participant == target && !allowed(role, Permission::Publish(t.source))
                    })
                    .map(|t| t.id)
                    .collect();
                for t in revoked {
                    self.unpublish(t, events);
                }
                if is_moderator(old) != is_moderator(role) && is_moderator(role) {
                    // A new moderator needs the lobby as it stands.
                    let edge = self.participants[&target].info.edge;
                    let lobby = self.waiting.values().cloned().collect();
                    self.personal(target, edge, RoomEventBody::Lobby(lobby), events);
                }
                Ok(Reply::Done)
            }
            Intent::Remove {
                participant,
                target,
            } => {
                let actor = self.require(participant, Permission::Remove)?;
                if target == participant {
                    return Err(RoomError::BadRequest("use room:leave to leave".into()));
                }
                let t = self
                    .participants
                    .get(&target)
                    .ok_or(RoomError::NoSuchParticipant)?;
                if !outranks(actor, t.info.role, true) {
                    return Err(RoomError::Forbidden(actor));
                }
                let edge = t.info.edge;
                self.personal(
                    target,
                    edge,
                    RoomEventBody::Removed { by: participant },
                    events,
                );
                self.remove_member(target, events);
                Ok(Reply::Done)
            }
            Intent::Invite {
                participant,
                identity,
                role,
            } => {
                let actor = self.require(participant, Permission::Invite)?;
                if role == Role::Host && actor != Role::Host {
                    return Err(RoomError::Forbidden(actor));
                }
                self.invited.insert(identity.clone(), role);
                let waiting: Vec<ParticipantId> = self
                    .waiting
                    .values()
                    .filter(|w| w.identity == identity)
                    .map(|w| w.id)
                    .collect();
                for w in waiting {
                    self.admit(w, events)?;
                }
                Ok(Reply::Done)
            }
            Intent::MuteRemote {
                participant,
                target,
                kind,
                muted,
            } => {
                let actor = self.require(participant, Permission::MuteOthers)?;
                if target == participant {
                    return Err(RoomError::BadRequest(
                        "use mute:self for your own tracks".into(),
                    ));
                }
                let t = self
                    .participants
                    .get_mut(&target)
                    .ok_or(RoomError::NoSuchParticipant)?;
                if !outranks(actor, t.info.role, false) {
                    return Err(RoomError::Forbidden(actor));
                }
                t.host_muted[kind_index(kind)] = muted;
                let edge = t.info.edge;
                let affected: Vec<(TrackId, bool)> = self
                    .tracks
                    .values()
                    .filter(|tr| tr.participant == target && tr.kind == kind)
                    .map(|tr| (tr.id, tr.muted))
                    .collect();
                for (track, was_muted) in affected {
                    // Lifting a host mute leaves the track muted until its owner unmutes it.
                    let now_muted = muted || was_muted;
                    self.set_track_muted(track, now_muted, muted, participant, events);
                }
                self.personal(
                    target,
                    edge,
                    RoomEventBody::MuteRequest {
                        kind,
                        muted,
                        by: participant,
                    },
                    events,
                );
                Ok(Reply::Done)
            }
            Intent::RaiseHand { participant } => {
                self.member(participant)?;
                if let Some(here) = self.acknowledged_here() {
                    here.hand_raised(participant);
                }
                if !self.hands.contains(&participant) {
                    self.hands.push(participant);
                    self.announce(participant);
                    self.emit_hand(participant, participant, true, events);
                }
                Ok(Reply::Done)
            }
            Intent::LowerHand {
                participant,
                target,
            } => {
                if target != participant {
                    self.require(participant, Permission::LowerOthersHands)?;
                    if !self.participants.contains_key(&target) {
                        return Err(RoomError::NoSuchParticipant);
                    }
                } else {
                    self.member(participant)?;
                }
                if let Some(here) = self.acknowledged_here() {
                    here.hand_lowered(target);
                }
                if let Some(i) = self.hands.iter().position(|p| *p == target) {
                    self.hands.remove(i);
                    self.emit_hand(target, participant, false, events);
                }
                Ok(Reply::Done)
            }
            Intent::Chat {
                participant,
                text,
                to,
            } => {
                self.require(participant, Permission::Chat)?;
                let chars = text.chars().count();
                if chars > MAX_CHAT_CHARS {
                    return Err(RoomError::BadRequest(format!(
                        "chat text of {chars} characters exceeds {MAX_CHAT_CHARS}"
                    )));
                }
                if text.trim().is_empty() {
                    return Err(RoomError::BadRequest("empty chat text".into()));
                }
                let recipient_edge = match to {
                    Some(r) if r == participant => {
                        return Err(RoomError::BadRequest("a direct message to yourself".into()))
                    }
                    Some(r) => Some(
                        self.participants
                            .get(&r)
                            .ok_or(RoomError::NoSuchParticipant)?
                            .info
                            .edge,
                    ),
                    None => None,
                };
                // Timestamps never go backwards within the room's order, even if the clock does.
                let ts = now_ms.max(self.last_chat_ts);
                self.last_chat_ts = ts;
                let message = ChatMessage {
                    id: self.next_chat,
                    ts,
                    from: participant,
                    from_name: self.participants[&participant].info.name.clone(),
                    to,
                    text,
                };
                self.next_chat += 1;
                self.chat.push_back(message.clone());
                while self.chat.len() > self.config.chat_history {
                    self.chat.pop_front();
                }
                match (to, recipient_edge) {
                    (Some(r), Some(edge)) => {
                        self.personal(r, edge, RoomEventBody::Chat(message.clone()), events)
                    }
                    _ => self.emit(RoomEventBody::Chat(message.clone()), events),
                }
                Ok(Reply::Chat { message })
            }
            Intent::React { participant, emoji } => {
                self.member(participant)?;
                if !REACTIONS.contains(&emoji.as_str()) {
                    return Err(RoomError::BadRequest(format!(
                        "reaction must be one of {}",
                        REACTIONS.join(" ")
                    )));
                }
                *self.reactions.entry(emoji.clone()).or_default() += 1;
                let counts = self.reactions.clone();
                self.emit(
                    RoomEventBody::Reaction {
                        participant,
                        emoji,
                        counts,
                    },
                    events,
                );
                Ok(Reply::Done)
            }
            Intent::SetLayout {
                participant,
                layout,
                spotlight,
            } => {
                self.require(participant, Permission::Layout)?;
                if let Some(Some(s)) = spotlight {
                    if !self.participants.contains_key(&s) {
                        return Err(RoomError::NoSuchParticipant);
                    }
                }
                if let Some(here) = self.acknowledged_here() {
                    here.settings.layout |= layout.is_some();
                    here.settings.spotlight |= spotlight.is_some();
                }
                if let Some(l) = layout {
                    self.settings.layout = l;
                }
                if let Some(s) = spotlight {
                    self.settings.spotlight = s;
                    if let Some(p) = s {
                        self.announce(p);
                    }
                }
                self.emit(
                    RoomEventBody::Layout {
                        layout: self.settings.layout,
                        spotlight: self.settings.spotlight,
                        by: participant,
                    },
                    events,
                );
                Ok(Reply::Done)
            }
        }
    }

    fn join(
        &mut self,
        edge: EdgeId,
        identity: Identity,
        role: Role,
        name: String,
        events: &mut Events,
    ) -> Result<Reply, RoomError> {
        if self.participants.len() as u32 >= self.config.max_participants {
            return Err(RoomError::RoomFull(self.config.max_participants));
        }
        let invited = self.invited.contains_key(&identity);
        let privileged = is_moderator(role) || invited;
        if self.settings.locked && !privileged {
            return Err(RoomError::Locked);
        }
        let id = ParticipantId(self.next_participant);
        let info = ParticipantInfo {
            id,
            identity,
            name,
            role,
            edge,
        };
        if self.settings.lobby && !privileged {
            if self.waiting.len() as u32 >= self.config.max_waiting {
                return Err(RoomError::RoomFull(self.config.max_participants));
            }
            self.next_participant += 1;
            self.waiting.insert(id, info.clone());
            self.emit_lobby(events);
            return Ok(Reply::Waiting { you: info });
        }
        self.next_participant += 1;
        self.add_member(info.clone());
        Ok(Reply::Joined(Box::new(self.snapshot(&info))))
    }

    fn add_member(&mut self, info: ParticipantInfo) {
        self.pending_joined.push(info.clone());
        self.participants.insert(
            info.id,
            Member {
                info,
                host_muted: [false; 2],
            },
        );
        self.check_size();
    }

    fn admit(&mut self, waiting: ParticipantId, events: &mut Events) -> Result<(), RoomError> {
        if self.participants.len() as u32 >= self.config.max_participants {
            return Err(RoomError::RoomFull(self.config.max_participants));
        }
        let Some(info) = self.waiting.remove(&waiting) else {
            return Err(RoomError::NoSuchParticipant);
        };
        self.add_member(info.clone());
        // The snapshot includes the batch announcing this participant, so nothing arrives
        // before the snapshot that the snapshot already contains.
        self.flush_into(events);
        let snapshot = self.snapshot(&info);
        self.personal(
            info.id,
            info.edge,
            RoomEventBody::Admitted(Box::new(snapshot)),
            events,
        );
        self.emit_lobby(events);
        Ok(())
    }

    /// The room as `you` first sees it. Everyone it names (but `you`) counts as announced from
    /// now on: in full presence it may name joins still pending, and if the room turns large
    /// before they are flushed, their entries must still go out (and their leaves be listed)
    /// for the joiner's roster to stay true.
    fn snapshot(&mut self, you: &ParticipantInfo) -> RoomSnapshot {
        let participants = self.snapshot_roster();
        self.announced
            .extend(participants.iter().map(|p| p.id).filter(|p| *p != you.id));
        let visible = |m: &&ChatMessage| m.to.is_none() || m.to == Some(you.id) || m.from == you.id;
        let mut chat: Vec<ChatMessage> = self
            .chat
            .iter()
            .rev()
            .filter(visible)
            .take(self.config.chat_on_join)
            .cloned()
            .collect();
        chat.reverse();
        RoomSnapshot {
            you: you.clone(),
            participants,
            participant_count: self.participants.len() as u32,
            presence: self.presence,
            tracks: self.tracks.values().cloned().collect(),
            chat,
            hands: self.hands.clone(),
            settings: self.settings.clone(),
            lobby: if is_moderator(you.role) {
                self.waiting.values().cloned().collect()
            } else {
                Vec::new()
            },
            seq: self.seq,
        }
    }

    /// The roster a snapshot lists: the first page in full presence; in a large room the
    /// announced participants, interesting ones first when they do not all fit a page.
    fn snapshot_roster(&self) -> Vec<ParticipantInfo> {
        if self.presence == PresenceMode::Full {
            return self
                .participants
                .values()
                .take(self.config.roster_page as usize)
                .map(|m| m.info.clone())
                .collect();
        }
        let bound = MAX_ROSTER_PAGE as usize;
        let (mut ids, rest): (Vec<ParticipantId>, Vec<ParticipantId>) = self
            .announced
            .iter()
            .partition(|p| self.is_interesting(**p));
        ids.truncate(bound);
        ids.extend(rest.into_iter().take(bound - ids.len()));
        ids.sort();
        ids.iter()
            .filter_map(|p| self.participants.get(p))
            .map(|m| m.info.clone())
            .collect()
    }

    fn remove_member(&mut self, participant: ParticipantId, events: &mut Events) {
        let gone: Vec<TrackId> = self
            .tracks
            .values()
            .filter(|t| t.participant == participant)
            .map(|t| t.id)
            .collect();
        for track in gone {
            self.unpublish(track, events);
        }
        self.hands.retain(|p| *p != participant);
        if let Some(here) = self.acknowledged_here() {
            here.left(participant);
        }
        if self.settings.spotlight == Some(participant) {
            self.settings.spotlight = None;
        }
        self.participants.remove(&participant);
        if self.announced.remove(&participant) {
            self.pending_left.push(participant);
        } else {
            // Never listed (came and went within one window, or not interesting in a large
            // room): its leave is news to no one.
            self.pending_joined.retain(|p| p.id != participant);
        }
        if self.participants.is_empty() {
            self.pending_joined.clear();
            self.pending_left.clear();
            self.announced.clear();
            self.push_to(
                RoomEventBody::RoomClosed { by: None },
                Audience::All,
                Vec::new(),
                events,
            );
        }
    }

    fn unpublish(&mut self, track: TrackId, events: &mut Events) {
        let Some(t) = self.tracks.remove(&track) else {
            return;
        };
        self.emit(
            RoomEventBody::TrackUnpublished {
                track,
                participant: t.participant,
            },
            events,
        );
        if t.source == TrackSource::Screen {
            self.emit(
                RoomEventBody::ScreenShare {
                    participant: t.participant,
                    track,
                    active: false,
                },
                events,
            );
        }
    }

    fn set_track_muted(
        &mut self,
        track: TrackId,
        muted: bool,
        host_muted: bool,
        by: ParticipantId,
        events: &mut Events,
    ) {
        if let Some(t) = self.tracks.get_mut(&track) {
            if t.muted == muted && t.host_muted == host_muted {
                return;
            }
            t.muted = muted;
            t.host_muted = host_muted;
            self.emit(
                RoomEventBody::TrackMuted {
                    track,
                    muted,
                    host_muted,
                    by,
                },
                events,
            );
        }
    }

    fn emit_hand(
        &mut self,
        participant: ParticipantId,
        by: ParticipantId,
        raised: bool,
        events: &mut Events,
    ) {
        let hands = self.hands.clone();
        self.emit(
            RoomEventBody::Hand {
                participant,
                by,
                raised,
                hands,
            },
            events,
        );
    }

    fn emit_settings(&mut self, by: ParticipantId, events: &mut Events) {
        let settings = self.settings.clone();
        self.emit(RoomEventBody::Settings { settings, by }, events);
    }

    fn emit_lobby(&mut self, events: &mut Events) {
        let lobby: Vec<ParticipantInfo> = self.waiting.values().cloned().collect();
        let mut to: Vec<EdgeId> = self
            .participants
            .values()
            .filter(|m| is_moderator(m.info.role))
            .map(|m| m.info.edge)
            .collect();
        to.sort_by_key(|e| e.0);
        to.dedup();
        if to.is_empty() {
            return;
        }
        events.push((
            RoomEvent {
                room: self.id.clone(),
                seq: self.seq,
                audience: Audience::Moderators,
                body: RoomEventBody::Lobby(lobby),
            },
            to,
        ));
    }

    fn member(&self, p: ParticipantId) -> Result<&Member, RoomError> {
        match self.participants.get(&p) {
            Some(m) => Ok(m),
            None if self.waiting.contains_key(&p) => Err(RoomError::InLobby),
            None => Err(RoomError::NotInRoom),
        }
    }

    /// The participant's role if it may do `what`.
    fn require(&self, p: ParticipantId, what: Permission) -> Result<Role, RoomError> {
        let role = self.member(p)?.info.role;
        if allowed(role, what) {
            Ok(role)
        } else {
            Err(RoomError::Forbidden(role))
        }
    }

    fn own_track(&self, p: ParticipantId, track: TrackId) -> Result<(), RoomError> {
        match self.tracks.get(&track) {
            Some(t) if t.participant == p => Ok(()),
            _ => Err(RoomError::NoSuchTrack),
        }
    }

    /// Edges that currently host participants of this room.
    fn edges(&self) -> Vec<EdgeId> {
        let mut edges: Vec<EdgeId> = self.participants.values().map(|m| m.info.edge).collect();
        edges.sort_by_key(|e| e.0);
        edges.dedup();
        edges
    }

    /// A room event for everyone, after any pending presence so the order holds.
    fn emit(&mut self, body: RoomEventBody, events: &mut Events) {
        self.flush_into(events);
        let to = self.edges();
        self.push_to(body, Audience::All, to, events);
    }

    /// An event for one participant (member or waiting), outside the room's sequence.
    fn personal(
        &mut self,
        participant: ParticipantId,
        edge: EdgeId,
        body: RoomEventBody,
        events: &mut Events,
    ) {
        // Whatever the participant must already know about comes first.
        self.flush_into(events);
        events.push((
            RoomEvent {
                room: self.id.clone(),
                seq: self.seq,
                audience: Audience::Participant(participant),
                body,
            },
            vec![edge],
        ));
    }

    fn push_to(
        &mut self,
        body: RoomEventBody,
        audience: Audience,
        to: Vec<EdgeId>,
        events: &mut Events,
    ) {
        self.seq += 1;
        events.push((
            RoomEvent {
                room: self.id.clone(),
                seq: self.seq,
                audience,
                body,
            },
            to,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::room::{Action, Layout, PresenceStatus};

    const E: EdgeId = EdgeId(0);

    fn room() -> Room {
        Room::new(RoomId::new("r").unwrap(), RoomConfig::default())
    }

    fn ask(r: &mut Room, intent: Intent) -> (Reply, Events) {
        r.handle(E, intent, 1_000)
    }

    fn join_intent(who: &str, role: Role) -> Intent {
        Intent::Join {
            identity: Identity::new(who).unwrap(),
            role,
            name: who.into(),
        }
    }

    fn join(r: &mut Room, who: &str, role: Role) -> ParticipantId {
        match ask(r, join_intent(who, role)).0 {
            Reply::Joined(s) => s.you.id,
            other => panic!("join refused: {other:?}"),
        }
    }

    fn publish(r: &mut Room, p: ParticipantId, source: TrackSource) -> Reply {
        ask(
            r,
            Intent::Publish {
                participant: p,
                source,
                codec: "VP8".into(),
                layers: 3,
            },
        )
        .0
    }

    fn track(r: &mut Room, p: ParticipantId, source: TrackSource) -> TrackInfo {
        match publish(r, p, source) {
            Reply::Published { track } => track,
            other => panic!("publish refused: {other:?}"),
        }
    }

    fn refused(reply: Reply) -> &'static str {
        match reply {
            Reply::Refused(e) => e.code(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn seqs(events: &Events) -> Vec<u64> {
        events
            .iter()
            .filter(|(e, _)| e.audience == Audience::All)
            .map(|(e, _)| e.seq)
            .collect()
    }

    #[test]
    fn events_are_numbered_without_gaps_and_refusals_change_nothing() {
        let mut r = room();
        let a = join(&mut r, "a", Role::Host);
        let v = join(&mut r, "v", Role::Viewer);
        assert_eq!(r.seq(), 0, "joins wait for the presence batch");
        let ev = r.flush_presence(1_000);
        assert_eq!(seqs(&ev), vec![1], "two joins, one event");
        let RoomEventBody::ParticipantsJoined(ref ps) = ev[0].0.body else {
            panic!()
        };
        assert_eq!(ps.len(), 2);
        assert_eq!(
            refused(publish(&mut r, v, TrackSource::Camera)),
            "forbidden"
        );
        assert_eq!(r.seq(), 1, "a refused intent emits nothing");
        let t = track(&mut r, a, TrackSource::Camera);
        assert_eq!(r.seq(), 2);
        assert_eq!(
            refused(publish(&mut r, a, TrackSource::Camera)),
            "source_in_use"
        );
        let (reply, ev) = ask(
            &mut r,
            Intent::Unpublish {
                participant: v,
                track: t.id,
            },
        );
        assert_eq!(refused(reply), "no_such_track", "not v's track");
        assert!(ev.is_empty());
        let (_, ev) = ask(&mut r, Intent::Leave { participant: a });
        assert_eq!(
            seqs(&ev),
            vec![3],
            "track unpublished now, the leave batched"
        );
        let ev = r.flush_presence(1_000);
        assert_eq!(seqs(&ev), vec![4]);
        assert!(matches!(&ev[0].0.body, RoomEventBody::ParticipantsLeft(l) if l == &vec![a]));
        assert_eq!(r.tracks().count(), 0);
    }

    #[test]
    fn a_pending_batch_goes_out_before_any_later_event() {
        let mut r = room();
        let a = join(&mut r, "a", Role::Host);
        let (_, ev) = ask(
            &mut r,
            Intent::Publish {
                participant: a,
                source: TrackSource::Microphone,
                codec: "opus".into(),
                layers: 1,
            },
        );
        assert!(matches!(ev[0].0.body, RoomEventBody::ParticipantsJoined(_)));
        assert!(matches!(ev[1].0.body, RoomEventBody::TrackPublished(_)));
        assert_eq!(seqs(&ev), vec![1, 2]);
        // Came and went within one window: nobody hears of it.
        join(&mut r, "b", Role::Attendee);
        let b = ParticipantId(2);
        ask(&mut r, Intent::Leave { participant: b });
        assert!(r.flush_presence(1_000).is_empty());
    }

    #[test]
    fn the_permission_matrix() {
        use Permission::*;
        let all = [
            Role::Host,
            Role::CoHost,
            Role::Presenter,
            Role::Attendee,
            Role::Viewer,
        ];
        let row = |p: Permission| all.map(|r| allowed(r, p));
        assert_eq!(
            row(Publish(TrackSource::Camera)),
            [true, true, true, true, false]
        );
        assert_eq!(
            row(Publish(TrackSource::Screen)),
            [true, true, true, false, false]
        );
        assert_eq!(row(Chat), [true; 5]);
        for p in [
            MuteOthers,
            Remove,
            Admit,
            Lock,
            LowerOthersHands,
            Layout,
            Invite,
            LiveStream,
        ] {
            assert_eq!(row(p), [true, true, false, false, false], "{p:?}");
        }
        for p in [ChangeRoles, EndForAll] {
            assert_eq!(row(p), [true, false, false, false, false], "{p:?}");
        }
    }

    #[test]
    fn refused_moderator_actions_of_guests_change_nothing() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        let g = join(&mut r, "g", Role::Attendee);
        r.flush_presence(1_000);
        let seq = r.seq();
        let intents = [
            Intent::MuteRemote {
                participant: g,
                target: h,
                kind: TrackKind::Audio,
                muted: true,
            },
            Intent::Remove {
                participant: g,
                target: h,
            },
            Intent::SetRole {
                participant: g,
                target: g,
                role: Role::Host,
            },
            Intent::SetLocked {
                participant: g,
                locked: true,
            },
            Intent::SetLobby {
                participant: g,
                enabled: true,
            },
            Intent::Close { participant: g },
            Intent::LowerHand {
                participant: g,
                target: h,
            },
            Intent::SetLayout {
                participant: g,
                layout: Some(Layout::Speaker),
                spotlight: None,
            },
            Intent::Invite {
                participant: g,
                identity: Identity::new("x").unwrap(),
                role: Role::Attendee,
            },
            Intent::Authorize {
                participant: g,
                action: Action::Publish(TrackSource::Screen),
            },
            Intent::Authorize {
                participant: g,
                action: Action::LiveStream,
            },
        ];
        for i in intents {
            let (reply, ev) = ask(&mut r, i.clone());
            assert_eq!(refused(reply), "forbidden", "{i:?}");
            assert!(ev.is_empty());
        }
        assert_eq!(r.seq(), seq);
        assert!(!r.settings().locked && !r.settings().lobby);
        // The host may ask for a live stream, which does not exist yet.
        let (reply, _) = ask(
            &mut r,
            Intent::Authorize {
                participant: h,
                action: Action::LiveStream,
            },
        );
        assert_eq!(refused(reply), "not_available");
    }

    #[test]
    fn co_hosts_may_not_touch_hosts() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        let c = join(&mut r, "c", Role::CoHost);
        let c2 = join(&mut r, "c2", Role::CoHost);
        let mute = |p, t| Intent::MuteRemote {
            participant: p,
            target: t,
            kind: TrackKind::Audio,
            muted: true,
        };
        assert_eq!(refused(ask(&mut r, mute(c, h)).0), "forbidden");
        assert_eq!(ask(&mut r, mute(c, c2)).0, Reply::Done);
        let remove = |p, t| Intent::Remove {
            participant: p,
            target: t,
        };
        assert_eq!(refused(ask(&mut r, remove(c, c2)).0), "forbidden");
        assert_eq!(refused(ask(&mut r, remove(c, h)).0), "forbidden");
        assert_eq!(ask(&mut r, remove(h, c2)).0, Reply::Done);
    }

    #[test]
    fn host_mute_sticks_until_lifted() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        let g = join(&mut r, "g", Role::Attendee);
        let mic = track(&mut r, g, TrackSource::Microphone);
        let cam = track(&mut r, g, TrackSource::Camera);
        let (reply, ev) = ask(
            &mut r,
            Intent::MuteRemote {
                participant: h,
                target: g,
                kind: TrackKind::Audio,
                muted: true,
            },
        );
        assert_eq!(reply, Reply::Done);
        assert!(ev.iter().any(|(e, _)| matches!(e.body,
            RoomEventBody::TrackMuted { track, muted: true, host_muted: true, by } if track == mic.id && by == h)));
        assert!(ev
            .iter()
            .any(|(e, _)| e.audience == Audience::Participant(g)
                && matches!(e.body, RoomEventBody::MuteRequest { muted: true, .. })));
        assert!(
            !r.tracks().find(|t| t.id == cam.id).unwrap().muted,
            "video untouched"
        );
        let unmute = Intent::SetMuted {
            participant: g,
            track: mic.id,
            muted: false,
        };
        assert_eq!(refused(ask(&mut r, unmute.clone()).0), "muted_by_host");
        // A mic published again while muted by the host starts muted.
        ask(
            &mut r,
            Intent::Unpublish {
                participant: g,
                track: mic.id,
            },
        );
        let mic2 = track(&mut r, g, TrackSource::Microphone);
        assert!(mic2.muted && mic2.host_muted);
        ask(
            &mut r,
            Intent::MuteRemote {
                participant: h,
                target: g,
                kind: TrackKind::Audio,
                muted: false,
            },
        );
        let t = r.tracks().find(|t| t.id == mic2.id).unwrap();
        assert!(t.muted && !t.host_muted, "allowed to unmute, not unmuted");
        let unmute2 = Intent::SetMuted {
            participant: g,
            track: mic2.id,
            muted: false,
        };
        assert_eq!(ask(&mut r, unmute2).0, Reply::Done);
        assert!(!r.tracks().find(|t| t.id == mic2.id).unwrap().muted);
    }

    #[test]
    fn lobby_admit_and_deny() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        ask(
            &mut r,
            Intent::SetLobby {
                participant: h,
                enabled: true,
            },
        );
        let (reply, ev) = ask(&mut r, join_intent("g", Role::Attendee));
        let Reply::Waiting { you } = reply else {
            panic!("{reply:?}")
        };
        assert!(ev.iter().any(|(e, _)| e.audience == Audience::Moderators
            && matches!(&e.body, RoomEventBody::Lobby(l) if l.len() == 1)));
        assert_eq!(r.participants().count(), 1);
        // While waiting, nothing else.
        assert_eq!(
            refused(
                ask(
                    &mut r,
                    Intent::RaiseHand {
                        participant: you.id
                    }
                )
                .0
            ),
            "in_lobby"
        );
        // A co-host token skips the lobby.
        join(&mut r, "c", Role::CoHost);
        let (reply, ev) = ask(
            &mut r,
            Intent::Admit {
                participant: h,
                waiting: you.id,
            },
        );
        assert_eq!(reply, Reply::Done);
        let admitted = ev
            .iter()
            .find_map(|(e, _)| match &e.body {
                RoomEventBody::Admitted(s) if e.audience == Audience::Participant(you.id) => {
                    Some(s.clone())
                }
                _ => None,
            })
            .expect("admitted event");
        assert_eq!(admitted.participant_count, 3);
        assert!(
            admitted.participants.iter().any(|p| p.id == you.id),
            "the snapshot includes the batch that announced the admission"
        );
        let (reply, _) = ask(&mut r, join_intent("d", Role::Attendee));
        let Reply::Waiting { you: d } = reply else {
            panic!()
        };
        let (_, ev) = ask(
            &mut r,
            Intent::Deny {
                participant: h,
                waiting: d.id,
            },
        );
        assert!(ev
            .iter()
            .any(|(e, _)| e.audience == Audience::Participant(d.id)
                && e.body == RoomEventBody::Denied));
        assert_eq!(
            refused(
                ask(
                    &mut r,
                    Intent::Admit {
                        participant: h,
                        waiting: d.id
                    }
                )
                .0
            ),
            "no_such_participant"
        );
    }

    #[test]
    fn lock_refuses_guests_but_not_moderators_or_the_invited() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        ask(
            &mut r,
            Intent::SetLocked {
                participant: h,
                locked: true,
            },
        );
        assert_eq!(
            refused(ask(&mut r, join_intent("g", Role::Attendee)).0),
            "room_locked"
        );
        join(&mut r, "c", Role::CoHost);
        ask(
            &mut r,
            Intent::Invite {
                participant: h,
                identity: Identity::new("g").unwrap(),
                role: Role::Attendee,
            },
        );
        join(&mut r, "g", Role::Attendee);
    }

    #[test]
    fn invite_admits_someone_waiting() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        ask(
            &mut r,
            Intent::SetLobby {
                participant: h,
                enabled: true,
            },
        );
        let (Reply::Waiting { you }, _) = ask(&mut r, join_intent("g", Role::Attendee)) else {
            panic!()
        };
        let (_, ev) = ask(
            &mut r,
            Intent::Invite {
                participant: h,
                identity: Identity::new("g").unwrap(),
                role: Role::Attendee,
            },
        );
        assert!(ev
            .iter()
            .any(|(e, _)| e.audience == Audience::Participant(you.id)
                && matches!(e.body, RoomEventBody::Admitted(_))));
    }

    #[test]
    fn chat_is_one_order_with_history_and_direct_messages() {
        let mut r = room();
        let a = join(&mut r, "a", Role::Host);
        let b = join(&mut r, "b", Role::Attendee);
        let c = join(&mut r, "c", Role::Attendee);
        let say = |r: &mut Room, from, text: &str, to, now| match r
            .handle(
                E,
                Intent::Chat {
                    participant: from,
                    text: text.into(),
                    to,
                },
                now,
            )
            .0
        {
            Reply::Chat { message } => message,
            other => panic!("{other:?}"),
        };
        let m1 = say(&mut r, a, "one", None, 5_000);
        let m2 = say(&mut r, b, "secret", Some(c), 4_000);
        let m3 = say(&mut r, c, "three", None, 6_000);
        assert!(m1.id < m2.id && m2.id < m3.id);
        assert_eq!(m2.ts, 5_000, "timestamps never go backwards");
        let (reply, _) = r.handle(
            E,
            Intent::Chat {
                participant: a,
                text: "x".repeat(MAX_CHAT_CHARS + 1),
                to: None,
            },
            7_000,
        );
        assert_eq!(refused(reply), "bad_request");
        let (reply, _) = ask(
            &mut r,
            Intent::Chat {
                participant: a,
                text: "hi".into(),
                to: Some(ParticipantId(99)),
            },
        );
        assert_eq!(refused(reply), "no_such_participant");
        let (Reply::Joined(s), _) = ask(&mut r, join_intent("d", Role::Attendee)) else {
            panic!()
        };
        let texts: Vec<&str> = s.chat.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(
            texts,
            vec!["one", "three"],
            "others' direct messages are not history"
        );
    }

    #[test]
    fn hands_queue_and_reactions_count() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        let a = join(&mut r, "a", Role::Attendee);
        let b = join(&mut r, "b", Role::Attendee);
        ask(&mut r, Intent::RaiseHand { participant: b });
        let (_, ev) = ask(&mut r, Intent::RaiseHand { participant: a });
        assert!(ev.iter().any(|(e, _)| matches!(&e.body,
            RoomEventBody::Hand { hands, raised: true, .. } if hands == &vec![b, a])));
        let (_, ev) = ask(&mut r, Intent::RaiseHand { participant: a });
        assert!(ev.is_empty(), "raising twice changes nothing");
        assert_eq!(
            refused(
                ask(
                    &mut r,
                    Intent::LowerHand {
                        participant: a,
                        target: b
                    }
                )
                .0
            ),
            "forbidden"
        );
        let (_, ev) = ask(
            &mut r,
            Intent::LowerHand {
                participant: h,
                target: b,
            },
        );
        assert!(
            ev.iter().any(|(e, _)| matches!(&e.body,
            RoomEventBody::Hand { hands, raised: false, by, .. } if hands == &vec![a] && *by == h))
        );
        for _ in 0..2 {
            ask(
                &mut r,
                Intent::React {
                    participant: a,
                    emoji: "👍".into(),
                },
            );
        }
        let (_, ev) = ask(
            &mut r,
            Intent::React {
                participant: b,
                emoji: "🎉".into(),
            },
        );
        let RoomEventBody::Reaction { counts, .. } = &ev.last().unwrap().0.body else {
            panic!()
        };
        assert_eq!(counts.get("👍"), Some(&2));
        assert_eq!(counts.get("🎉"), Some(&1));
        let (reply, _) = ask(
            &mut r,
            Intent::React {
                participant: b,
                emoji: "💩".into(),
            },
        );
        assert_eq!(refused(reply), "bad_request");
    }

    #[test]
    fn roster_pages_cover_everyone_once() {
        let mut r = Room::new(
            RoomId::new("r").unwrap(),
            RoomConfig {
                roster_page: 10,
                ..RoomConfig::default()
            },
        );
        let first = join(&mut r, "p0", Role::Host);
        for i in 1..25 {
            join(&mut r, &format!("p{i}"), Role::Attendee);
        }
        let (Reply::Joined(s), _) = ask(&mut r, join_intent("last", Role::Attendee)) else {
            panic!()
        };
        assert_eq!((s.participants.len(), s.participant_count), (10, 26));
        let mut seen = Vec::new();
        let mut after = ParticipantId(0);
        loop {
            let (reply, _) = ask(
                &mut r,
                Intent::Members {
                    participant: first,
                    after,
                    limit: 7,
                },
            );
            let Reply::Members {
                participants, next, ..
            } = reply
            else {
                panic!()
            };
            seen.extend(participants.iter().map(|p| p.id));
            match next {
                Some(n) => after = n,
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 26);
        assert_eq!(seen, sorted);
    }

    #[test]
    fn role_changes_revoke_screen_and_end_for_all_closes() {
        let mut r = room();
        let h = join(&mut r, "h", Role::Host);
        let p = join(&mut r, "p", Role::Presenter);
        track(&mut r, p, TrackSource::Screen);
        let (reply, ev) = ask(
            &mut r,
            Intent::SetRole {
                participant: h,
                target: p,
                role: Role::Attendee,
            },
        );
        assert_eq!(reply, Reply::Done);
        assert!(ev
            .iter()
            .any(|(e, _)| matches!(e.body, RoomEventBody::ScreenShare { active: false, .. })));
        assert_eq!(r.tracks().count(), 0);
        assert_eq!(
            refused(ask(&mut r, Intent::Close { participant: p }).0),
            "forbidden"
        );
        let (_, ev) = ask(
            &mut r,
            Intent::SetStatus {
                participant: p,
                status: PresenceStatus::Reconnecting,
            },
        );
        assert!(!ev.is_empty());
        let (reply, ev) = ask(&mut r, Intent::Close { participant: h });
        assert_eq!(reply, Reply::Done);
        assert!(matches!(
            ev.last().unwrap().0.body,
            RoomEventBody::RoomClosed { by: Some(_) }
        ));
        assert!(r.is_finished());
    }

    #[test]
    fn room_full_is_refused() {
        let mut r = Room::new(
            RoomId::new("r").unwrap(),
            RoomConfig {
                max_participants: 1,
                ..RoomConfig::default()
            },
        );
        join(&mut r, "a", Role::Host);
        let (reply, ev) = ask(&mut r, join_intent("b", Role::Attendee));
        assert_eq!(refused(reply), "room_full");
        assert!(ev.is_empty());
    }

    // --- presence in large rooms -------------------------------------------------------------

    fn large_room(threshold: u32) -> Room {
        Room::new(
            RoomId::new("r").unwrap(),
            RoomConfig {
                full_presence_up_to: threshold,
                ..RoomConfig::default()
            },
        )
    }

    /// Ids listed in `ParticipantsJoined` entries.
    fn joined_ids(events: &Events) -> Vec<ParticipantId> {
        events
            .iter()
            .filter_map(|(e, _)| match &e.body {
                RoomEventBody::ParticipantsJoined(ps) => Some(ps.iter().map(|p| p.id)),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn left_ids(events: &Events) -> Vec<ParticipantId> {
        events
            .iter()
            .filter_map(|(e, _)| match &e.body {
                RoomEventBody::ParticipantsLeft(ps) => Some(ps.iter().copied()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn counts(events: &Events) -> Vec<u32> {
        events
            .iter()
            .filter_map(|(e, _)| match e.body {
                RoomEventBody::ParticipantCount { count } => Some(count),
                _ => None,
            })
            .collect()
    }

    fn kinds(events: &Events) -> Vec<&'static str> {
        events
            .iter()
            .map(|(e, _)| match e.body {
                RoomEventBody::ParticipantsJoined(_) => "joined",
                RoomEventBody::ParticipantsLeft(_) => "left",
                RoomEventBody::ParticipantCount { .. } => "count",
                RoomEventBody::Hand { .. } => "hand",
                RoomEventBody::TrackPublished(_) => "published",
                RoomEventBody::RoleChanged { .. } => "role",
                RoomEventBody::Layout { .. } => "layout",
                RoomEventBody::ParticipantStatus { .. } => "status",
                _ => "other",
            })
            .collect()
    }

    fn at(r: &mut Room, intent: Intent, now_ms: u64) -> (Reply, Events) {
        r.handle(E, intent, now_ms)
    }

    fn join_at(r: &mut Room, who: &str, role: Role, now_ms: u64) -> ParticipantId {
        match at(r, join_intent(who, role), now_ms).0 {
            Reply::Joined(s) => s.you.id,
            other => panic!("join refused: {other:?}"),
        }
    }

    #[test]
    fn a_large_room_counts_attendees_instead_of_listing_each_join() {
        let mut r = large_room(10);
        let host = join_at(&mut r, "host", Role::Host, 0);
        let mut all = r.flush_presence(0);
        assert_eq!(joined_ids(&all), vec![host]);
        // 50 attendees over five 200 ms windows: the room turns large in the first.
        let mut t = 0;
        for batch in 0..5 {
            for i in 0..10 {
                join_at(&mut r, &format!("a{batch}-{i}"), Role::Attendee, t + 10);
            }
            t += 200;
            all.extend(r.flush_presence(t));
        }
        t += 200;
        all.extend(r.flush_presence(t));
        assert_eq!(r.presence(), PresenceMode::Interesting);
        // Listed: the host, and the first eight attendees, whom the snapshots of the joins
        // after them named while the room was small. None of the 42 who came after.
        let small: Vec<ParticipantId> = (1..=9).map(ParticipantId).collect();
        assert_eq!(joined_ids(&all), small);
        // The switch is told at once, then at most one count a second: at 200 ms and 1200 ms.
        assert_eq!(counts(&all), vec![11, 51]);
        assert_eq!(
            seqs(&all),
            (1..=all.len() as u64).collect::<Vec<_>>(),
            "counts are room events in the sequence"
        );
        assert!(
            r.flush_presence(t + 5_000).is_empty(),
            "unchanged: no count"
        );
        // A joiner is told the mode, the size and who was announced.
        let (reply, _) = at(&mut r, join_intent("late", Role::Attendee), t + 5_100);
        let Reply::Joined(s) = reply else { panic!() };
        assert_eq!(s.presence, PresenceMode::Interesting);
        assert_eq!(s.participant_count, 52);
        assert_eq!(
            s.participants.iter().map(|p| p.id).collect::<Vec<_>>(),
            small
        );
        assert_eq!(small[0], host);
        assert_eq!(counts(&r.flush_presence(t + 5_200)), vec![52]);
    }

    #[test]
    fn becoming_interesting_announces_first_and_announced_leaves_are_listed() {
        let mut r = large_room(1);
        let host = join_at(&mut r, "host", Role::Host, 0);
        r.flush_presence(0);
        let ids: Vec<ParticipantId> = (0..6)
            .map(|i| join_at(&mut r, &format!("a{i}"), Role::Attendee, 0))
            .collect();
        r.flush_presence(0);
        let [hand, publisher, promoted, spotlit, quiet, reconnecting] = ids[..] else {
            unreachable!()
        };

        // A raised hand: the entry comes just before the hand event, and only once.
        let (_, ev) = at(&mut r, Intent::RaiseHand { participant: hand }, 100);
        assert_eq!(kinds(&ev), vec!["joined", "hand"]);
        assert_eq!(joined_ids(&ev), vec![hand]);
        let (_, ev) = at(
            &mut r,
            Intent::LowerHand {
                participant: hand,
                target: hand,
            },
            110,
        );
        assert_eq!(kinds(&ev), vec!["hand"]);
        let (_, ev) = at(&mut r, Intent::RaiseHand { participant: hand }, 120);
        assert_eq!(kinds(&ev), vec!["hand"], "announced already");

        // Publishing: a viewer may not, an attendee may (mic).
        let (_, ev) = at(
            &mut r,
            Intent::Publish {
                participant: publisher,
                source: TrackSource::Microphone,
                codec: "opus".into(),
                layers: 1,
            },
            130,
        );
        assert_eq!(kinds(&ev), vec!["joined", "published"]);
        assert_eq!(joined_ids(&ev), vec![publisher]);

        // A promotion.
        let (_, ev) = at(
            &mut r,
            Intent::SetRole {
                participant: host,
                target: promoted,
                role: Role::Presenter,
            },
            140,
        );
        assert_eq!(kinds(&ev), vec!["joined", "role"]);
        let RoomEventBody::ParticipantsJoined(ref entry) = ev[0].0.body else {
            panic!()
        };
        assert_eq!(
            entry[0].role,
            Role::Presenter,
            "the entry says the new role"
        );

        // A spotlight names someone: they are announced too.
        let (_, ev) = at(
            &mut r,
            Intent::SetLayout {
                participant: host,
                layout: None,
                spotlight: Some(Some(spotlit)),
            },
            150,
        );
        assert_eq!(kinds(&ev), vec!["joined", "layout"]);

        // The connection state of someone nobody knows goes nowhere; of someone known, out.
        let (reply, ev) = at(
            &mut r,
            Intent::SetStatus {
                participant: reconnecting,
                status: PresenceStatus::Reconnecting,
            },
            160,
        );
        assert_eq!(reply, Reply::Done);
        assert!(ev.is_empty(), "{ev:?}");
        let (_, ev) = at(
            &mut r,
            Intent::SetStatus {
                participant: hand,
                status: PresenceStatus::Reconnecting,
            },
            170,
        );
        assert_eq!(kinds(&ev), vec!["status"]);

        // Leaves: the announced are listed, the quiet attendee is only counted.
        // (The publisher's track goes first, and the pending batch before that event.)
        let mut ev = Vec::new();
        for p in [hand, quiet, publisher] {
            ev.extend(at(&mut r, Intent::Leave { participant: p }, 200).1);
        }
        ev.extend(r.flush_presence(2_000));
        assert_eq!(left_ids(&ev), vec![hand, publisher]);
        assert_eq!(counts(&ev), vec![r.participant_count() as u32]);
        let announced: Vec<ParticipantId> = r.announced().collect();
        assert_eq!(announced, vec![host, promoted, spotlit]);

        // An interesting joiner is listed; one who came and went within a window is not.
        let presenter = join_at(&mut r, "presenter", Role::Presenter, 2_100);
        let gone = join_at(&mut r, "cohost", Role::CoHost, 2_100);
        at(&mut r, Intent::Leave { participant: gone }, 2_150);
        let ev = r.flush_presence(2_200);
        assert_eq!(joined_ids(&ev), vec![presenter]);
        assert!(left_ids(&ev).is_empty());
    }

    #[test]
    fn counts_are_coalesced_to_one_a_second_and_end_on_the_final_size() {
        let mut r = large_room(2);
        for i in 0..3 {
            join_at(&mut r, &format!("a{i}"), Role::Attendee, 0);
        }
        let mut sent: Vec<(u64, u32)> = Vec::new();
        let mut t = 0;
        let mut record = |r: &mut Room, t: u64| {
            for c in counts(&r.flush_presence(t)) {
                sent.push((t, c));
            }
        };
        // A join every 100 ms for 3 s, flushed every 200 ms; then 2 s of quiet.
        while t < 3_000 {
            t += 100;
            join_at(&mut r, &format!("j{t}"), Role::Attendee, t);
            if t % 200 == 0 {
                record(&mut r, t);
            }
        }
        while t < 5_000 {
            t += 200;
            record(&mut r, t);
        }
        assert!(sent.len() >= 3, "{sent:?}");
        for w in sent.windows(2) {
            assert!(w[1].0 - w[0].0 >= COUNT_INTERVAL_MS, "{sent:?}");
            assert_ne!(w[1].1, w[0].1, "never the same count twice: {sent:?}");
        }
        assert_eq!(
            sent.last().unwrap().1,
            r.participant_count() as u32,
            "the last count is the room's size"
        );
    }

    #[test]
    fn a_small_room_lists_everyone_and_never_counts() {
        let mut r = room();
        let host = join(&mut r, "host", Role::Host);
        let mut all = Vec::new();
        let mut ids = vec![host];
        for i in 0..50 {
            ids.push(join_at(&mut r, &format!("a{i}"), Role::Attendee, i * 100));
            if i % 10 == 9 {
                all.extend(r.flush_presence(i * 100 + 50));
            }
        }
        assert_eq!(joined_ids(&all), ids);
        assert!(counts(&all).is_empty());
        at(
            &mut r,
            Intent::Leave {
                participant: ids[3],
            },
            6_000,
        );
        let ev = r.flush_presence(6_100);
        assert_eq!(left_ids(&ev), vec![ids[3]]);
        assert!(counts(&ev).is_empty());
        let (reply, _) = at(&mut r, join_intent("late", Role::Attendee), 6_200);
        let Reply::Joined(s) = reply else { panic!() };
        assert_eq!(s.presence, PresenceMode::Full);
        assert_eq!(s.participants.len(), 51, "the first page, as before");
    }

    #[test]
    fn a_large_room_stays_large_when_it_shrinks() {
        let mut r = large_room(2);
        let host = join_at(&mut r, "host", Role::Host, 0);
        let a = join_at(&mut r, "a", Role::Attendee, 0);
        let b = join_at(&mut r, "b", Role::Attendee, 0);
        assert_eq!(counts(&r.flush_presence(0)), vec![3]);
        at(&mut r, Intent::Leave { participant: a }, 10);
        at(&mut r, Intent::Leave { participant: b }, 10);
        let ev = r.flush_presence(1_000);
        assert!(left_ids(&ev).is_empty(), "a and b were never listed");
        assert_eq!(counts(&ev), vec![1]);
        assert_eq!(r.presence(), PresenceMode::Interesting);
        let (reply, _) = at(&mut r, join_intent("c", Role::Attendee), 1_100);
        let Reply::Joined(s) = reply else { panic!() };
        assert_eq!(s.presence, PresenceMode::Interesting, "the mode latches");
        assert_eq!(
            s.participants.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![host]
        );
    }

    #[test]
    fn joins_a_snapshot_named_before_the_switch_are_still_listed() {
        let mut r = large_room(3);
        // All within one batch window: a1's snapshot names the host, a2's names a1 too.
        let host = join_at(&mut r, "host", Role::Host, 0);
        let a1 = join_at(&mut r, "a1", Role::Attendee, 0);
        let a2 = join_at(&mut r, "a2", Role::Attendee, 0);
        // The fourth makes the room large: a2 was named to nobody but itself.
        let (reply, _) = at(&mut r, join_intent("a3", Role::Attendee), 0);
        let Reply::Joined(s) = reply else { panic!() };
        assert_eq!(
            s.participants.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![host, a1]
        );
        let ev = r.flush_presence(100);
        assert_eq!(kinds(&ev), vec!["count", "joined"]);
        assert_eq!(joined_ids(&ev), vec![host, a1]);
        // a1's leave is listed (a2 and a3 know a1), a2's is not.
        at(&mut r, Intent::Leave { participant: a1 }, 200);
        at(&mut r, Intent::Leave { participant: a2 }, 200);
        assert_eq!(left_ids(&r.flush_presence(300)), vec![a1]);
    }

    #[test]
    fn a_large_snapshot_lists_at_most_a_page_of_announced_interesting_first() {
        let mut r = large_room(0);
        let host = join_at(&mut r, "host", Role::Host, 0);
        // Past one page of announced participants.
        let n = MAX_ROSTER_PAGE + 19;
        for i in 0..n {
            join_at(&mut r, &format!("p{i}"), Role::Presenter, 0);
        }
        r.flush_presence(0);
        assert_eq!(r.announced().count(), n as usize + 1);
        // Demoted presenters stay announced but are no longer interesting.
        for i in 0..30u64 {
            at(
                &mut r,
                Intent::SetRole {
                    participant: host,
                    target: ParticipantId(host.0 + 1 + i),
                    role: Role::Attendee,
                },
                10,
            );
        }
        let last = ParticipantId(host.0 + u64::from(n));
        let (reply, _) = at(&mut r, join_intent("x", Role::Attendee), 20);
        let Reply::Joined(s) = reply else { panic!() };
        assert_eq!(s.participants.len(), MAX_ROSTER_PAGE as usize);
        assert!(s.participants.iter().any(|p| p.id == last));
        let demoted_listed = s
            .participants
            .iter()
            .filter(|p| p.role == Role::Attendee)
            .count();
        assert_eq!(
            demoted_listed, 10,
            "interesting first (the host and 489 presenters), then 10 of the 30 demoted"
        );
        assert!(
            s.participants.windows(2).all(|w| w[0].id < w[1].id),
            "by id"
        );
    }
}
