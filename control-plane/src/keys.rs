//! Where things live in the store (the key layout documented in docs/control-plane.md).
//!
//! ```text
//! <root>/nodes/<kind>/<node-id>   NodeInfo JSON, under the node's lease (edge | origin)
//! <root>/rooms/<room>             Placement JSON: which origin owns the room (no lease)
//! <root>/meetings/<room>          Meeting JSON: the REST API's meeting options (no lease)
//! <root>/trees/<room>/<edge>      TreePosition JSON: the edge's place in the room's fan-out tree
//! <root>/presence/<room>/<edge>   EdgePresence JSON: the edge's share of the room, under its lease
//! ```
//!
//! Every key hangs off one configurable root (default `/kcs/v1`), so several deployments or
//! test runs can share one etcd cluster, and a future incompatible layout moves to `/kcs/v2`.

use crate::nodes::{NodeId, NodeKind};
use cascade_proto::RoomId;

/// The default root: the project name and the layout version.
pub const DEFAULT_ROOT: &str = "/kcs/v1";

/// Builds and parses keys under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    root: String,
}

impl Default for KeyLayout {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}

impl KeyLayout {
    /// A layout under `root` (a trailing `/` is ignored).
    pub fn new(root: &str) -> Self {
        Self {
            root: root.trim_end_matches('/').to_owned(),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// Prefix of every node registration (edges and origins).
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.root)
    }

    /// Prefix of the registrations of one kind.
    pub fn nodes_of_kind(&self, kind: NodeKind) -> String {
        format!("{}/nodes/{}/", self.root, kind.as_str())
    }

    pub fn node(&self, kind: NodeKind, id: &NodeId) -> String {
        format!("{}{}", self.nodes_of_kind(kind), id)
    }

    pub fn rooms_prefix(&self) -> String {
        format!("{}/rooms/", self.root)
    }

    pub fn room(&self, room: &RoomId) -> String {
        format!("{}{}", self.rooms_prefix(), room)
    }

    pub fn meetings_prefix(&self) -> String {
        format!("{}/meetings/", self.root)
    }

    pub fn meeting(&self, room: &RoomId) -> String {
        format!("{}{}", self.meetings_prefix(), room)
    }

    /// Prefix of one room's fan-out tree (one key per edge).
    pub fn tree(&self, room: &RoomId) -> String {
        format!("{}/trees/{}/", self.root, room)
    }

    pub fn tree_edge(&self, room: &RoomId, edge: &NodeId) -> String {
        format!("{}{}", self.tree(room), edge)
    }

    /// Prefix of every edge's room presence (what the tree keeper plans from).
    pub fn presence_prefix(&self) -> String {
        format!("{}/presence/", self.root)
    }

    pub fn presence(&self, room: &RoomId, edge: &NodeId) -> String {
        format!("{}{}/{}", self.presence_prefix(), room, edge)
    }

    /// The (room, edge) of a presence key, if it is one.
    pub fn presence_of<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key
            .strip_prefix(self.root.as_str())?
            .strip_prefix("/presence/")?;
        rest.split_once('/')
            .filter(|(r, e)| !r.is_empty() && !e.is_empty() && !e.contains('/'))
    }

    /// The room name at the end of a room or meeting key, if it is one.
    pub fn room_of<'k>(&self, prefix: &str, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(prefix).filter(|r| !r.contains('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let k = KeyLayout::new("/t/");
        let id = NodeId::new("edge-1").unwrap();
        assert_eq!(k.node(NodeKind::Edge, &id), "/t/nodes/edge/edge-1");
        let room = RoomId::new("standup").unwrap();
        let key = k.room(&room);
        assert_eq!(key, "/t/rooms/standup");
        assert_eq!(k.room_of(&k.rooms_prefix(), &key), Some("standup"));
        assert_eq!(k.room_of(&k.rooms_prefix(), "/t/meetings/x"), None);
        let presence = k.presence(&room, &id);
        assert_eq!(presence, "/t/presence/standup/edge-1");
        assert_eq!(k.presence_of(&presence), Some(("standup", "edge-1")));
        assert_eq!(k.presence_of("/t/presence/standup"), None);
        assert_eq!(k.presence_of("/t/presence/standup/a/b"), None);
        assert_eq!(k.presence_of("/u/presence/standup/edge-1"), None);
    }
}
