//! Rebuilding a room from its edges' replicas, after the origin that held it died.
//!
//! The control plane places an orphaned room on a new origin; every edge with participants in
//! it dials that origin and, before anything else, sends its [`RoomReplica`] (see
//! `cascade_proto::replica`). The first replica creates the room ([`Room::restored`]) and opens
//! a window of [`RESTORE_GRACE_MS`] for the other edges. Each replica is merged:
//!
//! - the edge's participants (and lobby guests) come back with their ids, roles and tracks, now
//!   homed on the edge that announced them; tracks a moderator muted stay host-muted;
//! - chat is the union of the replicas by message id (the room's order is the id order);
//! - the room's sequence number and id counters are the maximum over all replicas plus
//!   [`RESTORE_ID_MARGIN`] while the window is open, so no id or sequence number a client holds
//!   is reused, not even one only a replica still to come knows;
//! - settings and raised hands come from the replica that saw the latest event (highest `seq`),
//!   *under* what this origin acknowledged while the window is open ([`Acknowledged`]). The
//!   rebuilt room serves the edges already merged at once, so a hand may go up or down, or a
//!   moderator lock the room, before a replica that saw a later event of the old origin comes.
//!   Everything this origin acknowledged happened after the old origin's last event, so it wins:
//!   per settings field, a value set here stays; a hand lowered here stays down (the later
//!   replica may still have it up), one raised here stays up; the hands of those who left here
//!   do not come back. The later replica still brings what the old origin acknowledged last and
//!   the earlier replicas missed: its queue comes first, in its order (less the hands lowered
//!   here), then the hands raised here, in theirs. A replica that saw no later event than one
//!   merged before changes neither.
//!
//! Clients on different edges may hold different settings and hands: each edge's clients saw
//! its replica's. Whenever a merge leaves some client holding another view than the rebuilt
//! room's (this edge's replica differs from the result, or the result differs from what the
//! edges merged before hold), the room sends `Restored`, the whole settings and hand queue,
//! to every edge, and the edges' replicas take it too (so a second failover starts from it).
//! It has no actor; a merge that changes nothing anyone holds sends nothing.
//!
//! When the window closes (on [`Room::finish_restore`], driven by the origin's tick), anyone
//! some edge listed in its roster view but no edge announced — the participants of an edge
//! that died with the origin — leaves, with the usual batched event; hands and the spotlight
//! of those gone are dropped (followed by a `Restored` if that changed either). Someone who left here had their leave listed then, and is not
//! listed again though a later replica's roster view still names them.
//!
//! Presence: the rebuilt room is large if any replica saw it large (the mode latches), or if
//! it now holds more than the threshold. Its announced set is the union of the replicas'
//! (what some edge's clients were told). A large room lists the leaves of gone participants
//! only if they were announced, announces any interesting participant nobody was told of,
//! and sends a fresh `ParticipantCount` when the window closes (clients' counts predate the
//! failover). A full-presence room counts everyone as announced, as before.
//!
//! The same message reaches a live origin after a link blip. Merging is idempotent there:
//! known participants are re-homed on the edge's new link, nothing else changes, and a
//! participant the origin had already let go (its grace ran out while the link was down) is
//! taken back, since its edge still serves it. If the edge's settings or hands differ from the
//! room's (events sent while its link was down were lost), the room sends `Restored`.

use super::{kind_index, Events, Member, Room, RoomConfig};
use cascade_proto::room::{EdgeId, PresenceMode, RoomEventBody, RoomReplica, RoomSettings};
use cascade_proto::{ParticipantId, RoomId};
use std::collections::BTreeSet;

/// How far above every counter seen so far a rebuilt room starts the ids it hands out (for
/// participants, tracks and chat) while it still waits for replicas.
///
/// Why: the dying origin's last events reach its edges at different moments, so a replica that
/// comes later may hold ids the earlier ones never saw (a participant who joined, a message
/// acknowledged, on that edge only). Handing those ids out again would merge two participants
/// into one or drop a message on the later merge. Edges differ by the events in flight when
/// the origin died, far fewer than this; ids are opaque to clients, and chat keeps its order
/// (everything sent during the window comes after everything sent before it).
pub const RESTORE_ID_MARGIN: u64 = 1 << 20;

