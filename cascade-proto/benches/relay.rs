//! The relay's forward path: one 1,200-byte RTP packet from the source link, re-stamped for N
//! downstream links (header rewrite, one copy into the relay's output buffer per link), plus
//! the NACK cache insert. Throughput is in copies per second of one core;
//! `cargo bench -p cascade-proto --bench relay`.

use cascade_proto::link::{ControlMessage, FlowId, Layer, MediaDatagram, MediaFlags};
use cascade_proto::relay::{LinkId, Relay, RelayConfig};
use cascade_proto::{RoomId, TrackId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Instant;

fn relay(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay_1200B");
    let room = RoomId::new("bench").unwrap();
    let source = LinkId(0);
    for n in [1u64, 10, 50] {
        let mut r = Relay::new(RelayConfig::default());
        r.handle_link_up(source);
        r.set_track_source(room.clone(), TrackId(1), source);
        for i in 1..=n {
            r.handle_link_up(LinkId(i));
            r.handle_control(
                LinkId(i),
                ControlMessage::Subscribe {
                    flow: FlowId::new(100 + i as u32).unwrap(),
                    room: room.clone(),
                    track: TrackId(1),
                    layer: Layer::LOWEST,
                },
                Instant::now(),
            )
            .unwrap();
        }
        let up_flow = std::iter::from_fn(|| r.poll_control())
            .find_map(|(_, m)| match m {
                ControlMessage::Subscribe { flow, .. } => Some(flow),
                _ => None,
            })
            .unwrap();
        let datagrams: Vec<Vec<u8>> = (0..1024u16)
            .map(|seq| {
                let mut rtp = vec![0x80, 96];
                rtp.extend_from_slice(&seq.to_be_bytes());
                rtp.extend_from_slice(&[0; 8]);
                rtp.resize(1200, 0xab);
                let mut out = Vec::new();
                cascade_proto::wire::encode_datagram(
                    &MediaDatagram {
                        flow: up_flow,
                        layer: Layer::LOWEST,
                        flags: MediaFlags::default(),
                        rtp: &rtp,
                    },
                    &mut out,
                );
                out
            })
            .collect();
        let mut i = 0usize;
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                r.handle_datagram(source, &datagrams[i % datagrams.len()]);
                i += 1;
                let mut copies = 0u64;
                r.drain_datagrams(|_, bytes| copies += bytes.len() as u64);
                assert!(copies > 0, "every packet is forwarded");
                copies
            })
        });
    }
    group.finish();
}

criterion_group!(benches, relay);
criterion_main!(benches);
