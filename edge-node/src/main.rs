//! `kcs`: the KCS command line. `kcs dev` runs a whole single-machine system; `kcs edge` an edge
//! node; `kcs token` mints a dev join token.

use anyhow::Context;
use cascade_proto::{Identity, Role, RoomId};
use clap::{Parser, Subcommand};
use control_plane::token::{unix_now, TokenVerifier};
use edge_node::config::EdgeArgs;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kcs", version, about = "KCS: an edge-distributed cascaded SFU for meetings")]
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
    },
    /// Run an edge node that trusts the given token public keys.
    Edge {
        #[command(flatten)]
        edge: EdgeArgs,
        /// Token verification key as KID:HEX (32-byte Ed25519 public key); repeatable.
        #[arg(long = "token-public-key", env = "KCS_TOKEN_PUBLIC_KEY", value_delimiter = ',', required = true)]
        token_public_keys: Vec<String>,
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
                let hex: String = signer.public_key().iter().map(|b| format!("{b:02x}")).collect();
                println!("{}:{hex}", signer.kid());
                return Ok(());
            }
            let room = RoomId::new(room).context("--room")?;
            let identity = Identity::new(identity).context("--identity")?;
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            println!("{}", signer.mint(room, identity, role, name, unix_now(), ttl));
            Ok(())
        }
        Command::Dev { edge, room } => {
            let config = edge.resolve()?;
            init_logging(&config.log);
            let signer = edge_node::app::dev_signer(&config.data_dir)?;
            let mut verifier = TokenVerifier::new();
            verifier.add_key(signer.kid(), &signer.public_key());
            let room = RoomId::new(room).context("--room")?;
            let host = signer.mint(room.clone(), Identity::new("host").context("identity")?, Role::Host, None, unix_now(), 12 * 3600);
            runtime()?.block_on(async move {
                let running = edge_node::app::start(config, verifier, Some(signer)).await?;
                let url_host = match running.http.ip() {
                    ip if ip.is_unspecified() => "127.0.0.1".to_string(),
                    ip => ip.to_string(),
                };
                println!("KCS dev is running (dev signing key: .kcs/dev-signing-key; dev only).");
                println!("  Open in two browser tabs: http://{url_host}:{}/?room={room}", running.http.port());
                println!("  Host token for {room}: {host}");
                println!("  WHIP: POST http://{url_host}:{}/whip/{room}   WHEP: POST http://{url_host}:{}/whep/{room}", running.http.port(), running.http.port());
                println!("  Metrics: http://{url_host}:{}/metrics", running.http.port());
                wait_for_shutdown(running).await
            })
        }
        Command::Edge { edge, token_public_keys } => {
            let config = edge.resolve()?;
            init_logging(&config.log);
            let mut verifier = TokenVerifier::new();
            for k in &token_public_keys {
                let (kid, key) = edge_node::app::parse_public_key(k).context("--token-public-key")?;
                verifier.add_key(kid, &key);
            }
            runtime()?.block_on(async move {
                let running = edge_node::app::start(config, verifier, None).await?;
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
