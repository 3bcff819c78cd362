//! Fan-out trees: per room, which edge receives the room's media from which node.
//!
//! A room's media flows down a tree rooted at its origin over the edges that have participants
//! in the room (docs/cascade.md, architecture "Scaling a 10,000-participant meeting"). Each node
//! forwards each (track, layer) once per child, so the tree's fan-out bounds what one node
//! sends, and its depth bounds the delay a hop adds. [`plan`] builds the tree; it is sans-IO
//! (data in, data out) so it is tested on simulated topologies and benchmarked alone;
//! [`TreeStore`] writes the result under `<root>/trees/<room>/<edge>` for edges to watch.
//!
//! ## The shape
//!
//! - **Bounded fan-out**: at most [`FanoutConfig::max_children`] children per node, the origin
//!   included (default 8).
//! - **Region-aware**: every region with edges in the room has one *relay* edge, the only edge
//!   of that region whose parent is outside the region (the origin, or the relay of another
//!   region). Each (track, layer) crosses into a region once, however many edges it has there.
//!   The origin's own region has a relay too; its other edges may also hang off the origin.
//! - **Nearest first**: relays take the origin's slots in order of distance (the routing
//!   latency matrix), so the nearest regions are one hop from the origin; when there are more
//!   regions than slots, the farther ones hang off the shallowest relay with room, nearest
//!   first (a relay gives at most half its slots to other regions). Remaining origin
//!   slots go to edges of the origin's region. Within a region edges fill the subtree under
//!   the relay breadth-first, most participants first, so the tree is as shallow as the
//!   fan-out allows.
//! - **Stable**: given the previous tree, an edge keeps its parent whenever that parent is still
//!   in the tree, still a legal parent, and has room; only edges that lost their parent (or are
//!   new) are placed again, into the shallowest free slot. Subtrees move with their root, so a
//!   failure re-parents exactly the failed edge's children. If keeping parents left a region
//!   more than one level deeper than a fresh plan would, that region is re-planned from scratch
//!   (depth matters more than a few reconnects). [`Replan::moved`] counts edges whose parent
//!   changed: each is one link torn down and one set up.
//!
//! Edges without participants are left out: a subscriber-less edge needs no media.

use crate::keys::KeyLayout;
use crate::nodes::{NodeId, Region};
use crate::store::{Revision, Store, StoreError, WatchEvent};
use cascade_proto::RoomId;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use tokio_stream::StreamExt;

/// Plain data for the planner, defaults documented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutConfig {
    /// Children per node at most, the origin included (default 8: with the ~3 video layers and
    /// audio of a few speakers, 8 copies stay well inside one edge's uplink, and 8 levels of
    /// 8 reach 16 million edges, so depth stays 2-4 for any real meeting). At least 2.
    pub max_children: usize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self { max_children: 8 }
    }
}

/// One edge's share of a room, as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeDemand {
    pub id: NodeId,
    pub region: Region,
    /// Participants of the room connected to this edge (0: not in the tree).
    pub participants: u32,
}

/// Where a node of the tree gets its media from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parent {
    Origin,
    Edge(NodeId),
}

/// One edge in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEdge {
    pub region: Region,
    pub parent: Parent,
    /// Hops from the origin (its children are at depth 1).
    pub depth: u32,
    /// The region's relay (its only edge fed from outside the region).
    pub relay: bool,
    pub participants: u32,
}

/// A room's fan-out tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutTree {
    pub origin: NodeId,
    pub origin_region: Region,
    pub edges: BTreeMap<NodeId, TreeEdge>,
}

impl FanoutTree {
    /// Children of the origin (`None`) or of an edge, in id order.
    pub fn children(&self, of: Option<&NodeId>) -> Vec<&NodeId> {
        let want = match of {
            None => Parent::Origin,
            Some(id) => Parent::Edge(id.clone()),
        };
        self.edges
            .iter()
            .filter(|(_, e)| e.parent == want)
            .map(|(id, _)| id)
            .collect()
    }

    pub fn max_depth(&self) -> u32 {
        self.edges.values().map(|e| e.depth).max().unwrap_or(0)
    }
}

/// What a re-plan changed, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replan {
    pub added: Vec<NodeId>,
    pub removed: Vec<NodeId>,
    /// Edges present before and after whose parent changed.
    pub moved: Vec<NodeId>,
    /// Regions re-planned from scratch because keeping parents made them too deep.
    pub rebuilt_regions: Vec<Region>,
}

