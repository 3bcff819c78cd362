//! Where this edge takes each room's media from: its place in the room's fan-out tree.
//!
//! The control plane plans, per room, a tree rooted at the room's origin over the edges with
//! participants in it (`control_plane::fanout`) and writes each edge's position to etcd. An
//! edge's *media parent* for a room is either the origin itself or another edge (the relay of
//! its region, or an edge above it in the region's subtree). Room state always travels on the
//! link to the origin; only media subscriptions (subscribe, layer demand, keyframe requests,
//! NACKs and the datagrams they bring) go to the media parent.
//!
//! Two halves meet here: the follower, which watches the tree in etcd and says when a room's
//! parent changes, and the media side, which moves the room's remote-track subscriptions to the
//! new parent's link (falling back to the origin at once when the parent's link drops, so media
//! resumes before the planner has re-parented the edge).

use crate::uplink::OriginAddr;
use cascade_proto::RoomId;

/// A room's media parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaParent {
    /// The room's origin, over the edge's existing link to it.
    Origin,
    /// Another edge, dialled at its cascade address (`quic://NODE@HOST:PORT`).
    Edge(OriginAddr),
}

/// The follower's output: from now on, `room`'s media comes from `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentChange {
    pub room: RoomId,
    pub parent: MediaParent,
}
