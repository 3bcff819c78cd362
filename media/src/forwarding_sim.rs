//! Seeded simulation of one simulcast VP8 publisher -> edge -> one subscriber, through every
//! module of the crate, checking the invariants a subscriber's decoder relies on:
//! switches only at keyframes, one source packet per output seq, gaps only where packets were
//! lost, timestamps and picture ids that never run backwards, and NACKs that find the right
//! source packet.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use crate::cache::{PacketCache, SentPacket, Sequencer};
use crate::codec::{is_keyframe, VideoCodec};
use crate::meter::BitrateMeter;
use crate::rewrite::{RewriteInput, RtpRewriter};
use crate::selector::{Decision, LayerSelector};
use crate::seq::{SeqUnwrapper, TestRng, TsUnwrapper};
use crate::units::{Bitrate, SpatialLayer};
use crate::vp8::Vp8Descriptor;

const LAYERS: usize = 3;
/// Packets per frame per layer; 1000-byte packets at 30 fps: 240 kbps, 720 kbps, 1.92 Mbps.
const PACKETS_PER_FRAME: [u16; LAYERS] = [1, 3, 8];
const PACKET_BYTES: usize = 1000;
const FRAME_INTERVAL_MS: u64 = 33;
const TICKS_PER_FRAME: u32 = 3000;
const KEYFRAME_INTERVAL_FRAMES: u64 = 90;

struct PublisherLayer {
    seq: u16,
    ts: u32,
    pic: u16,
    tl0: u8,
    frames: u64,
    keyframe_requested: bool,
}

/// A packet on the way to the edge: (arrival ms, send order as tie-break, layer, payload).
type InFlight = (u64, u64, usize, Vec<u8>);

/// An output packet as the subscriber sees it.
struct Out {
    layer: SpatialLayer,
    ext_seq: u64,
    ts: u32,
    pic: u16,
    switch: bool,
    at_ms: u64,
}

fn payload(layer: usize, seq: u16, pic: u16, tl0: u8, first: bool, key: bool) -> Vec<u8> {
    let mut p = vec![
        if first { 0x90 } else { 0x80 }, // X=1, S on the first packet, PID=0
        0xC0,                            // I, L
        0x80 | (pic >> 8) as u8,
        pic as u8,
        tl0,
        if first && key { 0x10 } else { 0x11 }, // VP8 payload header, P bit
        layer as u8,
    ];
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(PACKET_BYTES, 0xEE);
    p
}

/// The (layer, wire seq) a payload was built with.
fn origin(p: &[u8]) -> (u8, u16) {
    (p[6], u16::from_be_bytes([p[7], p[8]]))
}

/// Budget and max layer over time: (until ms, budget kbps, max layer).
const SCHEDULE: &[(u64, u64, Option<u8>)] = &[
    (10_000, 5000, Some(2)),
    (20_000, 1000, Some(2)), // layer 2 does not fit: down to 1
    (30_000, 5000, Some(2)), // back up after the hold-off
    (40_000, 200, Some(2)),  // nothing fits: lowest layer, still video
    (45_000, 5000, None),    // paused by the subscriber
    (60_000, 5000, Some(2)), // resumed
];

fn schedule(ms: u64) -> (Bitrate, Option<SpatialLayer>) {
    let (_, kbps, max) = SCHEDULE
        .iter()
        .find(|(until, _, _)| ms < *until)
        .copied()
        .unwrap_or(*SCHEDULE.last().unwrap());
    (Bitrate::kbps(kbps), max.map(SpatialLayer))
}

