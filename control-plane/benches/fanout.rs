//! Planning time of the fan-out tree planner: a fresh plan and a re-plan after one edge fails,
//! for rooms of 100 and 1,000 edges in 12 regions (100 participants per edge on average, so
//! 100,000 participants at 1,000 edges). `cargo bench -p control-plane --bench fanout`.

use control_plane::fanout::{plan, EdgeDemand, FanoutConfig, Parent};
use control_plane::nodes::{NodeId, Region};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn region(i: u32) -> Region {
    Region::new(format!("r{i:02}")).unwrap()
}

/// Regions on a line, 10 ms apart.
fn distance(a: &Region, b: &Region) -> Option<u32> {
    let n = |r: &Region| r.as_str()[1..].parse::<u32>().ok();
    Some(n(a)?.abs_diff(n(b)?) * 10)
}

fn edges(n: usize, rng: &mut StdRng) -> Vec<EdgeDemand> {
    (0..n)
        .map(|i| EdgeDemand {
            id: NodeId::new(format!("edge-{i:05}")).unwrap(),
            region: region(rng.gen_range(0..12)),
            participants: rng.gen_range(1..200),
        })
        .collect()
}

fn planning(c: &mut Criterion) {
    let config = FanoutConfig::default();
    let origin = NodeId::new("origin-1").unwrap();
    let home = region(0);
    let mut group = c.benchmark_group("fanout_plan");
    for n in [100usize, 1000] {
        let mut rng = StdRng::seed_from_u64(n as u64);
        let input = edges(n, &mut rng);
        let participants: u32 = input.iter().map(|e| e.participants).sum();
        group.bench_with_input(
            BenchmarkId::new("fresh", format!("{n}_edges_{participants}_participants")),
            &input,
            |b, input| b.iter(|| plan(&config, &origin, &home, input, distance, None)),
        );
        // Re-plan after an interior edge fails: its children move, nothing else.
        let (tree, _) = plan(&config, &origin, &home, &input, distance, None);
        let failed = tree
            .edges
            .iter()
            .find(|(id, e)| {
                !e.relay
                    && tree
                        .edges
                        .values()
                        .any(|c| c.parent == Parent::Edge((*id).clone()))
            })
            .map(|(id, _)| id.clone())
            .expect("an interior edge");
        let after: Vec<EdgeDemand> = input.iter().filter(|e| e.id != failed).cloned().collect();
        group.bench_with_input(
            BenchmarkId::new("replan_one_failure", format!("{n}_edges")),
            &after,
            |b, after| b.iter(|| plan(&config, &origin, &home, after, distance, Some(&tree))),
        );
    }
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
