//! Placement latency against a running etcd cluster (see bench/control-plane/placement.sh).
//!
//! Phases, each timed per call:
//! - `new`: N distinct new rooms placed by C concurrent workers (compare-and-create);
//! - `existing`: the same rooms placed again (the join path: read + origin liveness check);
//! - `contended`: R rounds of 100 concurrent placements of one fresh room (one wins).
//!
//! Usage: placement_bench ENDPOINTS [ROOMS=2000] [CONCURRENCY=16] [ROUNDS=20]
//! ENDPOINTS is a comma-separated list of etcd client URLs. Bounded: it places a fixed number of
//! rooms and exits.

use cascade_proto::RoomId;
use control_plane::keys::KeyLayout;
use control_plane::nodes::{NodeId, Region};
use control_plane::placement::Placer;
use control_plane::{
    EtcdConfig, EtcdStore, NodeInfo, NodeKind, NodeLoad, NodeRegistration, RegistrationConfig,
    Store,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn percentiles(name: &str, mut v: Vec<Duration>, wall: Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    println!(
        "{name:<10} n={:<6} p50={:>8.2?} p90={:>8.2?} p99={:>8.2?} max={:>8.2?} throughput={:.0}/s",
        v.len(),
        p(0.50),
        p(0.90),
        p(0.99),
        v[v.len() - 1],
        v.len() as f64 / wall.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let endpoints: Vec<String> = args
        .get(1)
        .expect("usage: placement_bench ENDPOINTS [ROOMS] [CONCURRENCY] [ROUNDS]")
        .split(',')
        .map(str::to_owned)
        .collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (rooms, concurrency, rounds) = (arg(2, 2000), arg(3, 16), arg(4, 20));

    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&EtcdConfig::new(endpoints))
            .await
            .expect("etcd client"),
    );
    let keys = KeyLayout::new(&format!("/kcs-bench/{}", std::process::id()));
    let mut regs = Vec::new();
    for (i, region) in ["eu", "us", "ap"].iter().enumerate() {
        let info = NodeInfo {
            id: NodeId::new(format!("origin-{i}")).unwrap(),
            kind: NodeKind::Origin,
            region: Region::new(*region).unwrap(),
            addresses: vec![format!("198.51.100.{}", 10 + i).parse().unwrap()],
            url: format!("https://origin-{i}.example"),
            capacity: 100_000,
            load: NodeLoad::default(),
            draining: false,
            healthy: true,
        };
        regs.push(
            NodeRegistration::register(
                store.clone(),
                &keys,
                info,
                RegistrationConfig::with_ttl(Duration::from_secs(60)),
            )
            .await
            .expect("register origin"),
        );
    }
    let placer = Placer::new(store.clone(), keys.clone());
    let room_ids: Arc<Vec<RoomId>> = Arc::new(
        (0..rooms)
            .map(|i| RoomId::new(format!("room-{i}")).unwrap())
            .collect(),
    );

    for phase in ["new", "existing"] {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..concurrency {
            let placer = placer.clone();
            let room_ids = room_ids.clone();
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let region = Region::new(["eu", "us", "ap"][w % 3]).unwrap();
                for r in room_ids.iter().skip(w).step_by(concurrency) {
                    let t = Instant::now();
                    placer.place(r, Some(&region)).await.expect("placement");
                    lat.push(t.elapsed());
                }
                lat
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r.unwrap());
        }
        percentiles(phase, all, start.elapsed());
    }

    let mut all = Vec::new();
    let start = Instant::now();
    for round in 0..rounds {
        let room = RoomId::new(format!("contended-{round}")).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let placer = placer.clone();
            let room = room.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let p = placer.place(&room, None).await.expect("placement");
                (t.elapsed(), p.origin)
            });
        }
        let mut origins = std::collections::BTreeSet::new();
        while let Some(r) = tasks.join_next().await {
            let (d, o) = r.unwrap();
            all.push(d);
            origins.insert(o);
        }
        assert_eq!(origins.len(), 1, "round {round}: {origins:?}");
    }
    percentiles("contended", all, start.elapsed());
    for r in regs {
        r.deregister().await;
    }
}
