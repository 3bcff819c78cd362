//! The node registry: edges and origins announce themselves in the store under a lease.
//!
//! A node writes its [`NodeInfo`] (region, public addresses, capacity, load, draining flag) at
//! `<root>/nodes/<kind>/<id>` attached to a lease with a TTL of a few seconds and renews the
//! lease about three times per TTL ([`NodeRegistration`]). A node that dies stops renewing and
//! etcd deletes its key when the TTL runs out; every watcher (placement, geo-DNS, edges) sees
//! the deletion and re-plans. A node whose lease was lost while it was alive (a partition longer
//! than the TTL) notices on its next keepalive and registers again with a fresh lease.
//!
//! [`NodeTable`] is the sans-IO mirror of the registry that watchers keep: fed the initial
//! listing and then the watch batches, it holds every live node. [`follow_nodes`] is the shell
//! that drives it from a store.

use crate::keys::KeyLayout;
use crate::store::{LeaseId, Revision, Store, StoreError, WatchEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_stream::StreamExt;

/// Longest node id or region name: one DNS label (RFC 1035 §2.3.4), so a region can be a label
/// of `<region>.meet.<zone>`.
pub const MAX_LABEL_LEN: usize = 63;

/// Why a node id or region name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    #[error("must be 1 to {MAX_LABEL_LEN} characters")]
    Length,
    #[error("character {0:?} not allowed (use a-z, 0-9 and '-', not at either end)")]
    BadChar(char),
}

fn check_label(s: &str) -> Result<(), LabelError> {
    if s.is_empty() || s.len() > MAX_LABEL_LEN {
        return Err(LabelError::Length);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(LabelError::BadChar(c));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(LabelError::BadChar('-'));
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses a lowercase DNS label: `[a-z0-9-]`, 1 to 63 characters, no '-' at the ends.
            pub fn new(s: impl Into<String>) -> Result<Self, LabelError> {
                let s = s.into();
                check_label(&s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = LabelError;
            fn try_from(s: String) -> Result<Self, LabelError> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = LabelError;
            fn from_str(s: &str) -> Result<Self, LabelError> {
                Self::new(s)
            }
        }
    };
}

label_type!(
    /// A node's name, unique among nodes of its kind (`edge-fra-1`).
    NodeId
);
label_type!(
    /// A region (`eu-west`): a group of nodes near each other, a label of `<region>.meet.<zone>`.
    Region
);

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// Terminates clients (WebRTC, signaling); what DNS and join-info hand out.
    Edge,
    /// Owns rooms (room state, root of the fan-out tree); what placement picks.
    Origin,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Edge => "edge",
            NodeKind::Origin => "origin",
        }
    }
}

/// A node's current load, reported by the node itself.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLoad {
    /// Participants connected (edge) or rooms' participants hosted (origin).
    pub participants: u32,
    /// Packets forwarded per second, all directions.
    pub packets_per_sec: u64,
    /// CPU use of the node process, 0 to 100 per core summed over cores / cores.
    pub cpu_percent: f32,
}

/// What a node registers about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub id: NodeId,
    pub kind: NodeKind,
    pub region: Region,
    /// Public addresses clients (edge) or edges (origin) reach the node at; the A/AAAA answers.
    pub addresses: Vec<IpAddr>,
    /// Base URL of the node's HTTP side (`https://edge-fra-1.example.com`); join-info hands it
    /// out for edges, edges dial it for origins.
    pub url: String,
    /// Participants the node accepts at most.
    pub capacity: u32,
    #[serde(default)]
    pub load: NodeLoad,
    /// Finishing its current sessions, taking no new participants or rooms.
    #[serde(default)]
    pub draining: bool,
    /// The node's own health verdict (media path working); unhealthy nodes get nothing new.
    #[serde(default = "yes")]
    pub healthy: bool,
}

fn yes() -> bool {
    true
}

impl NodeInfo {
    /// Whether the node may be given new participants (edge) or rooms (origin).
    pub fn accepts_new(&self) -> bool {
        self.healthy && !self.draining && self.load.participants < self.capacity
    }

    /// Load as a fraction of capacity, for least-loaded choices (a full node is 1.0 or more).
    pub fn utilisation(&self) -> f64 {
        if self.capacity == 0 {
            return f64::INFINITY;
        }
        f64::from(self.load.participants) / f64::from(self.capacity)
    }
}

/// Sans-IO mirror of the registry: every live node, by kind and id.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    nodes: BTreeMap<String, NodeInfo>,
    revision: Revision,
    /// Registrations that did not parse (a newer node version, a bug); counted, not fatal.
    malformed: u64,
}

