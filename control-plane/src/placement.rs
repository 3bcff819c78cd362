//! Room -> origin placement: exactly one origin per room, decided by a store transaction.
//!
//! The placement of room `r` lives at `<root>/rooms/r` (not under a lease: the room outlives
//! any one origin). Placing is a compare-and-create on that key, so when a hundred edges ask
//! for the same new room at once, one transaction wins and the other ninety-nine read the
//! winner's choice. A placement whose origin is no longer registered (its lease expired) is
//! replaced by a compare-and-swap on the key's modification revision, so concurrent
//! re-placements also converge on one new origin; the placement's `epoch` goes up by one each
//! time. Edges watch `<root>/rooms/` to learn about moves ("tell the edges").
//!
//! The choice itself ([`choose_origin`]) is sans-IO: among origins that accept new rooms,
//! prefer the requested region, then the least utilised, then the smallest id (deterministic,
//! so racing placers usually agree even before the transaction decides).
//!
//! [`Placer::run_reassigner`] watches the origin registrations and re-places every room of an
//! origin that disappears.

use crate::keys::KeyLayout;
use crate::nodes::{NodeId, NodeInfo, NodeKind, Region};
use crate::store::{CreateOutcome, Revision, Store, StoreError, SwapOutcome, WatchEvent};
use cascade_proto::RoomId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

/// Transaction attempts before giving up on a contended room. Each failed attempt means some
/// other placer changed the key in between; after one round the key holds a live origin and
/// the next read returns it, so more than a few attempts means the registry is flapping.
const MAX_ATTEMPTS: usize = 8;

/// Where a room lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub room: RoomId,
    pub origin: NodeId,
    pub region: Region,
    /// The origin's URL, for edges to dial.
    pub url: String,
    /// Bumped on every re-placement; edges reconnect when it changes.
    pub epoch: u64,
}

/// Why a room could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    #[error("no origin accepts new rooms")]
    NoOrigin,
    #[error("room {0} is contended: gave up after {MAX_ATTEMPTS} attempts")]
    Contended(RoomId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Picks the origin for a new (or orphaned) room. See the module docs for the order.
pub fn choose_origin<'a>(
    origins: impl IntoIterator<Item = &'a NodeInfo>,
    preferred: Option<&Region>,
) -> Option<&'a NodeInfo> {
    origins
        .into_iter()
        .filter(|n| n.kind == NodeKind::Origin && n.accepts_new())
        .min_by(|a, b| {
            let away = |n: &NodeInfo| preferred.is_some_and(|r| &n.region != r);
            away(a)
                .cmp(&away(b))
                .then(a.utilisation().total_cmp(&b.utilisation()))
                .then(a.id.cmp(&b.id))
        })
}

/// The store-backed placement service. Cheap to clone.
#[derive(Clone)]
pub struct Placer {
    store: Arc<dyn Store>,
    keys: KeyLayout,
}

impl Placer {
    pub fn new(store: Arc<dyn Store>, keys: KeyLayout) -> Self {
        Self { store, keys }
    }

