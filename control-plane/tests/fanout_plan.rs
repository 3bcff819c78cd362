//! The fan-out tree planner on simulated topologies (seeded, so a failure replays): up to 1,000
//! edges in 12 regions carrying 100,000 participants, with churn. Every plan is checked for the
//! properties of control_plane::fanout's docs: fan-out bound, every edge reached exactly once,
//! one relay per region, nearest regions first, depth bound, and stability under churn.

use control_plane::fanout::{plan, EdgeDemand, FanoutConfig, FanoutTree, Parent, Replan};
use control_plane::nodes::{NodeId, Region};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};

fn region(i: usize) -> Region {
    Region::new(format!("r{i:02}")).unwrap()
}

/// Region `i` sits at `i * 10` ms on a line: distance is the difference.
fn distance(a: &Region, b: &Region) -> Option<u32> {
    let n = |r: &Region| r.as_str()[1..].parse::<u32>().ok();
    Some(n(a)?.abs_diff(n(b)?) * 10)
}

struct World {
    origin: NodeId,
    origin_region: Region,
    edges: Vec<EdgeDemand>,
    next_id: usize,
}

impl World {
    /// `n` edges over `regions` regions (region 0 is the origin's), `participants` in total.
    fn new(rng: &mut StdRng, n: usize, regions: usize, participants: u32) -> Self {
        let mut w = World {
            origin: NodeId::new("origin-1").unwrap(),
            origin_region: region(0),
            edges: Vec::new(),
            next_id: 0,
        };
        for _ in 0..n {
            w.add(rng, regions, 1);
        }
        // Spread the participants unevenly: some edges are much busier than others.
        let mut left = participants - n as u32;
        while left > 0 {
            let i = rng.gen_range(0..n);
            let k = rng.gen_range(1..=left.min(200));
            w.edges[i].participants += k;
            left -= k;
        }
        w
    }

    fn add(&mut self, rng: &mut StdRng, regions: usize, participants: u32) -> NodeId {
        let id = NodeId::new(format!("edge-{:05}", self.next_id)).unwrap();
        self.next_id += 1;
        self.edges.push(EdgeDemand {
            id: id.clone(),
            region: region(rng.gen_range(0..regions)),
            participants,
        });
        id
    }

    fn plan(&self, config: &FanoutConfig, prev: Option<&FanoutTree>) -> (FanoutTree, Replan) {
        plan(
            config,
            &self.origin,
            &self.origin_region,
            &self.edges,
            distance,
            prev,
        )
    }
}

/// Checks every structural property; returns the tree's max depth.
fn check(world: &World, config: &FanoutConfig, tree: &FanoutTree) -> u32 {
    let f = config.max_children;
    let wanted: BTreeSet<&NodeId> = world
        .edges
        .iter()
        .filter(|e| e.participants > 0)
        .map(|e| &e.id)
        .collect();
    let got: BTreeSet<&NodeId> = tree.edges.keys().collect();
    assert_eq!(
        got, wanted,
        "exactly the edges with participants are in the tree"
    );

    // Fan-out bound, the origin included.
    assert!(tree.children(None).len() <= f, "origin fan-out");
    let mut kids: BTreeMap<&NodeId, usize> = BTreeMap::new();
    for e in tree.edges.values() {
        if let Parent::Edge(p) = &e.parent {
            assert!(tree.edges.contains_key(p), "parent {p} is in the tree");
            *kids.entry(p).or_default() += 1;
        }
    }
    assert!(kids.values().all(|&k| k <= f), "edge fan-out <= {f}");

    // Reached from the origin, with the recorded depth (so no cycles).
    for (id, e) in &tree.edges {
        let mut depth = 0;
        let mut at = id;
        loop {
            depth += 1;
            assert!(depth <= tree.edges.len() as u32, "cycle through {id}");
            match &tree.edges[at].parent {
                Parent::Origin => break,
                Parent::Edge(p) => at = p,
            }
        }
        assert_eq!(e.depth, depth, "{id} depth");
    }

    // One relay per region: the only edge whose parent is outside its region. Other edges hang
    // off their region's edges (or the origin, in the origin's region).
    let mut relays: BTreeMap<&Region, Vec<&NodeId>> = BTreeMap::new();
    for (id, e) in &tree.edges {
        let outside = match &e.parent {
            Parent::Origin => true,
            Parent::Edge(p) => tree.edges[p].region != e.region,
        };
        if e.relay {
            assert!(outside, "relay {id} is fed from outside its region");
            relays.entry(&e.region).or_default().push(id);
            if let Parent::Edge(p) = &e.parent {
                assert!(
                    tree.edges[p].relay,
                    "a relay hangs off the origin or another relay"
                );
            }
        } else if outside {
            assert!(
                e.parent == Parent::Origin && e.region == tree.origin_region,
                "non-relay {id} fed from outside its region"
            );
        }
    }
    let regions: BTreeSet<&Region> = tree.edges.values().map(|e| &e.region).collect();
    for r in &regions {
        assert_eq!(relays.get(r).map(Vec::len), Some(1), "one relay in {r}");
    }
    tree.max_depth()
}

