//! `kcs`: the KCS command line. `kcs dev` runs a whole single-machine system; `kcs edge` an edge
//! node; `kcs origin` a process hosting rooms' origins for edges linked over QUIC; `kcs certs`
//! makes a dev cluster CA and node certificates; `kcs token` mints a dev join token.

use anyhow::Context;
use cascade_proto::{Identity, Role, RoomId};
use clap::{Parser, Subcommand};
use control_plane::token::{unix_now, TokenVerifier};
use edge_node::config::{EdgeArgs, OriginArgs};
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
    /// Run an edge node (tokens verified with --token-public-key or the control plane's keys).
    Edge {
        #[command(flatten)]
        edge: EdgeArgs,
        /// Token verification key as KID:HEX (32-byte Ed25519 public key); repeatable.
        #[arg(
            long = "token-public-key",
            env = "KCS_TOKEN_PUBLIC_KEY",
            value_delimiter = ',',
            required_unless_present = "control_plane"
        )]
        token_public_keys: Vec<String>,
        /// Control plane base URL (http://host:port): token keys are fetched from its
        /// /v1/keys and refreshed every minute.
        #[arg(long, env = "KCS_CONTROL_PLANE")]
        control_plane: Option<String>,
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
        /// Operator override (and tests): take ROOM's media from the edge at
        /// quic://NODE@HOST:PORT instead of the room's origin, falling back to the origin while
        /// that edge is unreachable. Repeatable. Needs --origin or --etcd (a cascade).
        #[arg(long = "media-parent", value_name = "ROOM=quic://NODE@HOST:PORT")]
        media_parents: Vec<String>,
    },
    /// Host rooms' origins for edges that link to it over QUIC (mutual TLS with the cluster CA).
    Origin {
        #[command(flatten)]
        origin: OriginArgs,
    },
    /// Make a cluster CA and node certificates (dev and test clusters): writes ca.pem and, per
    /// node, NODE.pem and NODE.key (mode 0600) into --out. The CA key is not kept.
    Certs {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Node ids to issue certificates for (repeat or comma-separate).
        #[arg(long = "node", value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// The CA's common name.
        #[arg(long, default_value = "kcs-cluster-ca")]
        ca_name: String,
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
        Command::Certs {
            out,
            nodes,
            ca_name,
        } => write_certs(&out, &nodes, &ca_name),
        Command::Origin { origin } => {
            let config = origin.resolve()?;
            init_logging(&config.log);
            runtime()?.block_on(run_origin(config))
        }
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
            realtime(config.realtime_priority);
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
                println!("  Control plane API: http://{}/v1 (OpenAPI at /openapi.json, API key {})", cp.http, edge_node::cluster::DEV_API_KEY);
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
            control_plane,
            etcd,
            region,
            node_id,
            public_url,
            media_parents,
        } => {
            let config = edge.resolve()?;
            let media_parents = media_parents
                .iter()
                .map(|s| edge_node::tree::parse_media_parent(s))
                .collect::<anyhow::Result<Vec<_>>>()
                .context("--media-parent")?;
            let wants_parents = !media_parents.is_empty();
            init_logging(&config.log);
            realtime(config.realtime_priority);
            let mut verifier = TokenVerifier::new();
            for k in &token_public_keys {
                let (kid, key) =
                    edge_node::app::parse_public_key(k).context("--token-public-key")?;
                verifier.add_key(kid, &key);
            }
            runtime()?.block_on(async move {
                if let Some(cp) = &control_plane {
                    verifier = edge_node::cluster::fetch_keys(cp)
                        .await
                        .context("fetching token keys from the control plane")?;
                }
                let node = node_id.clone().unwrap_or_else(host_name);
                let credentials = config
                    .credentials()
                    .context("cascade credentials (--ca, --cert, --key)")?;
                let store = if etcd.is_empty() {
                    None
                } else {
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
                    Some(store)
                };
                let keys = control_plane::keys::KeyLayout::new(control_plane::keys::DEFAULT_ROOT);
                let directory = match (&config.origin, &store) {
                    (Some(url), _) => Some(edge_node::uplink::OriginDirectory::Static(
                        edge_node::uplink::OriginAddr::parse(url).context("--origin")?,
                    )),
                    (None, Some(store)) if credentials.is_some() => {
                        Some(edge_node::uplink::OriginDirectory::Placement {
                            placer: control_plane::placement::Placer::new(
                                store.clone(),
                                keys.clone(),
                            ),
                            region: control_plane::nodes::Region::new(&region)
                                .map_err(|e| anyhow::anyhow!("--region: {e}"))?,
                        })
                    }
                    _ => None,
                };
                // Each room's media parent: operator overrides first, then (with etcd) the
                // rooms' fan-out trees (edge_node::membership), through one channel.
                let pinned: std::collections::BTreeSet<RoomId> =
                    media_parents.iter().map(|c| c.room.clone()).collect();
                let (parents_tx, parents_rx) =
                    tokio::sync::mpsc::channel(media_parents.len().max(256));
                for change in media_parents {
                    let _ = parents_tx.try_send(change);
                }
                let origins = match directory {
                    None => edge_node::app::Origins::InProcess,
                    Some(directory) => {
                        let credentials = credentials.as_ref().context(
                            "linking to origins needs --ca, --cert and --key (see kcs certs)",
                        )?;
                        edge_node::app::Origins::Linked {
                            endpoint: edge_node::app::edge_endpoint(
                                &config,
                                credentials,
                                &node,
                                &region,
                            )?,
                            directory,
                            parents: Some(parents_rx),
                        }
                    }
                };
                if wants_parents && matches!(origins, edge_node::app::Origins::InProcess) {
                    anyhow::bail!("--media-parent needs a cascade (--origin or --etcd)");
                }
                let in_process = matches!(origins, edge_node::app::Origins::InProcess);
                let running = edge_node::app::start_with(config, verifier, None, origins).await?;
                if let Some(url) = &running.cascade_url {
                    println!("kcs edge {node}: cascade {url} (child edges dial this)");
                }
                if let Some(cp) = control_plane {
                    edge_node::cluster::follow_keys(running.edge.clone(), cp);
                }
                if let Some(store) = store {
                    let url = public_url.unwrap_or_else(|| format!("http://{}", running.http));
                    if in_process {
                        edge_node::cluster::register(store, &keys, &running, &node, &region, &url)
                            .await?;
                    } else {
                        let registration = edge_node::cluster::register_edge(
                            store.clone(),
                            &keys,
                            &running,
                            &node,
                            &region,
                            &url,
                        )
                        .await?;
                        if let Some(cascade_url) = running.cascade_url.clone() {
                            let member = edge_node::membership::TreeMember {
                                edge: edge_node::cluster::edge_id(&node)?,
                                region: control_plane::nodes::Region::new(&region)
                                    .map_err(|e| anyhow::anyhow!("--region: {e}"))?,
                                cascade_url,
                            };
                            let counts = running.edge.hub.local_counts();
                            edge_node::membership::spawn_tree_follower(
                                store.clone(),
                                keys.clone(),
                                member.edge.clone(),
                                counts.clone(),
                                pinned,
                                parents_tx.clone(),
                                running.edge.metrics.clone(),
                            );
                            edge_node::membership::spawn_presence_writer(
                                store,
                                keys,
                                member,
                                registration,
                                counts,
                                running.edge.metrics.clone(),
                            );
                        }
                    }
                }
                // Held for the life of the process: closing the channel would end the data
                // plane's follower and with it every parent link (and `--media-parent`).
                let _parents = parents_tx;
                wait_for_shutdown(running).await
            })
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "edge".into())
}

