//! Edge configuration: a TOML file, then `KCS_*` environment variables, then flags.
//!
//! [`EdgeConfig`] is the validated node config the rest of the edge reads; [`EdgeArgs`] is the
//! command line (clap reads the environment for each flag too). Unknown keys in the file are an
//! error, so a typo never silently falls back to a default.

use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// The edge's settings. Every field has a default suitable for a single-machine dev run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// HTTP listener: signaling (`/ws`), WHIP/WHEP, the web page, `/metrics`, `/healthz`.
    pub http: SocketAddr,
    /// The one UDP address for media (STUN, DTLS, SRTP). Port 0 picks a free port.
    pub udp: SocketAddr,
    /// Optional port range "first-last": each shard then gets its own port and clients are
    /// pointed at their room's shard directly (no cross-shard hand-off).
    pub udp_ports: Option<String>,
    /// Addresses put in ICE candidates. Empty: the UDP address if specific, else every local
    /// interface address (loopback included, for dev).
    pub advertise: Vec<IpAddr>,
    /// Forwarding shards (threads). 0: one per CPU core.
    pub workers: usize,
    /// Where the dev signing key and other local state live.
    pub data_dir: PathBuf,
    /// `tracing` filter, e.g. `info,edge_node=debug`.
    pub log: String,
    /// Origin for every room, `quic://NODE@HOST:PORT` (`kcs edge` only). None: the control
    /// plane's placement when etcd is configured, else an in-process origin.
    pub origin: Option<String>,
    /// Cluster CA certificate (PEM) for cascade links.
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM, its DNS name is the node id).
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
    /// Local UDP address of the edge's cascade links: it dials origins and parent edges from it,
    /// and child edges of rooms' fan-out trees dial it (give a fixed port then). Port 0: any.
    pub cascade: SocketAddr,
    /// Rooms of the in-process origin (`kcs dev`, and `kcs edge` without an origin) list every
    /// join and leave up to this many participants; a larger room lists only interesting
    /// participants and sends its size as `participant:count` (docs/protocol.md, "Presence").
    pub full_presence_up_to: u32,
    /// Real-time (`SCHED_RR`) priority 1-99 for every thread of the node, so a datagram's
    /// wake-ups (quinn's runtime, the shard) preempt ordinary processes on a busy host; 0
    /// (default) keeps the normal scheduler. See [`crate::realtime`].
    pub realtime_priority: u8,
    /// Send each subscriber's share of a burst (a frame's packets, a keyframe) as one UDP GSO
    /// message where the kernel supports it (default). Off: one datagram per message, as
    /// before; a device that cannot segment turns it off by itself. See
    /// [`crate::udp::batch::SendBatch`].
    pub gso: bool,
    /// Threads per shard that help it make a large fan-out (a keyframe to a big room is
    /// hundreds of copies); unset (default): one when the edge may run on two cores or more,
    /// else none; 0: none, each room's copies are made on its shard's thread alone. See
    /// [`crate::spread`].
    pub fan_out_helpers: Option<usize>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            udp: SocketAddr::from(([0, 0, 0, 0], 50000)),
            udp_ports: None,
            advertise: Vec::new(),
            workers: 0,
            data_dir: PathBuf::from(".kcs"),
            log: "info".into(),
            origin: None,
            ca: None,
            cert: None,
            key: None,
            cascade: SocketAddr::from(([0, 0, 0, 0], 0)),
            full_presence_up_to: origin::RoomConfig::default().full_presence_up_to,
            realtime_priority: 0,
            gso: true,
            fan_out_helpers: None,
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("udp_ports must be \"first-last\" with first <= last, got {0:?}")]
    BadPortRange(String),
    #[error("realtime_priority must be 0 (off) or 1-99 (SCHED_RR), got {0}")]
    BadRealtimePriority(u8),
}

