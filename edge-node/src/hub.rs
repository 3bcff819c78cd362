//! The edge's side of the link to room origins.
//!
//! Sessions never touch room state: they send an [`Intent`] through the [`Hub`] and await the
//! origin's [`Reply`]; the origin's [`RoomEvent`]s come back through the hub, which fans each out
//! to the sessions of that room on this edge. The hub talks to "the origin" through a channel
//! pair carrying the `cascade-proto` room messages ([`EdgeToOrigin`] out, [`FromOrigin`] in). In
//! dev mode the origin runs in-process behind that pair ([`spawn_local_origin`]); in a cluster
//! the pair ends in [`crate::uplink`], which routes each room to its origin's QUIC link. Single
//! node and mesh are one code path.

use crate::sfu::{Event as ShardEvent, PublicationId};
use cascade_proto::replica::ReplicaTracker;
use cascade_proto::room::TrackInfo;
use cascade_proto::room::{
    Audience, EdgeId, EdgeToOrigin, Intent, OriginToEdge, Reply, RequestId, RoomEvent,
    RoomEventBody,
};
use cascade_proto::{Identity, ParticipantId, Role, RoomId, TrackId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Failed joins remembered in case the origin carried them out after all (see
/// [`FromOrigin::Failed`]).
const MAX_ORPHAN_JOINS: usize = 4096;

/// Room events queued per session before it is considered stuck and dropped from the room.
pub const SESSION_EVENT_QUEUE: usize = 1024;

/// What a session hears from its room.
#[derive(Debug, Clone)]
pub enum RoomSignal {
    Event(Arc<SharedEvent>),
    /// The dominant speaker changed (an edge-local publication, or silence).
    ActiveSpeaker(Option<PublicationId>),
}

/// One room event as every session of the edge receives it: the event once, and its client
/// JSON rendered once by whichever session needs it first. In a 10,000-person meeting each
/// batched join goes to thousands of sessions on one edge; rendering per session made the
/// edge's signaling cost grow with sessions x roster size.
#[derive(Debug)]
pub struct SharedEvent {
    pub event: RoomEvent,
    frame: std::sync::OnceLock<Option<Arc<str>>>,
}

impl SharedEvent {
    pub fn new(event: RoomEvent) -> Arc<Self> {
        Arc::new(Self {
            event,
            frame: std::sync::OnceLock::new(),
        })
    }

    /// The client frame for this event (`None`: none is sent), rendered by `render` only the
    /// first time any session asks.
    pub fn frame(&self, render: impl FnOnce(&RoomEvent) -> Option<String>) -> Option<Arc<str>> {
        self.frame
            .get_or_init(|| render(&self.event).map(Arc::from))
            .clone()
    }
}

impl std::ops::Deref for SharedEvent {
    type Target = RoomEvent;
    fn deref(&self) -> &RoomEvent {
        &self.event
    }
}

/// Why a request to the origin failed (as opposed to being refused by it).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the room's origin is unreachable")]
pub struct OriginUnavailable;

/// What the hub hears from the origin side.
#[derive(Debug)]
pub enum FromOrigin {
    /// A reply or a room event.
    Message(OriginToEdge),
    /// The request could not reach the origin, or its link dropped before the reply: the
    /// caller gets [`OriginUnavailable`].
    Failed(RequestId),
    /// The origin of these rooms no longer knows this edge's participants (it restarted, the
    /// room moved to a new origin, or the link stayed down past its grace period): the hub
    /// rebuilds each room there from its replica; sessions end only where it has none.
    Lost(Vec<RoomId>),
}

enum HubInput {
    Request {
        room: RoomId,
        intent: Intent,
        reply: oneshot::Sender<Reply>,
        /// For joins: where the new participant's room signals go.
        listener: Option<mpsc::Sender<RoomSignal>>,
    },
    Detach {
        room: RoomId,
        participant: ParticipantId,
    },
}

/// A request awaiting the origin's reply: its room, and for joins where the room's events go.
type Pending = (
    oneshot::Sender<Reply>,
    RoomId,
    Option<mpsc::Sender<RoomSignal>>,
);

/// Handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::Sender<HubInput>,
    /// Rooms by shard-local publication id, for routing active-speaker events.
    publication_rooms: Arc<Mutex<HashMap<PublicationId, RoomId>>>,
    /// The rooms this edge has participants in, as the origin told it (written by the hub task;
    /// read by the cascade to serve child edges' subscriptions).
    replicas: Arc<Mutex<ReplicaTracker>>,
    /// Joined local participants per room (rooms with none are absent), published by the hub
    /// task whenever a reply or event changes a count.
    local_counts: tokio::sync::watch::Receiver<LocalCounts>,
}

/// Joined participants on this edge per room; a room with none is absent.
pub type LocalCounts = std::collections::BTreeMap<RoomId, u32>;

impl Hub {
    /// Sends an intent and waits for the origin's reply. Joins pass a `listener` that will
    /// receive the room's events from the join's own sequence number on.
    pub async fn request(
        &self,
        room: &RoomId,
        intent: Intent,
        listener: Option<mpsc::Sender<RoomSignal>>,
    ) -> Result<Reply, OriginUnavailable> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(HubInput::Request {
                room: room.clone(),
                intent,
                reply,
                listener,
            })
            .await
            .map_err(|_| OriginUnavailable)?;
        rx.await.map_err(|_| OriginUnavailable)
    }

    /// Stops delivering the room's events to a participant (after it left).
    pub async fn detach(&self, room: &RoomId, participant: ParticipantId) {
        let _ = self
            .tx
            .send(HubInput::Detach {
                room: room.clone(),
                participant,
            })
            .await;
    }

    pub fn note_publication(&self, id: PublicationId, room: RoomId) {
        lock(&self.publication_rooms).insert(id, room);
    }

    pub fn forget_publication(&self, id: PublicationId) {
        lock(&self.publication_rooms).remove(&id);
    }

    /// This edge's joined participants per room, as a watch: what the edge's presence records
    /// and tree following ([`crate::membership`]) read. Cheap: a borrow, no hub round trip.
    pub fn local_counts(&self) -> tokio::sync::watch::Receiver<LocalCounts> {
        self.local_counts.clone()
    }

    /// What the edge knows of `room`: `None` when it has no participants there; else the
    /// track, if the room has it.
    pub fn track_info(&self, room: &RoomId, track: TrackId) -> Option<Option<TrackInfo>> {
        let r = lock(&self.replicas);
        r.has_room(room).then(|| r.track(room, track).cloned())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the hub, talking to an origin through `to_origin` / `from_origin`, and
/// consuming room-wide shard events (active speaker) from `shard_events`.
pub fn spawn(
    to_origin: mpsc::Sender<EdgeToOrigin>,
    mut from_origin: mpsc::Receiver<FromOrigin>,
    mut shard_events: mpsc::Receiver<ShardEvent>,
) -> Hub {
    let (tx, mut rx) = mpsc::channel::<HubInput>(4096);
    let publication_rooms: Arc<Mutex<HashMap<PublicationId, RoomId>>> = Arc::default();
    let rooms_by_pub = publication_rooms.clone();
    let replicas: Arc<Mutex<ReplicaTracker>> = Arc::default();
    let replicas_shared = replicas.clone();
    let (counts_tx, local_counts) = tokio::sync::watch::channel(LocalCounts::new());
    tokio::spawn(async move {
        let mut next_id = 1u64;
        let mut pending: HashMap<RequestId, Pending> = HashMap::new();
        // Invitations in flight: what the replica records once the origin accepts them.
        let mut invites: HashMap<RequestId, (Identity, Role)> = HashMap::new();
        // Joins failed locally (link down) whose reply may still come: id -> room.
        let mut orphan_rooms: HashMap<RequestId, RoomId> = HashMap::new();
        let mut rooms: HashMap<RoomId, HashMap<ParticipantId, mpsc::Sender<RoomSignal>>> =
            HashMap::new();
        // What a new origin needs to rebuild our rooms (see `cascade_proto::replica`).
        let replicas = replicas_shared;
        loop {
            tokio::select! {
                Some(input) = rx.recv() => match input {
                    HubInput::Request { room, intent, reply, listener } => {
                        let id = RequestId(next_id);
                        next_id += 1;
                        pending.insert(id, (reply, room.clone(), listener));
                        if let Intent::Invite { identity, role, .. } = &intent {
                            invites.insert(id, (identity.clone(), *role));
                        }
                        if to_origin.send(EdgeToOrigin::Request { id, room, intent }).await.is_err() {
                            pending.remove(&id); // dropping the sender tells the caller
                            invites.remove(&id);
                        }
                    }
                    HubInput::Detach { room, participant } => {
                        lock(&replicas).on_local_left(&room, participant);
                        publish_count(&counts_tx, &replicas, &room);
                        if let Some(members) = rooms.get_mut(&room) {
                            members.remove(&participant);
                            if members.is_empty() { rooms.remove(&room); }
                        }
                    }
                },
                Some(msg) = from_origin.recv() => match msg {
                    FromOrigin::Failed(id) => {
                        invites.remove(&id);
                        // Dropping the sender tells the caller.
                        if let Some((_, room, Some(_))) = pending.remove(&id) {
                            if orphan_rooms.len() < MAX_ORPHAN_JOINS {
                                orphan_rooms.insert(id, room);
                            }
                        }
                    }
                    FromOrigin::Lost(lost) => {
                        for room in lost {
                            // The origin that held the room forgot us (it restarted, or the
                            // room was placed on a new one): rebuild it there from what we
                            // know, and the sessions carry on.
                            let replica = lock(&replicas).replica(&room);
                            if let Some(replica) = replica {
                                let id = RequestId(next_id);
                                next_id += 1;
                                tracing::info!(%room, participants = replica.participants.len(), "restoring the room on its origin from this edge's replica");
                                let restore = EdgeToOrigin::Restore { id, room: room.clone(), replica: Box::new(replica) };
                                if to_origin.send(restore).await.is_ok() {
                                    continue;
                                }
                            }
                            if let Some(members) = rooms.remove(&room) {
                                // Nothing to restore from: dropping the listeners ends the
                                // sessions, and clients rejoin.
                                tracing::warn!(%room, sessions = members.len(), "the room's origin lost this edge's participants; ending their sessions");
                            }
                        }
                    }
                    FromOrigin::Message(OriginToEdge::Attached { .. }) => {}
                    FromOrigin::Message(OriginToEdge::Reply { id, reply }) => {
                        let Some((tx, room, listener)) = pending.remove(&id) else {
                            // A join whose caller was already told the origin was unreachable
                            // (its link dropped) but which the origin did carry out: leave, so
                            // no ghost stays in the roster.
                            if let (Reply::Joined(s), Some(room)) = (&reply, orphan_rooms.remove(&id)) {
                                let leave = Intent::Leave { participant: s.you.id };
                                let id = RequestId(next_id);
                                next_id += 1;
                                let _ = to_origin.send(EdgeToOrigin::Request { id, room, intent: leave }).await;
                            }
                            continue;
                        };
                        orphan_rooms.remove(&id);
                        lock(&replicas).on_reply(&room, &reply);
                        if let (Some((identity, role)), Reply::Done) = (invites.remove(&id), &reply) {
                            lock(&replicas).on_invited(&room, &identity, role);
                        }
                        publish_count(&counts_tx, &replicas, &room);
                        // Joined, or waiting in the lobby: either way the room's events (an
                        // admission, for one waiting) come to this listener from now on.
                        let you = match &reply {
                            Reply::Joined(s) => Some(s.you.id),
                            Reply::Waiting { you } => Some(you.id),
                            _ => None,
                        };
                        if let (Some(you), Some(l)) = (you, listener) {
                            rooms.entry(room).or_default().insert(you, l);
                        }
                        let _ = tx.send(reply);
                    }
                    FromOrigin::Message(OriginToEdge::Event(event)) => {
                        lock(&replicas).on_event(&event);
                        publish_count(&counts_tx, &replicas, &event.room);
                        let Some(members) = rooms.get_mut(&event.room) else { continue };
                        let room = event.room.clone();
                        deliver(members, &event);
                        match &event.body {
                            RoomEventBody::ParticipantsLeft(gone) => {
                                for p in gone { members.remove(p); }
                            }
                            RoomEventBody::RoomClosed { .. } => members.clear(),
                            _ => {}
                        }
                        if members.is_empty() { rooms.remove(&room); }
                    }
                },
                Some(ev) = shard_events.recv() => {
                    if let ShardEvent::ActiveSpeaker { publication, room } = ev {
                        let room_id = match publication {
                            Some(p) => lock(&rooms_by_pub).get(&p).cloned(),
                            None => RoomId::new(room).ok(),
                        };
                        let Some(room_id) = room_id else { continue };
                        if let Some(members) = rooms.get(&room_id) {
                            for l in members.values() {
                                let _ = l.try_send(RoomSignal::ActiveSpeaker(publication));
                            }
                        }
                    }
                },
                else => break,
            }
        }
    });
    Hub {
        tx,
        publication_rooms,
        replicas,
        local_counts,
    }
}

/// Publishes `room`'s local count if it changed (receivers are woken only then).
fn publish_count(
    counts: &tokio::sync::watch::Sender<LocalCounts>,
    replicas: &Mutex<ReplicaTracker>,
    room: &RoomId,
) {
    let n = u32::try_from(lock(replicas).local_count(room)).unwrap_or(u32::MAX);
    counts.send_if_modified(|m| {
        if n == 0 {
            m.remove(room).is_some()
        } else {
            m.insert(room.clone(), n) != Some(n)
        }
    });
}

/// Hands one room event to the sessions it is for. Moderator events go to every session, which
/// keeps them only if its participant is a moderator (the role is the session's to know).
fn deliver(members: &mut HashMap<ParticipantId, mpsc::Sender<RoomSignal>>, event: &RoomEvent) {
    let shared = SharedEvent::new(event.clone());
    let send = |p: &ParticipantId, l: &mpsc::Sender<RoomSignal>| match l
        .try_send(RoomSignal::Event(shared.clone()))
    {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(_)) => {
            // A session this far behind has lost room state; dropping its listener ends it,
            // and the client reconnects.
            tracing::warn!(room = %event.room, participant = %p, "session too slow for room events; detached");
            false
        }
    };
    match event.audience {
        Audience::Participant(p) => {
            if let Some(l) = members.get(&p) {
                if !send(&p, l) {
                    members.remove(&p);
                }
            }
        }
        Audience::All | Audience::Moderators => members.retain(|p, l| send(p, l)),
    }
}

/// Runs an in-process origin (dev mode and single-node deployments) and returns its link ends.
/// The one edge is `EdgeId(0)`.
pub fn spawn_local_origin(
    config: origin::RoomConfig,
) -> (mpsc::Sender<EdgeToOrigin>, mpsc::Receiver<FromOrigin>) {
    let edge = EdgeId(0);
    let (to_origin, mut origin_rx) = mpsc::channel::<EdgeToOrigin>(4096);
    let (edge_tx, edge_rx) = mpsc::channel::<FromOrigin>(16384);
    tokio::spawn(async move {
        let mut state = origin::Origin::new(config);
        let mut presence = tokio::time::interval(origin::PRESENCE_BATCH);
        presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let out = tokio::select! {
                msg = origin_rx.recv() => match msg {
                    Some(msg) => state.handle(edge, msg),
                    None => return,
                },
                _ = presence.tick() => state.tick(),
            };
            for out in out {
                // One edge in-process: everything goes to it.
                debug_assert_eq!(out.edge, edge);
                if edge_tx
                    .send(FromOrigin::Message(out.message))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    (to_origin, edge_rx)
}