/// How long a rebuilt room waits for the replicas of the rest of its edges. Edges dial the new
/// origin when the placement changes (an etcd watch, well under a second) and send their
/// replicas first, so a few seconds covers a loaded edge.
pub const RESTORE_GRACE_MS: u64 = 5_000;

#[derive(Debug)]
pub(super) struct Restoring {
    deadline_ms: u64,
    /// Highest `seq` among the replicas merged: settings and hands come from that one, under
    /// what this origin acknowledged since ([`Restoring::here`]).
    best_seq: Option<u64>,
    /// Everyone some edge believed was in the room.
    expected: BTreeSet<ParticipantId>,
    /// What this origin acknowledged while the window is open.
    pub(super) here: Acknowledged,
}

/// What the rebuilt room acknowledged to its clients while it still waits for replicas: a
/// later replica brings in what the old origin acknowledged last, but never undoes this (the
/// new origin's acknowledgements all come after the old origin's last event).
#[derive(Debug, Default)]
pub(super) struct Acknowledged {
    /// Hands raised here, in the order raised (one lowered again here is taken out).
    raised: Vec<ParticipantId>,
    /// Hands lowered here at some point, by their owner or a moderator: the old origin's
    /// place in the queue is void (one raised again here queues in `raised`).
    lowered: BTreeSet<ParticipantId>,
    /// Participants who left or were removed here: their hand, spotlight and leave are done.
    left: BTreeSet<ParticipantId>,
    /// The settings fields a moderator set here.
    pub(super) settings: SettingsSet,
}

/// Which fields of [`RoomSettings`] were set (to whatever value the room now holds).
/// `streaming` has no intent yet, so it always comes from the replicas.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SettingsSet {
    pub(super) locked: bool,
    pub(super) lobby: bool,
    pub(super) layout: bool,
    pub(super) spotlight: bool,
}

impl Acknowledged {
    pub(super) fn hand_raised(&mut self, p: ParticipantId) {
        if !self.raised.contains(&p) {
            self.raised.push(p);
        }
    }

    pub(super) fn hand_lowered(&mut self, p: ParticipantId) {
        self.raised.retain(|q| *q != p);
        self.lowered.insert(p);
    }

    pub(super) fn left(&mut self, p: ParticipantId) {
        self.raised.retain(|q| *q != p);
        self.left.insert(p);
    }

    /// The hands after a replica that saw a later event than any before it: the old origin's
    /// queue as that replica has it, less the hands lowered here (since) or of those who left
    /// here, then the hands raised here in their order. A hand raised here that the old origin
    /// had up too, and that was not lowered here in between, keeps its earlier place.
    fn hands_over(&self, replica: &[ParticipantId]) -> Vec<ParticipantId> {
        let mut hands: Vec<ParticipantId> = replica
            .iter()
            .copied()
            .filter(|p| !self.lowered.contains(p) && !self.left.contains(p))
            .collect();
        for p in &self.raised {
            if !hands.contains(p) {
                hands.push(*p);
            }
        }
        hands
    }

    /// The settings after such a replica: its fields, but for those set here (`current`
    /// holds those), and no spotlight on someone who left here.
    fn settings_over(&self, replica: &RoomSettings, current: &RoomSettings) -> RoomSettings {
        let set = self.settings;
        let mut s = replica.clone();
        if set.locked {
            s.locked = current.locked;
        }
        if set.lobby {
            s.lobby = current.lobby;
        }
        if set.layout {
            s.layout = current.layout;
        }
        if set.spotlight {
            s.spotlight = current.spotlight;
        }
        if s.spotlight.is_some_and(|p| self.left.contains(&p)) {
            s.spotlight = None;
        }
        s
    }
}