impl EdgeConfig {
    /// Reads a TOML file (every key optional, unknown keys refused).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Helper threads per shard ([`Self::fan_out_helpers`], resolved): unset, one when the
    /// cores this process may run on (its CPU affinity) are two or more, so an edge pinned to
    /// one core spreads nothing.
    pub fn fan_out_helper_count(&self) -> usize {
        self.fan_out_helpers.unwrap_or_else(|| {
            usize::from(std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2))
        })
    }

    /// The per-shard port range, if configured.
    pub fn port_range(&self) -> Result<Option<(u16, u16)>, ConfigError> {
        let Some(r) = &self.udp_ports else {
            return Ok(None);
        };
        let bad = || ConfigError::BadPortRange(r.clone());
        let (a, b) = r.split_once('-').ok_or_else(bad)?;
        let a: u16 = a.trim().parse().map_err(|_| bad())?;
        let b: u16 = b.trim().parse().map_err(|_| bad())?;
        if a == 0 || a > b {
            return Err(bad());
        }
        Ok(Some((a, b)))
    }

    /// The cascade credentials, when all three files are configured.
    pub fn credentials(
        &self,
    ) -> Result<Option<cascade_proto::quic::NodeCredentials>, cascade_proto::quic::TlsError> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(
                cascade_proto::quic::NodeCredentials::from_pem_files(ca, cert, key)?,
            )),
            _ => Ok(None),
        }
    }

    /// The in-process origin's room settings.
    pub fn room_config(&self) -> origin::RoomConfig {
        origin::RoomConfig {
            full_presence_up_to: self.full_presence_up_to,
            ..Default::default()
        }
    }

    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Flags shared by `kcs dev` and `kcs edge`; each also reads `KCS_<NAME>` from the environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EdgeArgs {
    /// TOML config file (flags and environment override it).
    #[arg(long, env = "KCS_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "KCS_HTTP")]
    pub http: Option<SocketAddr>,
    /// UDP media address [default: 0.0.0.0:50000].
    #[arg(long, env = "KCS_UDP")]
    pub udp: Option<SocketAddr>,
    /// Per-shard UDP port range, e.g. 50000-50007.
    #[arg(long, env = "KCS_UDP_PORTS")]
    pub udp_ports: Option<String>,
    /// Address to advertise in ICE candidates (repeat or comma-separate for several).
    #[arg(long, env = "KCS_ADVERTISE", value_delimiter = ',')]
    pub advertise: Vec<IpAddr>,
    /// Forwarding threads [default: one per core].
    #[arg(long, env = "KCS_WORKERS")]
    pub workers: Option<usize>,
    /// State directory [default: .kcs].
    #[arg(long, env = "KCS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log filter [default: info].
    #[arg(long, env = "KCS_LOG")]
    pub log: Option<String>,
    /// The origin of every room, quic://NODE@HOST:PORT (kcs edge).
    #[arg(long, env = "KCS_ORIGIN")]
    pub origin: Option<String>,
    /// Cluster CA certificate for cascade links (PEM).
    #[arg(long, env = "KCS_CA")]
    pub ca: Option<PathBuf>,
    /// This node's cascade certificate (PEM).
    #[arg(long, env = "KCS_CERT")]
    pub cert: Option<PathBuf>,
    /// This node's cascade key (PEM).
    #[arg(long, env = "KCS_KEY")]
    pub key: Option<PathBuf>,
    /// Local UDP address for cascade links: origins and parent edges are dialled from it, child
    /// edges dial it [default: 0.0.0.0:0].
    #[arg(long, env = "KCS_CASCADE")]
    pub cascade: Option<SocketAddr>,
    /// In-process origin: rooms list every join and leave up to this many participants, then
    /// only interesting ones plus a count [default: 500].
    #[arg(long, env = "KCS_FULL_PRESENCE_UP_TO")]
    pub full_presence_up_to: Option<u32>,
    /// SCHED_RR priority 1-99 for the node's threads (needs CAP_SYS_NICE); 0: normal
    /// scheduling [default: 0].
    #[arg(long, env = "KCS_REALTIME_PRIORITY")]
    pub realtime_priority: Option<u8>,
    /// Send a frame's packets to each subscriber as one UDP GSO message (where the kernel
    /// can) [default: true].
    #[arg(long, env = "KCS_GSO", value_name = "BOOL")]
    pub gso: Option<bool>,
    /// Threads per shard that help it make large fan-outs; 0: none [default: 1 on two cores
    /// or more].
    #[arg(long, env = "KCS_FAN_OUT_HELPERS")]
    pub fan_out_helpers: Option<usize>,
}

