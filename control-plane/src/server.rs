//! The control plane as one service: REST API + geo-DNS + registry mirror + reassigner, on a
//! given store. This is what `kcs control-plane` (etcd) and `kcs dev` (embedded dev store) run.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use control_plane::{ControlPlane, ControlPlaneConfig, store::MemStore};
//! let config: ControlPlaneConfig = serde_json::from_str(r#"{"http_listen": "127.0.0.1:8080"}"#)?;
//! let cp = ControlPlane::bind(config, MemStore::start()).await?;
//! println!("API on {}", cp.http_addr());
//! cp.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! [`ControlPlane::bind`] validates the config and binds every socket before anything runs, so
//! a bad config or a taken port fails at start-up with a clear error; [`ControlPlane::run`]
//! serves until the shutdown future completes, then stops every task it started.

use crate::api::{self, ApiConfig, ApiState};
use crate::dns::{self, DnsConfigError, GeoDns, GeoDnsConfig, GeoDnsHandler};
use crate::fanout::FanoutConfig;
use crate::keys::{KeyLayout, DEFAULT_ROOT};
use crate::nodes::{follow_nodes, NodeTable, Region};
use crate::placement::Placer;
use crate::routing::{EdgeRouter, RoutingConfig, RoutingError};
use crate::store::{EtcdConfig, Store};
use crate::token::{SigningKeys, TokenSigner, TokenVerifier};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// One token signing key. The first configured key signs; the others are published for
/// verification only (rotation: add the new key first, keep the old one until its tokens
/// expire, then remove it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKeyConfig {
    /// Key id carried in tokens (`kid`), e.g. the month it was made: `2026-11`.
    pub kid: String,
    /// The 32-byte Ed25519 seed as 64 hex digits.
    #[serde(default)]
    pub seed_hex: Option<String>,
    /// A file holding the seed as 64 hex digits (preferred: keeps the secret out of configs).
    #[serde(default)]
    pub seed_file: Option<PathBuf>,
}

/// The control plane's configuration (the `[control_plane]` section of the kcs config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// REST API listen address (default `0.0.0.0:8080`).
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// Root of every store key (default `/kcs/v1`).
    #[serde(default = "default_root")]
    pub key_root: String,
    /// etcd endpoints; required by `kcs control-plane`, ignored by `kcs dev` (embedded store).
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    /// Geo-DNS; absent: no DNS server.
    #[serde(default)]
    pub dns: Option<GeoDnsConfig>,
    /// Client -> region table and region latencies.
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub api: ApiConfig,
    /// Token keys, signing key first. Empty: a random key per start (dev only: tokens die
    /// with the process).
    #[serde(default)]
    pub signing_keys: Vec<SigningKeyConfig>,
    /// Re-place rooms of origins that disappear (default true; exactly one control plane
    /// instance needs it, but several are safe: placement is transactional).
    #[serde(default = "yes")]
    pub reassign_rooms: bool,
    /// Plan every room's fan-out tree from the edges' presence (default true; run it on one
    /// control plane instance: see `trees`).
    #[serde(default = "yes")]
    pub plan_trees: bool,
    /// Children per tree node at most, the origin included (default 8).
    #[serde(default = "default_tree_fanout")]
    pub tree_fanout: usize,
}

