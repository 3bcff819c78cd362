//! The store, registry and placement against a real 3-member etcd cluster.

mod common;

use cascade_proto::RoomId;
use common::{eventually, EtcdCluster};
use control_plane::keys::KeyLayout;
use control_plane::nodes::{
    NodeId, NodeInfo, NodeKind, NodeLoad, NodeRegistration, Region, RegistrationConfig,
};
use control_plane::placement::{PlacementChange, Placer};
use control_plane::store::{
    CreateOutcome, EtcdConfig, EtcdStore, Revision, Store, SwapOutcome, WatchEvent,
};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

/// etcd's smallest usable lease TTL with default election timeouts is about 2 s.
const TTL: Duration = Duration::from_secs(2);

async fn connect(cluster: &EtcdCluster) -> Arc<dyn Store> {
    Arc::new(
        EtcdStore::connect(&EtcdConfig::new(cluster.endpoints()))
            .await
            .expect("client"),
    )
}

fn origin(id: &str, region: &str, load: u32) -> NodeInfo {
    NodeInfo {
        id: NodeId::new(id).unwrap(),
        kind: NodeKind::Origin,
        region: Region::new(region).unwrap(),
        addresses: vec!["198.51.100.7".parse().unwrap()],
        url: format!("https://{id}.example"),
        capacity: 1000,
        load: NodeLoad {
            participants: load,
            ..NodeLoad::default()
        },
        draining: false,
        healthy: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_semantics_and_hundred_concurrent_creates_give_one_origin() {
    let cluster = EtcdCluster::start(3);
    let store = connect(&cluster).await;

    // Store basics on the real thing: create is exclusive, CAS detects changes, watch sees
    // lease-expiry deletions.
    match store.create("/t/a", b"1".to_vec(), None).await.unwrap() {
        CreateOutcome::Created(_) => {}
        other => panic!("first create: {other:?}"),
    }
    match store.create("/t/a", b"2".to_vec(), None).await.unwrap() {
        CreateOutcome::Exists(kv) => assert_eq!(kv.value, b"1"),
        other => panic!("second create: {other:?}"),
    }
    let kv = store.get("/t/a").await.unwrap().unwrap();
    assert!(matches!(
        store
            .compare_and_swap("/t/a", Revision(kv.mod_revision.0 - 1), b"x".to_vec(), None)
            .await
            .unwrap(),
        SwapOutcome::Conflict(Some(_))
    ));
    assert!(matches!(
        store
            .compare_and_swap("/t/a", kv.mod_revision, b"3".to_vec(), None)
            .await
            .unwrap(),
        SwapOutcome::Swapped(_)
    ));
    let page = store.range("/t/", None, None).await.unwrap();
    let mut watch = store
        .watch_prefix("/t/", Revision(page.revision.0 + 1))
        .await
        .unwrap();
    let lease = store.lease_grant(TTL).await.unwrap();
    store.put("/t/leased", vec![], Some(lease)).await.unwrap();
    assert!(store.lease_keepalive(lease).await.unwrap());
    store.lease_revoke(lease).await.unwrap();
    assert!(!store.lease_keepalive(lease).await.unwrap());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("watch event in time")
            .expect("watch open")
            .expect("watch ok");
        seen.extend(batch.events);
    }
    assert!(matches!(&seen[0], WatchEvent::Put(kv) if kv.key == "/t/leased"));
    assert!(matches!(&seen[1], WatchEvent::Delete { key, .. } if key == "/t/leased"));

    // Three origins; 100 placers on 10 separate connections race to place one room.
    let keys = KeyLayout::new("/kcs-test");
    let cfg = RegistrationConfig::with_ttl(Duration::from_secs(10));
    let mut regs = Vec::new();
    for (id, load) in [("o1", 5), ("o2", 5), ("o3", 5)] {
        regs.push(
            NodeRegistration::register(store.clone(), &keys, origin(id, "eu", load), cfg)
                .await
                .unwrap(),
        );
    }
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect(&cluster).await);
    }
    let room = RoomId::new("all-hands").unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let placer = Placer::new(clients[i % clients.len()].clone(), keys.clone());
        let room = room.clone();
        // Different region preferences make the racers disagree on the best origin, so the
        // transaction, not the deterministic choice, has to decide.
        let pref = Region::new(["eu", "us", "ap"][i % 3]).unwrap();
        tasks.spawn(async move { placer.place(&room, Some(&pref)).await });
    }
    let mut origins = BTreeSet::new();
    let mut epochs = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        let p = r.unwrap().expect("placement");
        origins.insert(p.origin);
        epochs.insert(p.epoch);
    }
    assert_eq!(origins.len(), 1, "exactly one origin: {origins:?}");
    assert_eq!(epochs, BTreeSet::from([0]));
    let stored = Placer::new(store.clone(), keys.clone())
        .lookup(&room)
        .await
        .unwrap()
        .unwrap();
    assert!(origins.contains(&stored.origin));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_origin_vanishes_within_ttl_and_its_rooms_move() {
    let cluster = EtcdCluster::start(3);
    let store = connect(&cluster).await;
    let keys = KeyLayout::new("/kcs-test");
    let cfg = RegistrationConfig::with_ttl(TTL);

    let doomed = NodeRegistration::register(store.clone(), &keys, origin("doomed", "eu", 0), cfg)
        .await
        .unwrap();
    let survivor =
        NodeRegistration::register(store.clone(), &keys, origin("survivor", "us", 0), cfg)
            .await
            .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let doomed_task = tokio::spawn(doomed.clone().run(std::future::pending()));
    let survivor_task = tokio::spawn(survivor.clone().run(async {
        let _ = stop_rx.await;
    }));

    let placer = Placer::new(store.clone(), keys.clone());
    let reassigner = tokio::spawn(placer.clone().run_reassigner(std::future::pending()));
    let eu = Region::new("eu").unwrap();
    let rooms: Vec<RoomId> = (0..5)
        .map(|i| RoomId::new(format!("room-{i}")).unwrap())
        .collect();
    for r in &rooms {
        assert_eq!(
            placer.place(r, Some(&eu)).await.unwrap().origin.as_str(),
            "doomed"
        );
    }

    // An edge following placements (snapshot, then watch) is told about the moves.
    let (snapshot, rev) = placer.snapshot().await.unwrap();
    assert_eq!(snapshot.len(), rooms.len());
    let mut changes = Box::pin(placer.watch(Revision(rev.0 + 1)).await.unwrap());

    // The survivor's keepalives hold its registration well past its TTL.
    tokio::time::sleep(TTL * 2).await;
    assert!(store.get(doomed.key()).await.unwrap().is_some());
    assert!(store.get(survivor.key()).await.unwrap().is_some());

    // Crash the doomed origin: no more keepalives, no revoke.
    doomed_task.abort();
    let crashed_at = std::time::Instant::now();
    assert!(
        eventually(TTL * 3, || async {
            store.get(doomed.key()).await.unwrap().is_none()
        })
        .await,
        "dead node still registered"
    );
    let gone_after = crashed_at.elapsed();
    // etcd expires a lease at most TTL (+ its checking granularity) after the last keepalive.
    assert!(gone_after <= TTL + Duration::from_secs(2), "{gone_after:?}");

    // The reassigner moves every room to the survivor, with a new epoch.
    let moved = eventually(Duration::from_secs(10), || async {
        let mut all = true;
        for r in &rooms {
            let p = placer.lookup(r).await.unwrap().unwrap();
            all &= p.origin.as_str() == "survivor" && p.epoch == 1;
        }
        all
    })
    .await;
    assert!(moved, "rooms not reassigned");
    let mut told = BTreeSet::new();
    while told.len() < rooms.len() {
        let batch = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("placement change in time")
            .expect("watch open")
            .expect("watch ok");
        for c in batch {
            match c {
                PlacementChange::Placed(p) => {
                    assert_eq!((p.origin.as_str(), p.epoch), ("survivor", 1));
                    told.insert(p.room);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    reassigner.abort();
    let _ = stop_tx.send(());
    survivor_task.await.unwrap();
    // A clean shutdown revokes the lease: gone at once, not after the TTL.
    assert!(store.get(survivor.key()).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_killed_everything_keeps_working() {
    let mut cluster = EtcdCluster::start(3);
    let store = connect(&cluster).await;
    let keys = KeyLayout::new("/kcs-test");
    let reg = NodeRegistration::register(
        store.clone(),
        &keys,
        origin("o1", "eu", 0),
        RegistrationConfig::with_ttl(TTL),
    )
    .await
    .unwrap();
    let reg_task = tokio::spawn(reg.clone().run(std::future::pending()));
    let placer = Placer::new(store.clone(), keys.clone());
    placer
        .place(&RoomId::new("before").unwrap(), None)
        .await
        .unwrap();

    // Kill members one at a time in separate runs would be slow; killing member 0 exercises
    // both a client connection to a dead member and, when it was the leader, a re-election.
    cluster.kill(0);

    // The client notices the dead connection; after that every operation succeeds.
    let recovered = eventually(Duration::from_secs(10), || async {
        store.get("/probe").await.is_ok()
    })
    .await;
    assert!(recovered, "cluster unusable after losing one member");
    for i in 0..20 {
        let room = RoomId::new(format!("after-{i}")).unwrap();
        let p = placer
            .place(&room, None)
            .await
            .expect("placement after kill");
        assert_eq!(p.origin.as_str(), "o1");
    }
    // Leases keep working: the registration outlives several TTLs.
    tokio::time::sleep(TTL * 2).await;
    assert!(store.get(reg.key()).await.unwrap().is_some());
    reg_task.abort();
}
