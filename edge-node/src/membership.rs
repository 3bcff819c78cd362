//! An edge's membership in rooms' fan-out trees: it says where it is, and it follows where the
//! control plane puts it.
//!
//! The control plane's tree keeper (`control_plane::trees`) plans each room's tree from the
//! edges' *presence records* and publishes each edge's *tree position*; this module is the edge's
//! half of that loop, for an edge running with `--etcd`:
//!
//! - **Presence** ([`spawn_presence_writer`]): for each room with at least one joined local
//!   participant, `<root>/presence/<room>/<edge>` holds an [`EdgePresence`] (region, local
//!   count, this edge's cascade URL for its children) under the edge's registration lease, so
//!   a dead edge's records vanish with it and the keeper re-plans its children without anyone
//!   noticing the death. Counts come from the hub's watch ([`crate::hub::Hub::local_counts`])
//!   and are written at most once per [`PRESENCE_EVERY`] per room: a join storm of a thousand
//!   participants costs a couple of writes, not a thousand. When the room's count drops to 0 its
//!   record is deleted. If the registration's lease changes (etcd lost it during an outage and
//!   the registration granted a new one), every record is written again under the new lease.
//! - **Following** ([`spawn_tree_follower`]): for each room with local participants, one task
//!   follows `<root>/trees/<room>/<edge>` (list, then watch from the listing's revision). A
//!   parent of `origin` becomes `ParentChange { parent: Origin }`; a parent edge `P` needs P's
//!   cascade URL, read from P's presence record `presence/<room>/<P>` and watched (it can appear
//!   after the position, or change when P restarts). Until P's record names a URL the room's
//!   media comes from the origin. The changes go to the data plane's follower
//!   ([`crate::tree::spawn_follower`]), which owns the parent links. A room whose last local
//!   participant leaves stops being followed and goes back to the origin. Rooms the operator
//!   pinned with `--media-parent` are not followed.
//!
//! Bad records (a position or presence that does not parse, a URL that is not
//! `quic://NODE@HOST:PORT`) are logged, counted (`kcs_tree_malformed_records_total`) and treated
//! as "from the origin": the origin can always serve the room.
//!
//! The decisions ([`PresenceBook`], [`parent_edge`], [`parent_url`]) are sans-IO and unit-tested;
//! the tasks only move data between the store, the hub's watch and the data plane's channel.

use crate::metrics::Metrics;
use crate::tree::{MediaParent, ParentChange};
use crate::uplink::OriginAddr;
use cascade_proto::RoomId;
use control_plane::fanout::{Parent, TreePosition};
use control_plane::keys::KeyLayout;
use control_plane::nodes::{NodeId, Region};
use control_plane::store::{LeaseId, Revision, Store, StoreError, WatchEvent, WatchStream};
use control_plane::trees::EdgePresence;
use control_plane::NodeRegistration;
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// At most one presence write per room per this interval (join storms are coalesced).
pub const PRESENCE_EVERY: Duration = Duration::from_millis(500);

/// Pause before reading and watching again after a store error.
const RESYNC_BACKOFF: Duration = Duration::from_millis(500);

/// One presence write to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceOp {
    /// Write the room's record: `participants` local, under `lease`.
    Put {
        room: RoomId,
        participants: u32,
        lease: Option<LeaseId>,
    },
    /// Delete the room's record (no local participants any more).
    Delete { room: RoomId },
}

/// What this edge has written about its rooms, and what to write next (sans-IO).
#[derive(Debug, Default)]
pub struct PresenceBook {
    /// Counts as last written successfully.
    written: BTreeMap<RoomId, u32>,
    /// The lease those records were written under.
    lease: Option<LeaseId>,
}