impl EdgeArgs {
    /// File, then environment and flags (clap has already merged those two).
    pub fn resolve(&self) -> Result<EdgeConfig, ConfigError> {
        let mut c = match &self.config {
            Some(p) => EdgeConfig::from_file(p)?,
            None => EdgeConfig::default(),
        };
        if let Some(v) = self.http {
            c.http = v;
        }
        if let Some(v) = self.udp {
            c.udp = v;
        }
        if let Some(v) = &self.udp_ports {
            c.udp_ports = Some(v.clone());
        }
        if !self.advertise.is_empty() {
            c.advertise = self.advertise.clone();
        }
        if let Some(v) = self.workers {
            c.workers = v;
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.log {
            c.log = v.clone();
        }
        if let Some(v) = &self.origin {
            c.origin = Some(v.clone());
        }
        for (flag, field) in [
            (&self.ca, &mut c.ca),
            (&self.cert, &mut c.cert),
            (&self.key, &mut c.key),
        ] {
            if let Some(v) = flag {
                *field = Some(v.clone());
            }
        }
        if let Some(v) = self.cascade {
            c.cascade = v;
        }
        if let Some(v) = self.full_presence_up_to {
            c.full_presence_up_to = v;
        }
        if let Some(v) = self.realtime_priority {
            c.realtime_priority = v;
        }
        if let Some(v) = self.gso {
            c.gso = v;
        }
        if let Some(v) = self.fan_out_helpers {
            c.fan_out_helpers = Some(v);
        }
        c.port_range()?;
        if c.realtime_priority > 99 {
            return Err(ConfigError::BadRealtimePriority(c.realtime_priority));
        }
        Ok(c)
    }
}

/// `kcs origin` settings: a TOML file, then `KCS_*` environment variables, then flags (the same
/// order as the edge's). Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// QUIC listen address for edges' cascade links.
    pub cascade: SocketAddr,
    /// Host (name or address) edges dial, put in the registered URL `quic://NODE@HOST:PORT`.
    /// Default: the cascade address's IP if specific, else 127.0.0.1.
    pub advertise: Option<String>,
    /// HTTP listener: `/healthz`, `/metrics`.
    pub http: SocketAddr,
    /// Node id (the name in its certificate).
    pub node_id: Option<String>,
    pub region: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Seconds a dropped edge's participants stay in their rooms.
    pub grace_secs: f64,
    pub etcd: Vec<String>,
    pub log: String,
    /// Rooms list every join and leave up to this many participants; a larger room lists only
    /// interesting participants and sends its size as `participant:count`.
    pub full_presence_up_to: u32,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            cascade: SocketAddr::from(([0, 0, 0, 0], 7400)),
            advertise: None,
            http: SocketAddr::from(([127, 0, 0, 1], 8090)),
            node_id: None,
            region: "local".into(),
            ca: None,
            cert: None,
            key: None,
            grace_secs: 10.0,
            etcd: Vec::new(),
            log: "info".into(),
            full_presence_up_to: origin::RoomConfig::default().full_presence_up_to,
        }
    }
}

/// Flags of `kcs origin`; each also reads `KCS_<NAME>` from the environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OriginArgs {
    /// TOML config file (flags and environment override it).
    #[arg(long, env = "KCS_CONFIG")]
    pub config: Option<PathBuf>,
    /// QUIC listen address for cascade links [default: 0.0.0.0:7400].
    #[arg(long, env = "KCS_CASCADE")]
    pub cascade: Option<SocketAddr>,
    /// Host edges dial (in the registered quic:// URL) [default: the cascade IP, or 127.0.0.1].
    #[arg(long, env = "KCS_ADVERTISE")]
    pub advertise: Option<String>,
    /// HTTP listen address (/healthz, /metrics) [default: 127.0.0.1:8090].
    #[arg(long, env = "KCS_HTTP")]
    pub http: Option<SocketAddr>,
    /// Node id: the DNS name in this node's certificate [default: the host name].
    #[arg(long, env = "KCS_NODE_ID")]
    pub node_id: Option<String>,
    /// Region [default: local].
    #[arg(long, env = "KCS_REGION")]
    pub region: Option<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "KCS_CA")]
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long, env = "KCS_CERT")]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "KCS_KEY")]
    pub key: Option<PathBuf>,
    /// Seconds a dropped edge's participants stay in their rooms [default: 10].
    #[arg(long, env = "KCS_GRACE_SECS")]
    pub grace_secs: Option<f64>,
    /// etcd endpoints to register in (comma-separated).
    #[arg(long, env = "KCS_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Log filter [default: info].
    #[arg(long, env = "KCS_LOG")]
    pub log: Option<String>,
    /// Rooms list every join and leave up to this many participants, then only interesting
    /// ones plus a count [default: 500].
    #[arg(long, env = "KCS_FULL_PRESENCE_UP_TO")]
    pub full_presence_up_to: Option<u32>,
}

impl OriginConfig {
    /// The origin's room settings.
    pub fn room_config(&self) -> origin::RoomConfig {
        origin::RoomConfig {
            full_presence_up_to: self.full_presence_up_to,
            ..Default::default()
        }
    }
}

