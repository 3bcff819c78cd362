//! Geo-DNS: an authoritative server for the configured zone that answers `meet.<zone>` with the
//! edges nearest to the client.
//!
//! Names served (RFC 1034/1035 authoritative semantics, no recursion):
//!
//! | name | answer |
//! |---|---|
//! | `<zone>` | SOA, NS (with glue for in-zone name servers); other types NODATA |
//! | `<ns>.<zone>` (configured name servers) | their A/AAAA glue |
//! | `meet.<zone>` | A/AAAA of up to `max_answers` edges nearest the client (see [`crate::routing`]) |
//! | `<region>.meet.<zone>` | A/AAAA of that region's edges (nearest other region if it has none) |
//! | anything else in the zone | NXDOMAIN with the SOA (RFC 2308 §2.1) |
//! | outside the zone | REFUSED (we are not a resolver) |
//!
//! A name that exists but has no record of the asked type (a region with no IPv6 edge asked for
//! AAAA, `meet` asked for TXT) is NODATA: NOERROR, empty answer, SOA in authority (RFC 2308
//! §2.2). Negative answers are cached for the SOA MINIMUM, which equals the short positive TTL,
//! so a recovering edge reappears quickly everywhere.
//!
//! EDNS Client Subnet (RFC 7871): when a resolver forwards the client's subnet, that subnet (not
//! the resolver's address) locates the client, and the option is echoed with the same family,
//! source prefix and address and a SCOPE PREFIX-LENGTH saying which leading bits the answer
//! depended on (§7.2.1): the matched CIDR's length for `meet.<zone>`, 0 for answers that do
//! not depend on the client. A subnet with bits set beyond its source prefix is FORMERR
//! (§7.1.2 "MUST ... REFUSED or FORMERR"); so is any message hickory cannot parse or one
//! with other than one question.
//!
//! The answering core ([`GeoDns::answer`]) is sans-IO: a query plus the mirrored node table in,
//! records out. [`GeoDnsHandler`] is the hickory-server shell; the table it reads is kept
//! current by [`crate::nodes::follow_nodes`] from the store's watch, never by polling.

use crate::nodes::{read_table, NodeInfo, NodeKind, NodeTable, Region};
use crate::routing::{mask, EdgeRouter};
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

/// A name server of the zone, for NS records and their glue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameServerConfig {
    /// Fully qualified name (`ns1.example.com`).
    pub name: String,
    /// Its addresses, served as glue when the name is inside the zone.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// Geo-DNS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoDnsConfig {
    /// The zone we are authoritative for (`example.com`).
    pub zone: String,
    /// UDP and TCP listen address (default `0.0.0.0:53`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TTL of answers and of negative answers (default 20 s: a dead edge leaves resolvers'
    /// caches within 20 s plus its lease TTL, while resolvers still absorb most load).
    #[serde(default = "default_ttl")]
    pub ttl_secs: u32,
    /// Edges per answer (default 2: a client has a second address if the first fails, and
    /// load still spreads because every answer is the current least-loaded pair).
    #[serde(default = "default_max_answers")]
    pub max_answers: usize,
    /// The zone's name servers (default: `ns1.<zone>` without glue).
    #[serde(default)]
    pub nameservers: Vec<NameServerConfig>,
    /// SOA RNAME, the zone contact as a name (default `hostmaster.<zone>`).
    #[serde(default)]
    pub hostmaster: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 53))
}
fn default_ttl() -> u32 {
    20
}
fn default_max_answers() -> usize {
    2
}

impl GeoDnsConfig {
    /// Defaults for `zone`.
    pub fn new(zone: &str) -> Self {
        Self {
            zone: zone.to_owned(),
            listen: default_listen(),
            ttl_secs: default_ttl(),
            max_answers: default_max_answers(),
            nameservers: Vec::new(),
            hostmaster: None,
        }
    }
}

/// Why a DNS config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsConfigError {
    #[error("invalid domain name {name:?}: {reason}")]
    BadName { name: String, reason: String },
}

fn fqdn(s: &str) -> Result<Name, DnsConfigError> {
    let mut n = Name::from_ascii(s).map_err(|e| DnsConfigError::BadName {
        name: s.to_owned(),
        reason: e.to_string(),
    })?;
    n.set_fqdn(true);
    Ok(n.to_lowercase())
}

/// SOA timers (RFC 1912 §2.2 suggestions; we have no secondaries, so they only matter to tools).
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 604_800;

