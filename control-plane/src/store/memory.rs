//! [`MemStore`]: the embedded, single-process store for **dev mode only**.
//!
//! It exists so `kcs dev` runs with nothing installed. It mirrors the etcd semantics the control
//! plane relies on (one global revision counter, compare-and-create, compare-and-swap on the
//! modification revision, leases whose expiry deletes their keys, prefix watches from a
//! revision) but it is not durable, not shared between processes and keeps no history: a watch
//! can only start at a revision it has not yet passed (older starts are answered with
//! [`StoreError::WatchLost`], like a compacted etcd). Never use it for a deployment.
//!
//! The state machine ([`MemCore`]) is sans-IO: every operation takes `now`, and expired leases
//! are reaped by [`MemCore::handle_expiry`]. The [`MemStore`] shell wraps it in a short-held
//! `std::sync::Mutex`, reads the clock, and fans changes out to watchers over a broadcast
//! channel.

use super::{
    CreateOutcome, KeyValue, LeaseId, RangePage, Revision, Store, StoreError, SwapOutcome,
    WatchBatch, WatchEvent, WatchStream,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;

/// Watch batches buffered per watcher before a slow one is told to resynchronise. Dev mode has a
/// handful of watchers and changes; 1024 covers any burst a dev session makes.
const WATCH_BUFFER: usize = 1024;

/// How often the shell reaps expired leases. Leases have second-granularity TTLs; a quarter
/// second keeps expiry within ~250 ms of the deadline.
const REAP_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// The store's state machine, without clock or channels.
#[derive(Debug, Default)]
pub struct MemCore {
    kvs: BTreeMap<String, KeyValue>,
    revision: i64,
    next_lease: i64,
    leases: HashMap<i64, Lease>,
}

impl MemCore {
    pub fn revision(&self) -> Revision {
        Revision(self.revision)
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.kvs.get(key).cloned()
    }

    pub fn range(&self, prefix: &str, after: Option<&str>, limit: Option<usize>) -> RangePage {
        let limit = limit.unwrap_or(usize::MAX);
        let mut iter = self
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .map(|(_, v)| v.clone());
        let kvs: Vec<KeyValue> = iter.by_ref().take(limit).collect();
        let more = iter.next().is_some();
        RangePage {
            kvs,
            revision: self.revision(),
            more,
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match lease {
            Some(l) if !self.leases.contains_key(&l.0) => Err(StoreError::Rejected {
                reason: format!("lease {:x} not found", l.0),
            }),
            _ => Ok(()),
        }
    }

    fn write(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> WatchEvent {
        self.revision += 1;
        if let Some(old) = self.kvs.get(key).and_then(|kv| kv.lease) {
            if let Some(l) = self.leases.get_mut(&old.0) {
                l.keys.remove(key);
            }
        }
        if let Some(l) = lease.and_then(|l| self.leases.get_mut(&l.0)) {
            l.keys.insert(key.to_owned());
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            mod_revision: Revision(self.revision),
            lease,
        };
        self.kvs.insert(key.to_owned(), kv.clone());
        WatchEvent::Put(kv)
    }

    fn remove(&mut self, key: &str) -> Option<WatchEvent> {
        let old = self.kvs.remove(key)?;
        self.revision += 1;
        if let Some(l) = old.lease.and_then(|l| self.leases.get_mut(&l.0)) {
            l.keys.remove(key);
        }
        Some(WatchEvent::Delete {
            key: key.to_owned(),
            mod_revision: Revision(self.revision),
        })
    }

    pub fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<WatchEvent, StoreError> {
        self.check_lease(lease)?;
        Ok(self.write(key, value, lease))
    }

    pub fn delete(&mut self, key: &str) -> Option<WatchEvent> {
        self.remove(key)
    }

    pub fn create(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(CreateOutcome, Option<WatchEvent>), StoreError> {
        self.check_lease(lease)?;
        if let Some(kv) = self.kvs.get(key) {
            return Ok((CreateOutcome::Exists(kv.clone()), None));
        }
        let ev = self.write(key, value, lease);
        Ok((CreateOutcome::Created(self.revision()), Some(ev)))
    }

    pub fn compare_and_swap(
        &mut self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(SwapOutcome, Option<WatchEvent>), StoreError> {
        self.check_lease(lease)?;
        let current = self.kvs.get(key).map(|kv| kv.mod_revision);
        // etcd compares a missing key's mod_revision as 0.
        if current.unwrap_or(Revision(0)) != expected {
            return Ok((SwapOutcome::Conflict(self.kvs.get(key).cloned()), None));
        }
        let ev = self.write(key, value, lease);
        Ok((SwapOutcome::Swapped(self.revision()), Some(ev)))
    }

    pub fn compare_and_delete(&mut self, key: &str, expected: Revision) -> Option<WatchEvent> {
        let current = self.kvs.get(key).map(|kv| kv.mod_revision)?;
        if current != expected {
            return None;
        }
        self.remove(key)
    }

    pub fn lease_grant(&mut self, ttl: Duration, now: Instant) -> LeaseId {
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        LeaseId(id)
    }

    pub fn lease_keepalive(&mut self, lease: LeaseId, now: Instant) -> bool {
        match self.leases.get_mut(&lease.0) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                true
            }
            _ => false,
        }
    }

    pub fn lease_revoke(&mut self, lease: LeaseId) -> Vec<WatchEvent> {
        let Some(l) = self.leases.remove(&lease.0) else {
            return Vec::new();
        };
        l.keys.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Revokes every lease whose deadline has passed; returns the resulting deletions.
    pub fn handle_expiry(&mut self, now: Instant) -> Vec<WatchEvent> {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .flat_map(|id| self.lease_revoke(LeaseId(id)))
            .collect()
    }
}

/// The dev-only embedded store (see the module docs). Create it with [`MemStore::start`].
pub struct MemStore {
    core: Mutex<MemCore>,
    changes: broadcast::Sender<Arc<WatchBatch>>,
}

impl MemStore {
    /// Creates the store and spawns its lease reaper on the current tokio runtime. The reaper
    /// stops when the last `Arc` to the store is dropped.
    pub fn start() -> Arc<Self> {
        let store = Arc::new(Self {
            core: Mutex::new(MemCore::default()),
            changes: broadcast::channel(WATCH_BUFFER).0,
        });
        let weak: Weak<Self> = Arc::downgrade(&store);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_INTERVAL);
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                store.reap(Instant::now());
            }
        });
        store
    }

    /// Reaps leases expired at `now` (the reaper calls this; tests may too).
    pub fn reap(&self, now: Instant) {
        let mut core = self.lock();
        let events = core.handle_expiry(now);
        self.publish(&core, events);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemCore> {
        // A panic while holding this lock is a bug in MemCore; the data is still consistent
        // enough for a dev store, so keep serving rather than poison every later call.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends events while the core lock is still held, so watchers see revisions in order.
    fn publish(&self, core: &MemCore, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(Arc::new(WatchBatch {
            revision: core.revision(),
            events,
        }));
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().get(key))
    }

    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<RangePage, StoreError> {
        Ok(self.lock().range(prefix, after, limit))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let mut core = self.lock();
        let ev = core.put(key, value, lease)?;
        self.publish(&core, vec![ev]);
        Ok(core.revision())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut core = self.lock();
        let ev = core.delete(key);
        let existed = ev.is_some();
        self.publish(&core, ev.into_iter().collect());
        Ok(existed)
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CreateOutcome, StoreError> {
        let mut core = self.lock();
        let (outcome, ev) = core.create(key, value, lease)?;
        self.publish(&core, ev.into_iter().collect());
        Ok(outcome)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<SwapOutcome, StoreError> {
        let mut core = self.lock();
        let (outcome, ev) = core.compare_and_swap(key, expected, value, lease)?;
        self.publish(&core, ev.into_iter().collect());
        Ok(outcome)
    }

    async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<bool, StoreError> {
        let mut core = self.lock();
        let ev = core.compare_and_delete(key, expected);
        let done = ev.is_some();
        self.publish(&core, ev.into_iter().collect());
        Ok(done)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        Ok(self.lock().lease_grant(ttl, Instant::now()))
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        Ok(self.lock().lease_keepalive(lease, Instant::now()))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut core = self.lock();
        let events = core.lease_revoke(lease);
        self.publish(&core, events);
        Ok(())
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let core = self.lock();
        // Subscribe under the lock: every batch after `core.revision()` reaches this receiver.
        let rx = self.changes.subscribe();
        if from.0 <= core.revision {
            return Err(StoreError::WatchLost {
                reason: format!(
                    "dev store keeps no history: cannot watch from {} (now at {})",
                    from.0, core.revision
                ),
            });
        }
        drop(core);
        let prefix = prefix.to_owned();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| match item {
                Ok(batch) => {
                    let events: Vec<WatchEvent> = batch
                        .events
                        .iter()
                        .filter(|e| e.key().starts_with(&prefix))
                        .cloned()
                        .collect();
                    (!events.is_empty()).then(|| {
                        Ok(WatchBatch {
                            revision: batch.revision,
                            events,
                        })
                    })
                }
                Err(_lagged) => Some(Err(StoreError::WatchLost {
                    reason: "watcher fell behind the dev store".into(),
                })),
            });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_exclusive_and_cas_detects_changes() {
        let mut c = MemCore::default();
        let (o, _) = c.create("/a", b"1".to_vec(), None).unwrap();
        assert!(matches!(o, CreateOutcome::Created(Revision(1))));
        let (o, _) = c.create("/a", b"2".to_vec(), None).unwrap();
        match o {
            CreateOutcome::Exists(kv) => assert_eq!(kv.value, b"1"),
            other => panic!("expected Exists, got {other:?}"),
        }
        let (o, _) = c
            .compare_and_swap("/a", Revision(7), b"3".to_vec(), None)
            .unwrap();
        assert!(matches!(o, SwapOutcome::Conflict(Some(_))));
        let (o, _) = c
            .compare_and_swap("/a", Revision(1), b"3".to_vec(), None)
            .unwrap();
        assert_eq!(o, SwapOutcome::Swapped(Revision(2)));
        assert_eq!(c.get("/a").unwrap().value, b"3");
    }

    #[test]
    fn lease_expiry_deletes_keys_and_keepalive_extends() {
        let t0 = Instant::now();
        let mut c = MemCore::default();
        let l = c.lease_grant(Duration::from_secs(2), t0);
        c.put("/n/1", b"x".to_vec(), Some(l)).unwrap();
        c.put("/n/2", b"y".to_vec(), None).unwrap();
        assert!(c.handle_expiry(t0 + Duration::from_secs(1)).is_empty());
        assert!(c.lease_keepalive(l, t0 + Duration::from_millis(1500)));
        // Without the keepalive it would have expired at t0+2s.
        assert!(c.handle_expiry(t0 + Duration::from_millis(3000)).is_empty());
        let gone = c.handle_expiry(t0 + Duration::from_millis(3600));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].key(), "/n/1");
        assert!(c.get("/n/1").is_none());
        assert!(c.get("/n/2").is_some());
        assert!(!c.lease_keepalive(l, t0 + Duration::from_secs(4)));
        assert!(c.put("/n/3", vec![], Some(l)).is_err());
    }

    #[test]
    fn range_pages_in_key_order() {
        let mut c = MemCore::default();
        for k in ["/p/c", "/p/a", "/p/b", "/q/a"] {
            c.put(k, vec![], None).unwrap();
        }
        let p = c.range("/p/", None, Some(2));
        let keys: Vec<_> = p.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/p/a", "/p/b"]);
        assert!(p.more);
        let p = c.range("/p/", Some("/p/b"), Some(2));
        assert_eq!(p.kvs.len(), 1);
        assert!(!p.more);
    }

    #[tokio::test]
    async fn watch_sees_puts_and_lease_deletes() {
        let s = MemStore::start();
        let rev = s.range("/w/", None, None).await.unwrap().revision;
        let mut w = s.watch_prefix("/w/", Revision(rev.0 + 1)).await.unwrap();
        let l = s.lease_grant(Duration::from_secs(1)).await.unwrap();
        s.put("/w/x", b"1".to_vec(), Some(l)).await.unwrap();
        s.put("/other", b"1".to_vec(), None).await.unwrap();
        s.reap(Instant::now() + Duration::from_secs(5));
        let b = w.next().await.unwrap().unwrap();
        assert!(matches!(&b.events[0], WatchEvent::Put(kv) if kv.key == "/w/x"));
        let b = w.next().await.unwrap().unwrap();
        assert!(matches!(&b.events[0], WatchEvent::Delete { key, .. } if key == "/w/x"));
    }
}