/// Builds the room's tree (see the module docs). `distance` gives the latency between two
/// regions (`None` when unknown: treated as farthest); `previous` is the tree this one replaces
/// (ignored if it is not a tree rooted at the origin). Duplicate edge ids keep the first entry.
pub fn plan(
    config: &FanoutConfig,
    origin: &NodeId,
    origin_region: &Region,
    edges: &[EdgeDemand],
    distance: impl Fn(&Region, &Region) -> Option<u32>,
    previous: Option<&FanoutTree>,
) -> (FanoutTree, Replan) {
    let dist = |a: &Region, b: &Region| {
        if a == b {
            0
        } else {
            distance(a, b).unwrap_or(u32::MAX)
        }
    };
    let previous = previous.filter(|p| is_tree(p));
    plan_with(config, origin, origin_region, edges, &dist, previous)
}

fn plan_with(
    config: &FanoutConfig,
    origin: &NodeId,
    origin_region: &Region,
    edges: &[EdgeDemand],
    dist: &dyn Fn(&Region, &Region) -> u32,
    previous: Option<&FanoutTree>,
) -> (FanoutTree, Replan) {
    let f = config.max_children.max(2);
    let mut input: BTreeMap<&NodeId, &EdgeDemand> = BTreeMap::new();
    for e in edges.iter().filter(|e| e.participants > 0) {
        input.entry(&e.id).or_insert(e);
    }

    // Regions and their relays (the previous relay while it stays).
    let mut regions: BTreeMap<&Region, Vec<&EdgeDemand>> = BTreeMap::new();
    for e in input.values() {
        regions.entry(&e.region).or_default().push(e);
    }
    let mut relays: BTreeMap<&Region, &NodeId> = BTreeMap::new();
    for (region, members) in &regions {
        let kept = previous.and_then(|prev| {
            members.iter().find(|m| {
                prev.edges
                    .get(&m.id)
                    .is_some_and(|p| p.relay && &p.region == *region)
            })
        });
        // Else most participants (its viewers need the media anyway), then smallest id.
        let relay = kept.or_else(|| {
            members
                .iter()
                .max_by(|a, b| a.participants.cmp(&b.participants).then(b.id.cmp(&a.id)))
        });
        if let Some(relay) = relay {
            relays.insert(region, &relay.id);
        }
    }

    let mut b = Builder::new(f, &input, &relays);
    // Region-level tree: relays nearest to the origin take its slots first; the rest hang off
    // the shallowest placed relay with room, the nearest of those (so far regions do not chain
    // into a deep line). A relay keeps at least half its slots for its own region.
    let mut order: Vec<&Region> = regions.keys().copied().collect();
    order.sort_by_key(|r| (dist(origin_region, r), *r));
    let relay_cap = f / 2;
    let mut hosts: Vec<(Option<&NodeId>, &Region, u32, usize)> = vec![(None, origin_region, 0, f)];
    for region in &order {
        let relay = relays[region];
        let host = hosts
            .iter_mut()
            .filter(|h| h.3 > 0)
            .min_by_key(|h| (h.0.is_some(), h.2, dist(h.1, region)))
            .expect("every relay adds host slots, so some host always has one");
        host.3 -= 1;
        let depth = host.2 + 1;
        let parent = host.0;
        b.attach(relay, parent);
        hosts.push((Some(relay), region, depth, relay_cap));
    }

    // Within each region: keep previous parents where legal, place the rest breadth-first.
    let mut rebuilt = Vec::new();
    let mut fresh: Option<FanoutTree> = None;
    for region in &order {
        let members: Vec<&EdgeDemand> = regions[region]
            .iter()
            .copied()
            .filter(|e| &e.id != relays[region])
            .collect();
        let own = *region == origin_region;
        let mut trial = b.clone();
        place_region(&mut trial, region, &members, own, previous);
        if previous.is_some() {
            // Compare with a fresh plan of the same input (computed once, when needed).
            let fresh_tree = fresh.get_or_insert_with(|| {
                plan_with(config, origin, origin_region, edges, dist, None).0
            });
            if trial.region_depth(region) > region_depth(fresh_tree, region) + 1 {
                trial = b.clone();
                place_region(&mut trial, region, &members, own, None);
                rebuilt.push((*region).clone());
            }
        }
        b = trial;
    }

    let tree = b.finish(origin, origin_region);
    let mut report = Replan {
        rebuilt_regions: rebuilt,
        ..Replan::default()
    };
    match previous {
        Some(prev) => {
            for (id, e) in &tree.edges {
                match prev.edges.get(id) {
                    None => report.added.push(id.clone()),
                    Some(p) if p.parent != e.parent => report.moved.push(id.clone()),
                    Some(_) => {}
                }
            }
            report.removed = prev
                .edges
                .keys()
                .filter(|id| !tree.edges.contains_key(*id))
                .cloned()
                .collect();
        }
        None => report.added = tree.edges.keys().cloned().collect(),
    }
    (tree, report)
}

