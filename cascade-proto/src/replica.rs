//! An edge's copy of what it must not lose if its rooms' origin dies.
//!
//! The origin is the only authority for a room (architecture rule 1), so its death would take
//! the roster, roles, raised hands and chat with it. Every edge already receives what the origin
//! acknowledged — join replies and the room's ordered events — so each edge keeps, per room, the
//! part of that stream a new origin needs ([`RoomReplica`]): settings, hands and chat as of the
//! last event it saw, its own participants with their roles and tracks, and its roster view.
//! When a link to a room's origin comes up (a new origin after a failover, or the same one after
//! a blip), the edge sends [`EdgeToOrigin::Restore`](crate::room::EdgeToOrigin::Restore) for
//! each of its rooms before anything else; the origin merges the replicas (see
//! `origin::Room::restore`).
//!
//! Sans-IO: the hub feeds [`ReplicaTracker::on_reply`] and [`ReplicaTracker::on_event`] with
//! what passes through it and asks [`ReplicaTracker::replica`] at link-up. What an edge cannot
//! know it does not claim: chat only as far back as its first participant's join snapshot (the
//! last 50 messages then) and events since; a roster beyond the snapshot's first page only from
//! the joins it saw since.
//!
//! Presence: the replica carries the room's presence mode as the edge last saw it (a snapshot's
//! `presence`, or any `ParticipantCount` event, which only an interesting-mode room sends) and
//! the participants *announced* to this edge's clients (listed in a snapshot or a
//! `ParticipantsJoined`, not left since). A rebuilt large room lists the leaves of those and of
//! no one else, so clients never hear of someone they were never told about.