impl NodeTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the contents with a fresh listing at `revision`.
    pub fn handle_snapshot(
        &mut self,
        kvs: impl IntoIterator<Item = (String, Vec<u8>)>,
        revision: Revision,
    ) {
        self.nodes.clear();
        for (key, value) in kvs {
            self.upsert(key, &value);
        }
        self.revision = revision;
    }

    /// Applies watch events.
    pub fn handle_events<'e>(
        &mut self,
        events: impl IntoIterator<Item = &'e WatchEvent>,
        revision: Revision,
    ) {
        for ev in events {
            match ev {
                WatchEvent::Put(kv) => self.upsert(kv.key.clone(), &kv.value),
                WatchEvent::Delete { key, .. } => {
                    self.nodes.remove(key);
                }
            }
        }
        self.revision = self.revision.max(revision);
    }

    fn upsert(&mut self, key: String, value: &[u8]) {
        match serde_json::from_slice::<NodeInfo>(value) {
            Ok(info) => {
                self.nodes.insert(key, info);
            }
            Err(_) => {
                self.malformed += 1;
                self.nodes.remove(&key);
            }
        }
    }

    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    pub fn all(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn of_kind(&self, kind: NodeKind) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values().filter(move |n| n.kind == kind)
    }

    pub fn find(&self, kind: NodeKind, id: &NodeId) -> Option<&NodeInfo> {
        self.of_kind(kind).find(|n| &n.id == id)
    }
}

/// Backoff between resynchronisations after a store error: long enough not to hammer a
/// recovering cluster, short enough that DNS catches up within a second of etcd returning.
const RESYNC_BACKOFF: Duration = Duration::from_millis(500);

/// Keeps `table` equal to the registry under `keys` until `shutdown` completes: lists, then
/// watches from the listing's revision, and lists again whenever the watch breaks. Calls
/// `on_change` after each applied change (the DNS uses it to bump its serial).
pub async fn follow_nodes(
    store: Arc<dyn Store>,
    keys: KeyLayout,
    table: Arc<RwLock<NodeTable>>,
    on_change: impl Fn() + Send + Sync,
    shutdown: impl Future<Output = ()>,
) {
    let prefix = keys.nodes_prefix();
    let run = async {
        loop {
            if let Err(e) = follow_once(&*store, &prefix, &table, &on_change).await {
                tracing::warn!(error = %e, "node registry watch broken; resynchronising");
            }
            tokio::time::sleep(RESYNC_BACKOFF).await;
        }
    };
    tokio::select! {
        _ = run => {}
        _ = shutdown => {}
    }
}

async fn follow_once(
    store: &dyn Store,
    prefix: &str,
    table: &RwLock<NodeTable>,
    on_change: &(impl Fn() + Send + Sync),
) -> Result<(), StoreError> {
    let page = store.range(prefix, None, None).await?;
    let from = Revision(page.revision.0 + 1);
    write_table(table).handle_snapshot(
        page.kvs.into_iter().map(|kv| (kv.key, kv.value)),
        page.revision,
    );
    on_change();
    let mut watch = store.watch_prefix(prefix, from).await?;
    while let Some(batch) = watch.next().await {
        let batch = batch?;
        if batch.events.is_empty() {
            continue;
        }
        write_table(table).handle_events(&batch.events, batch.revision);
        on_change();
    }
    Err(StoreError::WatchLost {
        reason: "watch stream ended".into(),
    })
}

fn write_table(t: &RwLock<NodeTable>) -> std::sync::RwLockWriteGuard<'_, NodeTable> {
    // The table is plain data replaced wholesale on resync; a poisoned lock still holds a usable
    // table.
    t.write().unwrap_or_else(|p| p.into_inner())
}

/// Read access to a shared table (poison-tolerant, see [`follow_nodes`]).
pub fn read_table(t: &RwLock<NodeTable>) -> std::sync::RwLockReadGuard<'_, NodeTable> {
    t.read().unwrap_or_else(|p| p.into_inner())
}

/// Registration settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// Lease TTL: how long after its last keepalive a dead node disappears. etcd's minimum
    /// usable TTL with default election timeouts is ~2 s; 5 s tolerates a slow keepalive.
    pub ttl: Duration,
    /// Keepalive interval: a third of the TTL, so two lost keepalives still keep the node.
    pub keepalive: Duration,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self::with_ttl(Duration::from_secs(5))
    }
}

impl RegistrationConfig {
    /// A TTL with the keepalive at a third of it.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            keepalive: ttl / 3,
        }
    }
}

struct RegState {
    info: NodeInfo,
    lease: Option<LeaseId>,
    /// The info changed since it was last written.
    dirty: bool,
}

/// A node's registration, kept alive by [`NodeRegistration::run`]. Cheap to clone; the node
/// updates its load with [`NodeRegistration::update`] and the next keepalive tick writes it.
#[derive(Clone)]
pub struct NodeRegistration {
    store: Arc<dyn Store>,
    key: String,
    config: RegistrationConfig,
    state: Arc<Mutex<RegState>>,
}