/// In a fresh plan the tree is as shallow as the fan-out allows: an edge sits at depth d > 2
/// only if every host of its region at depth < d - 1 is full.
fn check_fresh_is_breadth_first(tree: &FanoutTree, f: usize) {
    let mut kids: BTreeMap<Option<&NodeId>, usize> = BTreeMap::new();
    for e in tree.edges.values() {
        let p = match &e.parent {
            Parent::Origin => None,
            Parent::Edge(p) => Some(p),
        };
        *kids.entry(p).or_default() += 1;
    }
    for (id, e) in tree.edges.iter().filter(|(_, e)| !e.relay) {
        for (hid, h) in &tree.edges {
            if h.region == e.region && h.depth + 1 < e.depth && !h.relay {
                assert_eq!(
                    kids.get(&Some(hid)).copied().unwrap_or(0),
                    f,
                    "{id} at depth {} while {hid} at depth {} has room",
                    e.depth,
                    h.depth
                );
            }
        }
    }
}

#[test]
fn small_topologies_have_every_property() {
    let mut rng = StdRng::seed_from_u64(1);
    for case in 0..300 {
        let n = rng.gen_range(0..60);
        let regions = rng.gen_range(1..14);
        let f = rng.gen_range(2..10);
        let config = FanoutConfig { max_children: f };
        let world = World::new(&mut rng, n, regions, n as u32 * 3);
        let (tree, report) = world.plan(&config, None);
        check(&world, &config, &tree);
        check_fresh_is_breadth_first(&tree, f);
        assert_eq!(report.added.len(), tree.edges.len(), "case {case}");
    }
}

#[test]
fn nearest_regions_are_one_hop_from_the_origin() {
    let mut rng = StdRng::seed_from_u64(2);
    let config = FanoutConfig::default();
    // 12 regions, 8 origin slots: regions 0..8 (the nearest) get them, 8..12 hang off relays.
    let world = World::new(&mut rng, 400, 12, 40_000);
    let (tree, _) = world.plan(&config, None);
    check(&world, &config, &tree);
    let relay_depth: BTreeMap<&Region, u32> = tree
        .edges
        .values()
        .filter(|e| e.relay)
        .map(|e| (&e.region, e.depth))
        .collect();
    for (r, d) in &relay_depth {
        let i: usize = r.as_str()[1..].parse().unwrap();
        assert_eq!(*d, if i < 8 { 1 } else { 2 }, "relay of {r}");
    }
    // A far region hangs off the relay nearest to it (r07 for r08..r11 on the line).
    for e in tree.edges.values().filter(|e| e.relay && e.depth == 2) {
        let Parent::Edge(p) = &e.parent else {
            unreachable!()
        };
        assert_eq!(tree.edges[p].region.as_str(), "r07");
    }
    // Within a region the busiest edge is the relay.
    for e in tree.edges.values().filter(|e| e.relay) {
        let busiest = world
            .edges
            .iter()
            .filter(|x| x.region == e.region)
            .map(|x| x.participants)
            .max()
            .unwrap();
        assert_eq!(e.participants, busiest);
    }
}

#[test]
fn a_thousand_edges_and_a_hundred_thousand_participants() {
    let mut rng = StdRng::seed_from_u64(3);
    let config = FanoutConfig::default();
    let world = World::new(&mut rng, 1000, 12, 100_000);
    let (tree, _) = world.plan(&config, None);
    let depth = check(&world, &config, &tree);
    check_fresh_is_breadth_first(&tree, 8);
    assert_eq!(tree.edges.len(), 1000);
    // ~83 edges per region under a relay at depth <= 2 with 4-8 slots: 3 levels below it.
    assert!(depth <= 5, "max depth {depth}");
}