/// Whether every edge's parent chain reaches the origin (a tree read back from the store could
/// be anything).
fn is_tree(t: &FanoutTree) -> bool {
    t.edges.keys().all(|start| {
        let mut at = start;
        for _ in 0..=t.edges.len() {
            match t.edges.get(at).map(|e| &e.parent) {
                Some(Parent::Origin) => return true,
                Some(Parent::Edge(p)) => at = p,
                None => return false,
            }
        }
        false
    })
}

fn region_depth(tree: &FanoutTree, region: &Region) -> u32 {
    tree.edges
        .values()
        .filter(|e| &e.region == region)
        .map(|e| e.depth)
        .max()
        .unwrap_or(0)
}

/// Places a region's non-relay edges: kept parents first (when `previous` is given), then the
/// rest into the shallowest free slot of the region's connected subtree.
fn place_region<'a>(
    b: &mut Builder<'a>,
    region: &Region,
    members: &[&'a EdgeDemand],
    own_region: bool,
    previous: Option<&FanoutTree>,
) {
    let mut unplaced: Vec<&'a EdgeDemand> = Vec::new();
    if let Some(prev) = previous {
        // Shallow edges keep their place first, so a full parent keeps its oldest branches.
        let mut keep: Vec<(u32, &'a EdgeDemand, Option<&'a NodeId>)> = Vec::new();
        for e in members {
            let legal = prev.edges.get(&e.id).and_then(|p| match &p.parent {
                Parent::Origin if own_region => Some((p.depth, None)),
                Parent::Edge(pid) => b.id_in_region(pid, region).map(|pid| (p.depth, Some(pid))),
                Parent::Origin => None,
            });
            match legal {
                Some((depth, parent)) => keep.push((depth, e, parent)),
                None => unplaced.push(e),
            }
        }
        keep.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.id.cmp(&b.1.id)));
        for (_, e, parent) in keep {
            if b.free(parent) > 0 {
                b.attach(&e.id, parent);
            } else {
                unplaced.push(e);
            }
        }
    } else {
        unplaced.extend(members.iter().copied());
    }
    unplaced.sort_by(|a, b| b.participants.cmp(&a.participants).then(a.id.cmp(&b.id)));

    // Hosts: connected nodes of this region with free slots, shallowest first. The origin
    // hosts own-region edges with the slots the relays left.
    let mut heap: BinaryHeap<Reverse<(u32, Option<&'a NodeId>)>> = BinaryHeap::new();
    if own_region {
        heap.push(Reverse((0, None)));
    }
    for (id, depth) in b.connected_depths() {
        if b.regions.get(id).is_some_and(|r| *r == region) {
            heap.push(Reverse((depth, Some(id))));
        }
    }
    for e in unplaced {
        let mut placed = false;
        while let Some(Reverse((depth, host))) = heap.pop() {
            if b.free(host) == 0 {
                continue;
            }
            b.attach(&e.id, host);
            if b.free(host) > 0 {
                heap.push(Reverse((depth, host)));
            }
            // The new edge, and any kept subtree under it, are now connected hosts.
            for (id, d) in b.subtree_depths(&e.id, depth + 1) {
                heap.push(Reverse((d, Some(id))));
            }
            placed = true;
            break;
        }
        if !placed {
            // Unreachable: the relay keeps at least one slot for its region and every placed
            // edge brings `f >= 2` more. Keep the edge under the relay rather than lose it.
            let relay = b.relays.get(region).copied();
            b.attach(&e.id, relay);
        }
    }
}

/// The tree under construction, borrowing ids from the planner's input.
#[derive(Clone)]
struct Builder<'a> {
    f: usize,
    input: &'a BTreeMap<&'a NodeId, &'a EdgeDemand>,
    relays: &'a BTreeMap<&'a Region, &'a NodeId>,
    regions: BTreeMap<&'a NodeId, &'a Region>,
    parent: BTreeMap<&'a NodeId, Option<&'a NodeId>>,
    children: BTreeMap<Option<&'a NodeId>, usize>,
    kids: BTreeMap<&'a NodeId, Vec<&'a NodeId>>,
    origin_kids: Vec<&'a NodeId>,
}

