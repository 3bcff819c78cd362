//! Participant -> edge routing: which edges a client at a given address should use.
//!
//! Two steps, both sans-IO:
//!
//! 1. **Locate** the client: its address (or the EDNS client subnet a resolver forwards,
//!    RFC 7871) is looked up in the configured CIDR table, longest prefix first; failing that,
//!    in a MaxMind GeoIP database mapped to regions by country or continent (feature
//!    `maxmind`); failing that, the configured default region. The result carries the prefix
//!    length the decision depended on, which the geo-DNS echoes as the ECS scope.
//! 2. **Route**: among registered edges that accept new participants (healthy, not draining,
//!    below capacity), take those in the client's region, least utilised first; if the region
//!    has none, walk the other regions by the latency matrix, nearest first. With no region
//!    known, all regions are candidates.
//!
//! Nothing here touches the store or a socket; callers pass in the node list they mirror.

use crate::nodes::{NodeInfo, NodeKind, Region};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP prefix (`192.0.2.0/24`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR or a routing config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoutingError {
    #[error("invalid CIDR {0:?}: expected ADDRESS/PREFIX")]
    BadCidr(String),
    #[error("CIDR {0:?}: prefix longer than the address")]
    PrefixTooLong(String),
    #[error("CIDR {0:?} has host bits set (did you mean {1}?)")]
    HostBits(String, Cidr),
    #[error("latency matrix names region {0} that has no CIDRs and is not a known region")]
    UnknownRegion(Region),
    #[error("cannot open MaxMind database {path}: {reason}")]
    MaxMind { path: String, reason: String },
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn width(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Keeps the first `prefix` bits of `ip` (the rest zero).
pub fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    let w = width(ip);
    let prefix = prefix.min(w);
    let keep = if prefix == 0 {
        0
    } else {
        (u128::MAX << (128 - u32::from(prefix))) >> (128 - u32::from(w))
    };
    let masked = bits(ip) & keep;
    match ip {
        // `masked` came from a u32, so it fits.
        IpAddr::V4(_) => IpAddr::V4((masked as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(masked.into()),
    }
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, RoutingError> {
        let addr = unmap(addr);
        if prefix > width(addr) {
            return Err(RoutingError::PrefixTooLong(format!("{addr}/{prefix}")));
        }
        let c = Self { addr, prefix };
        if mask(addr, prefix) != addr {
            return Err(RoutingError::HostBits(
                format!("{addr}/{prefix}"),
                Self {
                    addr: mask(addr, prefix),
                    prefix,
                },
            ));
        }
        Ok(c)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmap(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = RoutingError;
    fn from_str(s: &str) -> Result<Self, RoutingError> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| RoutingError::BadCidr(s.to_owned()))?;
        let addr: IpAddr = a.parse().map_err(|_| RoutingError::BadCidr(s.to_owned()))?;
        let prefix: u8 = p.parse().map_err(|_| RoutingError::BadCidr(s.to_owned()))?;
        Self::new(addr, prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// MaxMind lookup settings (feature `maxmind`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxMindConfig {
    /// Path of a GeoLite2/GeoIP2 Country or City database (`.mmdb`).
    pub database: String,
    /// ISO 3166-1 country code -> region (`DE = "eu-central"`); checked first.
    #[serde(default)]
    pub countries: BTreeMap<String, Region>,
    /// Continent code (`EU`, `NA`, `AS`, ...) -> region; checked when the country is not listed.
    #[serde(default)]
    pub continents: BTreeMap<String, Region>,
}

/// How clients are mapped to regions and regions to each other.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Region -> client prefixes located there.
    #[serde(default)]
    pub regions: BTreeMap<Region, Vec<Cidr>>,
    /// Round-trip milliseconds between regions; symmetric, one direction is enough.
    #[serde(default)]
    pub latency_ms: BTreeMap<Region, BTreeMap<Region, u32>>,
    /// Region for clients no prefix matches (none: all regions are candidates).
    #[serde(default)]
    pub default_region: Option<Region>,
    /// Optional GeoIP database, consulted after the CIDR table (needs feature `maxmind`).
    #[serde(default)]
    pub maxmind: Option<MaxMindConfig>,
}

/// Where a client was located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub region: Region,
    /// Leading bits of the client address the answer depends on (RFC 7871 §7.2.1 SCOPE
    /// PREFIX-LENGTH); `None` when the answer holds for every address not matched by a more
    /// specific entry, which a DNS answer conservatively scopes to the query's source prefix.
    pub scope: Option<u8>,
}

/// The client -> region -> edges router (see the module docs).
pub struct EdgeRouter {
    /// Longest prefix first, so the first match is the most specific.
    table: Vec<(Cidr, Region)>,
    latency: BTreeMap<(Region, Region), u32>,
    default_region: Option<Region>,
    #[cfg(feature = "maxmind")]
    maxmind: Option<maxmind::MaxMindRegions>,
}

impl fmt::Debug for EdgeRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeRouter")
            .field("prefixes", &self.table.len())
            .field("latency_pairs", &self.latency.len())
            .field("default_region", &self.default_region)
            .finish()
    }
}

impl EdgeRouter {
    pub fn new(config: &RoutingConfig) -> Result<Self, RoutingError> {
        let mut table: Vec<(Cidr, Region)> = config
            .regions
            .iter()
            .flat_map(|(r, cidrs)| cidrs.iter().map(move |c| (*c, r.clone())))
            .collect();
        table.sort_by(|a, b| b.0.prefix.cmp(&a.0.prefix).then(a.0.addr.cmp(&b.0.addr)));
        let mut latency = BTreeMap::new();
        for (a, row) in &config.latency_ms {
            for (b, ms) in row {
                latency.insert((a.clone(), b.clone()), *ms);
                latency.entry((b.clone(), a.clone())).or_insert(*ms);
            }
        }
        #[cfg(feature = "maxmind")]
        let maxmind = config
            .maxmind
            .as_ref()
            .map(maxmind::MaxMindRegions::open)
            .transpose()?;
        #[cfg(not(feature = "maxmind"))]
        if let Some(m) = &config.maxmind {
            return Err(RoutingError::MaxMind {
                path: m.database.clone(),
                reason: "this build has no `maxmind` feature".into(),
            });
        }
        Ok(Self {
            table,
            latency,
            default_region: config.default_region.clone(),
            #[cfg(feature = "maxmind")]
            maxmind,
        })
    }

    /// The region of a client address (see the module docs for the order).
    pub fn locate(&self, ip: IpAddr) -> Option<Located> {
        let ip = unmap(ip);
        if let Some((cidr, region)) = self.table.iter().find(|(c, _)| c.contains(ip)) {
            return Some(Located {
                region: region.clone(),
                scope: Some(cidr.prefix),
            });
        }
        #[cfg(feature = "maxmind")]
        if let Some(found) = self.maxmind.as_ref().and_then(|m| m.locate(ip)) {
            return Some(found);
        }
        self.default_region.clone().map(|region| Located {
            region,
            scope: None,
        })
    }

    /// Round-trip latency between two regions, if configured (0 to itself).
    pub fn latency(&self, a: &Region, b: &Region) -> Option<u32> {
        if a == b {
            return Some(0);
        }
        self.latency.get(&(a.clone(), b.clone())).copied()
    }

    /// Up to `max` edges for a client in `region` (or anywhere, when `None`): that region's
    /// least utilised edges that accept participants, else the nearest region's.
    pub fn route<'a>(
        &self,
        region: Option<&Region>,
        edges: impl IntoIterator<Item = &'a NodeInfo>,
        max: usize,
    ) -> Vec<&'a NodeInfo> {
        let mut candidates: Vec<&NodeInfo> = edges
            .into_iter()
            .filter(|n| n.kind == NodeKind::Edge && n.accepts_new())
            .collect();
        if let Some(home) = region {
            // Distance of each candidate's region from home; unknown latencies after all known
            // ones, ties by region name so the choice is deterministic.
            let distance = |n: &NodeInfo| {
                (
                    self.latency(home, &n.region).unwrap_or(u32::MAX),
                    n.region.clone(),
                )
            };
            let Some(best) = candidates.iter().map(|n| distance(n)).min() else {
                return Vec::new();
            };
            candidates.retain(|n| distance(n) == best);
        }
        candidates.sort_by(|a, b| {
            a.utilisation()
                .total_cmp(&b.utilisation())
                .then(a.id.cmp(&b.id))
        });
        candidates.truncate(max);
        candidates
    }
}

