//! `kcs`: the KCS command line. `kcs dev` runs a whole single-machine system; `kcs edge` an edge
//! node; `kcs token` mints a dev join token.

use anyhow::Context;
use cascade_proto::{Identity, Role, RoomId};
use clap::{Parser, Subcommand};
use control_plane::token::{unix_now, TokenVerifier};
use edge_node::config::EdgeArgs;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kcs",
    version,
    about = "KCS: an edge-distributed cascaded SFU for meetings"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on this machine (edge + in-process origin) with the dev signing key,
    /// print the URL to open and a host token.
    Dev {
        #[command(flatten)]
        edge: EdgeArgs,
        /// Room the printed URL and token are for.
        #[arg(long, default_value = "demo")]
        room: String,
        /// The in-process control plane's REST API [default: a free loopback port].
        #[arg(long, env = "KCS_CONTROL_PLANE_HTTP", default_value = "127.0.0.1:0")]
        control_plane_http: std::net::SocketAddr,
        /// The in-process geo-DNS (zone kcs.localhost) [default: a free loopback port].
        #[arg(long, env = "KCS_DNS", default_value = "127.0.0.1:0")]
        dns: std::net::SocketAddr,
        /// Region this machine is in.
        #[arg(long, env = "KCS_REGION", default_value = "local")]
        region: String,
    },
    /// Run the control plane (REST API, geo-DNS, placement) against etcd.
    ControlPlane {
        /// Configuration file (TOML; see docs/control-plane.md). Must name etcd endpoints.
        #[arg(long, env = "KCS_CONTROL_PLANE_CONFIG")]
        config: PathBuf,
        /// Log filter.
        #[arg(long, env = "KCS_LOG", default_value = "info")]
        log: String,
    },
    /// Run an edge node that trusts the given token public keys.
    Edge {
        #[command(flatten)]
        edge: EdgeArgs,
        /// Token verification key as KID:HEX (32-byte Ed25519 public key); repeatable.
        #[arg(
            long = "token-public-key",
            env = "KCS_TOKEN_PUBLIC_KEY",
            value_delimiter = ',',
            required = true
        )]
        token_public_keys: Vec<String>,
        /// etcd endpoints to register this node in (comma-separated); none: no registration.
        #[arg(long, env = "KCS_ETCD", value_delimiter = ',')]
        etcd: Vec<String>,
        /// Region this node serves (for placement and geo-DNS).
        #[arg(long, env = "KCS_REGION", default_value = "local")]
        region: String,
        /// Node id in the registry [default: the host name].
        #[arg(long, env = "KCS_NODE_ID")]
        node_id: Option<String>,
        /// URL clients reach this node's HTTP side at [default: http://<http address>].
        #[arg(long, env = "KCS_PUBLIC_URL")]
        public_url: Option<String>,
    },
    /// Print a join token signed with the dev key.
    Token {
        #[arg(long)]
        room: String,
        #[arg(long)]
        identity: String,
        /// host, co-host, presenter, attendee or viewer.
        #[arg(long, default_value = "attendee")]
        role: String,
        /// Display name carried in the token.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// State directory holding the dev key.
        #[arg(long, env = "KCS_DATA_DIR", default_value = ".kcs")]
        data_dir: PathBuf,
        /// Print the dev public key (KID:HEX, for `kcs edge --token-public-key`) instead.
        #[arg(long)]
        public_key: bool,
    },
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            room,
            identity,
            role,
            name,
            ttl,
            data_dir,
            public_key,
        } => {
            let signer = edge_node::app::dev_signer(&data_dir)?;
            if public_key {
                let hex: String = signer
                    .public_key()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                println!("{}:{hex}", signer.kid());
                return Ok(());
            }
            let room = RoomId::new(room).context("--room")?;
            let identity = Identity::new(identity).context("--identity")?;
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            println!(
                "{}",
                signer.mint(room, identity, role, name, unix_now(), ttl)
            );
            Ok(())
        }
        Command::Dev {
            edge,
            room,
            control_plane_http,
            dns,
            region,
        } => {
            let config = edge.resolve()?;
            init_logging(&config.log);
            let signer = edge_node::app::dev_signer(&config.data_dir)?;
            let room = RoomId::new(room).context("--room")?;
            let host = signer.mint(
                room.clone(),
                Identity::new("host").context("identity")?,
                Role::Host,
                None,
                unix_now(),
                12 * 3600,
            );
            runtime()?.block_on(async move {
                let cp = edge_node::cluster::start_dev_control_plane(&config.data_dir, control_plane_http, Some(dns), &region).await?;
                let running = edge_node::app::start(config, cp.verifier.clone(), Some(signer)).await?;
                let url_host = match running.http.ip() {
                    ip if ip.is_unspecified() => "127.0.0.1".to_string(),
                    ip => ip.to_string(),
                };
                let base = format!("http://{url_host}:{}", running.http.port());
                edge_node::cluster::register(cp.store.clone(), &cp.keys, &running, "dev", &region, &base).await?;
                println!("KCS dev is running: edge, origin and control plane in one process (embedded store and dev signing key: dev only).");
                println!("  Open in two browser tabs: {base}/?room={room}");
                println!("  Host token for {room}: {host}");
                println!("  WHIP: POST {base}/whip/{room}   WHEP: POST {base}/whep/{room}");
                println!("  Metrics: {base}/metrics   Health: {base}/healthz");
                println!("  Control plane API: http://{}/v1 (OpenAPI at /openapi.json)", cp.http);
                if let Some(d) = cp.dns {
                    println!("  Geo-DNS: dig @{} -p {} meet.{} A", d.ip(), d.port(), cp.zone);
                }
                wait_for_shutdown(running).await
            })
        }
        Command::ControlPlane { config, log } => {
            init_logging(&log);
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg: control_plane::ControlPlaneConfig =
                toml::from_str(&text).with_context(|| format!("{}", config.display()))?;
            let etcd = cfg
                .etcd
                .clone()
                .context("the control plane needs etcd endpoints ([etcd] endpoints = [...])")?;
            runtime()?.block_on(async move {
                let store: std::sync::Arc<dyn control_plane::Store> = std::sync::Arc::new(
                    control_plane::EtcdStore::connect(&etcd)
                        .await
                        .context("connecting to etcd")?,
                );
                let shutdown = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                control_plane::run(cfg, store, shutdown)
                    .await
                    .context("control plane")?;
                Ok(())
            })
        }
        Command::Edge {
            edge,
            token_public_keys,
            etcd,
            region,
            node_id,
            public_url,
        } => {
            let config = edge.resolve()?;
            init_logging(&config.log);
            let mut verifier = TokenVerifier::new();
            for k in &token_public_keys {
                let (kid, key) =
                    edge_node::app::parse_public_key(k).context("--token-public-key")?;
                verifier.add_key(kid, &key);
            }
            runtime()?.block_on(async move {
                let running = edge_node::app::start(config, verifier, None).await?;
                if !etcd.is_empty() {
                    let store: std::sync::Arc<dyn control_plane::Store> = std::sync::Arc::new(
                        control_plane::EtcdStore::connect(
                            &serde_json::from_value::<control_plane::EtcdConfig>(
                                serde_json::json!({ "endpoints": etcd }),
                            )
                            .context("etcd endpoints")?,
                        )
                        .await
                        .context("connecting to etcd")?,
                    );
                    let keys =
                        control_plane::keys::KeyLayout::new(control_plane::keys::DEFAULT_ROOT);
                    let id = node_id.unwrap_or_else(|| {
                        std::fs::read_to_string("/etc/hostname")
                            .map(|h| h.trim().to_string())
                            .unwrap_or_else(|_| "edge".into())
                    });
                    let url = public_url.unwrap_or_else(|| format!("http://{}", running.http));
                    edge_node::cluster::register(store, &keys, &running, &id, &region, &url)
                        .await?;
                }
                wait_for_shutdown(running).await
            })
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Signaling and HTTP are light: two threads; media runs on the shard threads.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn wait_for_shutdown(running: edge_node::app::Running) -> anyhow::Result<()> {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("shutting down"); }
        _ = running.server => { anyhow::bail!("HTTP server stopped"); }
    }
    Ok(())
}
