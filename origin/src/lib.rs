//! Room authority: the room state machine every edge relays client intents to.
//!
//! Edges never own roster, roles or track lists (architecture rule 1): they forward each
//! participant's [`Intent`] to the room's origin and fan the origin's [`RoomEvent`]s back out.
//! [`Origin`] is sans-IO: [`Origin::handle`] takes one message from an edge (and the time, for
//! chat timestamps) and returns the replies and events to deliver, each addressed to the edges
//! that must see it; [`Origin::tick`], called every [`PRESENCE_BATCH`], sends the batched joins
//! and leaves (and, in rooms too large for full presence, the coalesced participant count). Dev mode drives it from one task over an in-memory link; the cascade issue drives
//! the same type over QUIC.
//!
//! Invariants: every request gets exactly one reply; each room's events for everyone are
//! numbered 1, 2, 3... without gaps; a refused intent changes nothing.
//!
//! [`Intent`]: cascade_proto::room::Intent

mod room;

pub use room::{
    allowed, is_moderator, Permission, Room, RoomConfig, COUNT_INTERVAL_MS, MAX_CHAT_CHARS,
    MAX_ROSTER_PAGE, REACTIONS, RESTORE_GRACE_MS, RESTORE_ID_MARGIN,
};

use cascade_proto::room::{
    EdgeId, EdgeToOrigin, Intent, OriginToEdge, Reply, RequestId, RoomError, RoomEvent,
};
use cascade_proto::{ParticipantId, RoomId};
use std::collections::HashMap;
use std::time::Duration;

/// How long joins and leaves collect before going out as one event.
pub const PRESENCE_BATCH: Duration = Duration::from_millis(200);

/// One message for one edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub edge: EdgeId,
    pub message: OriginToEdge,
}

