//! Sending a burst of copies on loopback: P packets of 1,200 bytes to each of N subscribers, as
//! a fan-out queues them (packet after packet, each to every subscriber), through the edge's own
//! `SendBatch`. `plain` sends them as queued, one datagram per message (32 per `sendmmsg`);
//! `gso` as the shard does: each subscriber's copies side by side, one GSO message per
//! subscriber. Throughput is in datagrams per second of one core; on loopback each send also
//! pays the delivery into the receiving socket (segmentation included, as for a browser, which
//! does not ask for GRO). `cargo bench -p edge-node --bench send`.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use edge_node::udp::batch::SendBatch;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

fn send(c: &mut Criterion) {
    let mut group = c.benchmark_group("send_burst_1200B");
    for (subscribers, packets) in [(60usize, 21usize), (60, 5), (60, 2), (60, 1)] {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let receivers: Vec<UdpSocket> = (0..subscribers)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let payloads: Vec<Vec<u8>> = (0..packets).map(|p| vec![p as u8; 1200]).collect();
        let queued: Vec<(SocketAddr, &[u8])> = payloads
            .iter()
            .flat_map(|p| {
                receivers
                    .iter()
                    .map(move |r| (r.local_addr().unwrap(), &p[..]))
            })
            .collect();
        let mut grouped = queued.clone();
        grouped.sort_by_key(|&(to, _)| to);
        let drain = || {
            let mut buf = [0u8; 2048];
            for r in &receivers {
                while r.recv(&mut buf).is_ok() {}
            }
        };
        group.throughput(Throughput::Elements(queued.len() as u64));
        let id = format!("{subscribers}x{packets}");
        for (name, gso, items) in [("plain", false, &queued), ("gso", true, &grouped)] {
            let mut sender = SendBatch::new(gso);
            group.bench_with_input(BenchmarkId::new(name, &id), items, |b, items| {
                b.iter_batched(
                    drain,
                    |()| {
                        let sent = sender.send(tx.as_raw_fd(), items).unwrap();
                        // Every copy must really leave.
                        assert_eq!(sent, items.len());
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, send);
criterion_main!(benches);
