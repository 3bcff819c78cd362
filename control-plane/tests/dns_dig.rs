//! The geo-DNS answering real `dig` queries (bind9-dnsutils) on a loopback port, fed by the
//! node registry's watch: the dev store for the protocol cases, a real etcd cluster for the
//! watch-driven change.

mod common;

use common::{eventually, EtcdCluster};
use control_plane::dns::{self, GeoDns, GeoDnsConfig, GeoDnsHandler, NameServerConfig};
use control_plane::keys::KeyLayout;
use control_plane::nodes::{
    follow_nodes, NodeId, NodeInfo, NodeKind, NodeLoad, NodeRegistration, NodeTable, Region,
    RegistrationConfig,
};
use control_plane::routing::{EdgeRouter, RoutingConfig};
use control_plane::store::{EtcdConfig, EtcdStore, MemStore, Store};
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::Duration;

const ZONE: &str = "kcs.example";

fn routing() -> RoutingConfig {
    serde_json::from_value(serde_json::json!({
        "regions": {
            "eu": ["192.0.2.0/24", "2001:db8:e0::/48"],
            "us": ["198.51.100.0/24", "2001:db8:a0::/48"],
            "ap": ["203.0.113.0/24"]
        },
        "latency_ms": {"eu": {"us": 90, "ap": 250}, "us": {"ap": 150}}
    }))
    .unwrap()
}

fn edge(id: &str, region: &str, addrs: &[&str], load: u32) -> NodeInfo {
    NodeInfo {
        id: NodeId::new(id).unwrap(),
        kind: NodeKind::Edge,
        region: Region::new(region).unwrap(),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        url: format!("https://{id}.{ZONE}"),
        capacity: 100,
        load: NodeLoad {
            participants: load,
            ..NodeLoad::default()
        },
        draining: false,
        healthy: true,
    }
}

struct DnsUnderTest {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for DnsUnderTest {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds UDP and TCP on one free loopback port.
async fn bind_pair() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    for _ in 0..50 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return (udp, tcp);
        }
    }
    panic!("no free port pair");
}