/// All rooms this origin is authoritative for.
#[derive(Debug, Default)]
pub struct Origin {
    rooms: HashMap<RoomId, Room>,
    config: RoomConfig,
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Origin {
    pub fn new(config: RoomConfig) -> Self {
        Self {
            rooms: HashMap::new(),
            config,
        }
    }

    /// Handles one message from `edge` at the system clock's time.
    pub fn handle(&mut self, edge: EdgeId, msg: EdgeToOrigin) -> Vec<Outgoing> {
        self.handle_at(edge, msg, unix_millis())
    }

    /// Handles one message from `edge` at `now_ms` (Unix milliseconds), returning what to send
    /// where. Only a join creates a room; anything else for an unknown room is refused.
    pub fn handle_at(&mut self, edge: EdgeId, msg: EdgeToOrigin, now_ms: u64) -> Vec<Outgoing> {
        match msg {
            EdgeToOrigin::Restore { id, room, replica } => {
                let config = self.config.clone();
                let events = self
                    .rooms
                    .entry(room.clone())
                    .or_insert_with(|| Room::restored(room, config, now_ms))
                    .restore(edge, *replica);
                let mut out = vec![Outgoing {
                    edge,
                    message: OriginToEdge::Reply {
                        id,
                        reply: Reply::Done,
                    },
                }];
                out.extend(fan_out(events));
                out
            }
            EdgeToOrigin::Request { id, room, intent } => {
                let state = match self.rooms.get_mut(&room) {
                    Some(r) => r,
                    None if matches!(intent, Intent::Join { .. }) => self
                        .rooms
                        .entry(room.clone())
                        .or_insert_with(|| Room::new(room.clone(), self.config.clone())),
                    None => {
                        return vec![Outgoing {
                            edge,
                            message: OriginToEdge::Reply {
                                id,
                                reply: Reply::Refused(RoomError::NotInRoom),
                            },
                        }]
                    }
                };
                let (reply, events) = state.handle(edge, intent, now_ms);
                let mut out = vec![Outgoing {
                    edge,
                    message: OriginToEdge::Reply { id, reply },
                }];
                out.extend(fan_out(events));
                if self.rooms.get(&room).is_some_and(Room::is_finished) {
                    self.rooms.remove(&room);
                }
                out
            }
            // Link bookkeeping belongs to the process that owns the links (`kcs origin`).
            EdgeToOrigin::Attach { .. } => Vec::new(),
        }
    }

    /// An edge is gone for good (its link stayed down past the grace period, or it came back
    /// as a new process): each of its participants and lobby guests leaves, as if it had sent
    /// the leave itself. Returns the events for the other edges (the replies, addressed to the
    /// gone edge, are dropped).
    pub fn drop_edge(&mut self, edge: EdgeId, now_ms: u64) -> Vec<Outgoing> {
        let mut gone: Vec<(RoomId, ParticipantId)> = Vec::new();
        for (id, room) in &self.rooms {
            gone.extend(
                room.participants()
                    .chain(room.waiting())
                    .filter(|p| p.edge == edge)
                    .map(|p| (id.clone(), p.id)),
            );
        }
        let mut out = Vec::new();
        for (room, participant) in gone {
            let leave = EdgeToOrigin::Request {
                id: RequestId(0),
                room,
                intent: Intent::Leave { participant },
            };
            out.extend(
                self.handle_at(edge, leave, now_ms).into_iter().filter(|o| {
                    !(o.edge == edge && matches!(o.message, OriginToEdge::Reply { .. }))
                }),
            );
        }
        out
    }

    /// Every room's id.
    pub fn room_ids(&self) -> impl Iterator<Item = &RoomId> {
        self.rooms.keys()
    }

    /// Participants in all rooms (for load reports).
    pub fn participant_count(&self) -> usize {
        self.rooms.values().map(Room::participant_count).sum()
    }

    /// Sends every room's batched joins and leaves (and large rooms' counts), and closes restore
    /// windows that are due.
    pub fn tick(&mut self) -> Vec<Outgoing> {
        self.tick_at(unix_millis())
    }

    /// [`Origin::tick`] at `now_ms` (Unix milliseconds).
    pub fn tick_at(&mut self, now_ms: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for room in self.rooms.values_mut() {
            out.extend(fan_out(room.finish_restore(now_ms)));
            out.extend(fan_out(room.flush_presence(now_ms)));
        }
        self.rooms.retain(|_, r| !r.is_finished());
        out
    }

    pub fn room(&self, room: &RoomId) -> Option<&Room> {
        self.rooms.get(room)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

/// Addresses each event to the edges the room named for it.
fn fan_out(events: Vec<(RoomEvent, Vec<EdgeId>)>) -> Vec<Outgoing> {
    let mut out = Vec::new();
    for (event, edges) in events {
        for edge in edges {
            out.push(Outgoing {
                edge,
                message: OriginToEdge::Event(event.clone()),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::room::{Reply, RoomEventBody};
    use cascade_proto::{Identity, Role};

    fn join(o: &mut Origin, edge: u32, who: &str) -> ParticipantId {
        let out = o.handle_at(
            EdgeId(edge),
            EdgeToOrigin::Request {
                id: RequestId(1),
                room: RoomId::new("r").unwrap(),
                intent: Intent::Join {
                    identity: Identity::new(who).unwrap(),
                    role: Role::Attendee,
                    name: who.into(),
                },
            },
            1,
        );
        match &out[0].message {
            OriginToEdge::Reply {
                reply: Reply::Joined(s),
                ..
            } => s.you.id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dropping_an_edge_removes_only_its_participants() {
        let mut o = Origin::new(RoomConfig::default());
        let a = join(&mut o, 1, "a");
        let b = join(&mut o, 2, "b");
        o.tick();
        let out = o.drop_edge(EdgeId(1), 2);
        assert!(
            out.iter().all(|m| m.edge == EdgeId(2)),
            "nothing goes to the gone edge: {out:?}"
        );
        let room = o.room(&RoomId::new("r").unwrap()).unwrap();
        let left: Vec<_> = room.participants().map(|p| p.id).collect();
        assert_eq!(left, vec![b]);
        let leaves: Vec<_> = o
            .tick()
            .into_iter()
            .filter_map(|m| match m.message {
                OriginToEdge::Event(RoomEvent {
                    body: RoomEventBody::ParticipantsLeft(gone),
                    ..
                }) => Some(gone),
                _ => None,
            })
            .collect();
        assert_eq!(leaves, vec![vec![a]], "the other edge hears the leave");
        assert!(
            o.drop_edge(EdgeId(7), 3).is_empty(),
            "an unknown edge changes nothing"
        );
    }
}