#[cfg(feature = "maxmind")]
mod maxmind {
    //! GeoIP lookups: MaxMind country/continent -> region.
    use super::{Located, MaxMindConfig, RoutingError};
    use crate::nodes::Region;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    pub struct MaxMindRegions {
        reader: maxminddb::Reader<Vec<u8>>,
        countries: BTreeMap<String, Region>,
        continents: BTreeMap<String, Region>,
    }

    impl MaxMindRegions {
        pub fn open(config: &MaxMindConfig) -> Result<Self, RoutingError> {
            let reader = maxminddb::Reader::open_readfile(&config.database).map_err(|e| {
                RoutingError::MaxMind {
                    path: config.database.clone(),
                    reason: e.to_string(),
                }
            })?;
            Ok(Self {
                reader,
                countries: config.countries.clone(),
                continents: config.continents.clone(),
            })
        }

        pub fn locate(&self, ip: IpAddr) -> Option<Located> {
            let found = self.reader.lookup(ip).ok()?;
            let country: maxminddb::geoip2::Country<'_> = found.decode().ok()??;
            let region = country
                .country
                .iso_code
                .and_then(|code| self.countries.get(code))
                .or_else(|| {
                    country
                        .continent
                        .code
                        .and_then(|code| self.continents.get(code))
                })?;
            let prefix = found.network().ok()?.prefix();
            Some(Located {
                region: region.clone(),
                // The database's own network prefix: every address in it gets this answer.
                scope: Some(prefix),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::tests::node;

    fn r(s: &str) -> Region {
        Region::new(s).unwrap()
    }

    fn router() -> EdgeRouter {
        let toml_like = serde_json::json!({
            "regions": {
                "eu": ["192.0.2.0/24", "2001:db8:e0::/48"],
                "us": ["198.51.100.0/24", "2001:db8::/32"],
                "ap": ["203.0.113.0/24"],
                "eu-lab": ["192.0.2.128/25"]
            },
            "latency_ms": {
                "eu": {"us": 90, "ap": 250, "eu-lab": 5},
                "us": {"ap": 150}
            },
            "default_region": "us"
        });
        EdgeRouter::new(&serde_json::from_value(toml_like).unwrap()).unwrap()
    }

    #[test]
    fn cidr_parse_and_contains() {
        let table = [
            ("192.0.2.0/24", "192.0.2.77", true),
            ("192.0.2.0/24", "192.0.3.1", false),
            ("192.0.2.0/24", "::ffff:192.0.2.9", true),
            ("2001:db8::/32", "2001:db8:1::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("0.0.0.0/0", "203.0.113.1", true),
            ("0.0.0.0/0", "2001:db8::1", false),
        ];
        for (c, ip, want) in table {
            let c: Cidr = c.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{c} {ip}");
        }
        for bad in [
            "192.0.2.0",
            "192.0.2.0/33",
            "x/8",
            "192.0.2.1/24",
            "2001:db8::/129",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            mask("2001:db8:ffff::1".parse().unwrap(), 36).to_string(),
            "2001:db8:f000::"
        );
    }

    #[test]
    fn locate_longest_prefix_then_default() {
        let rt = router();
        let table = [
            ("192.0.2.10", "eu", Some(24)),
            ("192.0.2.200", "eu-lab", Some(25)),
            ("2001:db8:e0::5", "eu", Some(48)),
            ("2001:db8:1::5", "us", Some(32)),
            ("203.0.113.9", "ap", Some(24)),
            ("100.64.0.1", "us", None),
        ];
        for (ip, region, scope) in table {
            let got = rt.locate(ip.parse().unwrap()).unwrap();
            assert_eq!((got.region.as_str(), got.scope), (region, scope), "{ip}");
        }
        let no_default = EdgeRouter::new(&RoutingConfig::default()).unwrap();
        assert_eq!(no_default.locate("192.0.2.1".parse().unwrap()), None);
    }

    #[test]
    fn route_prefers_home_then_nearest_and_skips_unusable() {
        let rt = router();
        let e = |id: &str, region: &str, load: u32| node(id, NodeKind::Edge, region, load);
        let mut draining = e("eu-2", "eu", 0);
        draining.draining = true;
        let mut sick = e("eu-3", "eu", 0);
        sick.healthy = false;
        let edges = vec![
            e("eu-1", "eu", 50),
            e("eu-4", "eu", 10),
            draining.clone(),
            sick.clone(),
            e("us-1", "us", 0),
            e("ap-1", "ap", 0),
            node("o-eu", NodeKind::Origin, "eu", 0),
        ];
        let ids = |v: Vec<&NodeInfo>| v.iter().map(|n| n.id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(rt.route(Some(&r("eu")), &edges, 5)), ["eu-4", "eu-1"]);
        assert_eq!(ids(rt.route(Some(&r("eu")), &edges, 1)), ["eu-4"]);
        assert_eq!(ids(rt.route(Some(&r("ap")), &edges, 5)), ["ap-1"]);
        // eu-lab has no edges: nearest is eu (5 ms).
        assert_eq!(
            ids(rt.route(Some(&r("eu-lab")), &edges, 5)),
            ["eu-4", "eu-1"]
        );
        // Only unusable edges in eu: us is nearer (90) than ap (250).
        let eu_dead = vec![draining, sick, e("us-1", "us", 0), e("ap-1", "ap", 0)];
        assert_eq!(ids(rt.route(Some(&r("eu")), &eu_dead, 5)), ["us-1"]);
        // No region: least utilised anywhere.
        assert_eq!(ids(rt.route(None, &edges, 2)), ["ap-1", "us-1"]);
        assert!(rt.route(Some(&r("eu")), &[], 5).is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = serde_json::json!({"regions": {}, "latency": {}});
        assert!(serde_json::from_value::<RoutingConfig>(bad).is_err());
    }

    /// A minimal MaxMind DB writer (format 2.0, IPv4 tree, 24-bit records), so the real
    /// reader is exercised on data we control.
    #[cfg(feature = "maxmind")]
    mod mmdb {
        fn ctrl(out: &mut Vec<u8>, ty: u8, size: usize) {
            assert!(size < 29);
            if ty <= 7 {
                out.push((ty << 5) | size as u8);
            } else {
                out.push(size as u8);
                out.push(ty - 7);
            }
        }
        pub fn string(out: &mut Vec<u8>, s: &str) {
            ctrl(out, 2, s.len());
            out.extend(s.as_bytes());
        }
        pub fn uint(out: &mut Vec<u8>, ty: u8, v: u64) {
            let bytes: Vec<u8> = v
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            ctrl(out, ty, bytes.len());
            out.extend(bytes);
        }
        pub fn map(out: &mut Vec<u8>, n: usize) {
            ctrl(out, 7, n);
        }

        enum Rec {
            Node(usize),
            Empty,
            Data(usize),
        }

        /// `entries`: (network, prefix, country ISO code, continent code).
        pub fn build(entries: &[([u8; 4], u8, &str, &str)]) -> Vec<u8> {
            let mut data = Vec::new();
            let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty, Rec::Empty]];
            for (net, prefix, country, continent) in entries {
                let offset = data.len();
                map(&mut data, 2);
                string(&mut data, "continent");
                map(&mut data, 1);
                string(&mut data, "code");
                string(&mut data, continent);
                string(&mut data, "country");
                map(&mut data, 1);
                string(&mut data, "iso_code");
                string(&mut data, country);
                let ip = u32::from_be_bytes(*net);
                let mut node = 0;
                for i in 0..*prefix as usize {
                    let bit = ((ip >> (31 - i)) & 1) as usize;
                    if i + 1 == *prefix as usize {
                        nodes[node][bit] = Rec::Data(offset);
                    } else {
                        node = match nodes[node][bit] {
                            Rec::Node(n) => n,
                            _ => {
                                nodes.push([Rec::Empty, Rec::Empty]);
                                let n = nodes.len() - 1;
                                nodes[node][bit] = Rec::Node(n);
                                n
                            }
                        };
                    }
                }
            }
            let count = nodes.len();
            let mut out = Vec::new();
            for n in &nodes {
                for r in n {
                    let v = match r {
                        Rec::Node(i) => *i,
                        Rec::Empty => count,
                        Rec::Data(off) => count + 16 + off,
                    } as u32;
                    out.extend(&v.to_be_bytes()[1..]);
                }
            }
            out.extend([0u8; 16]);
            out.extend(data);
            out.extend(b"\xab\xcd\xefMaxMind.com");
            map(&mut out, 9);
            string(&mut out, "binary_format_major_version");
            uint(&mut out, 5, 2);
            string(&mut out, "binary_format_minor_version");
            uint(&mut out, 5, 0);
            string(&mut out, "build_epoch");
            uint(&mut out, 9, 1_800_000_000);
            string(&mut out, "database_type");
            string(&mut out, "KCS-Test-Country");
            string(&mut out, "description");
            map(&mut out, 0);
            string(&mut out, "ip_version");
            uint(&mut out, 5, 4);
            string(&mut out, "languages");
            ctrl(&mut out, 11, 0);
            string(&mut out, "node_count");
            uint(&mut out, 6, count as u64);
            string(&mut out, "record_size");
            uint(&mut out, 5, 24);
            out
        }
    }

    #[cfg(feature = "maxmind")]
    #[test]
    fn maxmind_country_then_continent_after_the_cidr_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.mmdb");
        std::fs::write(
            &path,
            mmdb::build(&[
                ([192, 0, 2, 0], 24, "DE", "EU"),
                ([198, 51, 100, 0], 24, "US", "NA"),
            ]),
        )
        .unwrap();
        let config: RoutingConfig = serde_json::from_value(serde_json::json!({
            "regions": {"eu-lab": ["192.0.2.128/25"]},
            "maxmind": {
                "database": path.to_str().unwrap(),
                "countries": {"DE": "eu-central"},
                "continents": {"NA": "us", "EU": "eu-west"}
            }
        }))
        .unwrap();
        let rt = EdgeRouter::new(&config).unwrap();
        let loc = |ip: &str| {
            rt.locate(ip.parse().unwrap())
                .map(|l| (l.region.to_string(), l.scope))
        };
        assert_eq!(loc("192.0.2.5"), Some(("eu-central".into(), Some(24))));
        assert_eq!(loc("192.0.2.200"), Some(("eu-lab".into(), Some(25))));
        assert_eq!(loc("198.51.100.7"), Some(("us".into(), Some(24))));
        assert_eq!(loc("203.0.113.1"), None);
        assert_eq!(loc("2001:db8::1"), None);

        let missing = RoutingConfig {
            maxmind: Some(MaxMindConfig {
                database: "/nonexistent.mmdb".into(),
                ..MaxMindConfig::default()
            }),
            ..RoutingConfig::default()
        };
        assert!(matches!(
            EdgeRouter::new(&missing),
            Err(RoutingError::MaxMind { .. })
        ));
    }
}