async fn start_dns(store: Arc<dyn Store>, keys: KeyLayout) -> DnsUnderTest {
    let routing = routing();
    let mut cfg = GeoDnsConfig::new(ZONE);
    cfg.ttl_secs = 5;
    cfg.nameservers = vec![NameServerConfig {
        name: format!("ns1.{ZONE}"),
        addresses: vec!["203.0.113.53".parse().unwrap()],
    }];
    let core = GeoDns::new(
        &cfg,
        EdgeRouter::new(&routing).unwrap(),
        routing.regions.keys().cloned().collect::<Vec<_>>(),
    )
    .unwrap();
    let table = Arc::new(RwLock::new(NodeTable::new()));
    let (udp, tcp) = bind_pair().await;
    let port = udp.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn(follow_nodes(
        store,
        keys,
        table.clone(),
        || {},
        std::future::pending(),
    ));
    let server = tokio::spawn(async move {
        dns::serve(GeoDnsHandler::new(Arc::new(core), table), udp, tcp, async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    DnsUnderTest {
        port,
        stop: Some(stop_tx),
        tasks: vec![follower, server],
    }
}

/// What dig saw.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: String,
    answers: Vec<(String, String)>,
    answer_ttls: Vec<u32>,
    authority: Vec<String>,
    additional: Vec<String>,
    subnet: Option<String>,
}

async fn dig(port: u16, args: &[&str]) -> Dig {
    let mut cmd = Command::new("dig");
    cmd.arg("@127.0.0.1")
        .args(["-p", &port.to_string()])
        .args(["+time=2", "+tries=1", "+norec"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("dig installed (deps.sh)"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_dig(&text)
}

fn parse_dig(text: &str) -> Dig {
    let mut d = Dig {
        status: String::new(),
        flags: String::new(),
        answers: Vec::new(),
        answer_ttls: Vec::new(),
        authority: Vec::new(),
        additional: Vec::new(),
        subnet: None,
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or("").to_owned();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest.split(';').next().unwrap_or("").to_owned();
        }
        if let Some(rest) = line.strip_prefix("; CLIENT-SUBNET: ") {
            d.subnet = Some(rest.trim().to_owned());
        }
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.is_empty() || line.starts_with(";;") {
            if line.is_empty() {
                section = "";
            }
        } else if !line.starts_with(';') {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 5 {
                match section {
                    "answer" => {
                        d.answers.push((f[3].to_owned(), f[4..].join(" ")));
                        d.answer_ttls.push(f[1].parse().unwrap_or(u32::MAX));
                    }
                    "authority" => d.authority.push(f[3].to_owned()),
                    "additional" => d.additional.push(f[3].to_owned()),
                    _ => {}
                }
            }
        }
    }
    d
}

fn values(d: &Dig, rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = d
        .answers
        .iter()
        .filter(|(t, _)| t == rtype)
        .map(|(_, v)| v.clone())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_geo_answers_ecs_scope_and_negative_answers() {
    let store: Arc<dyn Store> = MemStore::start();
    let keys = KeyLayout::default();
    let dns = start_dns(store.clone(), keys.clone()).await;
    let cfg = RegistrationConfig::with_ttl(Duration::from_secs(5));
    let mut regs = Vec::new();
    for e in [
        edge("eu-1", "eu", &["192.0.2.10", "2001:db8:e0::10"], 10),
        edge("eu-2", "eu", &["192.0.2.11"], 20),
        edge("eu-3", "eu", &["192.0.2.12"], 90),
        edge("us-1", "us", &["198.51.100.10"], 5),
    ] {
        regs.push(
            NodeRegistration::register(store.clone(), &keys, e, cfg)
                .await
                .unwrap(),
        );
    }
    let port = dns.port;
    assert!(
        eventually(Duration::from_secs(5), || async {
            !values(&dig(port, &["meet.kcs.example", "A"]).await, "A").is_empty()
        })
        .await,
        "registry never reached the DNS"
    );

    // A client subnet in eu gets the two least-loaded eu edges, with the scope of the eu CIDR.
    let d = dig(port, &["meet.kcs.example", "A", "+subnet=192.0.2.0/24"]).await;
    assert_eq!(d.status, "NOERROR");
    assert!(d.flags.contains("aa"), "{d:?}");
    assert!(!d.flags.contains("ra"), "{d:?}");
    assert_eq!(values(&d, "A"), ["192.0.2.10", "192.0.2.11"]);
    assert_eq!(d.subnet.as_deref(), Some("192.0.2.0/24/24"));
    // Short TTL, as configured.
    assert_eq!(d.answer_ttls, [5, 5]);

    // A client subnet in us gets the us edge.
    let d = dig(port, &["meet.kcs.example", "A", "+subnet=198.51.100.0/24"]).await;
    assert_eq!(values(&d, "A"), ["198.51.100.10"]);
    assert_eq!(d.subnet.as_deref(), Some("198.51.100.0/24/24"));

    // ap has no edges: nearest by latency is us (150) before eu (250).
    let d = dig(port, &["meet.kcs.example", "A", "+subnet=203.0.113.0/24"]).await;
    assert_eq!(values(&d, "A"), ["198.51.100.10"]);

    // IPv6 client subnet in eu: AAAA of eu's IPv6 edge.
    let d = dig(
        port,
        &["meet.kcs.example", "AAAA", "+subnet=2001:db8:e0::/48"],
    )
    .await;
    assert_eq!(values(&d, "AAAA"), ["2001:db8:e0::10"]);
    assert_eq!(d.subnet.as_deref(), Some("2001:db8:e0::/48/48"));

    // Region name: that region's edges regardless of the client; scope 0.
    let d = dig(port, &["us.meet.kcs.example", "A", "+subnet=192.0.2.0/24"]).await;
    assert_eq!(values(&d, "A"), ["198.51.100.10"]);
    assert_eq!(d.subnet.as_deref(), Some("192.0.2.0/24/0"));

    // NODATA: us has no IPv6 edge.
    let d = dig(port, &["us.meet.kcs.example", "AAAA"]).await;
    assert_eq!(d.status, "NOERROR");
    assert!(d.answers.is_empty());
    assert_eq!(d.authority, ["SOA"]);

    // NXDOMAIN with SOA.
    for name in ["mars.meet.kcs.example", "nope.kcs.example"] {
        let d = dig(port, &[name, "A"]).await;
        assert_eq!(d.status, "NXDOMAIN", "{name}");
        assert!(d.flags.contains("aa"));
        assert_eq!(d.authority, ["SOA"]);
    }

    // SOA and NS (with glue) at the apex, over UDP and TCP.
    let d = dig(port, &["kcs.example", "SOA"]).await;
    assert_eq!(values(&d, "SOA").len(), 1);
    assert!(values(&d, "SOA")[0].starts_with("ns1.kcs.example. hostmaster.kcs.example."));
    let d = dig(port, &["kcs.example", "NS", "+tcp"]).await;
    assert_eq!(values(&d, "NS"), ["ns1.kcs.example."]);
    assert_eq!(d.additional, ["A"]);

    // Not our zone: REFUSED, never recursion.
    let d = dig(port, &["example.org", "A", "+rec"]).await;
    assert_eq!(d.status, "REFUSED");

    // An unhealthy edge disappears from the answers (watch-driven).
    regs[0].update(|n| n.healthy = false);
    regs[0].refresh().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            values(
                &dig(port, &["meet.kcs.example", "A", "+subnet=192.0.2.0/24"]).await,
                "A",
            ) == ["192.0.2.11", "192.0.2.12"]
        })
        .await,
        "unhealthy edge still answered"
    );

    // Malformed queries get FORMERR: two questions, ECS with host bits past its prefix, a
    // question cut short.
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut truncated = header(1, 0);
    truncated.extend([4, b'm', b'e']);
    for (what, msg) in [
        ("two questions", two_questions()),
        ("ecs host bits", ecs_host_bits()),
        ("truncated question", truncated),
    ] {
        sock.send_to(&msg, server).unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).expect(what);
        assert!(n >= 12, "{what}");
        assert_eq!(buf[0..2], msg[0..2], "{what}: id echoed");
        assert_eq!(buf[3] & 0x0f, 1, "{what}: rcode FORMERR");
    }
}

/// A query header (id 0xbeef, RD=0) with `qd` questions.
fn header(qd: u16, ar: u16) -> Vec<u8> {
    let mut m = vec![0xbe, 0xef, 0x00, 0x00];
    m.extend(qd.to_be_bytes());
    m.extend([0, 0, 0, 0]);
    m.extend(ar.to_be_bytes());
    m
}

fn question(m: &mut Vec<u8>) {
    for label in ["meet", "kcs", "example"] {
        m.push(label.len() as u8);
        m.extend(label.as_bytes());
    }
    m.extend([0, 0, 1, 0, 1]); // root, type A, class IN
}

fn two_questions() -> Vec<u8> {
    let mut m = header(2, 0);
    question(&mut m);
    question(&mut m);
    m
}

fn ecs_host_bits() -> Vec<u8> {
    let mut m = header(1, 1);
    question(&mut m);
    // OPT RR: root name, type 41, payload 1232, rcode/version/flags 0, rdlen 11,
    // option 8 (ECS) len 7: family 1, source /20, scope 0, address 192.0.2 (the 2 lies past
    // the first 20 bits).
    m.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 11]);
    m.extend([0, 8, 0, 7, 0, 1, 20, 0, 192, 0, 2]);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_mutated_queries_never_stop_the_server() {
    use rand::{Rng, SeedableRng};
    let store: Arc<dyn Store> = MemStore::start();
    let keys = KeyLayout::default();
    let dns = start_dns(store.clone(), keys.clone()).await;
    let _reg = NodeRegistration::register(
        store.clone(),
        &keys,
        edge("eu-1", "eu", &["192.0.2.10"], 0),
        RegistrationConfig::default(),
    )
    .await
    .unwrap();
    let port = dns.port;
    assert!(
        eventually(Duration::from_secs(5), || async {
            !values(&dig(port, &["meet.kcs.example", "A"]).await, "A").is_empty()
        })
        .await
    );

    // Seeded, so a failure replays: valid queries (with ECS) with bytes flipped, cut short or
    // extended, and pure noise. Bounded: 3000 datagrams.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b6373);
    let mut base = header(1, 1);
    question(&mut base);
    base.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 11]);
    base.extend([0, 8, 0, 7, 0, 1, 24, 0, 192, 0, 2]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    for i in 0..3000 {
        let msg: Vec<u8> = match i % 4 {
            0 => {
                let mut m = base.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..m.len());
                    m[at] = rng.gen();
                }
                m
            }
            1 => base[..rng.gen_range(0..base.len())].to_vec(),
            2 => {
                let mut m = base.clone();
                m.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>()));
                m
            }
            _ => (0..rng.gen_range(0..600))
                .map(|_| rng.gen::<u8>())
                .collect(),
        };
        sock.send_to(&msg, server).await.unwrap();
        if i % 200 == 0 {
            // Let the server drain its socket; we are testing robustness, not overload.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let d = dig(port, &["meet.kcs.example", "A", "+subnet=192.0.2.0/24"]).await;
    assert_eq!(d.status, "NOERROR", "{d:?}");
    assert_eq!(values(&d, "A"), ["192.0.2.10"]);
    assert!(!dns.tasks[1].is_finished(), "DNS server task ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_change_reaches_dns_answers() {
    let cluster = EtcdCluster::start(3);
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&EtcdConfig::new(cluster.endpoints()))
            .await
            .unwrap(),
    );
    let keys = KeyLayout::new("/kcs-dns-test");
    let dns = start_dns(store.clone(), keys.clone()).await;
    let port = dns.port;
    let cfg = RegistrationConfig::with_ttl(Duration::from_secs(2));
    let eu1 = NodeRegistration::register(
        store.clone(),
        &keys,
        edge("eu-1", "eu", &["192.0.2.10"], 0),
        cfg,
    )
    .await
    .unwrap();
    let eu1_task = tokio::spawn(eu1.clone().run(std::future::pending()));
    let want = |expected: &'static [&'static str]| async move {
        eventually(Duration::from_secs(8), || async {
            values(
                &dig(port, &["meet.kcs.example", "A", "+subnet=192.0.2.0/24"]).await,
                "A",
            ) == expected
        })
        .await
    };
    assert!(want(&["192.0.2.10"]).await, "registration not in DNS");

    // A second eu edge, less loaded, registers: it joins the answers.
    let eu2 = NodeRegistration::register(
        store.clone(),
        &keys,
        edge("eu-2", "eu", &["192.0.2.20"], 0),
        cfg,
    )
    .await
    .unwrap();
    let eu2_task = tokio::spawn(eu2.clone().run(std::future::pending()));
    assert!(
        want(&["192.0.2.10", "192.0.2.20"]).await,
        "new edge not in DNS"
    );

    // eu-1 starts draining: gone from the answers.
    eu1.update(|n| n.draining = true);
    eu1.refresh().await.unwrap();
    assert!(want(&["192.0.2.20"]).await, "draining edge still in DNS");

    // eu-2 crashes (no revoke): its lease expires and eu has nobody; the answer is empty
    // (eu-1 is draining, no other region has edges).
    eu2_task.abort();
    assert!(want(&[]).await, "crashed edge still in DNS after its TTL");
    eu1_task.abort();
}
