//! Messages between KCS nodes, independent of any transport.
//!
//! The edge relays client intents to the room's origin and fans the origin's ordered room
//! events back out to its clients (shared/guides/architecture.md, rule 1). In dev mode both ends
//! live in one process and exchange these values over an in-memory link; the cascade issue adds
//! a QUIC transport and a binary framing for the very same types, so "single node" and "mesh" are
//! one code path.
//!
//! This crate holds only plain data: identities, roles and the message enums. It does no I/O.

pub mod ids;
pub mod room;

pub use ids::{Identity, ParticipantId, Role, RoomId, TrackId, TrackKind, TrackSource};