use crate::ids::{Identity, ParticipantId, Role, RoomId, TrackId};
use crate::room::{
    Audience, ChatMessage, ParticipantInfo, PresenceMode, Reply, RoomEvent, RoomEventBody,
    RoomReplica, RoomSettings, RoomSnapshot, TrackInfo,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Chat messages kept per room (the origin's default history).
pub const CHAT_KEPT: usize = 200;

#[derive(Debug, Default)]
struct Mirror {
    seq: u64,
    settings: RoomSettings,
    hands: Vec<ParticipantId>,
    chat: BTreeMap<u64, ChatMessage>,
    local: BTreeMap<ParticipantId, ParticipantInfo>,
    waiting: BTreeMap<ParticipantId, ParticipantInfo>,
    tracks: BTreeMap<TrackId, TrackInfo>,
    known: BTreeSet<ParticipantId>,
    /// Listed to this edge's clients and not left since (a subset of `known`: paged members
    /// and the edge's own unannounced participants are known but not announced).
    announced: BTreeSet<ParticipantId>,
    /// Latched like the room's own: once interesting, always.
    presence: PresenceMode,
    max_participant: u64,
    max_track: u64,
    invited: BTreeMap<Identity, Role>,
}

impl Mirror {
    fn absorb_snapshot(&mut self, s: &RoomSnapshot) {
        if s.seq >= self.seq {
            self.seq = s.seq;
            self.settings = s.settings.clone();
            self.hands = s.hands.clone();
        }
        for m in &s.chat {
            self.add_chat(m);
        }
        for p in &s.participants {
            self.see_participant(p.id);
            self.announced.insert(p.id);
        }
        if s.presence == PresenceMode::Interesting {
            self.presence = PresenceMode::Interesting;
        }
        for t in &s.tracks {
            self.see_track(t);
        }
        self.waiting.remove(&s.you.id);
        self.see_participant(s.you.id);
        self.local.insert(s.you.id, s.you.clone());
    }

    fn see_participant(&mut self, p: ParticipantId) {
        self.known.insert(p);
        self.max_participant = self.max_participant.max(p.0);
    }

    fn see_track(&mut self, t: &TrackInfo) {
        self.max_track = self.max_track.max(t.id.0);
        self.tracks.insert(t.id, t.clone());
    }

    fn add_chat(&mut self, m: &ChatMessage) {
        self.chat.insert(m.id, m.clone());
        while self.chat.len() > CHAT_KEPT {
            self.chat.pop_first();
        }
    }

    fn forget_participant(&mut self, p: ParticipantId) {
        self.known.remove(&p);
        self.announced.remove(&p);
        self.local.remove(&p);
        self.waiting.remove(&p);
        self.tracks.retain(|_, t| t.participant != p);
        self.hands.retain(|h| *h != p);
    }

    fn is_empty(&self) -> bool {
        self.local.is_empty() && self.waiting.is_empty()
    }
}

/// Per-room replicas of one edge. See the module docs.
#[derive(Debug, Default)]
pub struct ReplicaTracker {
    rooms: HashMap<RoomId, Mirror>,
}

impl ReplicaTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A reply of the origin to one of this edge's requests in `room`.
    pub fn on_reply(&mut self, room: &RoomId, reply: &Reply) {
        match reply {
            Reply::Joined(s) => self
                .rooms
                .entry(room.clone())
                .or_default()
                .absorb_snapshot(s),
            Reply::Waiting { you } => {
                let m = self.rooms.entry(room.clone()).or_default();
                m.max_participant = m.max_participant.max(you.id.0);
                m.waiting.insert(you.id, you.clone());
            }
            Reply::Published { track } => {
                if let Some(m) = self.rooms.get_mut(room) {
                    m.see_track(track);
                }
            }
            Reply::Chat { message } => {
                if let Some(m) = self.rooms.get_mut(room) {
                    m.add_chat(message);
                }
            }
            Reply::Members { participants, .. } => {
                if let Some(m) = self.rooms.get_mut(room) {
                    for p in participants {
                        m.see_participant(p.id);
                    }
                }
            }
            Reply::Done | Reply::Refused(_) => {}
        }
    }

    /// The origin accepted an invitation one of this edge's participants made in `room` (an
    /// invitation is not an event, so only the inviting edge knows of it).
    pub fn on_invited(&mut self, room: &RoomId, identity: &Identity, role: Role) {
        if let Some(m) = self.rooms.get_mut(room) {
            m.invited.insert(identity.clone(), role);
        }
    }

    /// One event of a room, as delivered to this edge.
    pub fn on_event(&mut self, event: &RoomEvent) {
        let Some(m) = self.rooms.get_mut(&event.room) else {
            return;
        };
        if event.audience == Audience::All {
            m.seq = m.seq.max(event.seq);
        }
        match &event.body {
            RoomEventBody::ParticipantsJoined(joined) => {
                for p in joined {
                    m.see_participant(p.id);
                    m.announced.insert(p.id);
                    if let Some(local) = m.local.get_mut(&p.id) {
                        *local = p.clone();
                    }
                }
            }
            RoomEventBody::ParticipantsLeft(left) => {
                for p in left {
                    m.forget_participant(*p);
                }
            }
            RoomEventBody::RoleChanged {
                participant, role, ..
            } => {
                if let Some(local) = m.local.get_mut(participant) {
                    local.role = *role;
                }
            }
            RoomEventBody::TrackPublished(t) => m.see_track(t),
            RoomEventBody::TrackUnpublished { track, .. } => {
                m.tracks.remove(track);
            }
            RoomEventBody::TrackMuted {
                track,
                muted,
                host_muted,
                ..
            } => {
                if let Some(t) = m.tracks.get_mut(track) {
                    t.muted = *muted;
                    t.host_muted = *host_muted;
                }
            }
            RoomEventBody::Hand { hands, .. } => m.hands = hands.clone(),
            RoomEventBody::Chat(message) => m.add_chat(message),
            RoomEventBody::Layout {
                layout, spotlight, ..
            } => {
                m.settings.layout = *layout;
                m.settings.spotlight = *spotlight;
            }
            RoomEventBody::Settings { settings, .. } => m.settings = settings.clone(),
            RoomEventBody::Restored { settings, hands } => {
                m.settings = settings.clone();
                m.hands = hands.clone();
            }
            RoomEventBody::RoomClosed { .. } => {
                self.rooms.remove(&event.room);
                return;
            }
            RoomEventBody::Admitted(s) => m.absorb_snapshot(s),
            RoomEventBody::Denied | RoomEventBody::Removed { .. } => {
                if let Audience::Participant(p) = event.audience {
                    m.local.remove(&p);
                    m.waiting.remove(&p);
                }
            }
            RoomEventBody::ParticipantCount { .. } => m.presence = PresenceMode::Interesting,
            RoomEventBody::ParticipantStatus { .. }
            | RoomEventBody::ScreenShare { .. }
            | RoomEventBody::Reaction { .. }
            | RoomEventBody::Lobby(_)
            | RoomEventBody::MuteRequest { .. } => {}
        }
        if m.is_empty() {
            self.rooms.remove(&event.room);
        }
    }

    /// One of this edge's participants is gone (left, or its session ended).
    pub fn on_local_left(&mut self, room: &RoomId, participant: ParticipantId) {
        if let Some(m) = self.rooms.get_mut(room) {
            m.local.remove(&participant);
            m.waiting.remove(&participant);
            if m.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// This edge's joined participants in `room` (waiting guests not counted: they take no
    /// media).
    pub fn local_count(&self, room: &RoomId) -> usize {
        self.rooms.get(room).map_or(0, |m| m.local.len())
    }

    /// Whether this edge has participants (or waiting guests) in `room`.
    pub fn has_room(&self, room: &RoomId) -> bool {
        self.rooms.contains_key(room)
    }

    /// A track of `room` as the room's events described it (any participant's).
    pub fn track(&self, room: &RoomId, track: TrackId) -> Option<&TrackInfo> {
        self.rooms.get(room)?.tracks.get(&track)
    }

    /// Rooms this edge has participants (or waiting guests) in.
    pub fn rooms(&self) -> impl Iterator<Item = &RoomId> {
        self.rooms.keys()
    }

    /// What to send a (new) origin of `room`.
    pub fn replica(&self, room: &RoomId) -> Option<RoomReplica> {
        let m = self.rooms.get(room)?;
        let chat: Vec<ChatMessage> = m.chat.values().cloned().collect();
        Some(RoomReplica {
            seq: m.seq,
            settings: m.settings.clone(),
            hands: m.hands.clone(),
            next_chat: chat.last().map_or(1, |c| c.id + 1),
            chat,
            participants: m.local.values().cloned().collect(),
            waiting: m.waiting.values().cloned().collect(),
            tracks: m
                .tracks
                .values()
                .filter(|t| m.local.contains_key(&t.participant))
                .cloned()
                .collect(),
            known: m.known.iter().copied().collect(),
            next_participant: m.max_participant + 1,
            next_track: m.max_track + 1,
            invited: m.invited.iter().map(|(i, r)| (i.clone(), *r)).collect(),
            presence: m.presence,
            announced: m.announced.iter().copied().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Identity, Role, TrackKind, TrackSource};
    use crate::room::{EdgeId, Layout};

    fn room() -> RoomId {
        RoomId::new("r").unwrap()
    }

    fn person(id: u64, role: Role) -> ParticipantInfo {
        ParticipantInfo {
            id: ParticipantId(id),
            identity: Identity::new(format!("u{id}")).unwrap(),
            name: format!("User {id}"),
            role,
            edge: EdgeId(0),
        }
    }

    fn track(id: u64, owner: u64) -> TrackInfo {
        TrackInfo {
            id: TrackId(id),
            participant: ParticipantId(owner),
            source: TrackSource::Camera,
            kind: TrackKind::Video,
            codec: "VP8".into(),
            layers: 3,
            muted: false,
            host_muted: false,
        }
    }

    fn chat(id: u64, from: u64, to: Option<u64>) -> ChatMessage {
        ChatMessage {
            id,
            ts: 1_000 + id,
            from: ParticipantId(from),
            from_name: format!("User {from}"),
            to: to.map(ParticipantId),
            text: format!("message {id}"),
        }
    }

    fn event(seq: u64, body: RoomEventBody) -> RoomEvent {
        RoomEvent {
            room: room(),
            seq,
            audience: Audience::All,
            body,
        }
    }

    fn joined(you: ParticipantInfo, others: Vec<ParticipantInfo>, seq: u64) -> Reply {
        let mut participants = others;
        participants.push(you.clone());
        Reply::Joined(Box::new(RoomSnapshot {
            you,
            participant_count: participants.len() as u32,
            participants,
            presence: PresenceMode::Full,
            tracks: vec![track(1, 1)],
            chat: vec![chat(1, 1, None)],
            hands: vec![ParticipantId(1)],
            settings: RoomSettings::default(),
            lobby: vec![],
            seq,
        }))
    }

    #[test]
    fn replica_follows_the_event_stream() {
        let mut t = ReplicaTracker::new();
        // Participant 2 joins through this edge; 1 (elsewhere) is already there.
        t.on_reply(
            &room(),
            &joined(person(2, Role::Attendee), vec![person(1, Role::Host)], 4),
        );
        t.on_event(&event(
            5,
            RoomEventBody::ParticipantsJoined(vec![person(3, Role::Attendee)]),
        ));
        t.on_event(&event(
            6,
            RoomEventBody::RoleChanged {
                participant: ParticipantId(2),
                role: Role::Presenter,
                by: ParticipantId(1),
            },
        ));
        t.on_reply(&room(), &Reply::Published { track: track(7, 2) });
        t.on_event(&event(7, RoomEventBody::TrackPublished(track(7, 2))));
        t.on_event(&event(
            8,
            RoomEventBody::Hand {
                participant: ParticipantId(2),
                by: ParticipantId(2),
                raised: true,
                hands: vec![ParticipantId(1), ParticipantId(2)],
            },
        ));
        t.on_event(&event(9, RoomEventBody::Chat(chat(2, 3, None))));
        // A direct message to our participant arrives as a personal event.
        t.on_event(&RoomEvent {
            room: room(),
            seq: 9,
            audience: Audience::Participant(ParticipantId(2)),
            body: RoomEventBody::Chat(chat(3, 1, Some(2))),
        });
        t.on_event(&event(
            10,
            RoomEventBody::Layout {
                layout: Layout::Speaker,
                spotlight: Some(ParticipantId(1)),
                by: ParticipantId(1),
            },
        ));
        t.on_event(&event(
            11,
            RoomEventBody::ParticipantsLeft(vec![ParticipantId(3)]),
        ));

        let r = t.replica(&room()).expect("replica");
        assert_eq!(r.seq, 11);
        assert_eq!(r.participants.len(), 1);
        assert_eq!(r.participants[0].id, ParticipantId(2));
        assert_eq!(r.participants[0].role, Role::Presenter);
        // Only our participant's tracks; the host's track 1 is its own edge's to announce.
        assert_eq!(r.tracks.iter().map(|t| t.id.0).collect::<Vec<_>>(), vec![7]);
        assert_eq!(r.hands, vec![ParticipantId(1), ParticipantId(2)]);
        assert_eq!(
            r.chat.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(r.settings.layout, Layout::Speaker);
        assert_eq!(r.settings.spotlight, Some(ParticipantId(1)));
        assert_eq!(r.known, vec![ParticipantId(1), ParticipantId(2)]);
        assert_eq!((r.next_participant, r.next_track, r.next_chat), (4, 8, 4));
    }

    #[test]
    fn lobby_admission_and_removal_move_local_participants() {
        let mut t = ReplicaTracker::new();
        let guest = person(5, Role::Attendee);
        t.on_reply(&room(), &Reply::Waiting { you: guest.clone() });
        let r = t.replica(&room()).unwrap();
        assert_eq!(r.waiting, vec![guest.clone()]);
        assert!(r.participants.is_empty());
        assert_eq!(t.local_count(&room()), 0, "a waiting guest takes no media");
        let Reply::Joined(snapshot) = joined(guest.clone(), vec![person(1, Role::Host)], 3) else {
            unreachable!()
        };
        t.on_event(&RoomEvent {
            room: room(),
            seq: 3,
            audience: Audience::Participant(guest.id),
            body: RoomEventBody::Admitted(snapshot),
        });
        let r = t.replica(&room()).unwrap();
        assert!(r.waiting.is_empty());
        assert_eq!(r.participants, vec![guest.clone()]);
        assert_eq!(t.local_count(&room()), 1);
        t.on_event(&RoomEvent {
            room: room(),
            seq: 3,
            audience: Audience::Participant(guest.id),
            body: RoomEventBody::Removed {
                by: ParticipantId(1),
            },
        });
        // Its last local participant gone, the edge has nothing to restore.
        assert!(t.replica(&room()).is_none());
        assert_eq!(t.local_count(&room()), 0);
    }

    #[test]
    fn chat_is_bounded_and_closed_rooms_are_forgotten() {
        let mut t = ReplicaTracker::new();
        t.on_reply(&room(), &joined(person(2, Role::Host), vec![], 1));
        for id in 2..=(CHAT_KEPT as u64 + 50) {
            t.on_event(&event(id, RoomEventBody::Chat(chat(id, 2, None))));
        }
        let r = t.replica(&room()).unwrap();
        assert_eq!(r.chat.len(), CHAT_KEPT);
        assert_eq!(r.chat.last().unwrap().id, CHAT_KEPT as u64 + 50);
        t.on_event(&event(
            1_000,
            RoomEventBody::RoomClosed {
                by: Some(ParticipantId(2)),
            },
        ));
        assert!(t.replica(&room()).is_none());
        assert_eq!(t.rooms().count(), 0);
    }

    #[test]
    fn accepted_invitations_are_in_the_replica_of_a_known_room_only() {
        let mut t = ReplicaTracker::new();
        let vip = Identity::new("vip").unwrap();
        t.on_invited(&room(), &vip, Role::Presenter);
        assert!(t.replica(&room()).is_none(), "no room, nothing recorded");
        t.on_reply(&room(), &joined(person(2, Role::Host), vec![], 1));
        t.on_invited(&room(), &vip, Role::Attendee);
        t.on_invited(&room(), &vip, Role::Presenter);
        let r = t.replica(&room()).unwrap();
        assert_eq!(
            r.invited,
            vec![(vip, Role::Presenter)],
            "the latest invitation wins"
        );
        // A replica from an edge that predates the field still decodes.
        let mut json = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("invited");
        let old: RoomReplica = serde_json::from_value(json).unwrap();
        assert!(old.invited.is_empty());
    }

    #[test]
    fn events_of_unknown_rooms_and_local_leaves_are_harmless() {
        let mut t = ReplicaTracker::new();
        t.on_event(&event(1, RoomEventBody::Chat(chat(1, 1, None))));
        assert!(t.replica(&room()).is_none());
        t.on_reply(&room(), &joined(person(2, Role::Host), vec![], 1));
        t.on_local_left(&room(), ParticipantId(99));
        assert!(t.replica(&room()).is_some());
        t.on_local_left(&room(), ParticipantId(2));
        assert!(t.replica(&room()).is_none());
    }

    #[test]
    fn presence_mode_and_the_announced_follow_the_stream() {
        let mut t = ReplicaTracker::new();
        // Joined a full-presence room: the snapshot's first page was listed to us.
        t.on_reply(
            &room(),
            &joined(person(2, Role::Attendee), vec![person(1, Role::Host)], 3),
        );
        let r = t.replica(&room()).unwrap();
        assert_eq!(r.presence, PresenceMode::Full);
        assert_eq!(r.announced, vec![ParticipantId(1), ParticipantId(2)]);
        // The room turns large: its first count says so. An attendee raises a hand and is
        // announced; a page of members is known, not announced.
        t.on_event(&event(4, RoomEventBody::ParticipantCount { count: 700 }));
        t.on_event(&event(
            5,
            RoomEventBody::ParticipantsJoined(vec![person(40, Role::Attendee)]),
        ));
        t.on_reply(
            &room(),
            &Reply::Members {
                participants: vec![person(41, Role::Attendee)],
                next: None,
                count: 700,
            },
        );
        t.on_event(&event(
            6,
            RoomEventBody::ParticipantsLeft(vec![ParticipantId(1)]),
        ));
        let r = t.replica(&room()).unwrap();
        assert_eq!(r.presence, PresenceMode::Interesting);
        assert_eq!(r.announced, vec![ParticipantId(2), ParticipantId(40)]);
        assert!(r.known.contains(&ParticipantId(41)));

        // Another edge joins the large room: its snapshot says the mode; its own participant
        // is not announced to anyone.
        let mut other = ReplicaTracker::new();
        other.on_reply(
            &room(),
            &Reply::Joined(Box::new(RoomSnapshot {
                you: person(800, Role::Attendee),
                participants: vec![person(40, Role::Attendee)],
                participant_count: 800,
                presence: PresenceMode::Interesting,
                tracks: vec![],
                chat: vec![],
                hands: vec![ParticipantId(40)],
                settings: RoomSettings::default(),
                lobby: vec![],
                seq: 9,
            })),
        );
        let r = other.replica(&room()).unwrap();
        assert_eq!(r.presence, PresenceMode::Interesting);
        assert_eq!(r.announced, vec![ParticipantId(40)]);
        assert_eq!(r.known, vec![ParticipantId(40), ParticipantId(800)]);

        // A replica of an edge that predates presence modes decodes as full, none announced.
        let mut json = serde_json::to_value(&r).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("presence");
        fields.remove("announced");
        let old: RoomReplica = serde_json::from_value(json).unwrap();
        assert_eq!(old.presence, PresenceMode::Full);
        assert!(old.announced.is_empty());
        // And a snapshot from an origin before them is full presence.
        let Reply::Joined(s) = joined(person(2, Role::Host), vec![], 1) else {
            unreachable!()
        };
        let mut json = serde_json::to_value(&*s).unwrap();
        json.as_object_mut().unwrap().remove("presence");
        let old: RoomSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(old.presence, PresenceMode::Full);
    }
}
