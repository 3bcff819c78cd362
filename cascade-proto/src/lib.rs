//! Messages between KCS nodes, and their wire format.
//!
//! The edge relays client intents to the room's origin and fans the origin's ordered room
//! events back out to its clients (shared/guides/architecture.md, rule 1). In dev mode both ends
//! live in one process and exchange the [`room`] values over an in-memory link; between
//! processes they travel over a cascade link ([`link`]: control messages and media datagrams)
//! encoded by [`wire`] (byte layout in docs/cascade.md), so "single node" and "mesh" are one
//! code path.
//!
//! [`ids`], [`room`], [`link`] and [`wire`] are plain data and sans-IO codecs. The QUIC
//! transport lives in `quic` behind the `quic` feature, so crates that only need the
//! messages do not build quinn.

pub mod ids;
pub mod link;
#[cfg(feature = "quic")]
pub mod quic;
pub mod relay;
pub mod replica;
pub mod room;
pub mod wire;

pub use ids::{Identity, ParticipantId, Role, RoomId, TrackId, TrackKind, TrackSource};
