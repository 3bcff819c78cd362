//! Room authority: the room state machine every edge relays client intents to.
//!
//! Edges never own roster, roles or track lists (architecture rule 1): they forward each
//! participant's [`Intent`] to the room's origin and fan the origin's [`RoomEvent`]s back out.
//! [`Origin`] is sans-IO: [`Origin::handle`] takes one message from an edge and returns the
//! replies and events to deliver, each addressed to the edges that must see it. Dev mode drives it
//! from one task over an in-memory link; the cascade issue drives the same type over QUIC.
//!
//! Invariants: every request gets exactly one reply; each room's events are numbered 1, 2, 3...
//! without gaps; a refused intent changes nothing.

mod room;

pub use room::{Room, RoomConfig};

use cascade_proto::room::{EdgeId, EdgeToOrigin, OriginToEdge, RoomEvent};
use cascade_proto::RoomId;
use std::collections::HashMap;

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

impl Origin {
    pub fn new(config: RoomConfig) -> Self {
        Self {
            rooms: HashMap::new(),
            config,
        }
    }

    /// Handles one message from `edge`, returning what to send where.
    pub fn handle(&mut self, edge: EdgeId, msg: EdgeToOrigin) -> Vec<Outgoing> {
        match msg {
            EdgeToOrigin::Request { id, room, intent } => {
                let state = self
                    .rooms
                    .entry(room.clone())
                    .or_insert_with(|| Room::new(room.clone(), self.config.clone()));
                let (reply, events) = state.handle(edge, intent);
                let mut out = vec![Outgoing {
                    edge,
                    message: OriginToEdge::Reply { id, reply },
                }];
                out.extend(fan_out(events));
                if self.rooms.get(&room).is_some_and(Room::is_empty) {
                    self.rooms.remove(&room);
                }
                out
            }
        }
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