fn default_tree_fanout() -> usize {
    FanoutConfig::default().max_children
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_root() -> String {
    DEFAULT_ROOT.to_owned()
}
fn yes() -> bool {
    true
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            http_listen: default_http_listen(),
            key_root: default_root(),
            etcd: None,
            dns: None,
            routing: RoutingConfig::default(),
            api: ApiConfig::default(),
            signing_keys: Vec::new(),
            reassign_rooms: true,
            plan_trees: true,
            tree_fanout: default_tree_fanout(),
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlPlaneError {
    #[error("routing config: {0}")]
    Routing(#[from] RoutingError),
    #[error("dns config: {0}")]
    Dns(#[from] DnsConfigError),
    #[error("signing key {kid}: {reason}")]
    SigningKey { kid: String, reason: String },
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what} server failed: {source}")]
    Serve {
        what: &'static str,
        source: std::io::Error,
    },
}

fn parse_seed(kid: &str, hex: &str) -> Result<[u8; 32], ControlPlaneError> {
    let bad = |reason: &str| ControlPlaneError::SigningKey {
        kid: kid.to_owned(),
        reason: reason.to_owned(),
    };
    let hex = hex.trim();
    if hex.len() != 64 {
        return Err(bad("seed must be 64 hex digits"));
    }
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| bad("seed is not hexadecimal"))?;
    }
    Ok(seed)
}

/// Builds the key set from the config (see [`ControlPlaneConfig::signing_keys`]).
pub fn signing_keys(configs: &[SigningKeyConfig]) -> Result<SigningKeys, ControlPlaneError> {
    let mut signers = Vec::new();
    for c in configs {
        let hex = match (&c.seed_hex, &c.seed_file) {
            (Some(h), None) => h.clone(),
            (None, Some(path)) => {
                std::fs::read_to_string(path).map_err(|e| ControlPlaneError::SigningKey {
                    kid: c.kid.clone(),
                    reason: format!("cannot read {}: {e}", path.display()),
                })?
            }
            _ => {
                return Err(ControlPlaneError::SigningKey {
                    kid: c.kid.clone(),
                    reason: "give exactly one of seed_hex and seed_file".into(),
                })
            }
        };
        signers.push(TokenSigner::from_seed(
            c.kid.clone(),
            &parse_seed(&c.kid, &hex)?,
        ));
    }
    let mut iter = signers.into_iter();
    let Some(current) = iter.next() else {
        tracing::warn!("no signing key configured: using a random one (dev only)");
        return Ok(SigningKeys::new(TokenSigner::generate("dev")));
    };
    Ok(iter.fold(SigningKeys::new(current), |keys, s| {
        keys.with_retired(s.kid().to_owned(), s.public_key())
    }))
}

/// A bound, not yet running control plane.
pub struct ControlPlane {
    config: ControlPlaneConfig,
    store: Arc<dyn Store>,
    keys: KeyLayout,
    signing: Arc<RwLock<SigningKeys>>,
    nodes: Arc<RwLock<NodeTable>>,
    router: Arc<EdgeRouter>,
    http: tokio::net::TcpListener,
    dns: Option<(GeoDns, tokio::net::UdpSocket, tokio::net::TcpListener)>,
}

/// How many OS-chosen ports DNS tries before giving up (port 0 in the config).
const DNS_PORT_ATTEMPTS: usize = 32;

/// Binds the DNS sockets: UDP and TCP on one port. With port 0 the OS picks the UDP port, and
/// TCP may find that port taken (another process's TCP socket); then another port is tried, so
/// a dev node never fails to start on a collision it did not choose.
async fn bind_dns(
    listen: SocketAddr,
) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener), ControlPlaneError> {
    let attempts = if listen.port() == 0 {
        DNS_PORT_ATTEMPTS
    } else {
        1
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = tokio::net::UdpSocket::bind(listen)
            .await
            .map_err(|source| ControlPlaneError::Bind {
                what: "DNS (UDP)",
                addr: listen,
                source,
            })?;
        let tcp_addr = udp.local_addr().unwrap_or(listen);
        match tokio::net::TcpListener::bind(tcp_addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < attempts => {
                tracing::debug!(port = tcp_addr.port(), "DNS TCP port taken; trying another");
            }
            Err(source) => {
                return Err(ControlPlaneError::Bind {
                    what: "DNS (TCP)",
                    addr: tcp_addr,
                    source,
                })
            }
        }
    }
}

