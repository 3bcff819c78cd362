//! The edge's shared state: what every signaling session and HTTP handler reaches.
//!
//! Ownership: media state belongs to the shards; room state to the origin (through the hub);
//! this struct only holds handles, configuration and the registry of publications on this edge
//! (so a subscriber can find the shard and codec of a track), each behind its own short lock.

use crate::config::EdgeConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::sdp::{Fingerprint, LocalTransport};
use crate::sfu::{PublicationId, SessionId, SubscriptionId, TransportId};
use crate::transport::ice::IceCredentials;
use crate::udp::Shards;
use cascade_proto::{Identity, ParticipantId, RoomId, TrackId, TrackSource};
use control_plane::token::{TokenSigner, TokenVerifier};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

/// A track published on this edge, as subscribers need it.
#[derive(Debug, Clone)]
pub struct LocalPublication {
    pub id: PublicationId,
    pub participant: ParticipantId,
    pub source: TrackSource,
    pub codec: crate::sdp::Codec,
    pub kind: crate::sdp::MediaKind,
    pub layers: u8,
}

/// Everything shared.
pub struct Edge {
    pub config: EdgeConfig,
    pub shards: Shards,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    pub verifier: RwLock<TokenVerifier>,
    /// Present in dev mode only: mints tokens for `/dev/token`.
    pub dev_signer: Option<TokenSigner>,
    pub fingerprint: String,
    /// ICE candidate addresses per shard.
    candidates: Vec<Vec<SocketAddr>>,
    ips: Vec<IpAddr>,
    /// Shared with [`crate::cascade::CascadeMedia`], which adds relayed publications.
    publications: Arc<Mutex<HashMap<(RoomId, TrackId), LocalPublication>>>,
    /// The media side of cascade links (relayed publications, link sinks).
    pub cascade: Arc<crate::cascade::CascadeMedia>,
    /// WHIP/WHEP sessions by id, for DELETE.
    pub http_sessions: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
    /// Signaling connections that dropped, by resume token, for `reconnect:attempt`.
    resumable: Mutex<HashMap<String, crate::ws::Parked>>,
    /// Where to tell an identity it was invited somewhere (`participant:add`), per connection.
    notices: Mutex<HashMap<Identity, Vec<mpsc::Sender<String>>>>,
    ids: AtomicU64,
}

impl Edge {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: EdgeConfig,
        shards: Shards,
        shard_ports: Vec<u16>,
        hub: Hub,
        metrics: Arc<Metrics>,
        verifier: TokenVerifier,
        dev_signer: Option<TokenSigner>,
        fingerprint: String,
    ) -> Self {
        let ips = advertised_ips(&config);
        let candidates = shard_ports
            .iter()
            .map(|port| ips.iter().map(|ip| SocketAddr::new(*ip, *port)).collect())
            .collect();
        let publications = Arc::new(Mutex::new(HashMap::new()));
        let tracks = {
            let hub = hub.clone();
            Arc::new(move |room: &RoomId, track: TrackId| hub.track_info(room, track))
        };
        let cascade = Arc::new(crate::cascade::CascadeMedia::new(
            shards.clone(),
            publications.clone(),
            tracks,
        ));
        Self {
            config,
            shards,
            hub,
            metrics,
            verifier: RwLock::new(verifier),
            dev_signer,
            fingerprint,
            candidates,
            ips,
            publications,
            cascade,
            http_sessions: Mutex::new(HashMap::new()),
            resumable: Mutex::new(HashMap::new()),
            notices: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(1),
        }
    }

    /// A fresh id for a transport, publication, subscription or session (unique per edge).
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
    pub fn transport_id(&self) -> TransportId {
        TransportId(self.next_id())
    }
    pub fn publication_id(&self) -> PublicationId {
        PublicationId(self.next_id())
    }
    pub fn subscription_id(&self) -> SubscriptionId {
        SubscriptionId(self.next_id())
    }
    pub fn session_id(&self) -> SessionId {
        SessionId(self.next_id())
    }

    /// Our side of a new transport on `shard`: fresh ICE credentials, our certificate
    /// fingerprint and the shard's candidates.
    pub fn local_transport(&self, shard: usize) -> (IceCredentials, LocalTransport) {
        let creds = IceCredentials::random();
        let local = LocalTransport {
            ice_ufrag: creds.ufrag.clone(),
            ice_pwd: creds.pwd.clone(),
            fingerprint: Fingerprint {
                algorithm: "sha-256".into(),
                value: self.fingerprint.clone(),
            },
            candidates: self.candidates.get(shard).cloned().unwrap_or_default(),
        };
        (creds, local)
    }

    /// Registers a publication of this edge; upstream subscribes that reached the edge before
    /// it are bound to it ([`crate::cascade::CascadeMedia::local_published`]).
    pub async fn add_publication(&self, room: &RoomId, track: TrackId, p: LocalPublication) {
        lock(&self.publications).insert((room.clone(), track), p);
        self.cascade.local_published(room, track).await;
    }
    pub fn remove_publication(&self, room: &RoomId, track: TrackId) -> Option<LocalPublication> {
        lock(&self.publications).remove(&(room.clone(), track))
    }
    pub fn publication(&self, room: &RoomId, track: TrackId) -> Option<LocalPublication> {
        lock(&self.publications)
            .get(&(room.clone(), track))
            .cloned()
    }

    /// The addresses put in ICE candidates (and registered for geo-DNS).
    pub fn advertised_ips(&self) -> &[IpAddr] {
        &self.ips
    }

    /// Keeps a dropped connection for resuming.
    pub fn park(&self, token: String, parked: crate::ws::Parked) {
        if lock(&self.resumable).insert(token, parked).is_none() {
            self.metrics.ws_resumable.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes a parked connection (once).
    pub fn unpark(&self, token: &str) -> Option<crate::ws::Parked> {
        let parked = lock(&self.resumable).remove(token);
        if parked.is_some() {
            self.metrics.ws_resumable.fetch_sub(1, Ordering::Relaxed);
        }
        parked
    }

    /// Connections parked now.
    pub fn parked_count(&self) -> usize {
        lock(&self.resumable).len()
    }

    /// Lets `identity`'s connection hear of invitations.
    pub fn register_notices(&self, identity: &Identity, tx: mpsc::Sender<String>) {
        let mut n = lock(&self.notices);
        let list = n.entry(identity.clone()).or_default();
        list.retain(|t| !t.is_closed());
        list.push(tx);
    }

    /// Tells every connection of `identity` on this edge (closed ones are forgotten).
    pub fn notify(&self, identity: &Identity, frame: String) {
        let mut n = lock(&self.notices);
        if let Some(list) = n.get_mut(identity) {
            list.retain(|t| match t.try_send(frame.clone()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            if list.is_empty() {
                n.remove(identity);
            }
        }
    }

    pub fn verifier(&self) -> std::sync::RwLockReadGuard<'_, TokenVerifier> {
        self.verifier.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The addresses we advertise: configured ones; else the UDP bind address if specific; else every
/// IPv4 interface address (loopback included, so dev works in a browser on the same machine).
fn advertised_ips(config: &EdgeConfig) -> Vec<IpAddr> {
    if !config.advertise.is_empty() {
        return config.advertise.clone();
    }
    if !config.udp.ip().is_unspecified() {
        return vec![config.udp.ip()];
    }
    let mut ips: Vec<IpAddr> = webrtc_util::ifaces::ifaces()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| i.addr.map(|a| a.ip()))
        .filter(|ip| ip.is_ipv4())
        .collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    ips
}
