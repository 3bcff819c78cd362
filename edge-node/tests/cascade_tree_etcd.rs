//! The fan-out tree end to end with real parts: etcd, `kcs control-plane` (its tree keeper),
//! `kcs origin` in region eu, and three `kcs edge` processes that find the room's origin by
//! placement and learn their media parent from the tree in etcd:
//!
//! ```text
//!   publisher P (played by the test: an edge link publishing a 2-layer track)
//!      |
//!   origin (eu) ---- edge A (eu, participant ann)
//!      |
//!   us relay (R or C, whichever the planner picks; participant + raw child D2)
//!      |
//!   us child (the other one; participant + raw child D, which records arrivals)
//! ```
//!
//! - every edge writes its presence record; the keeper puts one us edge under the origin and
//!   the other under it (checked in etcd);
//! - D's media comes through the child edge, which takes it from the relay edge: the relay has
//!   two child links, and the origin sends each datagram once toward the us region (to the
//!   relay; and once to A, whose participant consumes it too), not once per us edge;
//! - the relay edge is SIGKILLed: the child falls back to the origin at once (the gap at D is
//!   printed, never asserted), the relay's presence goes with its lease, the keeper re-plans and
//!   the child's tree position says "origin";
//! - A's participant leaves: A's presence record is deleted and A leaves the tree;
//! - the child's lease is revoked behind its back: its presence comes back under a new lease;
//! - 20 participants join the child at once: the presence record counts them after fewer
//!   writes than joins.

mod common;

