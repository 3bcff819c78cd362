//! `loadtest`: run a scenario against an edge and write reports, or relay UDP with delay.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use edge_node::transport::dtls::SrtpProfile;
use loadtest::baseline::{self, BaselineConfig};
use loadtest::relay::{self, RelayConfig, RelayStats};
use loadtest::runner::{self, RunConfig};
use loadtest::scenario::{parse_duration, Mode, Scenario};
use loadtest::signaling::{Target, TokenSource};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "KCS load tester: simulated WebRTC participants against an edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file (TOML; see loadtest/scenarios/).
    Run {
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// N participants, each publishing camera + audio and seeing everyone.
    Conference {
        #[arg(long, default_value_t = 4)]
        participants: u32,
        #[command(flatten)]
        common: Common,
    },
    /// P presenters publishing, M viewers receiving.
    Webinar {
        #[arg(long, default_value_t = 1)]
        presenters: u32,
        #[arg(long, default_value_t = 20)]
        viewers: u32,
        #[command(flatten)]
        common: Common,
    },
    /// K viewers joining one presenter within T.
    JoinStorm {
        #[arg(long, default_value_t = 100)]
        joins: u32,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        within: Duration,
        #[command(flatten)]
        common: Common,
    },
    /// One big meeting: a few presenters, viewers receiving media, and a signaling-only
    /// audience (roster deltas and events, no media). Reports signaling load and whether every
    /// session's roster converged.
    TownHall {
        #[arg(long, default_value_t = 3)]
        presenters: u32,
        /// Participants receiving media (lowest simulcast layer).
        #[arg(long, default_value_t = 100)]
        viewers: u32,
        /// Signaling-only participants.
        #[arg(long, default_value_t = 1000)]
        audience: u32,
        /// Joins per second, per group.
        #[arg(long, default_value_t = 200.0)]
        join_rate: f64,
        /// Joins per second of the audience (default: --join-rate). Each join is a roster
        /// delta to every session already in, so this sets the signaling load.
        #[arg(long)]
        audience_join_rate: Option<f64>,
        #[command(flatten)]
        common: Common,
    },
    /// Ramp viewers on one presenter until loss > 1% or p99 delay > 50 ms; report the largest
    /// passing count.
    Capacity {
        #[arg(long, default_value_t = 200)]
        max_viewers: u32,
        #[arg(long, default_value_t = 20)]
        step: u32,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        step_duration: Duration,
        #[command(flatten)]
        common: Common,
    },
    /// The raw forwarding baseline: receive SRTP in batches, decrypt once, encrypt `fanout`
    /// copies with per-receiver contexts, send in batches; prints packets/s out per core.
    Baseline {
        #[arg(long, default_value_t = 50)]
        fanout: usize,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        warmup: Duration,
        /// SRTP profile: gcm (AEAD_AES_128_GCM, what browsers and the edge prefer) or cm.
        #[arg(long, default_value = "gcm")]
        profile: String,
        /// Pin the forwarder thread to this CPU.
        #[arg(long)]
        forwarder_cpu: Option<usize>,
        /// Pin the generator thread (input and receivers) to this CPU.
        #[arg(long)]
        generator_cpu: Option<usize>,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A userspace UDP relay adding delay, jitter and loss (both directions).
    Relay {
        /// Address clients send to.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The server's UDP address.
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        delay: Duration,
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        jitter: Duration,
        #[arg(long, default_value = "0%", value_parser = relay::parse_loss)]
        loss: f64,
        /// Stop after this long (default: run until interrupted).
        #[arg(long, value_parser = parse_duration)]
        r#for: Option<Duration>,
    },
}

#[derive(Args)]
struct Common {
    /// The server: an edge's HTTP address (`http://host:port`) or Janus's WebSocket API
    /// (`janus+ws://host:port`, VideoRoom plugin).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "LOADTEST_TARGET")]
    target: String,
    /// One token for every participant; default: ask `kcs dev`'s /dev/token for each.
    #[arg(long, env = "LOADTEST_TOKEN", conflicts_with = "token_api")]
    token: Option<String>,
    /// Mint each participant's token with this control plane's REST API (http://host:port;
    /// needs --api-key), for clusters of `kcs edge` nodes.
    #[arg(long, env = "LOADTEST_TOKEN_API", requires = "api_key")]
    token_api: Option<String>,
    /// API key for --token-api.
    #[arg(long, env = "LOADTEST_API_KEY")]
    api_key: Option<String>,
    /// Participants' identities are <prefix>-<group>-<index>; give each of several load
    /// testers sharing a room its own.
    #[arg(long, default_value = "lt")]
    identity_prefix: String,
    /// Send media to this address instead of the edge's candidate (a `loadtest relay`).
    #[arg(long)]
    media_via: Option<SocketAddr>,
    /// Sample this process's CPU and RSS (the server under test).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Media time after the last join (presets; files set their own).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Signaling: ws, or whip (WHIP publishers, WHEP viewers).
    #[arg(long)]
    mode: Option<String>,
    /// Room name (presets; files set their own).
    #[arg(long)]
    room: Option<String>,
    /// No retransmissions: receivers send no NACKs, publishers ignore the edge's (loss stays visible).
    #[arg(long)]
    no_nack: bool,
    /// Highest simulcast layer every subscriber asks for (0, 1 or 2; presets ask for none and
    /// take what the server sends). Side-by-side runs pin it so both servers forward alike.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    max_layer: Option<u8>,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Tokio worker threads for all participants.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// No live progress.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOADTEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn real_main(cli: Cli) -> anyhow::Result<i32> {
    let (mut scenario, common) = match cli.command {
        Command::Relay {
            listen,
            upstream,
            delay,
            jitter,
            loss,
            r#for,
        } => {
            return run_relay(
                RelayConfig {
                    listen,
                    upstream,
                    delay,
                    jitter,
                    loss,
                },
                r#for,
            );
        }
        Command::Baseline {
            fanout,
            duration,
            warmup,
            profile,
            forwarder_cpu,
            generator_cpu,
            json,
        } => {
            let profile = match profile.as_str() {
                "gcm" => SrtpProfile::AeadAes128Gcm,
                "cm" => SrtpProfile::Aes128CmHmacSha1_80,
                other => anyhow::bail!("--profile {other:?}: use gcm or cm"),
            };
            let report = baseline::run(&BaselineConfig {
                fanout,
                duration,
                warmup,
                profile,
                forwarder_cpu,
                generator_cpu,
            })
            .context("raw baseline")?;
            print!("{}", report.summary());
            if let Some(path) = &json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            return Ok(0);
        }
        Command::Run { file, common } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let s = Scenario::from_toml(&file.display().to_string(), &text)?;
            (s, common)
        }
        Command::Conference {
            participants,
            common,
        } => (
            Scenario::conference(
                participants,
                common.duration.unwrap_or(Duration::from_secs(20)),
            ),
            common,
        ),
        Command::Webinar {
            presenters,
            viewers,
            common,
        } => (
            Scenario::webinar(
                presenters,
                viewers,
                common.duration.unwrap_or(Duration::from_secs(20)),
            ),
            common,
        ),
        Command::JoinStorm {
            joins,
            within,
            common,
        } => (
            Scenario::join_storm(
                joins,
                within,
                common.duration.unwrap_or(Duration::from_secs(5)),
            ),
            common,
        ),
        Command::TownHall {
            presenters,
            viewers,
            audience,
            join_rate,
            audience_join_rate,
            common,
        } => (
            Scenario::town_hall(
                presenters,
                viewers,
                audience,
                join_rate,
                audience_join_rate.unwrap_or(join_rate),
                common.duration.unwrap_or(Duration::from_secs(10)),
            ),
            common,
        ),
        Command::Capacity {
            max_viewers,
            step,
            step_duration,
            common,
        } => (Scenario::capacity(max_viewers, step, step_duration), common),
    };
    if let Some(room) = &common.room {
        scenario.room = room.clone();
    }
    if let Some(m) = &common.mode {
        scenario.mode = match m.as_str() {
            "ws" => Mode::Ws,
            "whip" => Mode::Whip,
            other => anyhow::bail!("--mode {other:?}: use ws or whip"),
        };
    }
    if common.no_nack {
        scenario.nack = false;
    }
    if let Some(layer) = common.max_layer {
        for g in scenario.groups.iter_mut().filter(|g| g.subscribe) {
            g.max_layer = Some(layer);
        }
    }
    let cfg = RunConfig {
        target: common.target.clone(),
        tokens: match (&common.token, &common.token_api) {
            (Some(t), _) => TokenSource::Fixed(t.clone()),
            (None, Some(api)) => TokenSource::ControlPlane {
                api: Target::parse(api).map_err(|e| anyhow::anyhow!("--token-api: {e}"))?,
                api_key: common.api_key.clone().unwrap_or_default(),
            },
            (None, None) => TokenSource::Dev,
        },
        identity_prefix: common.identity_prefix.clone(),
        media_via: common.media_via,
        server_pid: common.server_pid,
        progress: !common.quiet,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.threads.max(1))
        .enable_all()
        .build()?;
    let report = rt.block_on(runner::run(scenario, cfg));
    // Participants' tasks may still hold sockets; the runtime goes with the process.
    rt.shutdown_timeout(Duration::from_secs(1));
    print!("{}", report.summary());
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.html {
        std::fs::write(path, report.html())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.outcome == "completed" {
        Ok(0)
    } else {
        eprintln!(
            "loadtest: run aborted: {}",
            report.error.as_deref().unwrap_or("?")
        );
        Ok(1)
    }
}

fn run_relay(cfg: RelayConfig, limit: Option<Duration>) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stats = Arc::new(RelayStats::default());
        let (addr, fut) = relay::start(cfg, stats.clone())
            .await
            .context("binding the relay")?;
        // The first line is the address, for scripts and tests to read.
        println!("relay listening on {addr}");
        eprintln!(
            "relaying {addr} <-> {} with delay {:?} jitter {:?} loss {:.2}% (each direction)",
            cfg.upstream,
            cfg.delay,
            cfg.jitter,
            cfg.loss * 100.0
        );
        match limit {
            Some(d) => {
                let _ = tokio::time::timeout(d, fut).await;
            }
            None => {
                tokio::select! {
                    _ = fut => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
        }
        let o = std::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "relay done: {} forwarded, {} dropped (loss), {} dropped (queue full)",
            stats.forwarded.load(o),
            stats.dropped_loss.load(o),
            stats.dropped_queue.load(o)
        );
        Ok(0)
    })
}
