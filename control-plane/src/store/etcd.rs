//! [`Store`] on a real etcd cluster (v3 API over gRPC, through etcd-client).
//!
//! The client balances over all configured endpoints, so one member down is invisible to
//! callers once its connection fails over. Every call is bounded by
//! [`EtcdConfig::request_timeout`]: a store that cannot answer in time is reported as
//! [`StoreError::Timeout`] (HTTP 503 at the API), never as a hung request. Connecting is lazy:
//! [`EtcdStore::connect`] succeeds with etcd down, and the store starts answering when etcd
//! comes back, with no restart.

use super::{
    CreateOutcome, KeyValue, LeaseId, RangePage, Revision, Store, StoreError, SwapOutcome,
    WatchBatch, WatchEvent, WatchStream,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use tokio_stream::StreamExt;

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the members, e.g. `["http://10.0.0.1:2379", ...]`. All of them, so that
    /// losing one member loses nothing.
    pub endpoints: Vec<String>,
    /// Bound on one store call (default 2 s: well above a healthy cluster's few milliseconds,
    /// short enough that an API client sees a 503 before its own timeout).
    #[serde(
        rename = "request_timeout_ms",
        default = "default_request_timeout",
        with = "crate::config::duration_ms"
    )]
    pub request_timeout: Duration,
    /// Bound on establishing a connection to one member (default 1 s; loopback or LAN).
    #[serde(
        rename = "connect_timeout_ms",
        default = "default_connect_timeout",
        with = "crate::config::duration_ms"
    )]
    pub connect_timeout: Duration,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            request_timeout: default_request_timeout(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

/// The production store. Cheap to clone (the gRPC channel is shared).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    timeout: Duration,
}

/// gRPC's INVALID_ARGUMENT status code (grpc/doc/statuscodes.md).
const GRPC_INVALID_ARGUMENT: i32 = 3;

fn unavailable(e: etcd_client::Error) -> StoreError {
    match e {
        etcd_client::Error::InvalidArgs(reason) => StoreError::Rejected { reason },
        // gRPC status 3 is INVALID_ARGUMENT: etcd refused the request itself.
        etcd_client::Error::GRpcStatus(s) if s.code() as i32 == GRPC_INVALID_ARGUMENT => {
            StoreError::Rejected {
                reason: s.message().to_owned(),
            }
        }
        other => StoreError::Unavailable {
            reason: other.to_string(),
        },
    }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv
        .key_str()
        .map_err(|_| StoreError::Rejected {
            reason: "non-UTF-8 key in store".into(),
        })?
        .to_owned();
    Ok(KeyValue {
        key,
        value: kv.value().to_vec(),
        mod_revision: Revision(kv.mod_revision()),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

/// The end of the key range that holds every key starting with `prefix` (etcd's convention:
/// increment the last byte that is not 0xff).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // An empty (or all-0xff) prefix: the whole key space, which etcd spells "\0".
    vec![0]
}

impl EtcdStore {
    /// Builds the client. Does not wait for etcd: the first calls fail with
    /// [`StoreError::Unavailable`] until a member answers.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_timeout(config.request_timeout)
            .with_connect_timeout(config.connect_timeout)
            // Keepalives notice a dead member's connection while the client is idle.
            .with_keep_alive(Duration::from_secs(5), config.request_timeout)
            .with_keep_alive_while_idle(true)
            // Refuse reads from a member cut off from the quorum rather than serve stale data.
            .with_require_leader(true);
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(Self {
            client,
            timeout: config.request_timeout,
        })
    }

    /// Runs one store call with the request timeout, retrying on errors that mean "this
    /// member is unreachable": the balanced channel still routes some calls to a dead member
    /// until its reconnect attempts give up, and the next try usually lands on a live one.
    async fn call<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match tokio::time::timeout_at(deadline, op(self.client.clone())).await {
                Err(_) => return Err(StoreError::Timeout(self.timeout)),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if retryable(&e) && attempts < MAX_ATTEMPTS => {
                    tracing::debug!(error = %e, attempts, "etcd call failed; retrying");
                    tokio::time::sleep_until(
                        (tokio::time::Instant::now() + RETRY_PAUSE).min(deadline),
                    )
                    .await;
                }
                Ok(Err(e)) => return Err(unavailable(e)),
            }
        }
    }
}

