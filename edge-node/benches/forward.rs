//! The forward path: one incoming SRTP packet (decrypt once) to N subscribers (rewrite and
//! encrypt once per copy), through the real shard core. Throughput is reported in outgoing
//! packets per second of one core; `cargo bench -p edge-node --bench forward`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edge_node::sfu::harness::Harness;
use edge_node::transport::dtls::SrtpProfile;

fn forward(c: &mut Criterion) {
    edge_node::transport::install_crypto_provider();
    let mut group = c.benchmark_group("forward_1200B");
    for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
        for n in [1usize, 10, 50] {
            let mut h = Harness::new(n, profile);
            // Pre-encrypt a long run of packets so the bench measures the edge, not the client.
            let packets: Vec<_> = (0..4096u32)
                .map(|k| h.publisher_packet(k as u16, k * 3000, k % 256 == 0, 1200))
                .collect();
            let mut i = 0usize;
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(format!("{profile:?}"), n), &n, |b, _| {
                b.iter(|| {
                    let p = &packets[i % packets.len()];
                    i += 1;
                    if i.is_multiple_of(packets.len()) {
                        // The replay window would refuse a second lap: start a fresh core.
                        h = Harness::new(n, profile);
                    }
                    h.from_publisher(p);
                    h.drain()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