/// One question, as the core sees it.
#[derive(Debug, Clone)]
pub struct DnsQuestion {
    pub name: Name,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    /// The address that locates the client: the ECS address when the query has one with a
    /// non-zero source prefix, else the query's source address.
    pub client: IpAddr,
    /// Whether `client` came from ECS (then the answer's scope matters).
    pub from_ecs: bool,
    /// The ECS source prefix length (0 without ECS).
    pub source_prefix: u8,
}

/// The core's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    /// NS records for the authority section.
    pub authorities: Vec<Record>,
    /// The SOA for negative answers.
    pub soa: Vec<Record>,
    pub additionals: Vec<Record>,
    /// ECS SCOPE PREFIX-LENGTH to echo (RFC 7871 §7.2.1).
    pub ecs_scope: u8,
}

impl DnsAnswer {
    fn refused() -> Self {
        Self {
            rcode: ResponseCode::Refused,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            soa: Vec::new(),
            additionals: Vec::new(),
            ecs_scope: 0,
        }
    }
}

/// The answering core (see the module docs).
pub struct GeoDns {
    zone: Name,
    meet: Name,
    ttl: u32,
    max_answers: usize,
    nameservers: Vec<(Name, Vec<IpAddr>)>,
    hostmaster: Name,
    router: EdgeRouter,
    /// Regions named in the routing config; regions of registered edges are added per query.
    configured_regions: BTreeSet<Region>,
}

impl GeoDns {
    pub fn new(
        config: &GeoDnsConfig,
        router: EdgeRouter,
        configured_regions: impl IntoIterator<Item = Region>,
    ) -> Result<Self, DnsConfigError> {
        let zone = fqdn(&config.zone)?;
        let meet = fqdn(&format!("meet.{}", config.zone))?;
        let nameservers = if config.nameservers.is_empty() {
            vec![(fqdn(&format!("ns1.{}", config.zone))?, Vec::new())]
        } else {
            config
                .nameservers
                .iter()
                .map(|ns| Ok((fqdn(&ns.name)?, ns.addresses.clone())))
                .collect::<Result<_, DnsConfigError>>()?
        };
        let hostmaster = match &config.hostmaster {
            Some(h) => fqdn(h)?,
            None => fqdn(&format!("hostmaster.{}", config.zone))?,
        };
        Ok(Self {
            zone,
            meet,
            ttl: config.ttl_secs,
            max_answers: config.max_answers.max(1),
            nameservers,
            hostmaster,
            router,
            configured_regions: configured_regions.into_iter().collect(),
        })
    }

    pub fn zone(&self) -> &Name {
        &self.zone
    }