/// Tries per call. With one of three members dead a try fails with probability about 1/3,
/// so ten tries fail together about once in 60,000 calls; the request timeout bounds the total.
const MAX_ATTEMPTS: u32 = 10;

/// Pause between tries: short, the next try goes to another member.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// gRPC's UNAVAILABLE status code: the member could not be reached or has no leader.
const GRPC_UNAVAILABLE: i32 = 14;

fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() as i32 == GRPC_UNAVAILABLE,
        _ => false,
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    Revision(h.map(|h| h.revision()).unwrap_or(0))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .call(|mut c| async move { c.get(key, None).await })
            .await?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<RangePage, StoreError> {
        // Start just after `after`: the smallest key greater than it is `after` + "\0".
        let start = match after {
            Some(a) if a >= prefix => {
                let mut s = a.as_bytes().to_vec();
                s.push(0);
                s
            }
            _ => prefix.as_bytes().to_vec(),
        };
        let mut options = GetOptions::new().with_range(prefix_end(prefix));
        if let Some(limit) = limit {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let resp = self
            .call(|mut c| {
                let (start, options) = (start.clone(), options.clone());
                async move { c.get(start, Some(options)).await }
            })
            .await?;
        let kvs = resp
            .kvs()
            .iter()
            .map(convert_kv)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RangePage {
            kvs,
            revision: header_revision(resp.header()),
            more: resp.more(),
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let resp = self
            .call(|mut c| {
                let (value, options) = (value.clone(), options.clone());
                async move { c.put(key, value, options).await }
            })
            .await?;
        Ok(header_revision(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self
            .call(|mut c| async move { c.delete(key, None::<DeleteOptions>).await })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CreateOutcome, StoreError> {
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, options)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(CreateOutcome::Created(header_revision(resp.header())));
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                if let Some(existing) = get.kvs().first() {
                    return Ok(CreateOutcome::Exists(convert_kv(existing)?));
                }
            }
        }
        // The compare failed, so the key existed; it was deleted between compare and get,
        // which etcd's serializable transactions rule out. Report it as unavailable to retry.
        Err(StoreError::Unavailable {
            reason: format!("create of {key} lost a race with a delete"),
        })
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<SwapOutcome, StoreError> {
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected.0)])
            .and_then([TxnOp::put(key, value, options)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(SwapOutcome::Swapped(header_revision(resp.header())));
        }
        let mut current = None;
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                current = get.kvs().first().map(convert_kv).transpose()?;
            }
        }
        Ok(SwapOutcome::Conflict(current))
    }

    async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected.0)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd leases have whole-second TTLs; round up so a caller never gets less than asked.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await?;
        Ok(LeaseId(resp.id()))
    }

    async fn lease_keepalive(&self, id: LeaseId) -> Result<bool, StoreError> {
        // One request on a fresh keepalive stream: etcd-client reads the first response and
        // reports a TTL of 0 (lease gone) as a LeaseKeepAliveError, which we pass through as a
        // value so the retry loop leaves it alone.
        let outcome = self
            .call(|mut c| async move {
                match c.lease_keep_alive(id.0).await {
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(outcome)
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        match self
            .call(|mut c| async move { c.lease_revoke(id.0).await })
            .await
        {
            Ok(_) => Ok(()),
            // Revoking a lease that already expired is what the caller wanted anyway.
            Err(StoreError::Unavailable { reason }) if reason.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from.0);
        let stream = self
            .call(|mut c| {
                let options = options.clone();
                async move { c.watch(prefix, Some(options)).await }
            })
            .await?;
        let mapped = stream.map(|item| {
            let resp = item.map_err(unavailable)?;
            if resp.canceled() {
                return Err(StoreError::WatchLost {
                    reason: format!(
                        "cancelled (compacted at {}): {}",
                        resp.compact_revision(),
                        resp.cancel_reason()
                    ),
                });
            }
            let mut events = Vec::with_capacity(resp.events().len());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let kv = convert_kv(kv)?;
                events.push(match ev.event_type() {
                    EventType::Put => WatchEvent::Put(kv),
                    EventType::Delete => WatchEvent::Delete {
                        key: kv.key,
                        mod_revision: kv.mod_revision,
                    },
                });
            }
            Ok(WatchBatch {
                revision: header_revision(resp.header()),
                events,
            })
        });
        Ok(Box::pin(mapped))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/kcs/a"), b"/kcs/b".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
