//! The store the control plane keeps its state in: one small trait, two implementations.
//!
//! [`EtcdStore`] is what every deployment runs: etcd gives us linearizable transactions (room
//! placement is a compare-and-create), leases (a node's registration vanishes when it stops
//! renewing) and watches (the geo-DNS and the edges learn about changes without polling).
//! [`MemStore`] is an embedded single-process store **for dev mode only** (`kcs dev`), so the
//! README's first command needs nothing installed. It keeps the same semantics (revisions,
//! leases with TTLs, prefix watches, compare-and-create) but nothing survives a restart and
//! nothing is shared between processes.
//!
//! The trait is deliberately narrow: the handful of etcd operations the control plane uses,
//! expressed in our own types so the rest of the crate never sees a gRPC type. Keys are UTF-8
//! strings laid out by [`crate::keys::KeyLayout`]; values are opaque bytes (JSON in practice).
//!
//! Watches: [`Store::watch_prefix`] streams [`WatchBatch`]es from a start revision. Consumers
//! follow the list-then-watch pattern: [`Store::range`] returns the revision of its snapshot and
//! the watch starts at `revision + 1`, so no change is missed or seen twice. A stream that ends
//! or yields an error means "resynchronise": list again, watch again.

mod etcd;
mod memory;

pub use etcd::{EtcdConfig, EtcdStore};
pub use memory::MemStore;

use std::pin::Pin;
use std::time::Duration;

/// A store revision (etcd's cluster-wide, monotonically increasing modification counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision(pub i64);

/// A lease id. Keys put under a lease are deleted when the lease expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// One key with its value and the revision that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last change to this key; the token for [`Store::compare_and_swap`].
    pub mod_revision: Revision,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A page of a range read, with the store revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangePage {
    pub kvs: Vec<KeyValue>,
    /// Revision of the read: watch from `revision + 1` to follow on without gaps.
    pub revision: Revision,
    /// More keys follow the last one returned (the page was cut by its limit).
    pub more: bool,
}

/// Outcome of [`Store::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The key did not exist and now holds our value.
    Created(Revision),
    /// Someone else created it first; here is what they wrote.
    Exists(KeyValue),
}

/// Outcome of [`Store::compare_and_swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapOutcome {
    /// The key was at the expected revision and now holds our value.
    Swapped(Revision),
    /// The key changed (or vanished) since the caller read it; here is its current state.
    Conflict(Option<KeyValue>),
}

/// What happened to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// The key was deleted (explicitly or because its lease expired).
    Delete {
        key: String,
        mod_revision: Revision,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// Events of one store revision range, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// Revision the store had reached when it sent this batch.
    pub revision: Revision,
    pub events: Vec<WatchEvent>,
}

/// A stream of watch batches; an `Err` item or the end of the stream means "resynchronise".
pub type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or has no quorum; the operation may be retried later.
    #[error("store unavailable: {reason}")]
    Unavailable { reason: String },
    /// The operation did not complete within the store timeout.
    #[error("store operation timed out after {0:?}")]
    Timeout(Duration),
    /// A watch was cancelled by the store (compaction, lagging consumer); list and watch again.
    #[error("watch lost: {reason}")]
    WatchLost { reason: String },
    /// The store refused the request itself (bad key, bad lease): a bug on our side.
    #[error("store rejected request: {reason}")]
    Rejected { reason: String },
}

impl StoreError {
    /// Whether the failure is the store's availability (maps to HTTP 503), not our request.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Timeout(_) | StoreError::WatchLost { .. }
        )
    }
}

/// The operations the control plane needs from its store. See the module docs.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Reads keys under `prefix` in key order, starting after `after` (exclusive) when given,
    /// at most `limit` keys when given.
    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<RangePage, StoreError>;

    /// Writes a key, optionally attached to a lease.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;

    /// Deletes a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Writes a key only if it does not exist, atomically (etcd: a transaction comparing the
    /// key's create revision with 0).
    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CreateOutcome, StoreError>;

    /// Writes a key only if it was last modified at `expected` (read-modify-write without
    /// lost updates).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<SwapOutcome, StoreError>;

    /// Deletes a key only if it was last modified at `expected`; returns whether it did.
    async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<bool, StoreError>;

    /// Grants a lease that expires `ttl` after its last keepalive.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease once. `Ok(false)`: the lease is gone (expired or revoked) and its keys
    /// with it; the holder must grant a new one and write its keys again.
    async fn lease_keepalive(&self, lease: LeaseId) -> Result<bool, StoreError>;

    /// Revokes a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Streams changes to keys under `prefix`, starting at revision `from`.
    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;
}