impl Room {
    /// A room rebuilt on this origin from replicas; the first one follows with
    /// [`Room::restore`].
    pub fn restored(id: RoomId, config: RoomConfig, now_ms: u64) -> Self {
        let mut room = Room::new(id, config);
        room.restoring = Some(Restoring {
            deadline_ms: now_ms + RESTORE_GRACE_MS,
            best_seq: None,
            expected: BTreeSet::new(),
            here: Acknowledged::default(),
        });
        room
    }

    /// Where an acknowledgement is recorded while the restore window is open (see
    /// [`Acknowledged`]); `None` once it closed.
    pub(super) fn acknowledged_here(&mut self) -> Option<&mut Acknowledged> {
        self.restoring.as_mut().map(|r| &mut r.here)
    }

    /// Whether the room is still waiting for replicas.
    pub fn is_restoring(&self) -> bool {
        self.restoring.is_some()
    }

    /// Merges one edge's replica (see the module docs). Returns the events to send: a
    /// `Restored` when some client may now hold other settings or hands than the room.
    pub fn restore(&mut self, edge: EdgeId, replica: RoomReplica) -> Events {
        let views_differ = if let Some(r) = &mut self.restoring {
            // What the clients of the edges merged before hold (none before the first).
            let held = r
                .best_seq
                .is_some()
                .then(|| (self.settings.clone(), self.hands.clone()));
            if r.best_seq.is_none_or(|best| replica.seq > best) {
                r.best_seq = Some(replica.seq);
                self.settings = r.here.settings_over(&replica.settings, &self.settings);
                self.hands = r.here.hands_over(&replica.hands);
            }
            let differ = replica.settings != self.settings
                || replica.hands != self.hands
                || held.is_some_and(|(settings, hands)| {
                    settings != self.settings || hands != self.hands
                });
            r.expected.extend(replica.known.iter().copied());
            // Events sent during the window come after anything a client saw from the old
            // origin, whichever edge it is on (resume replays by `seq`).
            self.seq = self.seq.max(replica.seq.saturating_add(RESTORE_ID_MARGIN));
            if replica.presence == PresenceMode::Interesting {
                self.presence = PresenceMode::Interesting;
            }
            self.announced.extend(replica.announced.iter().copied());
            differ
        } else {
            // A link blip on a live room: what the room sent while the link was down never
            // reached the edge's clients.
            replica.settings != self.settings || replica.hands != self.hands
        };
        // While the window is open, ids handed out stay clear of anything a later replica may
        // hold (see RESTORE_ID_MARGIN); a live room's merge (a link blip) changes no counter.
        let margin = if self.restoring.is_some() {
            RESTORE_ID_MARGIN
        } else {
            0
        };
        self.next_participant = self
            .next_participant
            .max(replica.next_participant.saturating_add(margin));
        self.next_track = self
            .next_track
            .max(replica.next_track.saturating_add(margin));
        self.next_chat = self.next_chat.max(replica.next_chat.saturating_add(margin));

        for mut info in replica.participants {
            info.edge = edge;
            self.waiting.remove(&info.id);
            match self.participants.get_mut(&info.id) {
                Some(m) => m.info.edge = edge,
                None => {
                    let mut host_muted = [false; 2];
                    for t in replica.tracks.iter().filter(|t| t.participant == info.id) {
                        host_muted[kind_index(t.kind)] |= t.host_muted;
                    }
                    if self.restoring.is_none() {
                        // A live room let this participant go; others must hear it is back.
                        self.pending_joined.push(info.clone());
                    }
                    self.participants
                        .insert(info.id, Member { info, host_muted });
                }
            }
        }
        for mut info in replica.waiting {
            if !self.participants.contains_key(&info.id) {
                info.edge = edge;
                self.waiting.insert(info.id, info);
            }
        }
        for t in replica.tracks {
            if self.participants.contains_key(&t.participant) {
                self.tracks.entry(t.id).or_insert(t);
            }
        }
        for m in replica.chat {
            self.last_chat_ts = self.last_chat_ts.max(m.ts);
            if !self.chat.iter().any(|c| c.id == m.id) {
                let at = self.chat.partition_point(|c| c.id < m.id);
                self.chat.insert(at, m);
            }
        }
        while self.chat.len() > self.config.chat_history {
            self.chat.pop_front();
        }
        for (identity, role) in replica.invited {
            self.invited.entry(identity).or_insert(role);
        }
        let mut events = Vec::new();
        if views_differ {
            self.emit_restored(&mut events);
        }
        events
    }

