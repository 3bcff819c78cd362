//! Starting an edge: shards, hub, origin link and the HTTP server, wired together.

use crate::config::EdgeConfig;
use crate::edge::Edge;
use crate::metrics::Metrics;
use crate::transport::dtls::DtlsCertificate;
use anyhow::Context;
use control_plane::token::{TokenSigner, TokenVerifier};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// A running edge.
pub struct Running {
    pub http: SocketAddr,
    pub udp: Vec<SocketAddr>,
    pub edge: Arc<Edge>,
    pub server: tokio::task::JoinHandle<()>,
    /// Where child edges of rooms' fan-out trees dial this edge, `quic://NODE@HOST:PORT` (HOST
    /// the first advertised address): what registration publishes. `None` with an
    /// in-process origin.
    pub cascade_url: Option<String>,
}

/// Where the edge's rooms live.
pub enum Origins {
    /// An origin in this process (dev mode and single-node deployments).
    InProcess,
    /// Origins over cascade links (see [`crate::uplink`]); media through the edge's
    /// [`CascadeMedia`](crate::cascade::CascadeMedia).
    Linked {
        endpoint: Arc<cascade_proto::quic::LinkEndpoint>,
        directory: crate::uplink::OriginDirectory,
        /// Each room's media parent in its fan-out tree (see [`crate::tree`]); `None`: every
        /// room's media comes from its origin. Child edges are served either way.
        parents: Option<tokio::sync::mpsc::Receiver<crate::tree::ParentChange>>,
    },
}

/// Starts an edge with an in-process origin (dev mode and single-node deployments).
pub async fn start(
    config: EdgeConfig,
    verifier: TokenVerifier,
    dev_signer: Option<TokenSigner>,
) -> anyhow::Result<Running> {
    start_with(config, verifier, dev_signer, Origins::InProcess).await
}

/// The cascade endpoint of an edge: its node id and region in the hello, its credentials.
pub fn edge_endpoint(
    config: &EdgeConfig,
    credentials: &cascade_proto::quic::NodeCredentials,
    node: &str,
    region: &str,
) -> anyhow::Result<Arc<cascade_proto::quic::LinkEndpoint>> {
    use cascade_proto::link::{Hello, Label, NodeRole, PROTOCOL_VERSION};
    let hello = Hello {
        node: Label::new(node).map_err(|e| anyhow::anyhow!("node id {node:?}: {e}"))?,
        region: Label::new(region).map_err(|e| anyhow::anyhow!("region {region:?}: {e}"))?,
        role: NodeRole::Edge,
        version: PROTOCOL_VERSION,
    };
    Ok(Arc::new(
        cascade_proto::quic::LinkEndpoint::bind(
            config.cascade,
            credentials,
            cascade_proto::quic::LinkConfig::new(hello),
        )
        .with_context(|| format!("binding the cascade endpoint {}", config.cascade))?,
    ))
}

/// Starts an edge whose rooms live where `origins` says.
pub async fn start_with(
    config: EdgeConfig,
    verifier: TokenVerifier,
    dev_signer: Option<TokenSigner>,
    origins: Origins,
) -> anyhow::Result<Running> {
    crate::transport::install_crypto_provider();
    let metrics = Arc::new(Metrics::default());
    let cert = Arc::new(DtlsCertificate::generate().context("generating the DTLS certificate")?);
    let fingerprint = cert.fingerprint_sha256();
    let (room_events_tx, room_events_rx) = tokio::sync::mpsc::channel(1024);
    let workers = config.worker_count();
    let shards = crate::udp::start(&config, workers, cert, metrics.clone(), room_events_tx)
        .with_context(|| format!("binding UDP {}", config.udp))?;
    let udp = shards.local_addrs.clone();
    let mut bridge = None;
    let mut tree = None;
    let (to_origin, from_origin) = match origins {
        Origins::InProcess => crate::hub::spawn_local_origin(config.room_config()),
        Origins::Linked {
            endpoint,
            directory,
            parents,
        } => {
            let b = crate::media_hook::EdgeMediaBridge::new();
            bridge = Some(b.clone());
            tree = Some((endpoint.clone(), parents));
            crate::uplink::spawn(endpoint, directory, b, metrics.uplink.clone())
        }
    };
    let hub = crate::hub::spawn(to_origin, from_origin, room_events_rx);
    let ports = udp.iter().map(|a| a.port()).collect();
    let edge = Arc::new(Edge::new(
        config.clone(),
        shards,
        ports,
        hub,
        metrics,
        verifier,
        dev_signer,
        fingerprint,
    ));
    if let Some(b) = bridge {
        b.attach(edge.cascade.clone());
    }
    let mut cascade_url = None;
    if let Some((endpoint, parents)) = tree {
        let local = endpoint.local_addr()?;
        let host = edge.advertised_ips().first().copied().unwrap_or(local.ip());
        let url = format!(
            "quic://{}@{}",
            endpoint.hello().node,
            std::net::SocketAddr::new(host, local.port())
        );
        tracing::info!(%url, "serving child edges");
        cascade_url = Some(url);
        crate::tree::serve_children(endpoint.clone(), edge.cascade.clone(), edge.metrics.clone());
        if let Some(changes) = parents {
            crate::tree::spawn_follower(
                endpoint,
                edge.cascade.clone(),
                edge.metrics.clone(),
                changes,
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("binding HTTP {}", config.http))?;
    let http = listener.local_addr()?;
    let app = crate::http::router(edge.clone());
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(%http, udp = ?udp, workers, "edge listening");
    Ok(Running {
        http,
        udp,
        edge,
        server,
        cascade_url,
    })
}

/// The dev signing key: a 32-byte seed kept hex-encoded in `<data_dir>/dev-signing-key`,
/// created on first use (mode 0600). Dev only: deployments mint tokens on the control plane.
pub fn dev_signer(data_dir: &Path) -> anyhow::Result<TokenSigner> {
    let path = data_dir.join("dev-signing-key");
    let seed = match std::fs::read_to_string(&path) {
        Ok(hex) => parse_seed(hex.trim())
            .with_context(|| format!("{} is not a 64-digit hex key", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let seed: [u8; 32] = rand::random();
            let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
            write_private(&path, &hex).with_context(|| format!("writing {}", path.display()))?;
            seed
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(TokenSigner::from_seed("dev", &seed))
}

fn parse_seed(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses `kid:hex` (a 32-byte Ed25519 public key) for `--token-public-key`.
pub fn parse_public_key(s: &str) -> anyhow::Result<(String, [u8; 32])> {
    let (kid, hex) = s
        .split_once(':')
        .context("expected KID:HEX (64 hex digits)")?;
    let key = parse_seed(hex).context("the key must be 64 hex digits")?;
    Ok((kid.to_string(), key))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_key_persists_and_parses() {
        let dir = std::env::temp_dir().join(format!("kcs-devkey-{}", rand::random::<u32>()));
        let a = dev_signer(&dir).unwrap();
        let b = dev_signer(&dir).unwrap();
        assert_eq!(a.public_key(), b.public_key(), "the same key is reused");
        std::fs::write(dir.join("dev-signing-key"), "zz").unwrap();
        assert!(dev_signer(&dir).is_err());
        let hex: String = a.public_key().iter().map(|b| format!("{b:02x}")).collect();
        let (kid, key) = parse_public_key(&format!("dev:{hex}")).unwrap();
        assert_eq!((kid.as_str(), key), ("dev", a.public_key()));
        assert!(parse_public_key("nokid").is_err());
        std::fs::remove_dir_all(dir).ok();
    }
}