impl NodeRegistration {
    /// Registers the node now (grants a lease, writes its info). Call [`Self::run`] to keep it.
    pub async fn register(
        store: Arc<dyn Store>,
        keys: &KeyLayout,
        info: NodeInfo,
        config: RegistrationConfig,
    ) -> Result<Self, StoreError> {
        let key = keys.node(info.kind, &info.id);
        let reg = Self {
            store,
            key,
            config,
            state: Arc::new(Mutex::new(RegState {
                info,
                lease: None,
                dirty: true,
            })),
        };
        reg.refresh().await?;
        Ok(reg)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RegState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current registered info.
    pub fn info(&self) -> NodeInfo {
        self.state().info.clone()
    }

    /// The store key of this registration.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease currently holding the registration.
    pub fn lease(&self) -> Option<LeaseId> {
        self.state().lease
    }

    /// Changes the registered info (load, draining, health); written on the next tick.
    pub fn update(&self, f: impl FnOnce(&mut NodeInfo)) {
        let mut s = self.state();
        f(&mut s.info);
        s.dirty = true;
    }

    /// One keepalive step: renews the lease (or grants a new one if it was lost) and writes the
    /// info if it changed or the lease is new.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let lease = self.state().lease;
        let alive = match lease {
            Some(l) => self.store.lease_keepalive(l).await?,
            None => false,
        };
        let lease = if alive {
            lease
        } else {
            if lease.is_some() {
                tracing::warn!(key = %self.key, "registration lease lost; registering again");
            }
            let l = self.store.lease_grant(self.config.ttl).await?;
            let mut s = self.state();
            s.lease = Some(l);
            s.dirty = true;
            Some(l)
        };
        let (value, dirty) = {
            let s = self.state();
            // Serialising our own plain struct cannot fail.
            (
                serde_json::to_vec(&s.info).expect("NodeInfo serialises"),
                s.dirty,
            )
        };
        if dirty {
            self.state().dirty = false;
            if let Err(e) = self.store.put(&self.key, value, lease).await {
                self.state().dirty = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Keeps the registration alive until `shutdown` completes, then revokes the lease so the
    /// node disappears at once instead of after its TTL. Store errors are logged and retried on
    /// the next tick.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.config.keepalive);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let run = async {
            loop {
                tick.tick().await;
                if let Err(e) = self.refresh().await {
                    tracing::warn!(key = %self.key, error = %e, "registration keepalive failed");
                }
            }
        };
        tokio::select! {
            _ = run => {}
            _ = shutdown => {}
        }
        self.deregister().await;
    }

    /// Removes the registration now (revokes the lease).
    pub async fn deregister(&self) {
        let lease = self.state().lease.take();
        if let Some(l) = lease {
            if let Err(e) = self.store.lease_revoke(l).await {
                tracing::warn!(key = %self.key, error = %e, "lease revoke failed; expires by TTL");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::KeyValue;

    pub(crate) fn node(id: &str, kind: NodeKind, region: &str, load: u32) -> NodeInfo {
        NodeInfo {
            id: NodeId::new(id).unwrap(),
            kind,
            region: Region::new(region).unwrap(),
            addresses: vec!["192.0.2.1".parse().unwrap()],
            url: format!("https://{id}.example"),
            capacity: 100,
            load: NodeLoad {
                participants: load,
                ..NodeLoad::default()
            },
            draining: false,
            healthy: true,
        }
    }

    #[test]
    fn labels_are_dns_labels() {
        for (s, ok) in [
            ("eu-west", true),
            ("a", true),
            ("", false),
            ("-a", false),
            ("a-", false),
            ("EU", false),
            ("a.b", false),
            (&"x".repeat(64), false),
        ] {
            assert_eq!(Region::new(s).is_ok(), ok, "{s:?}");
        }
    }

    #[test]
    fn table_follows_snapshot_and_events() {
        let keys = KeyLayout::default();
        let a = node("a", NodeKind::Edge, "eu", 1);
        let b = node("b", NodeKind::Origin, "us", 2);
        let ka = keys.node(NodeKind::Edge, &a.id);
        let kb = keys.node(NodeKind::Origin, &b.id);
        let mut t = NodeTable::new();
        t.handle_snapshot(
            [
                (ka.clone(), serde_json::to_vec(&a).unwrap()),
                ("/kcs/v1/nodes/edge/bad".into(), b"{".to_vec()),
            ],
            Revision(5),
        );
        assert_eq!(t.all().count(), 1);
        assert_eq!(t.malformed(), 1);
        t.handle_events(
            &[
                WatchEvent::Put(KeyValue {
                    key: kb,
                    value: serde_json::to_vec(&b).unwrap(),
                    mod_revision: Revision(6),
                    lease: None,
                }),
                WatchEvent::Delete {
                    key: ka,
                    mod_revision: Revision(7),
                },
            ],
            Revision(7),
        );
        assert_eq!(t.of_kind(NodeKind::Edge).count(), 0);
        assert_eq!(t.find(NodeKind::Origin, &b.id), Some(&b));
        assert_eq!(t.revision(), Revision(7));
    }

    #[test]
    fn accepts_new_excludes_draining_unhealthy_and_full() {
        let mut n = node("a", NodeKind::Edge, "eu", 10);
        assert!(n.accepts_new());
        n.draining = true;
        assert!(!n.accepts_new());
        n.draining = false;
        n.healthy = false;
        assert!(!n.accepts_new());
        n.healthy = true;
        n.load.participants = 100;
        assert!(!n.accepts_new());
    }
}