    /// Tells every edge the room's settings and hand queue after a merge (see the module docs).
    fn emit_restored(&mut self, events: &mut Events) {
        let body = RoomEventBody::Restored {
            settings: self.settings.clone(),
            hands: self.hands.clone(),
        };
        self.emit(body, events);
    }

    /// Closes the restore window once `now_ms` is past it: those expected but never announced
    /// leave. Returns the events (the batched leave) to send.
    pub fn finish_restore(&mut self, now_ms: u64) -> Events {
        let mut events = Vec::new();
        let Some(r) = &self.restoring else {
            return events;
        };
        if now_ms < r.deadline_ms {
            return events;
        }
        let Some(r) = self.restoring.take() else {
            return events;
        };
        // Those who left here had their leave listed then; a later replica's roster view may
        // still name them.
        let mut gone: Vec<ParticipantId> = r
            .expected
            .into_iter()
            .filter(|p| {
                !self.participants.contains_key(p)
                    && !self.waiting.contains_key(p)
                    && !r.here.left.contains(p)
            })
            .collect();
        let present = |p: &ParticipantId| self.participants.contains_key(p);
        let hands_before = self.hands.len();
        self.hands.retain(present);
        let mut dropped = self.hands.len() != hands_before;
        if self.settings.spotlight.is_some_and(|p| !present(&p)) {
            self.settings.spotlight = None;
            dropped = true;
        }
        self.tracks
            .retain(|_, t| self.participants.contains_key(&t.participant));
        if self.participants.is_empty() {
            self.pending_joined.clear();
            self.pending_left.clear();
            self.announced.clear();
            self.closed = !gone.is_empty();
            return events;
        }
        let was_large = self.presence == PresenceMode::Interesting;
        self.check_size();
        if was_large {
            // Only those some edge's clients were told of hear of their leave.
            gone.retain(|p| self.announced.contains(p));
            self.announced.retain(|p| self.participants.contains_key(p));
            let unannounced: Vec<ParticipantId> = self
                .participants
                .keys()
                .copied()
                .filter(|p| !self.announced.contains(p) && self.is_interesting(*p))
                .collect();
            for p in unannounced {
                self.announce(p);
            }
        } else {
            // Full presence: everyone here was listed to everyone (a room that turns large
            // only now starts from that).
            self.announced = self.participants.keys().copied().collect();
        }
        // The counts clients hold predate the failover.
        self.count_sent = None;
        self.pending_left.extend(gone);
        self.flush_into(&mut events);
        if dropped {
            self.emit_restored(&mut events);
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::room::{Intent, Layout, ParticipantInfo, Reply};
    use cascade_proto::{Identity, Role};

    fn p(id: u64) -> ParticipantId {
        ParticipantId(id)
    }

    fn ids(v: &[u64]) -> Vec<ParticipantId> {
        v.iter().copied().map(p).collect()
    }

    /// Where a later replica's hands and the window's acknowledgements end up, one ordering a
    /// row: (the replica's queue, raised here in order, lowered here, left here, result).
    #[test]
    fn hands_after_a_later_replica() {
        type Row = (
            &'static [u64],
            &'static [u64],
            &'static [u64],
            &'static [u64],
            &'static [u64],
        );
        let table: [Row; 9] = [
            (&[1, 2], &[], &[], &[], &[1, 2]),
            // Raised here: after the old origin's queue.
            (&[1, 2], &[3], &[], &[], &[1, 2, 3]),
            (&[1, 2], &[4, 3], &[], &[], &[1, 2, 4, 3]),
            // Raised here and on the old origin before: its earlier place.
            (&[1, 2], &[3, 1], &[], &[], &[1, 2, 3]),
            // Lowered here: stays down though the replica has it up.
            (&[1, 2], &[], &[1], &[], &[2]),
            // Lowered by a moderator here without knowing it was up (the replica had it).
            (&[3, 1, 2], &[], &[3, 2], &[], &[1]),
            // Left here: gone from the queue.
            (&[1, 2], &[], &[], &[2], &[1]),
            // Only the replica had it: the old origin raised it last.
            (&[5], &[3], &[], &[], &[5, 3]),
            // The replica has none up (all lowered on the old origin): only this origin's.
            (&[], &[3], &[], &[], &[3]),
        ];
        for (replica, raised, lowered, left, want) in table {
            let mut here = Acknowledged::default();
            for &r in raised {
                here.hand_raised(p(r));
            }
            for &l in lowered {
                here.hand_lowered(p(l));
            }
            for &l in left {
                here.left(p(l));
            }
            assert_eq!(
                here.hands_over(&ids(replica)),
                ids(want),
                "replica {replica:?} raised {raised:?} lowered {lowered:?} left {left:?}"
            );
        }
    }

    /// The last acknowledgement here for a hand is the one that counts.
    #[test]
    fn a_hand_raised_and_lowered_here_counts_its_last_change() {
        let mut here = Acknowledged::default();
        here.hand_raised(p(3));
        here.hand_lowered(p(3));
        assert_eq!(here.hands_over(&ids(&[1, 3])), ids(&[1]));
        here.hand_raised(p(3));
        assert_eq!(here.hands_over(&ids(&[1])), ids(&[1, 3]));
        // Lowered, then raised again: back at the end of the queue, behind 2.
        here.hand_lowered(p(1));
        here.hand_raised(p(1));
        assert_eq!(here.hands_over(&ids(&[1, 2])), ids(&[2, 3, 1]));
    }

    #[test]
    fn settings_after_a_later_replica_field_by_field() {
        let replica = RoomSettings {
            locked: true,
            lobby: true,
            layout: Layout::Speaker,
            spotlight: Some(p(7)),
            streaming: true,
        };
        let current = RoomSettings {
            locked: false,
            lobby: false,
            layout: Layout::Grid,
            spotlight: Some(p(2)),
            streaming: false,
        };
        let mut here = Acknowledged::default();
        assert_eq!(here.settings_over(&replica, &current), replica);
        here.settings.lobby = true;
        here.settings.spotlight = true;
        let s = here.settings_over(&replica, &current);
        assert_eq!(
            s,
            RoomSettings {
                lobby: false,
                spotlight: Some(p(2)),
                ..replica.clone()
            }
        );
        here.settings = SettingsSet {
            locked: true,
            lobby: true,
            layout: true,
            spotlight: true,
        };
        assert_eq!(
            here.settings_over(&replica, &current),
            RoomSettings {
                streaming: true,
                ..current.clone()
            },
            "streaming has no intent: always the replica's"
        );
        // A spotlight on someone who left here goes, whoever set it.
        let mut here = Acknowledged::default();
        here.left(p(7));
        assert_eq!(here.settings_over(&replica, &current).spotlight, None);
    }

    const E1: EdgeId = EdgeId(1);
    const E2: EdgeId = EdgeId(2);
    const E3: EdgeId = EdgeId(3);
    const T0: u64 = 1_000_000;

    fn person(id: u64, role: Role, edge: EdgeId) -> ParticipantInfo {
        ParticipantInfo {
            id: p(id),
            identity: Identity::new(format!("u{id}")).unwrap(),
            name: format!("User {id}"),
            role,
            edge,
        }
    }

    fn replica(
        seq: u64,
        participants: Vec<ParticipantInfo>,
        hands: &[u64],
        settings: RoomSettings,
    ) -> RoomReplica {
        RoomReplica {
            seq,
            settings,
            hands: ids(hands),
            participants,
            known: ids(&[1, 2, 3, 4]),
            next_participant: 5,
            next_track: 1,
            next_chat: 1,
            ..RoomReplica::default()
        }
    }

    fn done(r: &mut Room, edge: EdgeId, intent: Intent) {
        let (reply, _) = r.handle(edge, intent, T0 + 100);
        assert_eq!(reply, Reply::Done);
    }

    /// Three edges' replicas, the latest in the middle, with changes on the new origin before
    /// and after it: each later replica brings the old origin's last state under what was
    /// acknowledged here, an older one changes neither, and closing the window keeps it all.
    #[test]
    fn replicas_in_any_order_never_undo_what_was_acknowledged_here() {
        let host = person(1, Role::Host, E1);
        let guest = person(2, Role::Attendee, E1);
        let a = person(3, Role::Attendee, E2);
        let b = person(4, Role::Attendee, E3);
        let mut r = Room::restored(RoomId::new("r").unwrap(), RoomConfig::default(), T0);
        r.restore(
            E1,
            replica(
                10,
                vec![host.clone(), guest.clone()],
                &[2],
                RoomSettings::default(),
            ),
        );
        assert_eq!(r.hands, ids(&[2]));
        done(
            &mut r,
            E1,
            Intent::RaiseHand {
                participant: host.id,
            },
        );
        done(
            &mut r,
            E1,
            Intent::LowerHand {
                participant: guest.id,
                target: guest.id,
            },
        );
        done(
            &mut r,
            E1,
            Intent::SetLocked {
                participant: host.id,
                locked: true,
            },
        );
        let seq = r.seq();

        // The latest: the old origin's last events raised a's hand, turned the lobby on and
        // the layout to speaker; it still had the guest's hand up and the room unlocked.
        let latest = RoomSettings {
            lobby: true,
            layout: Layout::Speaker,
            ..RoomSettings::default()
        };
        let events = r.restore(E2, replica(30, vec![a.clone()], &[2, 3], latest));
        assert_eq!(r.hands, ids(&[3, 1]));
        let want = RoomSettings {
            locked: true,
            lobby: true,
            layout: Layout::Speaker,
            ..RoomSettings::default()
        };
        assert_eq!(r.settings(), &want);
        assert!(seq < 30 + RESTORE_ID_MARGIN);
        // Both edges' clients hold other views than the room: one `Restored` to both,
        // numbered on above the latest replica.
        let restored = RoomEventBody::Restored {
            settings: want.clone(),
            hands: ids(&[3, 1]),
        };
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0.body, restored);
        assert_eq!(events[0].0.seq, 30 + RESTORE_ID_MARGIN + 1);
        assert_eq!(events[0].1, vec![E1, E2]);

        // An older one: nothing of its settings or hands; its clients are told the room's.
        let events = r.restore(
            E3,
            replica(20, vec![b.clone()], &[2, 4], RoomSettings::default()),
        );
        assert_eq!(r.hands, ids(&[3, 1]));
        assert_eq!(r.settings(), &want);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0.body, restored);
        assert_eq!(events[0].1, vec![E1, E2, E3]);
        done(&mut r, E3, Intent::RaiseHand { participant: b.id });
        done(
            &mut r,
            E1,
            Intent::SetLobby {
                participant: host.id,
                enabled: false,
            },
        );

        let _ = r.finish_restore(T0 + RESTORE_GRACE_MS);
        assert!(!r.is_restoring());
        assert_eq!(r.hands, ids(&[3, 1, 4]));
        assert_eq!(
            r.settings(),
            &RoomSettings {
                lobby: false,
                ..want
            }
        );
        assert_eq!(r.participant_count(), 4);
    }
}