    fn soa(&self, serial: u32) -> Record {
        let mname = self.nameservers[0].0.clone();
        Record::from_rdata(
            self.zone.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                mname,
                self.hostmaster.clone(),
                serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                // Negative-caching TTL (RFC 2308 §4): as short as positive answers.
                self.ttl,
            )),
        )
    }

    fn address_records(&self, name: &Name, addrs: &[IpAddr], qtype: RecordType) -> Vec<Record> {
        addrs
            .iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|rd| Record::from_rdata(name.clone(), self.ttl, rd))
            .collect()
    }

    fn edge_records(&self, name: &Name, edges: &[&NodeInfo], qtype: RecordType) -> Vec<Record> {
        let mut seen = BTreeSet::new();
        let addrs: Vec<IpAddr> = edges
            .iter()
            .flat_map(|n| n.addresses.iter().copied())
            .filter(|ip| seen.insert(*ip))
            .collect();
        self.address_records(name, &addrs, qtype)
    }

    /// Answers one question from the node table (see the module docs for the rules).
    pub fn answer(&self, q: &DnsQuestion, nodes: &NodeTable) -> DnsAnswer {
        let name = q.name.to_lowercase();
        if q.qclass != DNSClass::IN || !self.zone.zone_of(&name) {
            return DnsAnswer::refused();
        }
        // The serial follows the registry: every registration change is a new zone version.
        let serial = (nodes.revision().0 & i64::from(u32::MAX)) as u32;
        let mut out = DnsAnswer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            authorities: Vec::new(),
            soa: Vec::new(),
            additionals: Vec::new(),
            ecs_scope: 0,
        };
        let is_address = matches!(q.qtype, RecordType::A | RecordType::AAAA);

        if name == self.zone {
            match q.qtype {
                RecordType::SOA => out.answers.push(self.soa(serial)),
                RecordType::NS => {
                    for (ns, addrs) in &self.nameservers {
                        out.answers.push(Record::from_rdata(
                            self.zone.clone(),
                            self.ttl,
                            RData::NS(NS(ns.clone())),
                        ));
                        if self.zone.zone_of(ns) {
                            out.additionals
                                .extend(self.address_records(ns, addrs, RecordType::A));
                            out.additionals.extend(self.address_records(
                                ns,
                                addrs,
                                RecordType::AAAA,
                            ));
                        }
                    }
                }
                _ => {}
            }
        } else if let Some((_, addrs)) = self.nameservers.iter().find(|(ns, _)| ns == &name) {
            if is_address {
                out.answers = self.address_records(&name, addrs, q.qtype);
            }
        } else if name == self.meet {
            if is_address {
                let located = self.router.locate(q.client);
                let region = located.as_ref().map(|l| &l.region);
                let edges =
                    self.router
                        .route(region, nodes.of_kind(NodeKind::Edge), self.max_answers);
                out.answers = self.edge_records(&name, &edges, q.qtype);
                if q.from_ecs {
                    out.ecs_scope = located.and_then(|l| l.scope).unwrap_or(q.source_prefix);
                }
            }
        } else if let Some(region) = self.region_label(&name, nodes) {
            if is_address {
                let edges = self.router.route(
                    Some(&region),
                    nodes.of_kind(NodeKind::Edge),
                    self.max_answers,
                );
                out.answers = self.edge_records(&name, &edges, q.qtype);
            }
        } else if name.num_labels() > self.meet.num_labels() && self.meet.zone_of(&name) {
            // Below a region name (x.eu.meet.<zone>) or an unknown region: no such name.
            out.rcode = ResponseCode::NXDomain;
        } else if self.meet.zone_of(&name) || name.zone_of(&self.meet) {
            // An empty non-terminal on the way to meet.<zone> exists (RFC 8020 §2): NODATA.
        } else {
            out.rcode = ResponseCode::NXDomain;
        }

        if out.answers.is_empty() && q.qtype != RecordType::NS {
            out.soa.push(self.soa(serial));
        }
        out
    }

    /// `name` is `<region>.meet.<zone>` for a region we know (configured or registered).
    fn region_label(&self, name: &Name, nodes: &NodeTable) -> Option<Region> {
        if name.num_labels() != self.meet.num_labels() + 1 || !self.meet.zone_of(name) {
            return None;
        }
        let label = name.iter().next()?;
        let region = Region::new(std::str::from_utf8(label).ok()?).ok()?;
        let known = self.configured_regions.contains(&region)
            || nodes.of_kind(NodeKind::Edge).any(|n| n.region == region);
        known.then_some(region)
    }
}

/// hickory-server request handler around [`GeoDns`].
#[derive(Clone)]
pub struct GeoDnsHandler {
    core: Arc<GeoDns>,
    nodes: Arc<RwLock<NodeTable>>,
}

impl GeoDnsHandler {
    pub fn new(core: Arc<GeoDns>, nodes: Arc<RwLock<NodeTable>>) -> Self {
        Self { core, nodes }
    }
}

/// Largest UDP payload we advertise: the DNS flag day 2020 value, which avoids fragmentation.
const EDNS_MAX_PAYLOAD: u16 = 1232;

#[async_trait::async_trait]
impl RequestHandler for GeoDnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_MAX_PAYLOAD);
            e.set_version(0);
            e
        });
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = false;
        metadata.recursion_available = false;

        let verdict = self.decide(request);
        let answer = match verdict {
            Ok((question, ecs)) => {
                let answer = {
                    let table = read_table(&self.nodes);
                    self.core.answer(&question, &table)
                };
                if let (Some(e), Some(ecs)) = (edns.as_mut(), ecs) {
                    e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
                        ecs.addr(),
                        ecs.source_prefix(),
                        answer.ecs_scope,
                    )));
                }
                metadata.authoritative = answer.authoritative;
                metadata.response_code = answer.rcode;
                answer
            }
            Err(rcode) => {
                metadata.response_code = rcode;
                if let Some(e) = edns.as_mut() {
                    e.set_rcode_high(rcode.high());
                }
                DnsAnswer::refused()
            }
        };
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answer.answers.iter(),
            answer.authorities.iter(),
            answer.soa.iter(),
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns response not sent");
                let mut md = Metadata::response_from_request(&request.metadata);
                md.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: md,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

