//! Keeping every room's fan-out tree current: edges say where they are, the keeper plans, edges
//! follow.
//!
//! The planner ([`crate::fanout::plan`]) needs, per room, its origin and the edges with
//! participants in it. The origin comes from the room's placement (`<root>/rooms/<room>`). The
//! edges tell us themselves: each edge writes `<root>/presence/<room>/<edge>` ([`EdgePresence`]:
//! its region, how many of the room's participants it holds, and the cascade URL its children
//! dial) under its registration lease, so a dead edge's presence vanishes with its lease and
//! its children are re-planned without anyone having to notice the death. The keeper follows
//! both prefixes (list, then watch from the listing's revision; resynchronise when a watch
//! breaks), marks the rooms a change touches, and re-plans them in batches every
//! [`REPLAN_EVERY`], publishing only the positions that changed ([`TreeStore::publish`]), with
//! the previous tree as the planner's `previous` so edges that keep a legal parent stay put.
//!
//! [`TreeBook`] is the sans-IO core (presence and placements in, trees out); [`run_tree_keeper`]
//! is its shell. One keeper per deployment: two keepers would each publish the same plan from
//! the same inputs, so it is harmless but wasteful (leader election is future work).

use crate::fanout::{plan, EdgeDemand, FanoutConfig, FanoutTree, Replan, TreeStore};
use crate::keys::KeyLayout;
use crate::nodes::{NodeId, Region};
use crate::placement::Placement;
use crate::store::{Revision, Store, StoreError, WatchEvent};
use cascade_proto::RoomId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

/// How often dirty rooms are re-planned: a burst of joins costs one plan, and an edge's death
/// reaches its children's positions within this plus the watch latency.
pub const REPLAN_EVERY: Duration = Duration::from_millis(200);

/// Pause before listing and watching again after a store error.
const RESYNC_BACKOFF: Duration = Duration::from_millis(500);

/// What an edge writes about its share of one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgePresence {
    pub region: Region,
    /// The room's participants connected to this edge.
    pub participants: u32,
    /// Where child edges dial this edge for the room's media (`quic://NODE@HOST:PORT`); absent
    /// when the edge takes no children.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<String>,
}

/// What to do about one room after a re-plan.
#[derive(Debug, Clone, PartialEq)]
pub enum TreeStep {
    /// Publish `tree` over `previous`.
    Publish {
        tree: FanoutTree,
        previous: Option<FanoutTree>,
        replan: Replan,
    },
    /// The room has no edges (or no origin) any more: delete `previous`.
    Remove { previous: FanoutTree },
    /// Nothing changed.
    Keep,
}

/// The keeper's state: presence and placements as last seen, trees as last published.
#[derive(Debug, Default)]
pub struct TreeBook {
    presence: BTreeMap<RoomId, BTreeMap<NodeId, EdgePresence>>,
    origins: BTreeMap<RoomId, (NodeId, Region)>,
    trees: BTreeMap<RoomId, FanoutTree>,
    dirty: BTreeSet<RoomId>,
    malformed: u64,
}