impl ControlPlane {
    /// Validates the config and binds the HTTP (and DNS) sockets.
    pub async fn bind(
        config: ControlPlaneConfig,
        store: Arc<dyn Store>,
    ) -> Result<Self, ControlPlaneError> {
        let router = Arc::new(EdgeRouter::new(&config.routing)?);
        let signing = Arc::new(RwLock::new(signing_keys(&config.signing_keys)?));
        let http = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| ControlPlaneError::Bind {
                what: "HTTP",
                addr: config.http_listen,
                source,
            })?;
        let dns = match &config.dns {
            Some(d) => {
                let regions: Vec<_> = config
                    .routing
                    .regions
                    .keys()
                    .chain(config.routing.latency_ms.keys())
                    .cloned()
                    .collect();
                let core = GeoDns::new(d, EdgeRouter::new(&config.routing)?, regions)?;
                let (udp, tcp) = bind_dns(d.listen).await?;
                Some((core, udp, tcp))
            }
            None => None,
        };
        Ok(Self {
            keys: KeyLayout::new(&config.key_root),
            config,
            store,
            signing,
            nodes: Arc::new(RwLock::new(NodeTable::new())),
            router,
            http,
            dns,
        })
    }

    /// Where the REST API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.config.http_listen)
    }

    /// Where the DNS listens (UDP and TCP), if enabled.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns
            .as_ref()
            .and_then(|(_, udp, _)| udp.local_addr().ok())
    }

    /// The key layout in use (for node registrations in the same process).
    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    /// A token verifier for every published key: what an in-process edge uses in dev mode
    /// (remote edges build the same from `GET /v1/keys`).
    pub fn verifier(&self) -> TokenVerifier {
        self.signing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verifier()
    }

    /// The shared key set, e.g. to rotate keys at run time.
    pub fn signing_keys(&self) -> Arc<RwLock<SigningKeys>> {
        self.signing.clone()
    }

    /// Serves until `shutdown` completes, then stops every task it started.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ControlPlaneError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                // Err: the sender is gone, which also means stop.
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(follow_nodes(
            self.store.clone(),
            self.keys.clone(),
            self.nodes.clone(),
            || {},
            stopped(),
        ));
        if self.config.reassign_rooms {
            let placer = Placer::new(self.store.clone(), self.keys.clone());
            tasks.spawn(placer.run_reassigner(stopped()));
        }
        if self.config.plan_trees {
            let router = self.router.clone();
            let config = FanoutConfig {
                max_children: self.config.tree_fanout.max(2),
            };
            tasks.spawn(crate::trees::run_tree_keeper(
                self.store.clone(),
                self.keys.clone(),
                config,
                move |a: &Region, b: &Region| router.latency(a, b),
                stopped(),
            ));
        }
        let mut dns_task = None;
        if let Some((core, udp, tcp)) = self.dns {
            let handler = GeoDnsHandler::new(Arc::new(core), self.nodes.clone());
            dns_task = Some(tokio::spawn(dns::serve(handler, udp, tcp, stopped())));
        }
        let state = ApiState::new(
            self.store.clone(),
            self.keys.clone(),
            self.signing.clone(),
            self.router.clone(),
            self.nodes.clone(),
            self.config.api.clone(),
        );
        let app = api::router(Arc::new(state)).into_make_service_with_connect_info::<SocketAddr>();
        let http = axum::serve(self.http, app).with_graceful_shutdown(stopped());
        let http_task = tokio::spawn(async move { http.await });

        shutdown.await;
        let _ = stop_tx.send(true);
        let http_result = http_task.await;
        let dns_result = match dns_task {
            Some(t) => Some(t.await),
            None => None,
        };
        while tasks.join_next().await.is_some() {}
        match http_result {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(ControlPlaneError::Serve {
                    what: "HTTP",
                    source,
                })
            }
            Err(e) => {
                return Err(ControlPlaneError::Serve {
                    what: "HTTP",
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
        match dns_result {
            Some(Ok(Err(source))) => Err(ControlPlaneError::Serve {
                what: "DNS",
                source,
            }),
            Some(Err(e)) => Err(ControlPlaneError::Serve {
                what: "DNS",
                source: std::io::Error::other(e.to_string()),
            }),
            _ => Ok(()),
        }
    }
}

/// Binds and serves until `shutdown` (see [`ControlPlane`]).
pub async fn run(
    config: ControlPlaneConfig,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlPlaneError> {
    ControlPlane::bind(config, store).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: ControlPlaneConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, ControlPlaneConfig::default());
        assert_eq!(c.http_listen.port(), 8080);
        assert!(c.reassign_rooms);
        let c: ControlPlaneConfig = serde_json::from_str(
            r#"{"etcd": {"endpoints": ["http://127.0.0.1:2379"], "request_timeout_ms": 500}}"#,
        )
        .unwrap();
        let etcd = c.etcd.unwrap();
        assert_eq!(etcd.request_timeout, std::time::Duration::from_millis(500));
        assert_eq!(etcd.connect_timeout, std::time::Duration::from_secs(1));
        for bad in [
            r#"{"http_listn": "0.0.0.0:1"}"#,
            r#"{"dns": {"zone": "x.example", "ttl": 5}}"#,
            r#"{"api": {"api_key": "k"}}"#,
            r#"{"etcd": {"endpoints": [], "timeout": 1}}"#,
            r#"{"routing": {"regions": {"eu": ["192.0.2.1/24"]}}}"#,
        ] {
            assert!(
                serde_json::from_str::<ControlPlaneConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }

    /// With port 0, DNS gets one port for UDP and TCP even when many TCP ports are taken by
    /// others (the CI failure this guards: TCP found the OS's UDP pick in use).
    #[tokio::test]
    async fn dns_on_port_zero_binds_udp_and_tcp_on_one_port_despite_taken_tcp_ports() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Hold ~3% of the ephemeral range as TCP listeners: over 100 binds, a collision is
        // all but certain (1 - 0.97^100 > 95%), and each must be survived.
        let _taken: Vec<_> = (0..900)
            .map(|_| std::net::TcpListener::bind(loopback).unwrap())
            .collect();
        for _ in 0..100 {
            let (udp, tcp) = bind_dns(loopback).await.expect("a free pair");
            assert_eq!(
                udp.local_addr().unwrap().port(),
                tcp.local_addr().unwrap().port()
            );
        }
        // A fixed port that is taken is refused at once, naming the socket.
        let held = std::net::TcpListener::bind(loopback).unwrap();
        let err = bind_dns(held.local_addr().unwrap()).await.unwrap_err();
        assert!(err.to_string().contains("DNS (TCP)"), "{err}");
    }

    #[test]
    fn signing_keys_from_config() {
        let seed = "11".repeat(32);
        let keys = signing_keys(&[
            SigningKeyConfig {
                kid: "new".into(),
                seed_hex: Some(seed.clone()),
                seed_file: None,
            },
            SigningKeyConfig {
                kid: "old".into(),
                seed_hex: Some("22".repeat(32)),
                seed_file: None,
            },
        ])
        .unwrap();
        assert_eq!(keys.signer().kid(), "new");
        assert_eq!(keys.jwks().keys.len(), 2);
        let same = TokenSigner::from_seed("new", &[0x11; 32]);
        assert_eq!(keys.signer().public_key(), same.public_key());
        for (hex, file) in [
            (Some("zz".repeat(32)), None),
            (Some("11".into()), None),
            (None, None),
        ] {
            let r = signing_keys(&[SigningKeyConfig {
                kid: "k".into(),
                seed_hex: hex,
                seed_file: file,
            }]);
            assert!(r.is_err());
        }
    }
}
