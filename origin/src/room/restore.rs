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
//! - settings and raised hands come from the replica that saw the latest event (highest `seq`),
//!   and the room's sequence number and id counters are the maximum over all replicas plus
//!   [`RESTORE_ID_MARGIN`] while the window is open, so no id or sequence number a client holds
//!   is reused, not even one only a replica still to come knows.
//!
//! When the window closes (on [`Room::finish_restore`], driven by the origin's tick), anyone
//! some edge listed in its roster view but no edge announced — the participants of an edge
//! that died with the origin — leaves, with the usual batched event; hands and the spotlight
//! of those gone are dropped.
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
//! taken back, since its edge still serves it.

use super::{kind_index, Events, Member, Room, RoomConfig};
use cascade_proto::room::{EdgeId, PresenceMode, RoomReplica};
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
    /// Highest `seq` among the replicas merged: settings and hands come from that one.
    best_seq: Option<u64>,
    /// Everyone some edge believed was in the room.
    expected: BTreeSet<ParticipantId>,
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
        });
        room
    }

    /// Whether the room is still waiting for replicas.
    pub fn is_restoring(&self) -> bool {
        self.restoring.is_some()
    }

    /// Merges one edge's replica (see the module docs).
    pub fn restore(&mut self, edge: EdgeId, replica: RoomReplica) {
        if let Some(r) = &mut self.restoring {
            if r.best_seq.is_none_or(|best| replica.seq > best) {
                r.best_seq = Some(replica.seq);
                self.settings = replica.settings.clone();
                self.hands = replica.hands.clone();
            }
            r.expected.extend(replica.known.iter().copied());
            // Events sent during the window come after anything a client saw from the old
            // origin, whichever edge it is on (resume replays by `seq`).
            self.seq = self.seq.max(replica.seq.saturating_add(RESTORE_ID_MARGIN));
            if replica.presence == PresenceMode::Interesting {
                self.presence = PresenceMode::Interesting;
            }
            self.announced.extend(replica.announced.iter().copied());
        }
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
        let mut gone: Vec<ParticipantId> = r
            .expected
            .into_iter()
            .filter(|p| !self.participants.contains_key(p) && !self.waiting.contains_key(p))
            .collect();
        let present = |p: &ParticipantId| self.participants.contains_key(p);
        self.hands.retain(present);
        if self.settings.spotlight.is_some_and(|p| !present(&p)) {
            self.settings.spotlight = None;
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
        events
    }
}