impl TreeBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces all presence with a listing (after a resync); every room involved is dirty.
    pub fn presence_snapshot<'a>(
        &mut self,
        keys: &KeyLayout,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) {
        let old = std::mem::take(&mut self.presence);
        self.dirty.extend(old.into_keys());
        for (key, value) in kvs {
            self.put_presence(keys, key, Some(value));
        }
    }

    /// Applies presence watch events.
    pub fn presence_events(&mut self, keys: &KeyLayout, events: &[WatchEvent]) {
        for e in events {
            match e {
                WatchEvent::Put(kv) => self.put_presence(keys, &kv.key, Some(&kv.value)),
                WatchEvent::Delete { key, .. } => self.put_presence(keys, key, None),
            }
        }
    }

    fn put_presence(&mut self, keys: &KeyLayout, key: &str, value: Option<&[u8]>) {
        let Some((room, edge)) = keys.presence_of(key) else {
            self.malformed += 1;
            return;
        };
        let (Ok(room), Ok(edge)) = (RoomId::new(room), NodeId::new(edge)) else {
            self.malformed += 1;
            return;
        };
        let parsed = match value.map(serde_json::from_slice::<EdgePresence>) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                self.malformed += 1;
                None
            }
        };
        let edges = self.presence.entry(room.clone()).or_default();
        let changed = match parsed {
            Some(p) => edges.insert(edge, p.clone()).as_ref() != Some(&p),
            None => edges.remove(&edge).is_some(),
        };
        if edges.is_empty() {
            self.presence.remove(&room);
        }
        if changed {
            self.dirty.insert(room);
        }
    }

    /// Replaces all placements with a listing.
    pub fn placement_snapshot(&mut self, placements: impl IntoIterator<Item = Placement>) {
        let old = std::mem::take(&mut self.origins);
        self.dirty.extend(old.into_keys());
        for p in placements {
            self.place(p);
        }
    }

    /// A room placed (or moved) on an origin.
    pub fn place(&mut self, p: Placement) {
        let origin = (p.origin, p.region);
        if self.origins.get(&p.room) != Some(&origin) {
            self.origins.insert(p.room.clone(), origin);
            self.dirty.insert(p.room);
        }
    }

    /// A room's placement removed.
    pub fn release(&mut self, room: &RoomId) {
        if self.origins.remove(room).is_some() {
            self.dirty.insert(room.clone());
        }
    }

    /// Rooms whose inputs changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<RoomId> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// Marks a room for the next round (its publication failed).
    pub fn mark_dirty(&mut self, room: RoomId) {
        self.dirty.insert(room);
    }

    /// Whether the book holds the room's published tree (else the shell loads it first, so a
    /// restarted keeper keeps edges where they are).
    pub fn knows_tree(&self, room: &RoomId) -> bool {
        self.trees.contains_key(room)
    }

    /// Records a tree read from the store.
    pub fn loaded_tree(&mut self, room: RoomId, tree: FanoutTree) {
        self.trees.insert(room, tree);
    }

    /// Re-plans one room; the book records the result as published (call [`Self::mark_dirty`]
    /// if publishing fails, and the next round publishes over the same previous tree).
    pub fn replan(
        &mut self,
        room: &RoomId,
        config: &FanoutConfig,
        distance: impl Fn(&Region, &Region) -> Option<u32>,
    ) -> TreeStep {
        let demands: Vec<EdgeDemand> = self
            .presence
            .get(room)
            .into_iter()
            .flatten()
            .filter(|(_, p)| p.participants > 0)
            .map(|(id, p)| EdgeDemand {
                id: id.clone(),
                region: p.region.clone(),
                participants: p.participants,
            })
            .collect();
        let previous = self.trees.remove(room);
        let Some((origin, origin_region)) = self.origins.get(room).filter(|_| !demands.is_empty())
        else {
            return match previous {
                Some(previous) => TreeStep::Remove { previous },
                None => TreeStep::Keep,
            };
        };
        let (tree, replan) = plan(
            config,
            origin,
            origin_region,
            &demands,
            distance,
            previous.as_ref(),
        );
        self.trees.insert(room.clone(), tree.clone());
        if previous.as_ref() == Some(&tree) {
            return TreeStep::Keep;
        }
        TreeStep::Publish {
            tree,
            previous,
            replan,
        }
    }

    /// Presence records that did not parse (a bug or a foreign writer), for metrics.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}

/// Keeps every room's tree current until `shutdown` completes (see the module docs).
pub async fn run_tree_keeper(
    store: Arc<dyn Store>,
    keys: KeyLayout,
    config: FanoutConfig,
    distance: impl Fn(&Region, &Region) -> Option<u32> + Send + Sync,
    shutdown: impl Future<Output = ()>,
) {
    let trees = TreeStore::new(store.clone(), keys.clone());
    let mut book = TreeBook::new();
    let run = async {
        loop {
            if let Err(e) = keep_once(&*store, &keys, &trees, &config, &distance, &mut book).await {
                tracing::warn!(error = %e, "tree keeper lost its watch; resynchronising");
            }
            tokio::time::sleep(RESYNC_BACKOFF).await;
        }
    };
    tokio::select! {
        _ = run => {}
        _ = shutdown => {}
    }
}