use cascade_proto::link::NodeRole;
use common::etcd::EtcdCluster;
use common::*;
use control_plane::fanout::{Parent, TreeStore};
use control_plane::keys::KeyLayout;
use control_plane::nodes::NodeId;
use control_plane::trees::EdgePresence;
use control_plane::{EtcdStore, Store};
use edge_node::uplink::OriginAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// Polls `f` until it returns `Some` (or panics after `within`).
async fn until<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Origin relay datagrams in and out over one second, from its `/metrics`.
async fn origin_relay_rate(http: SocketAddr) -> (i64, i64) {
    let before = (
        metric(http, "kcs_relay_datagrams_in_total").await,
        metric(http, "kcs_relay_datagrams_out_total").await,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    (
        metric(http, "kcs_relay_datagrams_in_total").await - before.0,
        metric(http, "kcs_relay_datagrams_out_total").await - before.1,
    )
}

struct EdgeProc {
    node: &'static str,
    http: SocketAddr,
    cascade: u16,
    proc: Option<Proc>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_follow_the_tree_in_etcd_and_a_killed_relay_is_replaced_by_the_origin() {
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints().join(",");
    let dir = std::env::temp_dir().join(format!("kcs-tree-etcd-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    certs(&dir, "origin-eu,edge-a,edge-r,edge-c,edge-p,edge-d,edge-d2");
    let signer = control_plane::token::TokenSigner::from_seed("test", &[9; 32]);
    let key: String = signer
        .public_key()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let room = cascade_proto::RoomId::new("tree-etcd").unwrap();

    // The control plane: its tree keeper plans from presence and placements.
    let (_cp, _) = control_plane(
        &dir,
        &etcd.endpoints(),
        "tree_fanout = 8\n[routing.latency_ms.eu]\nus = 40",
    )
    .await;

    // The origin, registered in etcd (edges find it by placement).
    let (origin_port, origin_http) = (free_port(), local(free_port()));
    let mut args: Vec<String> = vec![
        "origin".into(),
        "--cascade".into(),
        format!("127.0.0.1:{origin_port}"),
        "--http".into(),
        origin_http.to_string(),
        "--region".into(),
        "eu".into(),
        "--etcd".into(),
        endpoints.clone(),
    ];
    args.extend(tls(&dir, "origin-eu"));
    let _origin = kcs(&dir, "origin", &args);
    wait_healthy(origin_http).await;

    let edge_args = |node: &str, region: &str, http: SocketAddr, cascade: u16| {
        let mut a: Vec<String> = vec![
            "edge".into(),
            "--http".into(),
            http.to_string(),
            "--udp".into(),
            "127.0.0.1:0".into(),
            "--workers".into(),
            "1".into(),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--cascade".into(),
            format!("127.0.0.1:{cascade}"),
            "--token-public-key".into(),
            format!("test:{key}"),
            "--etcd".into(),
            endpoints.clone(),
            "--region".into(),
            region.into(),
            "--data-dir".into(),
            dir.join(node).display().to_string(),
        ];
        a.extend(tls(&dir, node));
        a
    };
    let mut edges: Vec<EdgeProc> = Vec::new();
    for (node, region) in [("edge-a", "eu"), ("edge-r", "us"), ("edge-c", "us")] {
        let (http, cascade) = (local(free_port()), free_port());
        let proc = kcs(&dir, node, &edge_args(node, region, http, cascade));
        edges.push(EdgeProc {
            node,
            http,
            cascade,
            proc: Some(proc),
        });
    }
    for e in &edges {
        wait_healthy(e.http).await;
    }

    // One participant per edge (the joins place the room on the origin).
    let ann = ws_join(edges[0].http, &signer, &room, "ann").await;
    let _rita = ws_join(edges[1].http, &signer, &room, "rita").await;
    let _carl = ws_join(edges[2].http, &signer, &room, "carl").await;
    let origin_addr = OriginAddr {
        node: label("origin-eu"),
        addr: local(origin_port),
    };
    let track = publisher_as(&creds(&dir, "edge-p"), "edge-p", &origin_addr, &room).await;

    // Presence records and the tree, as etcd has them.
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(
            &serde_json::from_value(serde_json::json!({ "endpoints": etcd.endpoints() })).unwrap(),
        )
        .await
        .unwrap(),
    );
    let keys = KeyLayout::default();
    for e in &edges {
        let key = keys.presence(&room, &id(&format!("{}-edge", e.node)));
        let presence: EdgePresence = until("presence records", WAIT, || {
            let (store, key) = (store.clone(), key.clone());
            async move {
                let kv = store.get(&key).await.ok()??;
                serde_json::from_slice(&kv.value).ok()
            }
        })
        .await;
        println!("{key}: {presence:?}");
        assert_eq!(presence.participants, 1);
        assert_eq!(
            presence.cascade.as_deref(),
            Some(format!("quic://{}@127.0.0.1:{}", e.node, e.cascade).as_str())
        );
        assert!(
            store.get(&key).await.unwrap().unwrap().lease.is_some(),
            "presence lives under the edge's lease"
        );
    }
    let trees = TreeStore::new(store.clone(), keys.clone());
    let tree = until("a tree over the three edges", WAIT, || {
        let trees = &trees;
        let room = &room;
        async move {
            let (tree, _) = trees.load(room).await.ok()?;
            tree.filter(|t| t.edges.len() == 3)
        }
    })
    .await;
    for (edge, e) in &tree.edges {
        println!(
            "tree: {edge} region {} parent {:?} depth {} relay {}",
            e.region, e.parent, e.depth, e.relay
        );
    }
    assert_eq!(tree.edges[&id("edge-a-edge")].parent, Parent::Origin);
    let (relay, child) = match (
        &tree.edges[&id("edge-r-edge")].parent,
        &tree.edges[&id("edge-c-edge")].parent,
    ) {
        (Parent::Origin, Parent::Edge(p)) if *p == id("edge-r-edge") => (1, 2),
        (Parent::Edge(p), Parent::Origin) if *p == id("edge-c-edge") => (2, 1),
        other => panic!("one us edge under the origin, the other under it: {other:?}"),
    };
    let (relay_node, child_node) = (edges[relay].node, edges[child].node);
    println!("us relay {relay_node}, its child {child_node}");
    let (relay_http, child_http) = (edges[relay].http, edges[child].http);

    // The child edge follows its position: it links to the relay edge.
    metric_at_least(child_http, "kcs_tree_parent_changes_total", 1).await;
    metric_at_least(child_http, "kcs_cascade_parent_links", 1).await;
    assert_eq!(metric(child_http, "kcs_tree_rooms_followed").await, 1);
    assert_eq!(metric(relay_http, "kcs_cascade_parent_links").await, 0);

    // Subscribers below both us edges: D (recording) on the child, D2 on the relay.
    let d_ep = raw_endpoint_with(&creds(&dir, "edge-d"), "edge-d", NodeRole::Edge);
    let (_d, arrivals) =
        child_subscriber(&d_ep, local(edges[child].cascade), child_node, &room, track).await;
    let d2_ep = raw_endpoint_with(&creds(&dir, "edge-d2"), "edge-d2", NodeRole::Edge);
    let (_d2, arrivals2) = child_subscriber(
        &d2_ep,
        local(edges[relay].cascade),
        relay_node,
        &room,
        track,
    )
    .await;
    let count = |a: &std::sync::Arc<std::sync::Mutex<Vec<Instant>>>| a.lock().unwrap().len();
    eventually("media reaches D below the child edge", || {
        count(&arrivals) > 100
    })
    .await;
    eventually("media reaches D2 below the relay edge", || {
        count(&arrivals2) > 100
    })
    .await;
    // The relay serves two children: the child edge and D2.
    metric_at_least(relay_http, "kcs_cascade_child_links", 2).await;
    assert!(metric(relay_http, "kcs_cascade_link_packets_out_total").await > 0);
    // Each layer crosses to the us region once. Every edge's participant consumes the track, so
    // the origin has two children that want it: A (eu) and the us relay. Without the tree it
    // would send three copies (A, R and C); with it, two.
    let (din, dout) = origin_relay_rate(origin_http).await;
    println!("tree: origin relay in {din}, out {dout} over 1 s");
    assert!(din > 50, "the publisher's media reaches the origin ({din})");
    assert!(
        (dout as f64) < 2.5 * din as f64,
        "the origin sends to A and the us relay only, not to each us edge (in {din}, out {dout})"
    );
    assert!(
        metric(edges[0].http, "kcs_cascade_relayed_packets_in_total").await > 0,
        "A takes the track from the origin"
    );

    // SIGKILL the relay edge.
    let before = count(&arrivals);
    let killed_at = Instant::now();
    drop(edges[relay].proc.take());
    metric_at_least(child_http, "kcs_cascade_parent_fallbacks_total", 1).await;
    let detected = killed_at.elapsed();
    eventually("media resumes at D through the origin", || {
        arrivals
            .lock()
            .unwrap()
            .iter()
            .any(|t| *t > killed_at + detected)
    })
    .await;
    let gap = {
        let a = arrivals.lock().unwrap();
        let last = a[..before].last().copied().unwrap();
        a.iter()
            .find(|t| **t > killed_at + detected)
            .copied()
            .unwrap()
            - last
    };
    println!("relay edge killed: loss noticed after {detected:?}, media gap at D {gap:?}");

    // The relay's lease expires with its presence; the keeper re-plans: the child is now the
    // us relay, under the origin.
    let relay_id = id(&format!("{relay_node}-edge"));
    let child_id = id(&format!("{child_node}-edge"));
    let replanned = until("the keeper re-plans without the killed edge", WAIT, || {
        let (trees, room, relay_id, child_id) = (&trees, &room, &relay_id, &child_id);
        async move {
            let (tree, _) = trees.load(room).await.ok()?;
            tree.filter(|t| {
                !t.edges.contains_key(relay_id)
                    && t.edges
                        .get(child_id)
                        .is_some_and(|e| e.parent == Parent::Origin)
            })
        }
    })
    .await;
    println!(
        "re-planned after {:?}: {:?}",
        killed_at.elapsed(),
        replanned.edges.keys().collect::<Vec<_>>()
    );
    assert!(replanned.edges[&child_id].relay);
    metric_at_least(child_http, "kcs_tree_parent_changes_total", 2).await;
    let n = count(&arrivals);
    eventually("media keeps flowing at D", || count(&arrivals) > n + 50).await;
    assert_eq!(metric(child_http, "kcs_cascade_parent_links").await, 0);

    // ann leaves edge A: its presence record goes, and A leaves the tree.
    drop(ann);
    let a_presence = keys.presence(&room, &id("edge-a-edge"));
    until("A's presence record is deleted", WAIT, || {
        let (store, key) = (store.clone(), a_presence.clone());
        async move { store.get(&key).await.ok()?.is_none().then_some(()) }
    })
    .await;
    until("A leaves the tree", WAIT, || {
        let (trees, room) = (&trees, &room);
        async move {
            let (tree, _) = trees.load(room).await.ok()?;
            tree.filter(|t| !t.edges.contains_key(&id("edge-a-edge")))
        }
    })
    .await;
    assert_eq!(metric(edges[0].http, "kcs_tree_rooms_followed").await, 0);
    assert!(metric(edges[0].http, "kcs_tree_presence_deletes_total").await >= 1);

    // etcd loses the surviving us edge's lease (as after an outage longer than the TTL): its
    // registration takes a new lease and its presence is written again under it.
    let child_presence = keys.presence(&room, &child_id);
    let old_lease = store
        .get(&child_presence)
        .await
        .unwrap()
        .and_then(|kv| kv.lease)
        .expect("the child's presence is under a lease");
    store.lease_revoke(old_lease).await.unwrap();
    let new_lease = until("the presence is rewritten under a new lease", WAIT, || {
        let (store, key) = (store.clone(), child_presence.clone());
        async move {
            let kv = store.get(&key).await.ok()??;
            kv.lease.filter(|l| *l != old_lease)
        }
    })
    .await;
    println!("lease {old_lease:?} revoked; presence rewritten under {new_lease:?}");

    // A join storm on the child edge: the presence record follows the count, written far fewer
    // times than there were joins (one write per room per 500 ms at most).
    let writes_before = metric(child_http, "kcs_tree_presence_writes_total").await;
    const STORM: usize = 20;
    let names: Vec<String> = (0..STORM).map(|i| format!("storm{i}")).collect();
    let storm = futures_util::future::join_all(
        names
            .iter()
            .map(|name| ws_join(child_http, &signer, &room, name)),
    )
    .await;
    let presence: EdgePresence = until("the presence counts the storm", WAIT, || {
        let (store, key) = (store.clone(), child_presence.clone());
        async move {
            let kv = store.get(&key).await.ok()??;
            serde_json::from_slice::<EdgePresence>(&kv.value)
                .ok()
                .filter(|p| p.participants as usize == STORM + 1)
        }
    })
    .await;
    let writes = metric(child_http, "kcs_tree_presence_writes_total").await - writes_before;
    println!(
        "{STORM} joins: presence now {} participants after {writes} writes",
        presence.participants
    );
    assert!(
        writes < STORM as i64,
        "joins are coalesced into fewer presence writes ({writes} for {STORM} joins)"
    );
    drop(storm);
    let _ = std::fs::remove_dir_all(&dir);
}
