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
        c.port_range()?;
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
        let dir = std::env::temp_dir().join(format!("kcs-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("edge.toml");
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
}
