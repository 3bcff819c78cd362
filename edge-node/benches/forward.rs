//! The forward path: one incoming SRTP packet (decrypt once) to N subscribers (rewrite and
//! encrypt once per copy), through the real shard core. Throughput is reported in outgoing
//! packets per second of one core; `cargo bench -p edge-node --bench forward`. At 500
//! subscribers their state (about 5 KiB each with the transport) no longer fits in the core's
//! cache, as on a busy edge: each copy then also waits for memory.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edge_node::sfu::harness::Harness;
use edge_node::transport::dtls::SrtpProfile;

fn forward(c: &mut Criterion) {
    edge_node::transport::install_crypto_provider();
    let mut group = c.benchmark_group("forward_1200B");
    for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
        for n in [1usize, 10, 50, 500] {
            let mut h = Harness::new(n, profile);
            // Pre-encrypt a long run of packets so the bench measures the edge, not the client.
            let packets: Vec<_> = (0..4096u32)
                .map(|k| h.publisher_packet(k as u16, k * 3000, k % 256 == 0, 1200))
                .collect();
            let mut i = 0usize;
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(format!("{profile:?}"), n), &n, |b, _| {
                b.iter(|| {
                    if i > 0 && i.is_multiple_of(packets.len()) {
                        // The replay window would refuse a second lap: start a fresh core.
                        h = Harness::new(n, profile);
                    }
                    let p = &packets[i % packets.len()];
                    i += 1;
                    h.from_publisher(p);
                    let out = h.drain();
                    // Every packet must really be forwarded to every subscriber.
                    debug_assert_eq!(out.len(), n);
                    assert!(
                        h.core.counters.rejected_srtp == 0,
                        "the bench fed a packet the edge refused"
                    );
                    out
                })
            });
        }
    }
    group.finish();
}

/// The ceiling the forward path is compared with, in the same run: decrypt one packet and
/// encrypt N copies with bare SRTP contexts, no routing, rewriting or bookkeeping. With the
/// edge's buffers: decrypt in a reused buffer, encrypt the copies into an arena.
fn raw_srtp(c: &mut Criterion) {
    use edge_node::transport::srtp::SrtpSession;
    let mut group = c.benchmark_group("raw_srtp_1200B");
    for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
        for n in [1usize, 10, 50, 500] {
            let mut h = Harness::new(0, profile);
            let packets: Vec<_> = (0..4096u32)
                .map(|k| h.publisher_packet(k as u16, k * 3000, false, 1200))
                .collect();
            let keys = |i: u8| edge_node::sfu::harness::test_keys(profile, i);
            let mut inbound = SrtpSession::new(&keys(0).0).expect("srtp");
            let mut outbound: Vec<SrtpSession> = (0..n)
                .map(|i| SrtpSession::new(&keys(1 + i as u8).0).expect("srtp"))
                .collect();
            let mut i = 0usize;
            let mut rx: Vec<u8> = Vec::with_capacity(2048);
            let mut arena = bytes::BytesMut::with_capacity(64 * 1024);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(format!("{profile:?}"), n), &n, |b, _| {
                b.iter(|| {
                    if i > 0 && i.is_multiple_of(packets.len()) {
                        inbound = SrtpSession::new(&keys(0).0).expect("srtp");
                    }
                    let p = &packets[i % packets.len()];
                    i += 1;
                    rx.clear();
                    rx.extend_from_slice(p);
                    let len = inbound.decrypt_rtp_in_place(&mut rx).expect("decrypt");
                    let mut out = Vec::with_capacity(n);
                    for s in outbound.iter_mut() {
                        out.push(s.encrypt_rtp_into(&rx[..len], &mut arena).expect("encrypt"));
                    }
                    out
                })
            });
        }
    }
    group.finish();
}

/// The same as [`raw_srtp`] with webrtc-srtp's `Context` (what the edge used before its own
/// in-place RTP transform): a fresh buffer per decrypted and per encrypted packet.
fn raw_webrtc_srtp(c: &mut Criterion) {
    use webrtc_srtp::context::Context;
    use webrtc_srtp::protection_profile::ProtectionProfile;
    let mut group = c.benchmark_group("raw_webrtc_srtp_1200B");
    for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
        let wp = match profile {
            SrtpProfile::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
            _ => ProtectionProfile::Aes128CmHmacSha1_80,
        };
        for n in [1usize, 10, 50] {
            let mut h = Harness::new(0, profile);
            let packets: Vec<_> = (0..4096u32)
                .map(|k| h.publisher_packet(k as u16, k * 3000, false, 1200))
                .collect();
            let keys = |i: u8| edge_node::sfu::harness::test_keys(profile, i).0;
            // The edge's side of each key pair, as SrtpSession::new uses it.
            let context = |i: u8| {
                let k = keys(i);
                Context::new(&k.local_key, &k.local_salt, wp, None, None).expect("srtp")
            };
            let mut inbound = {
                let k = keys(0);
                Context::new(&k.remote_key, &k.remote_salt, wp, None, None).expect("srtp")
            };
            let mut outbound: Vec<Context> = (0..n).map(|i| context(1 + i as u8)).collect();
            let mut i = 0usize;
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(format!("{profile:?}"), n), &n, |b, _| {
                b.iter(|| {
                    let p = &packets[i % packets.len()];
                    i += 1;
                    let plain = inbound.decrypt_rtp(p).expect("decrypt");
                    let mut out = Vec::with_capacity(n);
                    for s in outbound.iter_mut() {
                        out.push(s.encrypt_rtp(&plain).expect("encrypt"));
                    }
                    out
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, forward, raw_srtp, raw_webrtc_srtp);
criterion_main!(benches);