impl PresenceBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// The writes that bring the store to `counts` (rooms with local participants) under
    /// `lease`: changed and new rooms, deleted rooms, and every room again when the lease
    /// changed; nothing without a lease. The caller reports each op's outcome with
    /// [`Self::done`].
    pub fn plan(
        &mut self,
        counts: &BTreeMap<RoomId, u32>,
        lease: Option<LeaseId>,
    ) -> Vec<PresenceOp> {
        if lease != self.lease {
            // Records under the old lease are gone (or going) with it: write all again.
            self.written.clear();
            self.lease = lease;
        }
        if lease.is_none() {
            // Between losing a lease and getting the next one: a record without a lease would
            // outlive the edge, so write nothing until there is one.
            return Vec::new();
        }
        let mut ops: Vec<PresenceOp> = counts
            .iter()
            .filter(|(room, n)| **n > 0 && self.written.get(*room) != Some(n))
            .map(|(room, n)| PresenceOp::Put {
                room: room.clone(),
                participants: *n,
                lease,
            })
            .collect();
        ops.extend(
            self.written
                .keys()
                .filter(|room| counts.get(*room).is_none_or(|n| *n == 0))
                .map(|room| PresenceOp::Delete { room: room.clone() }),
        );
        ops
    }

    /// Records an op's outcome: a failed op is planned again next round.
    pub fn done(&mut self, op: &PresenceOp, ok: bool) {
        match (op, ok) {
            (
                PresenceOp::Put {
                    room, participants, ..
                },
                true,
            ) => {
                self.written.insert(room.clone(), *participants);
            }
            (PresenceOp::Put { room, .. }, false) => {
                // Unknown state: the next round writes it again.
                self.written.remove(room);
            }
            (PresenceOp::Delete { room }, true) => {
                self.written.remove(room);
            }
            (PresenceOp::Delete { .. }, false) => {}
        }
    }

    /// Rooms with a record written (for the shutdown path and tests).
    pub fn rooms(&self) -> impl Iterator<Item = &RoomId> {
        self.written.keys()
    }
}

/// Who this edge is in the store: its registered id, region and cascade URL.
#[derive(Debug, Clone)]
pub struct TreeMember {
    /// The registered edge id (`{node}-edge`): the key of its presence and tree position.
    pub edge: NodeId,
    pub region: Region,
    /// Where child edges dial it (`quic://NODE@HOST:PORT`).
    pub cascade_url: String,
}

/// Keeps this edge's presence records in step with its local counts (see the module docs),
/// for as long as the process runs.
pub fn spawn_presence_writer(
    store: Arc<dyn Store>,
    keys: KeyLayout,
    member: TreeMember,
    registration: NodeRegistration,
    mut counts: watch::Receiver<crate::hub::LocalCounts>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        let mut book = PresenceBook::new();
        let mut tick = tokio::time::interval(PRESENCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Wake on the tick: a change seen now is written at the next one at the latest, and
            // a lease change (no count change) is noticed within one interval.
            tick.tick().await;
            let snapshot = counts.borrow_and_update().clone();
            for op in book.plan(&snapshot, registration.lease()) {
                let result = match &op {
                    PresenceOp::Put {
                        room,
                        participants,
                        lease,
                    } => {
                        let record = EdgePresence {
                            region: member.region.clone(),
                            participants: *participants,
                            cascade: Some(member.cascade_url.clone()),
                        };
                        // Serialising our own plain struct cannot fail.
                        let value = serde_json::to_vec(&record).expect("EdgePresence serialises");
                        store
                            .put(&keys.presence(room, &member.edge), value, *lease)
                            .await
                            .map(|_| metrics.tree.presence_writes.fetch_add(1, Relaxed))
                    }
                    PresenceOp::Delete { room } => store
                        .delete(&keys.presence(room, &member.edge))
                        .await
                        .map(|_| metrics.tree.presence_deletes.fetch_add(1, Relaxed)),
                };
                if let Err(e) = &result {
                    metrics.tree.presence_failures.fetch_add(1, Relaxed);
                    tracing::warn!(?op, error = %e, "presence write failed; retrying next round");
                }
                book.done(&op, result.is_ok());
            }
        }
    });
}

/// Why a record was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(String);

