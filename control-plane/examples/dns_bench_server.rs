//! A geo-DNS server for benchmarks (see bench/control-plane/dns.sh): the control plane on the
//! dev store with E registered edges in three regions, on ONE runtime thread, for at most S
//! seconds (bounded: it stops by itself).
//!
//! Usage: dns_bench_server LISTEN [EDGES=30] [SECONDS=60]

use control_plane::nodes::{NodeId, Region};
use control_plane::{
    ControlPlane, ControlPlaneConfig, MemStore, NodeInfo, NodeKind, NodeLoad, NodeRegistration,
    RegistrationConfig,
};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:5353".into());
    let arg = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (edges, seconds) = (arg(2, 30), arg(3, 60));
    // One core: the figure is queries per second per core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let config: ControlPlaneConfig = serde_json::from_value(serde_json::json!({
            "http_listen": "127.0.0.1:0",
            "dns": {"zone": "kcs.example", "listen": listen, "ttl_secs": 20},
            "routing": {
                "regions": {
                    "eu": ["192.0.2.0/24", "2001:db8:e0::/48"],
                    "us": ["198.51.100.0/24", "2001:db8:a0::/48"],
                    "ap": ["203.0.113.0/24"]
                },
                "latency_ms": {"eu": {"us": 90, "ap": 250}, "us": {"ap": 150}}
            },
            "reassign_rooms": false
        }))
        .expect("config");
        let store = MemStore::start();
        let cp = ControlPlane::bind(config, store.clone())
            .await
            .expect("bind");
        let keys = cp.keys().clone();
        let mut regs = Vec::new();
        for i in 0..edges {
            let (region, addr) = match i % 3 {
                0 => ("eu", format!("192.0.2.{}", 10 + i)),
                1 => ("us", format!("198.51.100.{}", 10 + i)),
                _ => ("ap", format!("203.0.113.{}", 10 + i)),
            };
            let info = NodeInfo {
                id: NodeId::new(format!("edge-{i}")).unwrap(),
                kind: NodeKind::Edge,
                region: Region::new(region).unwrap(),
                addresses: vec![addr.parse().unwrap()],
                url: format!("https://edge-{i}.kcs.example"),
                capacity: 1000,
                load: NodeLoad {
                    participants: (i * 7 % 100) as u32,
                    ..NodeLoad::default()
                },
                draining: false,
                healthy: true,
            };
            regs.push(
                NodeRegistration::register(
                    store.clone(),
                    &keys,
                    info,
                    RegistrationConfig::with_ttl(Duration::from_secs(seconds + 60)),
                )
                .await
                .expect("register"),
            );
        }
        println!("dns on {}", cp.dns_addr().expect("dns enabled"));
        cp.run(tokio::time::sleep(Duration::from_secs(seconds)))
            .await
            .expect("serve");
    });
}
