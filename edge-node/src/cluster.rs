//! Running the edge as part of a cluster: the control plane in-process for `kcs dev`, and node
//! registration (edge and origin, under a lease, with load kept current) for every mode.

use crate::app::Running;
use anyhow::Context;
use control_plane::nodes::{NodeId, Region};
use control_plane::{
    ControlPlane, ControlPlaneConfig, NodeInfo, NodeKind, NodeLoad, NodeRegistration,
    RegistrationConfig, Store,
};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Lease TTL of our registrations: a dead node leaves DNS answers within this.
const REGISTRATION_TTL: Duration = Duration::from_secs(5);
/// How often the registered load is refreshed from our metrics.
const LOAD_REFRESH: Duration = Duration::from_secs(2);

/// The control plane of `kcs dev`: embedded store (dev only), REST API and geo-DNS on loopback,
/// signing with the dev key so `kcs token` and the API mint interchangeable tokens.
pub struct DevControlPlane {
    pub http: SocketAddr,
    pub dns: Option<SocketAddr>,
    pub zone: String,
    pub store: Arc<dyn Store>,
    pub keys: control_plane::keys::KeyLayout,
    pub verifier: control_plane::token::TokenVerifier,
}

/// Starts the dev control plane. `dns` of `None` disables the DNS server.
pub async fn start_dev_control_plane(
    data_dir: &Path,
    http: SocketAddr,
    dns: Option<SocketAddr>,
    region: &str,
) -> anyhow::Result<DevControlPlane> {
    // Make sure the dev key exists (created on first use), then sign with it.
    crate::app::dev_signer(data_dir)?;
    let zone = "kcs.localhost".to_string();
    let mut json = serde_json::json!({
        "http_listen": http,
        "signing_keys": [{"kid": "dev", "seed_file": data_dir.join("dev-signing-key")}],
        "routing": {"default_region": region},
    });
    if let Some(dns) = dns {
        json["dns"] = serde_json::json!({"zone": zone, "listen": dns, "ttl_secs": 5});
    }
    let config: ControlPlaneConfig =
        serde_json::from_value(json).context("dev control plane config")?;
    let store: Arc<dyn Store> = control_plane::MemStore::start();
    let cp = ControlPlane::bind(config, store.clone())
        .await
        .context("starting the dev control plane")?;
    let out = DevControlPlane {
        http: cp.http_addr(),
        dns: cp.dns_addr(),
        zone,
        store,
        keys: cp.keys().clone(),
        verifier: cp.verifier(),
    };
    tokio::spawn(async move {
        if let Err(e) = cp.run(std::future::pending()).await {
            tracing::error!(error = %e, "control plane stopped");
        }
    });
    Ok(out)
}

/// Registers this edge (and its in-process origin) and keeps the registrations and their load
/// current until the process ends.
pub async fn register(
    store: Arc<dyn Store>,
    keys: &control_plane::keys::KeyLayout,
    running: &Running,
    node_id: &str,
    region: &str,
    public_url: &str,
) -> anyhow::Result<()> {
    let region = Region::new(region).map_err(|e| anyhow::anyhow!("region {region:?}: {e}"))?;
    let addresses: Vec<IpAddr> = running.edge.advertised_ips().to_vec();
    let mut regs = Vec::new();
    for (kind, suffix) in [(NodeKind::Edge, "edge"), (NodeKind::Origin, "origin")] {
        let id = NodeId::new(format!("{node_id}-{suffix}"))
            .map_err(|e| anyhow::anyhow!("node id: {e}"))?;
        let info = NodeInfo {
            id,
            kind,
            region: region.clone(),
            addresses: addresses.clone(),
            url: public_url.to_string(),
            capacity: 10_000,
            load: NodeLoad::default(),
            draining: false,
            healthy: true,
        };
        let reg = NodeRegistration::register(
            store.clone(),
            keys,
            info,
            RegistrationConfig::with_ttl(REGISTRATION_TTL),
        )
        .await
        .with_context(|| format!("registering the {suffix}"))?;
        regs.push(reg);
    }
    let metrics = running.edge.metrics.clone();
    tokio::spawn(async move {
        let mut last_packets = 0u64;
        let mut tick = tokio::time::interval(LOAD_REFRESH);
        loop {
            tick.tick().await;
            let packets =
                metrics.media.packets_out.load(Relaxed) + metrics.media.packets_in.load(Relaxed);
            let load = NodeLoad {
                participants: metrics.participants.load(Relaxed).max(0) as u32,
                packets_per_sec: packets.saturating_sub(last_packets)
                    / LOAD_REFRESH.as_secs().max(1),
                cpu_percent: 0.0,
            };
            last_packets = packets;
            for r in &regs {
                r.update(|info| info.load = load);
                if let Err(e) = r.refresh().await {
                    tracing::warn!(error = %e, "node registration refresh failed (retrying)");
                }
            }
        }
    });
    Ok(())
}