#[test]
fn a_leaf_leaving_or_an_edge_joining_moves_nobody() {
    let mut rng = StdRng::seed_from_u64(4);
    let config = FanoutConfig::default();
    let mut world = World::new(&mut rng, 300, 6, 20_000);
    let (tree, _) = world.plan(&config, None);

    let leaf = tree
        .edges
        .iter()
        .find(|(id, e)| !e.relay && tree.children(Some(id)).is_empty())
        .map(|(id, _)| id.clone())
        .unwrap();
    world.edges.retain(|e| e.id != leaf);
    let (after_leave, report) = world.plan(&config, Some(&tree));
    check(&world, &config, &after_leave);
    assert_eq!(report.removed, vec![leaf]);
    assert!(report.moved.is_empty(), "moved {:?}", report.moved);

    let new = world.add(&mut rng, 6, 5);
    let (after_join, report) = world.plan(&config, Some(&after_leave));
    check(&world, &config, &after_join);
    assert_eq!(report.added, vec![new]);
    assert!(report.moved.is_empty(), "moved {:?}", report.moved);
}

#[test]
fn a_failed_edge_moves_only_its_children() {
    let mut rng = StdRng::seed_from_u64(5);
    let config = FanoutConfig::default();
    let mut world = World::new(&mut rng, 500, 4, 50_000);
    let (tree, _) = world.plan(&config, None);
    // An interior non-relay edge, and then a relay.
    let interior = tree
        .edges
        .iter()
        .find(|(id, e)| !e.relay && !tree.children(Some(id)).is_empty())
        .map(|(id, _)| id.clone())
        .unwrap();
    let relay = tree
        .edges
        .iter()
        .find(|(_, e)| e.relay && e.region.as_str() == "r02")
        .map(|(id, _)| id.clone())
        .unwrap();
    let mut prev = tree;
    for failed in [interior, relay] {
        let orphans: BTreeSet<NodeId> = prev.children(Some(&failed)).into_iter().cloned().collect();
        world.edges.retain(|e| e.id != failed);
        let (next, report) = world.plan(&config, Some(&prev));
        check(&world, &config, &next);
        let moved: BTreeSet<NodeId> = report.moved.iter().cloned().collect();
        // Each orphan is re-parented; a new relay (one of them, or another edge of the region)
        // moves up too. Nobody else moves.
        assert!(moved.is_superset(&orphans), "all orphans re-parented");
        assert!(
            moved.len() <= orphans.len() + 1,
            "moved {} for {} orphans",
            moved.len(),
            orphans.len()
        );
        assert!(report.rebuilt_regions.is_empty());
        prev = next;
    }
}

#[test]
fn churn_keeps_every_property_and_moves_few() {
    let mut rng = StdRng::seed_from_u64(6);
    let config = FanoutConfig::default();
    let regions = 8;
    let mut world = World::new(&mut rng, 1000, regions, 100_000);
    let (mut tree, _) = world.plan(&config, None);
    let mut total_moved = 0;
    let mut total_orphans = 0;
    for round in 0..100 {
        // A few edges leave (some with children), a few join, some lose all participants.
        let mut orphans = 0;
        for _ in 0..rng.gen_range(0..6) {
            let i = rng.gen_range(0..world.edges.len());
            let gone = world.edges.swap_remove(i).id;
            orphans += tree.children(Some(&gone)).len();
        }
        for _ in 0..rng.gen_range(0..6) {
            let participants = rng.gen_range(1..300);
            world.add(&mut rng, regions, participants);
        }
        if rng.gen_bool(0.2) {
            let i = rng.gen_range(0..world.edges.len());
            orphans += tree.children(Some(&world.edges[i].id)).len();
            world.edges[i].participants = 0;
        }
        let (next, report) = world.plan(&config, Some(&tree));
        let depth = check(&world, &config, &next);
        let (fresh, _) = world.plan(&config, None);
        assert!(
            depth <= fresh.max_depth() + 1,
            "round {round}: depth {depth} vs fresh {}",
            fresh.max_depth()
        );
        total_moved += report.moved.len();
        total_orphans += orphans;
        tree = next;
    }
    // Moves are the orphans plus at most one relay replacement a round: far from re-planning
    // (1,000 edges a round).
    assert!(
        total_moved <= total_orphans + 100,
        "moved {total_moved}, orphans {total_orphans}"
    );
    println!("churn: {total_moved} edges moved over 100 rounds ({total_orphans} orphaned)");
}

#[test]
fn a_corrupt_previous_tree_is_ignored() {
    let mut rng = StdRng::seed_from_u64(7);
    let config = FanoutConfig::default();
    let world = World::new(&mut rng, 50, 3, 500);
    let (mut tree, _) = world.plan(&config, None);
    // Make a cycle: two edges each other's parent.
    let ids: Vec<NodeId> = tree.edges.keys().take(2).cloned().collect();
    tree.edges.get_mut(&ids[0]).unwrap().parent = Parent::Edge(ids[1].clone());
    tree.edges.get_mut(&ids[1]).unwrap().parent = Parent::Edge(ids[0].clone());
    let (next, _) = world.plan(&config, Some(&tree));
    check(&world, &config, &next);
}
