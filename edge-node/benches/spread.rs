//! The span of a keyframe's fan-out: from the shard starting on a 21-packet keyframe (1,200-byte
//! packets) to N subscribers to its last copy handed to the kernel, through the real shard core
//! and `ShardCore::fan_out_spread`, with no helper (`alone`: every copy on the shard's thread)
//! and with one (`helped`). Copies go to loopback sockets through the edge's `SendBatch` with
//! GSO, so each send also pays the kernel, as on an edge. Compare the two in one run; the
//! ratio is the figure (`cargo bench -p edge-node --bench spread`), and it needs a second idle
//! core to show anything.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edge_node::sfu::harness::Harness;
use edge_node::sfu::Transmit;
use edge_node::spread::Helpers;
use edge_node::transport::dtls::SrtpProfile;
use edge_node::udp::batch::SendBatch;
use std::cell::RefCell;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const KEYFRAME_PACKETS: u32 = 21;

thread_local! {
    static SENDER: RefCell<SendBatch> = RefCell::new(SendBatch::new(true));
}

fn spread(c: &mut Criterion) {
    edge_node::transport::install_crypto_provider();
    let mut group = c.benchmark_group("keyframe_fan_out_span");
    for n in [60usize, 200] {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let receivers: Vec<UdpSocket> = (0..n)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let sinks: Vec<SocketAddr> = receivers.iter().map(|r| r.local_addr().unwrap()).collect();
        let drain = || {
            let mut buf = [0u8; 2048];
            for r in &receivers {
                while r.recv(&mut buf).is_ok() {}
            }
        };
        // The harness's subscriber i is at port 10001 + i: each copy goes to its own socket.
        let send = |t: &mut Vec<Transmit>| {
            let items: Vec<(SocketAddr, &[u8])> = t
                .iter()
                .map(|t| (sinks[usize::from(t.to.port() - 10_001)], &t.data[..]))
                .collect();
            SENDER.with_borrow_mut(|s| {
                let mut done = 0;
                while done < items.len() {
                    done += match s.send(tx.as_raw_fd(), &items[done..]) {
                        Ok(k) => k,
                        Err(e) => e.datagrams.max(1),
                    };
                }
            });
        };
        group.throughput(Throughput::Elements(n as u64 * u64::from(KEYFRAME_PACKETS)));
        for (label, count) in [("alone", 0usize), ("helped", 1)] {
            let helpers = Helpers::start(count, "bench-fan-out").unwrap();
            let profile = SrtpProfile::AeadAes128Gcm;
            let mut h = Harness::new(n, profile);
            let mut next = 0u32;
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let mut span = Duration::ZERO;
                    for _ in 0..iters {
                        if next > 60_000 {
                            // Sequence numbers would wrap into the replay window: a fresh core.
                            h = Harness::new(n, profile);
                            next = 0;
                        }
                        for k in 0..KEYFRAME_PACKETS {
                            let p = h.publisher_packet((next + k) as u16, next * 100, k == 0, 1200);
                            h.from_publisher(&p);
                        }
                        next += KEYFRAME_PACKETS;
                        let start = Instant::now();
                        h.core.fan_out_spread(&helpers, 32, &send);
                        span += start.elapsed();
                        drain();
                    }
                    span
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, spread);
criterion_main!(benches);