/// The parent edge a stored tree position names (`None`: the origin, or no position yet).
pub fn parent_edge(position: Option<&[u8]>) -> Result<Option<NodeId>, Malformed> {
    let Some(bytes) = position else {
        return Ok(None);
    };
    let p: TreePosition =
        serde_json::from_slice(bytes).map_err(|e| Malformed(format!("tree position: {e}")))?;
    Ok(match p.parent {
        Parent::Origin => None,
        Parent::Edge(id) => Some(id),
    })
}

/// The media parent a parent edge's presence record gives (`Origin` while it has none or no
/// cascade URL: the origin serves the room until the parent is reachable).
pub fn parent_url(presence: Option<&[u8]>) -> Result<MediaParent, Malformed> {
    let Some(bytes) = presence else {
        return Ok(MediaParent::Origin);
    };
    let p: EdgePresence =
        serde_json::from_slice(bytes).map_err(|e| Malformed(format!("parent presence: {e}")))?;
    match p.cascade {
        None => Ok(MediaParent::Origin),
        Some(url) => OriginAddr::parse(&url)
            .map(MediaParent::Edge)
            .map_err(|e| Malformed(format!("parent cascade URL {url:?}: {e}"))),
    }
}

/// Follows this edge's tree position for each room with local participants (see the module
/// docs), handing media parent changes to `changes`. Rooms in `pinned` (operator overrides)
/// are left alone.
pub fn spawn_tree_follower(
    store: Arc<dyn Store>,
    keys: KeyLayout,
    edge: NodeId,
    mut counts: watch::Receiver<crate::hub::LocalCounts>,
    pinned: BTreeSet<RoomId>,
    changes: mpsc::Sender<ParentChange>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        let mut followed: HashMap<RoomId, tokio::task::AbortHandle> = HashMap::new();
        loop {
            let rooms: BTreeSet<RoomId> = counts
                .borrow_and_update()
                .keys()
                .filter(|r| !pinned.contains(*r))
                .cloned()
                .collect();
            let gone: Vec<RoomId> = followed
                .keys()
                .filter(|r| !rooms.contains(*r))
                .cloned()
                .collect();
            for room in gone {
                if let Some(task) = followed.remove(&room) {
                    task.abort();
                }
                metrics.tree.rooms_followed.fetch_sub(1, Relaxed);
                tracing::info!(%room, "no local participants left; no longer following the room's tree");
                // The data plane ignores this if the room already takes media from the origin.
                let change = ParentChange {
                    room,
                    parent: MediaParent::Origin,
                };
                if changes.send(change).await.is_err() {
                    return;
                }
            }
            for room in rooms {
                if followed.contains_key(&room) {
                    continue;
                }
                metrics.tree.rooms_followed.fetch_add(1, Relaxed);
                tracing::info!(%room, %edge, "following the room's fan-out tree");
                let task = tokio::spawn(follow_room(
                    store.clone(),
                    keys.clone(),
                    room.clone(),
                    edge.clone(),
                    changes.clone(),
                    metrics.clone(),
                ));
                followed.insert(room, task.abort_handle());
            }
            if counts.changed().await.is_err() {
                return; // the hub is gone: the edge is shutting down
            }
        }
    });
}

/// One room: follow the position, and the parent's presence, until aborted.
async fn follow_room(
    store: Arc<dyn Store>,
    keys: KeyLayout,
    room: RoomId,
    edge: NodeId,
    changes: mpsc::Sender<ParentChange>,
    metrics: Arc<Metrics>,
) {
    let mut current = MediaParent::Origin;
    loop {
        match follow_room_once(
            &*store,
            &keys,
            &room,
            &edge,
            &changes,
            &metrics,
            &mut current,
        )
        .await
        {
            Ok(()) => return, // the data plane is gone
            Err(e) => {
                metrics.tree.watch_resyncs.fetch_add(1, Relaxed);
                tracing::warn!(%room, error = %e, "tree watch lost; reading the position again");
            }
        }
        tokio::time::sleep(RESYNC_BACKOFF).await;
    }
}