impl<'a> Builder<'a> {
    fn new(
        f: usize,
        input: &'a BTreeMap<&'a NodeId, &'a EdgeDemand>,
        relays: &'a BTreeMap<&'a Region, &'a NodeId>,
    ) -> Self {
        Self {
            f,
            input,
            relays,
            regions: input.iter().map(|(id, e)| (*id, &e.region)).collect(),
            parent: BTreeMap::new(),
            children: BTreeMap::new(),
            kids: BTreeMap::new(),
            origin_kids: Vec::new(),
        }
    }

    fn attach(&mut self, id: &'a NodeId, parent: Option<&'a NodeId>) {
        self.parent.insert(id, parent);
        *self.children.entry(parent).or_default() += 1;
        match parent {
            None => self.origin_kids.push(id),
            Some(p) => self.kids.entry(p).or_default().push(id),
        }
    }

    fn free(&self, host: Option<&'a NodeId>) -> usize {
        self.f
            .saturating_sub(self.children.get(&host).copied().unwrap_or(0))
    }

    /// The input's own reference to `id` if it is an edge of `region` in this plan.
    fn id_in_region(&self, id: &NodeId, region: &Region) -> Option<&'a NodeId> {
        self.input
            .get_key_value(id)
            .filter(|(_, e)| &e.region == region)
            .map(|(k, _)| *k)
    }

    fn kids_of(&self, node: Option<&'a NodeId>) -> &[&'a NodeId] {
        match node {
            None => &self.origin_kids,
            Some(id) => self.kids.get(id).map_or(&[], Vec::as_slice),
        }
    }

    /// Depth of every edge reachable from the origin.
    fn connected_depths(&self) -> Vec<(&'a NodeId, u32)> {
        let mut out: Vec<(&'a NodeId, u32)> = self.origin_kids.iter().map(|k| (*k, 1)).collect();
        let mut i = 0;
        while i < out.len() {
            let (node, d) = out[i];
            out.extend(self.kids_of(Some(node)).iter().map(|k| (*k, d + 1)));
            i += 1;
        }
        out
    }

    /// `root` at `depth` and everything under it, with depths.
    fn subtree_depths(&self, root: &'a NodeId, depth: u32) -> Vec<(&'a NodeId, u32)> {
        let mut out = vec![(root, depth)];
        let mut i = 0;
        while i < out.len() {
            let (node, d) = out[i];
            out.extend(self.kids_of(Some(node)).iter().map(|k| (*k, d + 1)));
            i += 1;
        }
        out
    }

    fn region_depth(&self, region: &Region) -> u32 {
        self.connected_depths()
            .into_iter()
            .filter(|(id, _)| self.regions.get(id).is_some_and(|r| *r == region))
            .map(|(_, d)| d)
            .max()
            .unwrap_or(0)
    }

    fn finish(self, origin: &NodeId, origin_region: &Region) -> FanoutTree {
        let depths: BTreeMap<&NodeId, u32> = self.connected_depths().into_iter().collect();
        let edges = self
            .input
            .iter()
            .filter_map(|(id, e)| {
                let parent = self.parent.get(id)?;
                Some((
                    (*id).clone(),
                    TreeEdge {
                        region: e.region.clone(),
                        parent: parent.map_or(Parent::Origin, |p| Parent::Edge(p.clone())),
                        depth: depths.get(id).copied().unwrap_or(0),
                        relay: self.relays.get(&e.region).is_some_and(|r| r == id),
                        participants: e.participants,
                    },
                ))
            })
            .collect();
        FanoutTree {
            origin: origin.clone(),
            origin_region: origin_region.clone(),
            edges,
        }
    }
}

/// What one edge reads at `<root>/trees/<room>/<edge>`: where its media of the room comes from
/// and whom it forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreePosition {
    pub room: RoomId,
    pub origin: NodeId,
    pub origin_region: Region,
    pub region: Region,
    pub parent: Parent,
    pub children: Vec<NodeId>,
    pub depth: u32,
    pub relay: bool,
    pub participants: u32,
}