fn run(seed: u64) {
    let mut rng = TestRng::new(seed);
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);

    let mut publisher: Vec<PublisherLayer> = (0..LAYERS)
        .map(|_| PublisherLayer {
            // Start near the wraps to exercise them.
            seq: 65_000 + rng.below(500) as u16,
            ts: u32::MAX - rng.below(100_000) as u32,
            pic: 32_000 + rng.below(700) as u16,
            tl0: rng.below(256) as u8,
            frames: 0,
            keyframe_requested: false,
        })
        .collect();
    let mut network: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut lost_upstream = 0usize;
    // Keyframe requests reach the publisher 50 ms later.
    let mut requests: Vec<(u64, usize)> = Vec::new();

    // Edge state.
    let mut unwrappers: Vec<SeqUnwrapper> = (0..LAYERS).map(|_| SeqUnwrapper::new()).collect();
    let mut caches: Vec<PacketCache> = (0..LAYERS).map(|_| PacketCache::new(1024)).collect();
    let mut meters: Vec<BitrateMeter> = (0..LAYERS).map(|_| BitrateMeter::new()).collect();
    let mut selector = LayerSelector::new(LAYERS as u8);
    let mut rewriter = RtpRewriter::new(90_000);
    let mut munger = crate::vp8::Vp8Munger::new();
    let mut sequencer = Sequencer::new(1024);

    // Subscriber view.
    let mut out_seqs = SeqUnwrapper::new();
    let mut outs: BTreeMap<u64, Out> = BTreeMap::new();
    let mut current_at: BTreeMap<u64, Option<SpatialLayer>> = BTreeMap::new();

    for ms in 0..60_000u64 {
        // Publisher: a frame per layer every 33 ms.
        if ms % FRAME_INTERVAL_MS == 0 {
            requests.retain(|&(due, l)| {
                if due <= ms {
                    publisher[l].keyframe_requested = true;
                }
                due > ms
            });
            for (l, p) in publisher.iter_mut().enumerate() {
                let key = p.frames % KEYFRAME_INTERVAL_FRAMES == 0 || p.keyframe_requested;
                p.keyframe_requested = false;
                for i in 0..PACKETS_PER_FRAME[l] {
                    let bytes = payload(l, p.seq, p.pic, p.tl0, i == 0, key);
                    // 3% lost and recovered by upstream NACK/RTX 60 ms later; 5% reordered.
                    let mut delay = 20;
                    if rng.below(100) < 3 {
                        delay += 60;
                        lost_upstream += 1;
                    } else if rng.below(100) < 5 {
                        delay += 5;
                    }
                    order += 1;
                    network.push(Reverse((ms + delay, order, l, bytes)));
                    p.seq = p.seq.wrapping_add(1);
                }
                p.frames += 1;
                p.pic = (p.pic + 1) % (1 << 15);
                p.tl0 = p.tl0.wrapping_add(1);
                p.ts = p.ts.wrapping_add(TICKS_PER_FRAME);
            }
        }

        // Edge: allocation every 500 ms, subscriber preference from the schedule.
        if ms % 500 == 0 {
            let (budget, max) = schedule(ms);
            if max != selector.max_layer() {
                selector.set_max_layer(max);
            }
            let rates: Vec<Option<Bitrate>> = meters.iter().map(|m| m.bitrate(at(ms))).collect();
            selector.handle_allocation(budget, &rates, at(ms));
        }
        if ms % 10 == 0 {
            if let Some(l) = selector.poll_keyframe_request(at(ms)) {
                requests.push((ms + 50, usize::from(l.0)));
            }
        }

        // Edge: packets arriving now.
        while network.peek().is_some_and(|Reverse((t, ..))| *t <= ms) {
            let Reverse((_, _, l, bytes)) = network.pop().unwrap();
            let (_, wire_seq) = origin(&bytes);
            let ext_seq = unwrappers[l].extend(wire_seq);
            caches[l].insert(ext_seq, &bytes, at(ms));
            meters[l].handle_packet(bytes.len(), at(ms));
            let layer = SpatialLayer(l as u8);
            let key = is_keyframe(VideoCodec::Vp8, &bytes);
            let Decision::Forward { switch } = selector.handle_packet(layer, key, at(ms)) else {
                continue;
            };
            assert!(
                !switch || key,
                "seed {seed} {ms} ms: switch on a delta frame"
            );
            let input = RewriteInput {
                layer,
                ext_seq,
                timestamp: ts_of(&publisher, l, &bytes),
                arrival: at(ms),
            };
            let Some(r) = rewriter.rewrite(&input, switch) else {
                continue;
            };
            let mut sent = bytes.clone();
            munger.rewrite(&mut sent, switch).unwrap();
            sequencer.record(
                r.seq,
                SentPacket {
                    layer,
                    ext_seq,
                    timestamp: r.timestamp,
                },
            );
            let out_ext = out_seqs.extend(r.seq);
            let pic = Vp8Descriptor::parse(&sent)
                .unwrap()
                .picture_id
                .unwrap()
                .value;
            let o = Out {
                layer,
                ext_seq,
                ts: r.timestamp,
                pic,
                switch,
                at_ms: ms,
            };
            if let Some(prev) = outs.get(&out_ext) {
                assert_eq!(
                    (prev.layer, prev.ext_seq),
                    (layer, ext_seq),
                    "seed {seed}: output seq reused for another packet"
                );
            }
            outs.insert(out_ext, o);
        }
        if ms % 500 == 499 {
            current_at.insert(ms, selector.current());
        }
    }

    // The subscriber saw the layers the schedule asks for, once settled.
    let expect = [
        (9_999, Some(2)),
        (19_999, Some(1)),
        (29_999, Some(2)),
        (39_999, Some(0)),
        (44_999, None),
        (59_999, Some(2)),
    ];
    for (ms, want) in expect {
        assert_eq!(
            current_at[&ms],
            want.map(SpatialLayer),
            "seed {seed} at {ms} ms"
        );
    }
    // Nothing is forwarded while paused.
    assert!(!outs.values().any(|o| (40_100..45_000).contains(&o.at_ms)));

    // Walk the output in seq order.
    let mut ts_unwrap = TsUnwrapper::new();
    let mut prev: Option<(u64, u64, u16)> = None; // (out ext seq, ts ext, pic)
    let mut gaps = 0u64;
    let mut switches = 0;
    for (&seq, o) in &outs {
        let ts = ts_unwrap.extend(o.ts);
        if let Some((pseq, pts, ppic)) = prev {
            gaps += seq - pseq - 1;
            assert!(
                ts >= pts,
                "seed {seed}: timestamp went backwards at out seq {seq}"
            );
            let dpic = u64::from(o.pic.wrapping_sub(ppic) % (1 << 15));
            assert!(
                dpic <= seq - pseq,
                "seed {seed}: picture id jump at out seq {seq}"
            );
            if o.switch {
                switches += 1;
                assert_eq!(seq, pseq + 1, "seed {seed}: switch not contiguous");
                assert_eq!(dpic, 1, "seed {seed}: switch picture id not last + 1");
            }
            // Resuming after the pause: the timestamp advanced with wall time (5 s at 90 kHz).
            if o.switch && o.at_ms >= 45_000 && o.at_ms < 46_000 {
                let adv = ts - pts;
                assert!(
                    (5 * 90_000 - 9000..6 * 90_000).contains(&adv),
                    "seed {seed}: resume advanced {adv} ticks"
                );
            }
        }
        prev = Some((seq, ts, o.pic));
    }
    // Down to 1, up to 2, down to 0, resume at 2 (the first packet has no predecessor).
    assert!(switches >= 4, "seed {seed}: only {switches} switches");
    assert!(
        gaps <= lost_upstream as u64,
        "seed {seed}: {gaps} gaps for {lost_upstream} lost packets"
    );

    // NACKs of recent output seqs find the source packet in the cache.
    let last = *outs.keys().next_back().unwrap();
    for (&seq, o) in outs.range(last - 300..) {
        let sent = sequencer.lookup(seq as u16).expect("recorded");
        assert_eq!(
            (sent.layer, sent.ext_seq, sent.timestamp),
            (o.layer, o.ext_seq, o.ts)
        );
        let bytes = caches[usize::from(sent.layer.0)]
            .get(sent.ext_seq)
            .expect("cached");
        assert_eq!(origin(bytes), (sent.layer.0, sent.ext_seq as u16));
    }
    // A gap's seq (a packet never sent) finds nothing.
    for seq in last - 300..last {
        if !outs.contains_key(&seq) {
            assert_eq!(sequencer.lookup(seq as u16), None);
        }
    }
}

/// The RTP timestamp the publisher gave this packet: recomputed from its picture id, since the
/// payload carries the picture id and all layers advance one frame per picture.
fn ts_of(publisher: &[PublisherLayer], layer: usize, bytes: &[u8]) -> u32 {
    let p = &publisher[layer];
    let pic = Vp8Descriptor::parse(bytes)
        .unwrap()
        .picture_id
        .unwrap()
        .value;
    // Frames behind the publisher's next picture id.
    let behind = p.pic.wrapping_sub(pic) % (1 << 15);
    p.ts.wrapping_sub(u32::from(behind) * TICKS_PER_FRAME)
}

#[test]
fn simulcast_forwarding_invariants() {
    for seed in 0..4 {
        run(seed);
    }
}