/// Reads one key and starts watching it from the read's revision (list-then-watch).
async fn read_and_watch(
    store: &dyn Store,
    key: &str,
) -> Result<(Option<Vec<u8>>, WatchStream), StoreError> {
    // A range, not a get: it returns the revision the watch must start after.
    let page = store.range(key, None, None).await?;
    let value = page
        .kvs
        .into_iter()
        .find(|kv| kv.key == key)
        .map(|kv| kv.value);
    let watch = store
        .watch_prefix(key, Revision(page.revision.0 + 1))
        .await?;
    Ok((value, watch))
}

/// Applies a watch batch to one exact key's value (the prefix watch also sees longer keys).
fn apply(
    key: &str,
    batch: Option<Result<control_plane::store::WatchBatch, StoreError>>,
    value: &mut Option<Vec<u8>>,
) -> Result<bool, StoreError> {
    let batch = batch.ok_or_else(|| StoreError::WatchLost {
        reason: "watch ended".into(),
    })??;
    let mut changed = false;
    for e in batch.events.iter().filter(|e| e.key() == key) {
        *value = match e {
            WatchEvent::Put(kv) => Some(kv.value.clone()),
            WatchEvent::Delete { .. } => None,
        };
        changed = true;
    }
    Ok(changed)
}

/// `Ok(())` only when the data plane's channel closed; an error means "resynchronise".
async fn follow_room_once(
    store: &dyn Store,
    keys: &KeyLayout,
    room: &RoomId,
    edge: &NodeId,
    changes: &mpsc::Sender<ParentChange>,
    metrics: &Metrics,
    current: &mut MediaParent,
) -> Result<(), StoreError> {
    let position_key = keys.tree_edge(room, edge);
    let (mut position, mut position_watch) = read_and_watch(store, &position_key).await?;
    loop {
        let parent = match parent_edge(position.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                metrics.tree.malformed_records.fetch_add(1, Relaxed);
                tracing::warn!(%room, key = %position_key, error = %e, "unusable tree position; taking media from the origin");
                None
            }
        };
        let Some(parent) = parent.filter(|p| p != edge) else {
            if !hand_over(changes, metrics, room, current, MediaParent::Origin).await {
                return Ok(());
            }
            while !apply(&position_key, position_watch.next().await, &mut position)? {}
            continue;
        };
        // A parent edge: its cascade URL is in its presence record for the room.
        let presence_key = keys.presence(room, &parent);
        let (mut presence, mut presence_watch) = read_and_watch(store, &presence_key).await?;
        loop {
            let target = match parent_url(presence.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    metrics.tree.malformed_records.fetch_add(1, Relaxed);
                    tracing::warn!(%room, key = %presence_key, error = %e, "unusable parent presence; taking media from the origin");
                    MediaParent::Origin
                }
            };
            if target == MediaParent::Origin && presence.is_none() {
                tracing::info!(%room, %parent, "parent edge has no presence record (yet); media from the origin meanwhile");
            }
            if !hand_over(changes, metrics, room, current, target).await {
                return Ok(());
            }
            tokio::select! {
                batch = position_watch.next() => {
                    if apply(&position_key, batch, &mut position)? {
                        break; // re-read the parent (it may be another edge now)
                    }
                }
                batch = presence_watch.next() => {
                    apply(&presence_key, batch, &mut presence)?;
                }
            }
        }
    }
}