impl FanoutTree {
    /// Every edge's position, in id order.
    pub fn positions(&self, room: &RoomId) -> BTreeMap<NodeId, TreePosition> {
        let mut children: BTreeMap<&NodeId, Vec<NodeId>> = BTreeMap::new();
        for (id, e) in &self.edges {
            if let Parent::Edge(p) = &e.parent {
                children.entry(p).or_default().push(id.clone());
            }
        }
        self.edges
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    TreePosition {
                        room: room.clone(),
                        origin: self.origin.clone(),
                        origin_region: self.origin_region.clone(),
                        region: e.region.clone(),
                        parent: e.parent.clone(),
                        children: children.remove(id).unwrap_or_default(),
                        depth: e.depth,
                        relay: e.relay,
                        participants: e.participants,
                    },
                )
            })
            .collect()
    }

    /// Rebuilds a tree from positions read back from the store (`None` when there are none or
    /// they disagree on the origin).
    pub fn from_positions(
        positions: impl IntoIterator<Item = (NodeId, TreePosition)>,
    ) -> Option<Self> {
        let mut origin: Option<(NodeId, Region)> = None;
        let mut edges = BTreeMap::new();
        for (id, p) in positions {
            match &origin {
                None => origin = Some((p.origin.clone(), p.origin_region.clone())),
                Some((o, _)) if *o != p.origin => return None,
                Some(_) => {}
            }
            edges.insert(
                id,
                TreeEdge {
                    region: p.region,
                    parent: p.parent,
                    depth: p.depth,
                    relay: p.relay,
                    participants: p.participants,
                },
            );
        }
        let (origin, origin_region) = origin?;
        Some(Self {
            origin,
            origin_region,
            edges,
        })
    }
}

/// What [`TreeStore::publish`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishStats {
    pub written: usize,
    pub deleted: usize,
}

/// Room trees in the store: one key per (room, edge), so a re-plan writes only the edges whose
/// position changed and each edge watches one key.
#[derive(Clone)]
pub struct TreeStore {
    store: Arc<dyn Store>,
    keys: KeyLayout,
}

impl TreeStore {
    pub fn new(store: Arc<dyn Store>, keys: KeyLayout) -> Self {
        Self { store, keys }
    }

    /// Writes `tree` over `previous` (what the store holds for the room, as last published or
    /// loaded): changed positions are put, parents before children, then positions of edges
    /// that left are deleted. Not atomic across keys: an edge may briefly see its new parent
    /// before a sibling sees its own move, which is harmless (links are set up per edge).
    pub async fn publish(
        &self,
        room: &RoomId,
        tree: &FanoutTree,
        previous: Option<&FanoutTree>,
    ) -> Result<PublishStats, StoreError> {
        let new = tree.positions(room);
        let old = previous.map(|p| p.positions(room)).unwrap_or_default();
        let mut changed: Vec<(&NodeId, &TreePosition)> = new
            .iter()
            .filter(|(id, p)| old.get(*id) != Some(*p))
            .collect();
        changed.sort_by_key(|(id, p)| (p.depth, *id));
        let mut stats = PublishStats::default();
        for (id, p) in changed {
            // Serialising our own plain struct cannot fail.
            let value = serde_json::to_vec(p).expect("TreePosition serialises");
            self.store
                .put(&self.keys.tree_edge(room, id), value, None)
                .await?;
            stats.written += 1;
        }
        for id in old.keys().filter(|id| !new.contains_key(*id)) {
            self.store.delete(&self.keys.tree_edge(room, id)).await?;
            stats.deleted += 1;
        }
        Ok(stats)
    }

    /// The room's tree as stored, and the revision it was read at (watch from `revision + 1`).
    pub async fn load(&self, room: &RoomId) -> Result<(Option<FanoutTree>, Revision), StoreError> {
        let prefix = self.keys.tree(room);
        let page = self.store.range(&prefix, None, None).await?;
        let positions = page.kvs.iter().filter_map(|kv| {
            let id = NodeId::new(kv.key.strip_prefix(&prefix)?).ok()?;
            Some((id, serde_json::from_slice::<TreePosition>(&kv.value).ok()?))
        });
        Ok((FanoutTree::from_positions(positions), page.revision))
    }

    /// One edge's position in the room's tree.
    pub async fn position(
        &self,
        room: &RoomId,
        edge: &NodeId,
    ) -> Result<Option<TreePosition>, StoreError> {
        Ok(self
            .store
            .get(&self.keys.tree_edge(room, edge))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    /// An edge's position changes from revision `from` on (`None`: the edge left the tree).
    /// The stream ends or yields an error when the watch breaks: read the position again.
    pub async fn watch_position(
        &self,
        room: &RoomId,
        edge: &NodeId,
        from: Revision,
    ) -> Result<
        impl tokio_stream::Stream<Item = Result<Option<TreePosition>, StoreError>> + Send,
        StoreError,
    > {
        let key = self.keys.tree_edge(room, edge);
        let watch = self.store.watch_prefix(&key, from).await?;
        Ok(watch.filter_map(move |batch| {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            // Only the last change of this exact key in the batch matters.
            let last = batch.events.iter().rev().find(|e| e.key() == key)?;
            Some(Ok(match last {
                WatchEvent::Put(kv) => serde_json::from_slice(&kv.value).ok(),
                WatchEvent::Delete { .. } => None,
            }))
        }))
    }
}