impl GeoDnsHandler {
    /// Checks the request's form; returns the question and the ECS option to echo, or the
    /// error code to answer with.
    fn decide(
        &self,
        request: &Request,
    ) -> Result<(DnsQuestion, Option<ClientSubnet>), ResponseCode> {
        if let Some(e) = &request.edns {
            // RFC 6891 §6.1.3: we implement version 0 only.
            if e.version() > 0 {
                return Err(ResponseCode::BADVERS);
            }
        }
        if request.metadata.message_type != MessageType::Query {
            return Err(ResponseCode::FormErr);
        }
        if request.metadata.op_code != OpCode::Query {
            return Err(ResponseCode::NotImp);
        }
        // Exactly one question (RFC 9619): anything else is malformed for us.
        let info = request.request_info().map_err(|_| ResponseCode::FormErr)?;
        let ecs = match request
            .edns
            .as_ref()
            .and_then(|e| e.option(EdnsCode::Subnet))
        {
            Some(EdnsOption::Subnet(s)) => {
                let max = if s.addr().is_ipv4() { 32 } else { 128 };
                // RFC 7871 §7.1.2: a scope in a query, a prefix longer than the address, or
                // address bits beyond the prefix make the option malformed.
                if s.scope_prefix() != 0
                    || s.source_prefix() > max
                    || mask(s.addr(), s.source_prefix()) != s.addr()
                {
                    return Err(ResponseCode::FormErr);
                }
                Some(*s)
            }
            _ => None,
        };
        let (client, from_ecs, source_prefix) = match ecs {
            Some(s) if s.source_prefix() > 0 => (s.addr(), true, s.source_prefix()),
            _ => (request.src().ip(), false, 0),
        };
        Ok((
            DnsQuestion {
                name: Name::from(info.query.name().clone()),
                qtype: info.query.query_type(),
                qclass: info.query.query_class(),
                client,
                from_ecs,
                source_prefix,
            },
            ecs,
        ))
    }
}