fn write_certs(out: &std::path::Path, nodes: &[String], ca_name: &str) -> anyhow::Result<()> {
    use cascade_proto::link::Label;
    use cascade_proto::quic::ClusterCa;
    use std::os::unix::fs::OpenOptionsExt;
    let labels = nodes
        .iter()
        .map(|n| Label::new(n.as_str()).map_err(|e| anyhow::anyhow!("node id {n:?}: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ca = ClusterCa::generate(ca_name)?;
    let write = |name: String, text: &str, mode: u32| -> anyhow::Result<()> {
        use std::io::Write;
        let path = out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    };
    write("ca.pem".into(), &ca.cert_pem(), 0o644)?;
    for node in &labels {
        let (cert, key) = ca.issue_pem(node)?;
        write(format!("{node}.pem"), &cert, 0o644)?;
        write(format!("{node}.key"), &key, 0o600)?;
    }
    println!(
        "wrote {}/ca.pem and certificates for {}",
        out.display(),
        nodes.join(", ")
    );
    Ok(())
}

async fn run_origin(config: edge_node::config::OriginConfig) -> anyhow::Result<()> {
    use cascade_proto::link::Label;
    let node = config.node_id.clone().unwrap_or_else(host_name);
    let credentials = match (&config.ca, &config.cert, &config.key) {
        (Some(ca), Some(cert), Some(key)) => {
            cascade_proto::quic::NodeCredentials::from_pem_files(ca, cert, key)?
        }
        _ => anyhow::bail!("kcs origin needs --ca, --cert and --key (see kcs certs)"),
    };
    anyhow::ensure!(
        config.grace_secs.is_finite() && config.grace_secs >= 0.0,
        "--grace-secs must be a non-negative number of seconds"
    );
    let settings = edge_node::origin_server::OriginSettings {
        cascade: config.cascade,
        http: config.http,
        node: Label::new(node.as_str()).map_err(|e| anyhow::anyhow!("node id {node:?}: {e}"))?,
        region: Label::new(config.region.as_str())
            .map_err(|e| anyhow::anyhow!("region {:?}: {e}", config.region))?,
        credentials,
        grace: std::time::Duration::from_secs_f64(config.grace_secs),
        rooms: config.room_config(),
    };
    let running = edge_node::origin_server::start(
        settings,
        std::sync::Arc::new(edge_node::origin_server::OriginRelay::new()),
    )
    .await?;
    let host = config
        .advertise
        .clone()
        .unwrap_or_else(|| match running.cascade.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            ip => ip.to_string(),
        });
    let url = format!("quic://{node}@{host}:{}", running.cascade.port());
    println!(
        "kcs origin {node}: cascade {url}, HTTP http://{}",
        running.http
    );
    if !config.etcd.is_empty() {
        let store: std::sync::Arc<dyn control_plane::Store> = std::sync::Arc::new(
            control_plane::EtcdStore::connect(
                &serde_json::from_value::<control_plane::EtcdConfig>(
                    serde_json::json!({ "endpoints": config.etcd }),
                )
                .context("etcd endpoints")?,
            )
            .await
            .context("connecting to etcd")?,
        );
        let keys = control_plane::keys::KeyLayout::new(control_plane::keys::DEFAULT_ROOT);
        let addresses = host.parse().map(|ip| vec![ip]).unwrap_or_default();
        edge_node::cluster::register_origin(
            store,
            &keys,
            &node,
            &config.region,
            &url,
            addresses,
            running.metrics.clone(),
        )
        .await?;
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("shutting down"); }
        _ = running.server => { anyhow::bail!("HTTP server stopped"); }
    }
    Ok(())
}

/// `realtime_priority`, before any thread is started (they inherit it): a refusal is logged
/// and the node runs with the normal scheduler.
fn realtime(priority: u8) {
    match edge_node::realtime::apply(priority) {
        Ok(()) if priority > 0 => {
            tracing::info!(priority, "threads scheduled SCHED_RR (realtime_priority)");
        }
        Ok(()) => {}
        Err(e) => tracing::warn!(
            priority,
            error = %e,
            "realtime_priority not applied: it needs CAP_SYS_NICE (root, or \
             AmbientCapabilities=CAP_SYS_NICE / LimitRTPRIO in the systemd unit); \
             running with the normal scheduler"
        ),
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