async fn keep_once(
    store: &dyn Store,
    keys: &KeyLayout,
    trees: &TreeStore,
    config: &FanoutConfig,
    distance: &(impl Fn(&Region, &Region) -> Option<u32> + Send + Sync),
    book: &mut TreeBook,
) -> Result<(), StoreError> {
    let presence_prefix = keys.presence_prefix();
    let rooms_prefix = keys.rooms_prefix();
    let presence = store.range(&presence_prefix, None, None).await?;
    book.presence_snapshot(
        keys,
        presence
            .kvs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
    );
    let rooms = store.range(&rooms_prefix, None, None).await?;
    book.placement_snapshot(
        rooms
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Placement>(&kv.value).ok()),
    );
    let mut presence_watch = store
        .watch_prefix(&presence_prefix, Revision(presence.revision.0 + 1))
        .await?;
    let mut rooms_watch = store
        .watch_prefix(&rooms_prefix, Revision(rooms.revision.0 + 1))
        .await?;
    let mut tick = tokio::time::interval(REPLAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = presence_watch.next() => {
                let batch = batch.ok_or_else(|| lost("presence watch ended"))??;
                book.presence_events(keys, &batch.events);
            }
            batch = rooms_watch.next() => {
                let batch = batch.ok_or_else(|| lost("rooms watch ended"))??;
                for e in &batch.events {
                    match e {
                        WatchEvent::Put(kv) => match serde_json::from_slice::<Placement>(&kv.value) {
                            Ok(p) => book.place(p),
                            Err(_) => tracing::warn!(key = %kv.key, "unreadable placement; ignored"),
                        },
                        WatchEvent::Delete { key, .. } => {
                            if let Some(room) = keys.room_of(&rooms_prefix, key).and_then(|r| RoomId::new(r).ok()) {
                                book.release(&room);
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => replan_dirty(trees, config, distance, book).await,
        }
    }
}

async fn replan_dirty(
    trees: &TreeStore,
    config: &FanoutConfig,
    distance: &(impl Fn(&Region, &Region) -> Option<u32> + Send + Sync),
    book: &mut TreeBook,
) {
    for room in book.take_dirty() {
        if !book.knows_tree(&room) {
            match trees.load(&room).await {
                Ok((Some(tree), _)) => book.loaded_tree(room.clone(), tree),
                Ok((None, _)) => {}
                Err(e) => {
                    tracing::warn!(%room, error = %e, "reading the room's tree failed; retrying");
                    book.mark_dirty(room);
                    continue;
                }
            }
        }
        let result = match book.replan(&room, config, distance) {
            TreeStep::Keep => Ok(()),
            TreeStep::Publish {
                tree,
                previous,
                replan,
            } => trees
                .publish(&room, &tree, previous.as_ref())
                .await
                .map(|stats| {
                    tracing::info!(
                        %room,
                        edges = tree.edges.len(),
                        depth = tree.max_depth(),
                        added = replan.added.len(),
                        removed = replan.removed.len(),
                        moved = replan.moved.len(),
                        written = stats.written,
                        deleted = stats.deleted,
                        "fan-out tree published"
                    );
                }),
            TreeStep::Remove { previous } => {
                let empty = FanoutTree {
                    origin: previous.origin.clone(),
                    origin_region: previous.origin_region.clone(),
                    edges: BTreeMap::new(),
                };
                trees
                    .publish(&room, &empty, Some(&previous))
                    .await
                    .map(|_| tracing::info!(%room, "fan-out tree removed (no edges left)"))
            }
        };
        if let Err(e) = result {
            // The book already holds the new tree; publishing it again next round writes
            // every position that differs from what is stored.
            tracing::warn!(%room, error = %e, "publishing the room's tree failed; retrying");
            book.forget_tree(&room);
            book.mark_dirty(room);
        }
    }
}

impl TreeBook {
    /// Drops the book's copy of a room's tree, so the next round reloads what is stored.
    pub fn forget_tree(&mut self, room: &RoomId) {
        self.trees.remove(room);
    }
}

fn lost(reason: &str) -> StoreError {
    StoreError::WatchLost {
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::Parent;
    use crate::store::KeyValue;

    fn keys() -> KeyLayout {
        KeyLayout::new("/t")
    }

    fn presence(region: &str, participants: u32) -> Vec<u8> {
        serde_json::to_vec(&EdgePresence {
            region: Region::new(region).unwrap(),
            participants,
            cascade: Some("quic://x@127.0.0.1:1".into()),
        })
        .unwrap()
    }

    fn put(key: &str, value: Vec<u8>) -> WatchEvent {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value,
            mod_revision: Revision(1),
            lease: None,
        })
    }

    fn placement(room: &str) -> Placement {
        Placement {
            room: RoomId::new(room).unwrap(),
            origin: NodeId::new("origin-eu").unwrap(),
            region: Region::new("eu").unwrap(),
            url: "quic://origin-eu@127.0.0.1:7400".into(),
            epoch: 1,
        }
    }

    fn distance(a: &Region, b: &Region) -> Option<u32> {
        Some(if a == b { 0 } else { 80 })
    }

    #[test]
    fn presence_and_placement_make_a_tree_and_a_departure_replans_only_that_room() {
        let k = keys();
        let mut book = TreeBook::new();
        let room = RoomId::new("town-hall").unwrap();
        book.placement_snapshot([placement("town-hall")]);
        book.presence_events(
            &k,
            &[
                put("/t/presence/town-hall/eu-1", presence("eu", 10)),
                put("/t/presence/town-hall/us-1", presence("us", 5)),
                put("/t/presence/town-hall/us-2", presence("us", 3)),
            ],
        );
        assert_eq!(book.take_dirty(), vec![room.clone()]);
        let config = FanoutConfig::default();
        let TreeStep::Publish { tree, previous, .. } = book.replan(&room, &config, distance) else {
            panic!("a new room's tree is published");
        };
        assert!(previous.is_none());
        assert_eq!(tree.edges.len(), 3);
        // One relay for us; the other us edge hangs off it, not off the origin.
        let us_relay = tree
            .edges
            .iter()
            .find(|(_, e)| e.region.as_str() == "us" && e.relay)
            .map(|(id, _)| id.clone())
            .unwrap();
        let us_other = tree
            .edges
            .iter()
            .find(|(id, e)| e.region.as_str() == "us" && **id != us_relay)
            .unwrap();
        assert_eq!(us_other.1.parent, Parent::Edge(us_relay.clone()));

        // Same inputs again: nothing to publish.
        book.mark_dirty(room.clone());
        assert_eq!(book.take_dirty().len(), 1);
        assert_eq!(book.replan(&room, &config, distance), TreeStep::Keep);

        // The us relay's lease expires: its child moves, the eu edge does not.
        book.presence_events(
            &k,
            &[WatchEvent::Delete {
                key: format!("/t/presence/town-hall/{us_relay}"),
                mod_revision: Revision(2),
            }],
        );
        assert_eq!(book.take_dirty(), vec![room.clone()]);
        let TreeStep::Publish { tree, replan, .. } = book.replan(&room, &config, distance) else {
            panic!("a departure re-plans");
        };
        assert_eq!(tree.edges.len(), 2);
        assert_eq!(replan.removed, vec![us_relay]);
        assert_eq!(replan.moved, vec![us_other.0.clone()]);
        assert_eq!(tree.edges[us_other.0].parent, Parent::Origin);

        // Everyone leaves: the tree is removed.
        book.presence_events(
            &k,
            &[
                WatchEvent::Delete {
                    key: "/t/presence/town-hall/eu-1".into(),
                    mod_revision: Revision(3),
                },
                put(
                    &format!("/t/presence/town-hall/{}", us_other.0),
                    presence("us", 0),
                ),
            ],
        );
        book.take_dirty();
        assert!(matches!(
            book.replan(&room, &config, distance),
            TreeStep::Remove { .. }
        ));
    }

    #[test]
    fn no_tree_without_an_origin_and_bad_records_are_counted_not_applied() {
        let k = keys();
        let mut book = TreeBook::new();
        let room = RoomId::new("r").unwrap();
        book.presence_events(
            &k,
            &[
                put("/t/presence/r/eu-1", presence("eu", 2)),
                put("/t/presence/r/eu-2", b"{not json".to_vec()),
                put("/t/presence/r", presence("eu", 2)),
                put("/t/presence/Bad Room/eu-1", presence("eu", 2)),
            ],
        );
        assert_eq!(book.malformed(), 3);
        assert_eq!(book.take_dirty(), vec![room.clone()]);
        // Not placed yet: nothing to plan.
        assert_eq!(
            book.replan(&room, &FanoutConfig::default(), distance),
            TreeStep::Keep
        );
        // Placed: planned, with the one good edge.
        book.place(placement("r"));
        assert_eq!(book.take_dirty(), vec![room.clone()]);
        let TreeStep::Publish { tree, .. } = book.replan(&room, &FanoutConfig::default(), distance)
        else {
            panic!("placed room is planned");
        };
        assert_eq!(
            tree.edges.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["eu-1"]
        );
        // Placement released: the tree goes.
        book.release(&room);
        assert!(matches!(
            book.replan(&room, &FanoutConfig::default(), distance),
            TreeStep::Remove { .. }
        ));
    }
}