impl OriginArgs {
    pub fn resolve(&self) -> Result<OriginConfig, ConfigError> {
        let mut c: OriginConfig = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => OriginConfig::default(),
        };
        if let Some(v) = self.cascade {
            c.cascade = v;
        }
        if let Some(v) = &self.advertise {
            c.advertise = Some(v.clone());
        }
        if let Some(v) = self.http {
            c.http = v;
        }
        if let Some(v) = &self.node_id {
            c.node_id = Some(v.clone());
        }
        if let Some(v) = &self.region {
            c.region = v.clone();
        }
        for (flag, field) in [
            (&self.ca, &mut c.ca),
            (&self.cert, &mut c.cert),
            (&self.key, &mut c.key),
        ] {
            if let Some(v) = flag {
                *field = Some(v.clone());
            }
        }
        if let Some(v) = self.grace_secs {
            c.grace_secs = v;
        }
        if !self.etcd.is_empty() {
            c.etcd = self.etcd.clone();
        }
        if let Some(v) = &self.log {
            c.log = v.clone();
        }
        if let Some(v) = self.full_presence_up_to {
            c.full_presence_up_to = v;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<EdgeConfig>("htp = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, "http = \"127.0.0.1:9000\"\nworkers = 3\n").unwrap();
        let args = EdgeArgs {
            config: Some(path),
            workers: Some(1),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.http.port(), 9000, "from the file");
        assert_eq!(c.workers, 1, "flag overrides file");
        assert_eq!(c.udp.port(), 50000, "default");
        assert_eq!(c.room_config().full_presence_up_to, 500, "default");
    }

    #[test]
    fn presence_threshold_from_file_and_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, "full_presence_up_to = 40\n").unwrap();
        let from_file = EdgeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(
            from_file
                .resolve()
                .unwrap()
                .room_config()
                .full_presence_up_to,
            40
        );
        let flagged = EdgeArgs {
            config: Some(path),
            full_presence_up_to: Some(7),
            ..Default::default()
        };
        assert_eq!(
            flagged.resolve().unwrap().room_config().full_presence_up_to,
            7
        );
        let dir2 = tempfile::tempdir().unwrap();
        let origin_path = dir2.path().join("origin.toml");
        std::fs::write(&origin_path, "full_presence_up_to = 12\n").unwrap();
        let origin = OriginArgs {
            config: Some(origin_path),
            ..Default::default()
        };
        assert_eq!(
            origin.resolve().unwrap().room_config().full_presence_up_to,
            12
        );
        let flagged = OriginArgs {
            full_presence_up_to: Some(3),
            ..Default::default()
        };
        assert_eq!(
            flagged.resolve().unwrap().room_config().full_presence_up_to,
            3
        );
    }

    #[test]
    fn origin_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("origin.toml");
        std::fs::write(
            &path,
            "cascade = \"127.0.0.1:7500\"\nca = \"/etc/kcs/ca.pem\"\ngrace_secs = 3\n",
        )
        .unwrap();
        let args = OriginArgs {
            config: Some(path),
            grace_secs: Some(5.0),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.cascade.port(), 7500, "from the file");
        assert_eq!(c.ca.as_deref(), Some(Path::new("/etc/kcs/ca.pem")));
        assert_eq!(c.grace_secs, 5.0, "flag overrides file");
        assert_eq!(c.http.port(), 8090, "default");
        assert!(toml::from_str::<OriginConfig>("grace = 3").is_err());
    }

    #[test]
    fn port_ranges_are_validated() {
        let mut c = EdgeConfig {
            udp_ports: Some("50000-50003".into()),
            ..Default::default()
        };
        assert_eq!(c.port_range().unwrap(), Some((50000, 50003)));
        for bad in ["5-1", "x-3", "50000", "0-4"] {
            c.udp_ports = Some(bad.into());
            assert!(c.port_range().is_err(), "{bad}");
        }
    }

    #[test]
    fn realtime_priority_from_file_and_flag_and_refused_above_99() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, "realtime_priority = 20\n").unwrap();
        let from_file = EdgeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(from_file.resolve().unwrap().realtime_priority, 20);
        assert_eq!(
            EdgeArgs::default().resolve().unwrap().realtime_priority,
            0,
            "off"
        );
        let flagged = EdgeArgs {
            config: Some(path.clone()),
            realtime_priority: Some(5),
            ..Default::default()
        };
        assert_eq!(flagged.resolve().unwrap().realtime_priority, 5);
        std::fs::write(&path, "realtime_priority = 100\n").unwrap();
        let err = from_file.resolve().unwrap_err();
        assert!(
            matches!(err, ConfigError::BadRealtimePriority(100)),
            "{err}"
        );
    }

    #[test]
    fn gso_is_on_by_default_and_turned_off_by_file_or_flag() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            args: EdgeArgs,
        }
        assert!(EdgeArgs::default().resolve().unwrap().gso);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, "gso = false\n").unwrap();
        let file = path.to_str().unwrap();
        let parsed =
            |argv: &[&str]| Cmd::try_parse_from(argv).map(|c| c.args.resolve().unwrap().gso);
        assert!(!parsed(&["kcs", "--config", file]).unwrap());
        assert!(parsed(&["kcs", "--config", file, "--gso", "true"]).unwrap());
        assert!(!parsed(&["kcs", "--gso", "false"]).unwrap());
        assert!(parsed(&["kcs", "--gso", "maybe"]).is_err());
    }
}