    /// Registered origins.
    pub async fn origins(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let page = self
            .store
            .range(&self.keys.nodes_of_kind(NodeKind::Origin), None, None)
            .await?;
        Ok(page
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// The room's current placement, if any (without checking its origin is alive).
    pub async fn lookup(&self, room: &RoomId) -> Result<Option<Placement>, StoreError> {
        Ok(self
            .store
            .get(&self.keys.room(room))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    /// All placements (operators' listing), one page from after `after`.
    pub async fn list(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<(Vec<Placement>, bool), StoreError> {
        let prefix = self.keys.rooms_prefix();
        let after_key = after.map(|r| self.keys.room(r));
        let page = self
            .store
            .range(&prefix, after_key.as_deref(), Some(limit))
            .await?;
        Ok((
            page.kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                .collect(),
            page.more,
        ))
    }

    async fn origin_alive(&self, id: &NodeId) -> Result<bool, StoreError> {
        Ok(self
            .store
            .get(&self.keys.node(NodeKind::Origin, id))
            .await?
            .is_some())
    }

    /// Returns the room's placement, placing it (or re-placing it off a dead origin) if needed.
    /// Safe to call concurrently from anywhere: all callers get the same answer.
    pub async fn place(
        &self,
        room: &RoomId,
        preferred: Option<&Region>,
    ) -> Result<Placement, PlacementError> {
        let key = self.keys.room(room);
        for _ in 0..MAX_ATTEMPTS {
            let current = self.store.get(&key).await?;
            let (epoch, expected) = match &current {
                Some(kv) => match serde_json::from_slice::<Placement>(&kv.value) {
                    Ok(p) if self.origin_alive(&p.origin).await? => return Ok(p),
                    Ok(p) => (p.epoch + 1, Some(kv.mod_revision)),
                    // An unreadable placement is replaced like an orphaned one.
                    Err(_) => (1, Some(kv.mod_revision)),
                },
                None => (0, None),
            };
            let origins = self.origins().await?;
            let origin = choose_origin(&origins, preferred).ok_or(PlacementError::NoOrigin)?;
            let placement = Placement {
                room: room.clone(),
                origin: origin.id.clone(),
                region: origin.region.clone(),
                url: origin.url.clone(),
                epoch,
            };
            // Serialising our own plain struct cannot fail.
            let value = serde_json::to_vec(&placement).expect("Placement serialises");
            match expected {
                None => match self.store.create(&key, value, None).await? {
                    CreateOutcome::Created(_) => return Ok(placement),
                    CreateOutcome::Exists(_) => continue,
                },
                Some(rev) => match self.store.compare_and_swap(&key, rev, value, None).await? {
                    SwapOutcome::Swapped(_) => {
                        tracing::info!(%room, origin = %placement.origin, epoch, "room re-placed");
                        return Ok(placement);
                    }
                    SwapOutcome::Conflict(_) => continue,
                },
            }
        }
        Err(PlacementError::Contended(room.clone()))
    }

    /// Removes a room's placement (the meeting ended or was deleted).
    pub async fn release(&self, room: &RoomId) -> Result<bool, StoreError> {
        self.store.delete(&self.keys.room(room)).await
    }

    /// Re-places every room whose origin is not registered. Returns the new placements.
    pub async fn sweep(&self) -> Result<Vec<Placement>, PlacementError> {
        let alive: BTreeSet<NodeId> = self.origins().await?.into_iter().map(|n| n.id).collect();
        let mut moved = Vec::new();
        let mut after: Option<RoomId> = None;
        loop {
            let (page, more) = self.list(after.as_ref(), SWEEP_PAGE).await?;
            for p in &page {
                if !alive.contains(&p.origin) {
                    match self.place(&p.room, Some(&p.region)).await {
                        Ok(np) => moved.push(np),
                        Err(PlacementError::NoOrigin) => {
                            tracing::warn!(room = %p.room, "origin gone and no origin to move to");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            after = page.last().map(|p| p.room.clone());
            if !more || after.is_none() {
                return Ok(moved);
            }
        }
    }

    /// Watches origin registrations until `shutdown`, sweeping whenever an origin disappears
    /// (and once at start and after every resynchronisation, to catch deaths missed meanwhile).
    pub async fn run_reassigner(self, shutdown: impl Future<Output = ()>) {
        let run = async {
            loop {
                if let Err(e) = self.reassign_once().await {
                    tracing::warn!(error = %e, "reassigner interrupted; resynchronising");
                }
                tokio::time::sleep(REASSIGN_BACKOFF).await;
            }
        };
        tokio::select! {
            _ = run => {}
            _ = shutdown => {}
        }
    }

    async fn reassign_once(&self) -> Result<(), PlacementError> {
        let prefix = self.keys.nodes_of_kind(NodeKind::Origin);
        let page = self.store.range(&prefix, None, Some(1)).await?;
        let mut watch = self
            .store
            .watch_prefix(&prefix, Revision(page.revision.0 + 1))
            .await?;
        self.sweep().await?;
        while let Some(batch) = watch.next().await {
            let batch = batch?;
            let died = batch
                .events
                .iter()
                .any(|e| matches!(e, WatchEvent::Delete { .. }));
            // A new origin may also adopt rooms that had nowhere to go.
            let born = batch.events.iter().any(|e| matches!(e, WatchEvent::Put(_)));
            if died || born {
                self.sweep().await?;
            }
        }
        Err(StoreError::WatchLost {
            reason: "origin watch ended".into(),
        }
        .into())
    }
}

/// A change to a room's placement, as an edge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementChange {
    /// The room was placed or moved (a higher `epoch` than before: reconnect to the origin).
    Placed(Placement),
    /// The placement was removed (the meeting was deleted).
    Released(RoomId),
}

impl Placer {
    /// Current placements under `rooms/` (all pages) and the revision they were read at, for
    /// following with [`Placer::watch`] from `revision + 1`.
    pub async fn snapshot(&self) -> Result<(Vec<Placement>, Revision), StoreError> {
        let page = self
            .store
            .range(&self.keys.rooms_prefix(), None, None)
            .await?;
        let placements = page
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        Ok((placements, page.revision))
    }

    /// Placement changes from revision `from` on: how edges learn that a room moved. The
    /// stream ends or yields an error when the watch breaks; take a new snapshot then.
    pub async fn watch(
        &self,
        from: Revision,
    ) -> Result<
        impl tokio_stream::Stream<Item = Result<Vec<PlacementChange>, StoreError>> + Send,
        StoreError,
    > {
        let keys = self.keys.clone();
        let prefix = keys.rooms_prefix();
        let watch = self.store.watch_prefix(&prefix, from).await?;
        Ok(watch.map(move |batch| {
            let batch = batch?;
            Ok(batch
                .events
                .iter()
                .filter_map(|e| match e {
                    WatchEvent::Put(kv) => serde_json::from_slice(&kv.value)
                        .ok()
                        .map(PlacementChange::Placed),
                    WatchEvent::Delete { key, .. } => keys
                        .room_of(&prefix, key)
                        .and_then(|r| RoomId::new(r).ok())
                        .map(PlacementChange::Released),
                })
                .collect())
        }))
    }
}

/// Rooms read per page while sweeping.
const SWEEP_PAGE: usize = 500;

/// Pause before re-watching after an error (see `nodes::RESYNC_BACKOFF`).
const REASSIGN_BACKOFF: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::tests::node;
    use crate::nodes::{NodeLoad, NodeRegistration, RegistrationConfig};
    use crate::store::MemStore;

    #[test]
    fn choose_prefers_region_then_least_loaded_then_id() {
        let o = |id: &str, region: &str, load: u32| node(id, NodeKind::Origin, region, load);
        let mut draining = o("d", "eu", 0);
        draining.draining = true;
        let table: Vec<(Vec<NodeInfo>, Option<&str>, Option<&str>)> = vec![
            (
                vec![o("a", "eu", 50), o("b", "eu", 10)],
                Some("eu"),
                Some("b"),
            ),
            (
                vec![o("a", "us", 0), o("b", "eu", 90)],
                Some("eu"),
                Some("b"),
            ),
            (vec![o("a", "us", 0), o("b", "eu", 90)], None, Some("a")),
            (
                vec![o("a", "us", 5), o("b", "us", 5)],
                Some("eu"),
                Some("a"),
            ),
            (
                vec![draining.clone(), o("z", "us", 99)],
                Some("eu"),
                Some("z"),
            ),
            (vec![draining, o("f", "eu", 100)], Some("eu"), None),
            (vec![node("e", NodeKind::Edge, "eu", 0)], None, None),
        ];
        for (origins, pref, want) in table {
            let pref = pref.map(|r| Region::new(r).unwrap());
            let got = choose_origin(&origins, pref.as_ref()).map(|n| n.id.as_str());
            assert_eq!(got, want, "{origins:?} pref {pref:?}");
        }
    }

    #[tokio::test]
    async fn place_is_stable_and_moves_off_dead_origin() {
        let store: Arc<dyn Store> = MemStore::start();
        let keys = KeyLayout::default();
        let cfg = RegistrationConfig::with_ttl(Duration::from_secs(5));
        let a = NodeRegistration::register(
            store.clone(),
            &keys,
            node("a", NodeKind::Origin, "eu", 0),
            cfg,
        )
        .await
        .unwrap();
        let placer = Placer::new(store.clone(), keys.clone());
        let room = RoomId::new("r1").unwrap();
        let p1 = placer.place(&room, None).await.unwrap();
        assert_eq!(p1.origin.as_str(), "a");
        assert_eq!(p1.epoch, 0);

        let _b = NodeRegistration::register(
            store.clone(),
            &keys,
            NodeInfo {
                load: NodeLoad::default(),
                ..node("b", NodeKind::Origin, "us", 0)
            },
            cfg,
        )
        .await
        .unwrap();
        // Still on a: placement is sticky while the origin lives.
        assert_eq!(placer.place(&room, None).await.unwrap(), p1);

        a.deregister().await;
        let moved = placer.sweep().await.unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].origin.as_str(), "b");
        assert_eq!(moved[0].epoch, 1);
        assert_eq!(placer.lookup(&room).await.unwrap().unwrap(), moved[0]);
    }

    #[tokio::test]
    async fn no_origin_is_an_error_and_writes_nothing() {
        let store: Arc<dyn Store> = MemStore::start();
        let placer = Placer::new(store, KeyLayout::default());
        let room = RoomId::new("r1").unwrap();
        assert_eq!(
            placer.place(&room, None).await.unwrap_err(),
            PlacementError::NoOrigin
        );
        assert!(placer.lookup(&room).await.unwrap().is_none());
    }
}
