//! Fan-out trees stored in a real etcd: a re-plan writes only the positions that changed, and an
//! edge watching its own key sees its new parent.

mod common;

use cascade_proto::RoomId;
use common::EtcdCluster;
use control_plane::fanout::{plan, EdgeDemand, FanoutConfig, Parent, TreeStore};
use control_plane::keys::KeyLayout;
use control_plane::nodes::{NodeId, Region};
use control_plane::store::{EtcdConfig, EtcdStore, Revision, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

fn edge(id: &str, region: &str, participants: u32) -> EdgeDemand {
    EdgeDemand {
        id: NodeId::new(id).unwrap(),
        region: Region::new(region).unwrap(),
        participants,
    }
}

fn distance(a: &Region, b: &Region) -> Option<u32> {
    Some(if a == b { 0 } else { 80 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_are_published_incrementally_and_edges_watch_their_parent() {
    let cluster = EtcdCluster::start(1);
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&EtcdConfig::new(cluster.endpoints()))
            .await
            .expect("client"),
    );
    let keys = KeyLayout::new("/fanout-test");
    let trees = TreeStore::new(store.clone(), keys.clone());
    let room = RoomId::new("town-hall").unwrap();
    let origin = NodeId::new("origin-1").unwrap();
    let eu = Region::new("eu").unwrap();
    // Fan-out 2 so a small room has depth: origin -> eu relay + us relay; eu relay -> 1 child
    // (one slot went to nothing else), and so on.
    let config = FanoutConfig { max_children: 2 };
    let mut edges = vec![
        edge("eu-1", "eu", 50),
        edge("eu-2", "eu", 40),
        edge("eu-3", "eu", 30),
        edge("eu-4", "eu", 20),
        edge("us-1", "us", 10),
    ];
    let (tree, _) = plan(&config, &origin, &eu, &edges, distance, None);
    let stats = trees.publish(&room, &tree, None).await.unwrap();
    assert_eq!(stats.written, 5);

    // What is stored reads back as the same tree.
    let (loaded, revision) = trees.load(&room).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&tree));

    // Pick an edge whose parent is an eu edge, watch it, and fail that parent.
    let (child, failed) = tree
        .edges
        .iter()
        .find_map(|(id, e)| match &e.parent {
            Parent::Edge(p) if !tree.edges[p].relay => Some((id.clone(), p.clone())),
            _ => None,
        })
        .expect("a two-level eu subtree");
    let position = trees.position(&room, &child).await.unwrap().unwrap();
    assert_eq!(position.parent, Parent::Edge(failed.clone()));
    let mut watch = trees
        .watch_position(&room, &child, Revision(revision.0 + 1))
        .await
        .unwrap();

    edges.retain(|e| e.id != failed);
    let (next, report) = plan(&config, &origin, &eu, &edges, distance, Some(&tree));
    assert!(report.moved.contains(&child));
    let stats = trees.publish(&room, &next, Some(&tree)).await.unwrap();
    assert_eq!(stats.deleted, 1);
    // Only positions that changed are written: the moved edge, and the parents whose child
    // lists changed; never the whole tree.
    assert!(stats.written < next.edges.len(), "{stats:?}");

    let seen = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch delivers in time")
        .expect("stream open")
        .expect("no watch error")
        .expect("child still in the tree");
    assert_eq!(seen.parent, next.edges[&child].parent);
    assert_ne!(seen.parent, Parent::Edge(failed.clone()));

    // The failed edge's key is gone, and the stored tree is the new plan.
    assert!(trees.position(&room, &failed).await.unwrap().is_none());
    assert_eq!(trees.load(&room).await.unwrap().0, Some(next));
}