/// Serves DNS on `udp` and `tcp` until `shutdown` completes.
pub async fn serve(
    handler: GeoDnsHandler,
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), std::io::Error> {
    let mut server = hickory_server::Server::new(handler);
    server.register_socket(udp);
    // A TCP client idle this long is dropped (slowloris bound); responses are tiny.
    server.register_listener(tcp, std::time::Duration::from_secs(5), 16);
    shutdown.await;
    server
        .shutdown_gracefully()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodes::tests::node;
    use crate::routing::RoutingConfig;
    use crate::store::{KeyValue, Revision, WatchEvent};

    fn core() -> GeoDns {
        let routing: RoutingConfig = serde_json::from_value(serde_json::json!({
            "regions": {"eu": ["192.0.2.0/24"], "us": ["198.51.100.0/24", "2001:db8::/32"]},
            "latency_ms": {"eu": {"us": 90}}
        }))
        .unwrap();
        let router = EdgeRouter::new(&routing).unwrap();
        let mut cfg = GeoDnsConfig::new("example.com");
        cfg.nameservers = vec![NameServerConfig {
            name: "ns1.example.com".into(),
            addresses: vec!["203.0.113.53".parse().unwrap()],
        }];
        GeoDns::new(
            &cfg,
            router,
            routing.regions.keys().cloned().collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn table(edges: &[NodeInfo]) -> NodeTable {
        let mut t = NodeTable::new();
        let events: Vec<WatchEvent> = edges
            .iter()
            .map(|n| {
                WatchEvent::Put(KeyValue {
                    key: format!("/n/{}", n.id),
                    value: serde_json::to_vec(n).unwrap(),
                    mod_revision: Revision(1),
                    lease: None,
                })
            })
            .collect();
        t.handle_events(&events, Revision(42));
        t
    }

    fn edge(id: &str, region: &str, ip: &str) -> NodeInfo {
        let mut n = node(id, NodeKind::Edge, region, 0);
        n.addresses = vec![ip.parse().unwrap()];
        n
    }

    fn q(name: &str, qtype: RecordType, client: &str, ecs: Option<u8>) -> DnsQuestion {
        DnsQuestion {
            name: Name::from_ascii(name).unwrap(),
            qtype,
            qclass: DNSClass::IN,
            client: client.parse().unwrap(),
            from_ecs: ecs.is_some(),
            source_prefix: ecs.unwrap_or(0),
        }
    }

    fn addrs(a: &DnsAnswer) -> Vec<String> {
        a.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn answers_by_name_type_and_client() {
        let g = core();
        let t = table(&[
            edge("eu-1", "eu", "192.0.2.10"),
            edge("us-1", "us", "198.51.100.10"),
            edge("us-6", "us", "2001:db8::10"),
        ]);
        use RecordType::*;
        // (name, type, client, ecs source prefix, rcode, answers, has SOA, ecs scope)
        let cases: Vec<(
            &str,
            RecordType,
            &str,
            Option<u8>,
            ResponseCode,
            Vec<&str>,
            bool,
            u8,
        )> = vec![
            (
                "meet.example.com.",
                A,
                "192.0.2.1",
                Some(24),
                ResponseCode::NoError,
                vec!["192.0.2.10"],
                false,
                24,
            ),
            (
                "meet.example.com.",
                A,
                "198.51.100.0",
                Some(24),
                ResponseCode::NoError,
                vec!["198.51.100.10"],
                false,
                24,
            ),
            (
                "MEET.Example.COM.",
                A,
                "198.51.100.7",
                None,
                ResponseCode::NoError,
                vec!["198.51.100.10"],
                false,
                0,
            ),
            (
                "meet.example.com.",
                AAAA,
                "2001:db8:1::",
                Some(48),
                ResponseCode::NoError,
                vec!["2001:db8::10"],
                false,
                32,
            ),
            // eu has no IPv6 edge: NODATA.
            (
                "meet.example.com.",
                AAAA,
                "192.0.2.1",
                Some(24),
                ResponseCode::NoError,
                vec![],
                true,
                24,
            ),
            (
                "meet.example.com.",
                TXT,
                "192.0.2.1",
                None,
                ResponseCode::NoError,
                vec![],
                true,
                0,
            ),
            (
                "eu.meet.example.com.",
                A,
                "198.51.100.1",
                Some(24),
                ResponseCode::NoError,
                vec!["192.0.2.10"],
                false,
                0,
            ),
            (
                "mars.meet.example.com.",
                A,
                "192.0.2.1",
                None,
                ResponseCode::NXDomain,
                vec![],
                true,
                0,
            ),
            (
                "x.eu.meet.example.com.",
                A,
                "192.0.2.1",
                None,
                ResponseCode::NXDomain,
                vec![],
                true,
                0,
            ),
            (
                "www.example.com.",
                A,
                "192.0.2.1",
                None,
                ResponseCode::NXDomain,
                vec![],
                true,
                0,
            ),
            (
                "ns1.example.com.",
                A,
                "192.0.2.1",
                None,
                ResponseCode::NoError,
                vec!["203.0.113.53"],
                false,
                0,
            ),
            (
                "example.com.",
                A,
                "192.0.2.1",
                None,
                ResponseCode::NoError,
                vec![],
                true,
                0,
            ),
            (
                "example.org.",
                A,
                "192.0.2.1",
                None,
                ResponseCode::Refused,
                vec![],
                false,
                0,
            ),
        ];
        for (name, qtype, client, ecs, rcode, want, soa, scope) in cases {
            let a = g.answer(&q(name, qtype, client, ecs), &t);
            assert_eq!(a.rcode, rcode, "{name} {qtype}");
            assert_eq!(addrs(&a), want, "{name} {qtype}");
            assert_eq!(!a.soa.is_empty(), soa, "{name} {qtype} soa");
            assert_eq!(a.ecs_scope, scope, "{name} {qtype} scope");
            assert_eq!(a.authoritative, rcode != ResponseCode::Refused);
        }
    }

    #[test]
    fn soa_and_ns_with_glue() {
        let g = core();
        let t = table(&[]);
        let a = g.answer(&q("example.com.", RecordType::SOA, "192.0.2.1", None), &t);
        match &a.answers[0].data {
            RData::SOA(soa) => {
                assert_eq!(soa.serial, 42);
                assert_eq!(soa.minimum, 20);
                assert_eq!(soa.mname.to_string(), "ns1.example.com.");
            }
            other => panic!("{other:?}"),
        }
        let a = g.answer(&q("example.com.", RecordType::NS, "192.0.2.1", None), &t);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.additionals.len(), 1);
    }

    #[test]
    fn unhealthy_and_draining_edges_leave_answers_and_region_falls_back() {
        let g = core();
        let mut sick = edge("eu-1", "eu", "192.0.2.10");
        sick.healthy = false;
        let mut draining = edge("eu-2", "eu", "192.0.2.11");
        draining.draining = true;
        let t = table(&[sick, draining, edge("us-1", "us", "198.51.100.10")]);
        let a = g.answer(
            &q("meet.example.com.", RecordType::A, "192.0.2.1", Some(24)),
            &t,
        );
        assert_eq!(addrs(&a), ["198.51.100.10"]);
        let a = g.answer(
            &q("eu.meet.example.com.", RecordType::A, "192.0.2.1", None),
            &t,
        );
        assert_eq!(addrs(&a), ["198.51.100.10"]);
    }
}
