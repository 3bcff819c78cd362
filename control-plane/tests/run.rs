//! The library entry point end to end, as `kcs dev` uses it: dev store, REST over real TCP,
//! DNS over real UDP (dig), node registration, clean shutdown.

mod common;

use common::eventually;
use control_plane::nodes::{NodeId, Region};
use control_plane::{
    ControlPlane, ControlPlaneConfig, MemStore, NodeInfo, NodeKind, NodeLoad, NodeRegistration,
    RegistrationConfig,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "dev-key-for-tests";

/// One HTTP/1.1 request over a fresh connection (the API is plain HTTP; no client crate).
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let json = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

fn dig_a(dns: SocketAddr, name: &str, subnet: &str) -> Vec<String> {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args([
            "-p",
            &dns.port().to_string(),
            "+short",
            "+time=2",
            "+tries=1",
        ])
        .arg(format!("+subnet={subnet}"))
        .args([name, "A"])
        .output()
        .expect("dig installed (deps.sh)");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_control_plane_serves_api_and_dns_and_shuts_down() {
    let config: ControlPlaneConfig = serde_json::from_value(json!({
        "http_listen": "127.0.0.1:0",
        "dns": {"zone": "kcs.example", "listen": "127.0.0.1:0", "ttl_secs": 5},
        "routing": {
            "regions": {"eu": ["192.0.2.0/24"], "us": ["198.51.100.0/24"]},
            "latency_ms": {"eu": {"us": 90}}
        },
        "api": {"api_keys": [KEY]}
    }))
    .unwrap();
    let store = MemStore::start();
    let cp = ControlPlane::bind(config, store.clone()).await.unwrap();
    let http_addr = cp.http_addr();
    let dns_addr = cp.dns_addr().unwrap();
    let keys = cp.keys().clone();
    let verifier = cp.verifier();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cp.run(async {
        let _ = stop_rx.await;
    }));

    // An edge and an origin register as they would in the same process.
    let reg = RegistrationConfig::default();
    let node = |id: &str, kind, region: &str, addr: &str| NodeInfo {
        id: NodeId::new(id).unwrap(),
        kind,
        region: Region::new(region).unwrap(),
        addresses: vec![addr.parse().unwrap()],
        url: format!("http://{addr}:8443"),
        capacity: 500,
        load: NodeLoad::default(),
        draining: false,
        healthy: true,
    };
    let edge = NodeRegistration::register(
        store.clone(),
        &keys,
        node("edge-1", NodeKind::Edge, "eu", "192.0.2.10"),
        reg,
    )
    .await
    .unwrap();
    let origin = NodeRegistration::register(
        store.clone(),
        &keys,
        node("origin-1", NodeKind::Origin, "eu", "192.0.2.20"),
        reg,
    )
    .await
    .unwrap();
    let edge_task = tokio::spawn(edge.clone().run(std::future::pending()));

    let (s, m) = http(
        http_addr,
        "POST",
        "/v1/meetings",
        Some(json!({"room": "demo"})),
    )
    .await;
    assert_eq!(s, 201, "{m}");
    let (s, t) = http(
        http_addr,
        "POST",
        "/v1/meetings/demo/tokens",
        Some(json!({"identity": "dev", "role": "host"})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    // The in-process verifier (what the dev edge uses) accepts the minted token.
    verifier.verify(t["token"].as_str().unwrap()).unwrap();

    assert!(
        eventually(Duration::from_secs(5), || async {
            http(
                http_addr,
                "GET",
                "/v1/meetings/demo/join-info?client_ip=198.51.100.9",
                None,
            )
            .await
            .0 == 200
        })
        .await
    );
    let (_, j) = http(
        http_addr,
        "GET",
        "/v1/meetings/demo/join-info?client_ip=198.51.100.9",
        None,
    )
    .await;
    // The us client is sent to the only (eu) edge: nearest region with an edge.
    assert_eq!(j["edge"]["url"], "http://192.0.2.10:8443");
    assert_eq!(j["origin"]["origin"], "origin-1");
    // Without client_ip, the TCP peer address (loopback, no region) is used.
    let (s, _) = http(http_addr, "GET", "/v1/meetings/demo/join-info", None).await;
    assert_eq!(s, 200);

    let answers =
        tokio::task::spawn_blocking(move || dig_a(dns_addr, "meet.kcs.example", "192.0.2.0/24"))
            .await
            .unwrap();
    assert_eq!(answers, ["192.0.2.10"]);

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("control plane stops on shutdown")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(http_addr).await.is_err());
    edge_task.abort();
    origin.deregister().await;
}