/// Sends `target` to the data plane if it differs from `current`; `false` if the data plane
/// is gone.
async fn hand_over(
    changes: &mpsc::Sender<ParentChange>,
    metrics: &Metrics,
    room: &RoomId,
    current: &mut MediaParent,
    target: MediaParent,
) -> bool {
    if *current == target {
        return true;
    }
    tracing::info!(%room, parent = %match &target { MediaParent::Origin => "origin".to_string(), MediaParent::Edge(a) => a.url() }, "tree says: new media parent");
    metrics.tree.parent_changes.fetch_add(1, Relaxed);
    *current = target.clone();
    changes
        .send(ParentChange {
            room: room.clone(),
            parent: target,
        })
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::new(s).unwrap()
    }

    fn counts(v: &[(&str, u32)]) -> BTreeMap<RoomId, u32> {
        v.iter().map(|(r, n)| (room(r), *n)).collect()
    }

    fn apply_all(book: &mut PresenceBook, ops: &[PresenceOp]) {
        for op in ops {
            book.done(op, true);
        }
    }

    #[test]
    fn presence_writes_changes_only_and_rewrites_everything_under_a_new_lease() {
        let mut book = PresenceBook::new();
        let l1 = Some(LeaseId(1));
        let ops = book.plan(&counts(&[("a", 3), ("b", 1)]), l1);
        assert_eq!(ops.len(), 2);
        apply_all(&mut book, &ops);
        // Nothing changed: nothing to write (a join storm between two rounds is one write).
        assert!(book.plan(&counts(&[("a", 3), ("b", 1)]), l1).is_empty());
        // One count changes, one room empties.
        let ops = book.plan(&counts(&[("a", 40)]), l1);
        assert_eq!(
            ops,
            vec![
                PresenceOp::Put {
                    room: room("a"),
                    participants: 40,
                    lease: l1
                },
                PresenceOp::Delete { room: room("b") }
            ]
        );
        // The delete fails: it is planned again; the put succeeded and is not.
        book.done(&ops[0], true);
        book.done(&ops[1], false);
        assert_eq!(
            book.plan(&counts(&[("a", 40)]), l1),
            vec![PresenceOp::Delete { room: room("b") }]
        );
        book.done(&PresenceOp::Delete { room: room("b") }, true);
        // A failed put is retried.
        let ops = book.plan(&counts(&[("a", 41)]), l1);
        book.done(&ops[0], false);
        assert_eq!(book.plan(&counts(&[("a", 41)]), l1).len(), 1);
        book.done(
            &PresenceOp::Put {
                room: room("a"),
                participants: 41,
                lease: l1,
            },
            true,
        );
        // The lease changed (etcd outage): every room is written again under the new one.
        let l2 = Some(LeaseId(2));
        assert_eq!(
            book.plan(&counts(&[("a", 41)]), l2),
            vec![PresenceOp::Put {
                room: room("a"),
                participants: 41,
                lease: l2
            }]
        );
        // No lease: nothing is written (it would outlive the edge).
        assert!(book.plan(&counts(&[("a", 41)]), None).is_empty());
        // A zero count is the same as an absent room.
        let mut book = PresenceBook::new();
        assert!(book.plan(&counts(&[("z", 0)]), l1).is_empty());
    }

    #[test]
    fn positions_and_parent_presence_give_the_media_parent_and_bad_records_are_refused() {
        let position = |parent: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({
                "room": "r", "origin": "origin-eu", "origin_region": "eu", "region": "us",
                "parent": parent, "children": [], "depth": 2, "relay": false, "participants": 1
            }))
            .unwrap()
        };
        assert_eq!(parent_edge(None), Ok(None));
        assert_eq!(parent_edge(Some(&position("origin".into()))), Ok(None));
        assert_eq!(
            parent_edge(Some(&position(serde_json::json!({"edge": "edge-us-1"})))),
            Ok(Some(NodeId::new("edge-us-1").unwrap()))
        );
        assert!(parent_edge(Some(b"{")).is_err());
        assert!(parent_edge(Some(&position(serde_json::json!({"edge": "Not An Id"})))).is_err());

        let presence = |cascade: Option<&str>| {
            serde_json::to_vec(&EdgePresence {
                region: Region::new("us").unwrap(),
                participants: 2,
                cascade: cascade.map(str::to_owned),
            })
            .unwrap()
        };
        assert_eq!(parent_url(None), Ok(MediaParent::Origin));
        assert_eq!(parent_url(Some(&presence(None))), Ok(MediaParent::Origin));
        match parent_url(Some(&presence(Some("quic://edge-r@127.0.0.1:7500")))) {
            Ok(MediaParent::Edge(a)) => assert_eq!(a.url(), "quic://edge-r@127.0.0.1:7500"),
            other => panic!("{other:?}"),
        }
        assert!(parent_url(Some(&presence(Some("http://edge-r@127.0.0.1:7500")))).is_err());
        assert!(parent_url(Some(b"[]")).is_err());
    }
}
