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

/// The REST API key of `kcs dev` (dev only; deployments configure their own).
pub const DEV_API_KEY: &str = "kcs-dev-api-key";

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
        "api": {"api_keys": [DEV_API_KEY]},
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
    register_kinds(store, keys, running, node_id, region, public_url, true)
        .await
        .map(drop)
}

/// Registers this edge alone: its rooms live on origins over cascade links. Returns the
/// registration (its lease holds the edge's presence records, see [`crate::membership`]).
pub async fn register_edge(
    store: Arc<dyn Store>,
    keys: &control_plane::keys::KeyLayout,
    running: &Running,
    node_id: &str,
    region: &str,
    public_url: &str,
) -> anyhow::Result<NodeRegistration> {
    register_kinds(store, keys, running, node_id, region, public_url, false).await
}

/// The registered id of the edge on node `node_id` (the key of its registration, presence
/// records and tree positions).
pub fn edge_id(node_id: &str) -> anyhow::Result<NodeId> {
    NodeId::new(format!("{node_id}-edge")).map_err(|e| anyhow::anyhow!("node id: {e}"))
}

/// Registers a `kcs origin` under `node_id` with its cascade URL (`quic://NODE@HOST:PORT`, what
/// placement hands edges to dial) and keeps the registration alive until the process ends.
pub async fn register_origin(
    store: Arc<dyn Store>,
    keys: &control_plane::keys::KeyLayout,
    node_id: &str,
    region: &str,
    cascade_url: &str,
    addresses: Vec<IpAddr>,
    metrics: Arc<crate::origin_server::OriginMetrics>,
) -> anyhow::Result<()> {
    let info = NodeInfo {
        id: NodeId::new(node_id).map_err(|e| anyhow::anyhow!("node id: {e}"))?,
        kind: NodeKind::Origin,
        region: Region::new(region).map_err(|e| anyhow::anyhow!("region {region:?}: {e}"))?,
        addresses,
        url: cascade_url.to_string(),
        capacity: 10_000,
        load: NodeLoad::default(),
        draining: false,
        healthy: true,
    };
    let reg = NodeRegistration::register(
        store,
        keys,
        info,
        RegistrationConfig::with_ttl(REGISTRATION_TTL),
    )
    .await
    .context("registering the origin")?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LOAD_REFRESH);
        loop {
            tick.tick().await;
            let participants = metrics.participants.load(Relaxed).max(0) as u32;
            reg.update(|info| info.load.participants = participants);
            if let Err(e) = reg.refresh().await {
                tracing::warn!(error = %e, "origin registration refresh failed (retrying)");
            }
        }
    });
    Ok(())
}

async fn register_kinds(
    store: Arc<dyn Store>,
    keys: &control_plane::keys::KeyLayout,
    running: &Running,
    node_id: &str,
    region: &str,
    public_url: &str,
    with_origin: bool,
) -> anyhow::Result<NodeRegistration> {
    let region = Region::new(region).map_err(|e| anyhow::anyhow!("region {region:?}: {e}"))?;
    let addresses: Vec<IpAddr> = running.edge.advertised_ips().to_vec();
    let mut regs = Vec::new();
    let kinds: &[(NodeKind, &str)] = if with_origin {
        &[(NodeKind::Origin, "origin"), (NodeKind::Edge, "edge")]
    } else {
        &[(NodeKind::Edge, "edge")]
    };
    for &(kind, suffix) in kinds {
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
    // The edge's registration is the last one registered.
    let edge_reg = regs.last().cloned().context("no registration")?;
    let metrics = running.edge.metrics.clone();
    tokio::spawn(async move {
        let mut last_packets = 0u64;
        let mut last_cpu = process_cpu_seconds();
        let mut tick = tokio::time::interval(LOAD_REFRESH);
        loop {
            tick.tick().await;
            let packets =
                metrics.media.packets_out.load(Relaxed) + metrics.media.packets_in.load(Relaxed);
            let load = NodeLoad {
                participants: metrics.participants.load(Relaxed).max(0) as u32,
                packets_per_sec: packets.saturating_sub(last_packets)
                    / LOAD_REFRESH.as_secs().max(1),
                cpu_percent: {
                    let cpu = process_cpu_seconds();
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                    let used = (cpu - last_cpu).max(0.0);
                    last_cpu = cpu;
                    (100.0 * used / LOAD_REFRESH.as_secs_f64() / cores) as f32
                },
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
    Ok(edge_reg)
}

/// CPU time (user + system) this process has used, from /proc/self/stat (0 where unavailable).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// How often an edge refetches the control plane's token keys (the API says max-age=60).
pub const KEYS_REFRESH: Duration = Duration::from_secs(60);

/// Fetches the control plane's published token keys (`GET <base>/v1/keys`, a JWK set) and
/// builds a verifier from them. Plain `http://` only: the control plane API is an internal
/// service; put it behind the deployment's mTLS mesh or a local sidecar.
pub async fn fetch_keys(base: &str) -> anyhow::Result<control_plane::token::TokenVerifier> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = base
        .strip_prefix("http://")
        .context("--control-plane must be an http:// URL")?;
    let (authority, prefix) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .context("connecting to the control plane timed out")?
    .with_context(|| format!("connecting to {authority}"))?;
    let request = format!(
        "GET {prefix}/v1/keys HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        stream.take(1 << 20).read_to_end(&mut response),
    )
    .await
    .context("reading the key set timed out")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    anyhow::ensure!(status == "200", "GET /v1/keys answered {status}");
    let jwks: control_plane::token::Jwks =
        serde_json::from_str(body).context("the key set is not a JWK set")?;
    control_plane::token::TokenVerifier::from_jwks(&jwks)
        .map_err(|e| anyhow::anyhow!("key set: {e}"))
}

/// Keeps the edge's verifier in step with the control plane's keys (rotation), every
/// [`KEYS_REFRESH`]; a failed fetch keeps the keys we have.
pub fn follow_keys(edge: Arc<crate::edge::Edge>, base: String) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(KEYS_REFRESH).await;
            match fetch_keys(&base).await {
                Ok(v) => *edge.verifier.write().unwrap_or_else(|e| e.into_inner()) = v,
                Err(e) => {
                    tracing::warn!(error = %e, "refreshing token keys failed; keeping the current ones")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::{Identity, Role, RoomId};

    #[tokio::test]
    async fn an_edge_verifies_with_the_control_planes_published_keys() {
        let dir = std::env::temp_dir().join(format!("kcs-keys-{}", rand::random::<u32>()));
        let cp = start_dev_control_plane(&dir, "127.0.0.1:0".parse().unwrap(), None, "local")
            .await
            .unwrap();
        let verifier = fetch_keys(&format!("http://{}", cp.http)).await.unwrap();
        let signer = crate::app::dev_signer(&dir).unwrap();
        let token = signer.mint(
            RoomId::new("r").unwrap(),
            Identity::new("a").unwrap(),
            Role::Host,
            None,
            control_plane::token::unix_now(),
            60,
        );
        assert_eq!(verifier.verify(&token).unwrap().identity.as_str(), "a");
        let stranger = control_plane::token::TokenSigner::generate("dev");
        let forged = stranger.mint(
            RoomId::new("r").unwrap(),
            Identity::new("a").unwrap(),
            Role::Host,
            None,
            control_plane::token::unix_now(),
            60,
        );
        assert!(verifier.verify(&forged).is_err());
        assert!(
            fetch_keys("https://example.invalid").await.is_err(),
            "only http:// is supported"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
