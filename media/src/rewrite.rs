//! One continuous RTP stream per (subscriber, track), across layer switches and drops.
//!
//! A simulcast publisher sends each layer as its own RTP stream with its own SSRC, sequence numbers
//! and timestamps. A subscriber receives one stream with one fixed SSRC, so every forwarded packet
//! gets a rewritten sequence number and timestamp (the SSRC is the caller's constant). The rules,
//! after mediasoup's `SeqManager` and `SimulcastConsumer`:
//!
//! - Within a layer, `out_seq = in_ext_seq + offset`: a packet lost upstream stays a gap in the
//!   output, so the subscriber NACKs it (RFC 4585 §6.2.1) and we can resend it from the cache.
//! - A packet the forwarder chose not to send ([`RtpRewriter::skip`], e.g. a dropped temporal
//!   layer) must not look lost: later packets are shifted down to close its gap.
//! - At a switch (a keyframe of the new layer, or the very first packet) the output continues at
//!   `last_seq + 1` and `last_ts + max(1, wall time since the last forwarded packet)` in clock-rate
//!   ticks, so the receiver's jitter buffer sees a plausible timeline (RFC 3550 §5.1: timestamps
//!   advance with sampling time).
//! - Packets of a layer we left, or of the new layer from before the switch, are not forwarded:
//!   the decoder cannot use them and their numbers were never reserved in the output.
//! - Reordered packets of the current layer (after the switch point) get the seq they would have
//!   had in order, unless they are older than [`MAX_REORDER`] packets.
//!
//! Output arithmetic is modular: sequence numbers wrap at 2^16 and timestamps at 2^32 exactly as
//! a receiver expects. Audio uses the same rewriter with a single layer.

use std::collections::VecDeque;
use std::time::Instant;

use crate::units::SpatialLayer;

/// Packets older than this many packets behind the newest one of the current layer are not
/// forwarded. About 0.7 s of a 15 Mbps stream (~1500 packets/s): later than a real-time jitter
/// buffer waits for a packet, and it bounds the skipped-packet bookkeeping.
pub const MAX_REORDER: u64 = 1024;

/// One packet offered to the rewriter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewriteInput {
    /// The simulcast layer the packet belongs to (`SpatialLayer(0)` for audio).
    pub layer: SpatialLayer,
    /// The packet's extended sequence number in its layer's stream (see [`crate::seq`]).
    pub ext_seq: u64,
    /// The packet's RTP timestamp in its layer's stream.
    pub timestamp: u32,
    /// When the packet arrived.
    pub arrival: Instant,
}

/// The header values to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Output sequence number.
    pub seq: u16,
    /// Output RTP timestamp.
    pub timestamp: u32,
}

/// The mapping from the current layer's stream to the output stream.
#[derive(Debug, Clone)]
struct Mapping {
    layer: SpatialLayer,
    /// Extended seq of the switch packet: older packets of this layer are not forwarded.
    switch_ext_seq: u64,
    /// The newest extended seq of this layer seen (forwarded or skipped).
    highest_in: u64,
    /// `out_ext = in_ext + seq_offset - (skipped packets before in_ext)`, wrapping.
    seq_offset: u64,
    /// `out_ts = in_ts + ts_offset`, wrapping.
    ts_offset: u32,
    /// Skipped extended seqs newer than `highest_in - MAX_REORDER`, ascending.
    skipped: VecDeque<u64>,
}

impl Mapping {
    /// Forgets skipped entries too old to matter, folding them into the offset (the output of
    /// newer packets does not change: one fewer skipped entry, one less offset).
    fn prune(&mut self) {
        let floor = self.highest_in.saturating_sub(MAX_REORDER);
        while self.skipped.front().is_some_and(|&s| s < floor) {
            self.skipped.pop_front();
            self.seq_offset = self.seq_offset.wrapping_sub(1);
        }
    }

    fn out_ext_seq(&self, ext_seq: u64) -> u64 {
        let skipped_before = self.skipped.partition_point(|&s| s < ext_seq) as u64;
        ext_seq
            .wrapping_add(self.seq_offset)
            .wrapping_sub(skipped_before)
    }
}

/// Rewrites sequence numbers and timestamps of one (subscriber, track) output stream.
#[derive(Debug, Clone)]
pub struct RtpRewriter {
    clock_rate: u32,
    mapping: Option<Mapping>,
    /// Extended output seq of the newest forwarded packet (wrapping; only its low 16 bits are
    /// sent).
    last_out_seq: u64,
    /// Output timestamp of the newest forwarded packet.
    last_out_ts: u32,
    /// Arrival of the newest forwarded packet.
    last_arrival: Option<Instant>,
}

impl RtpRewriter {
    /// A rewriter for a track with this RTP clock rate (90000 for video, 48000 for Opus).
    pub fn new(clock_rate: u32) -> Self {
        Self {
            clock_rate,
            mapping: None,
            last_out_seq: 0,
            last_out_ts: 0,
            last_arrival: None,
        }
    }

    /// The layer currently mapped to the output, if any packet was forwarded.
    pub fn layer(&self) -> Option<SpatialLayer> {
        self.mapping.as_ref().map(|m| m.layer)
    }

    /// Rewrites a packet to forward.
    ///
    /// `switch` = this packet is the keyframe where forwarding moves to `input.layer` (or the very
    /// first packet). Returns `None` for packets that must not be forwarded (older than the switch
    /// point or than [`MAX_REORDER`], from a layer we left, or already skipped).
    pub fn rewrite(&mut self, input: &RewriteInput, switch: bool) -> Option<Rewritten> {
        if switch {
            return Some(self.switch_to(input));
        }
        let m = self.mapping.as_mut()?;
        if input.layer != m.layer
            || input.ext_seq < m.switch_ext_seq
            || input.ext_seq.saturating_add(MAX_REORDER) < m.highest_in
            || m.skipped.binary_search(&input.ext_seq).is_ok()
        {
            return None;
        }
        let newest = input.ext_seq > m.highest_in;
        if newest {
            m.highest_in = input.ext_seq;
            m.prune();
        }
        let out_seq = m.out_ext_seq(input.ext_seq);
        let out_ts = input.timestamp.wrapping_add(m.ts_offset);
        if newest {
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
            self.last_arrival = Some(input.arrival);
        }
        Some(Rewritten {
            seq: out_seq as u16,
            timestamp: out_ts,
        })
    }

    /// The forwarder decided not to send this packet of the current layer (paused, temporal
    /// drop): close the seq gap it would leave.
    ///
    /// Only packets newer than every packet seen so far can be closed; an older one already
    /// showed up as a gap after its successors were sent, and stays one.
    pub fn skip(&mut self, input: &RewriteInput) {
        let Some(m) = self.mapping.as_mut() else {
            return;
        };
        if input.layer != m.layer || input.ext_seq <= m.highest_in {
            return;
        }
        m.highest_in = input.ext_seq;
        m.skipped.push_back(input.ext_seq);
        m.prune();
    }

    fn switch_to(&mut self, input: &RewriteInput) -> Rewritten {
        let (out_seq, out_ts) = match self.last_arrival {
            None => (input.ext_seq, input.timestamp),
            Some(last) => {
                let elapsed = input.arrival.saturating_duration_since(last);
                let ticks = elapsed.as_micros() * u128::from(self.clock_rate) / 1_000_000;
                // Modular: an elapsed time longer than the timestamp space wraps like RTP does.
                let ticks = ticks.max(1) as u32;
                (
                    self.last_out_seq.wrapping_add(1),
                    self.last_out_ts.wrapping_add(ticks),
                )
            }
        };
        let mut skipped = self.mapping.take().map(|m| m.skipped).unwrap_or_default();
        skipped.clear();
        self.mapping = Some(Mapping {
            layer: input.layer,
            switch_ext_seq: input.ext_seq,
            highest_in: input.ext_seq,
            seq_offset: out_seq.wrapping_sub(input.ext_seq),
            ts_offset: out_ts.wrapping_sub(input.timestamp),
            skipped,
        });
        self.last_out_seq = out_seq;
        self.last_out_ts = out_ts;
        self.last_arrival = Some(input.arrival);
        Rewritten {
            seq: out_seq as u16,
            timestamp: out_ts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seq::{SeqUnwrapper, TestRng};
    use std::time::Duration;

    const L0: SpatialLayer = SpatialLayer(0);
    const L1: SpatialLayer = SpatialLayer(1);
    const L2: SpatialLayer = SpatialLayer(2);

    /// One step of a table: what arrives, what the forwarder does, what must come out.
    #[derive(Clone, Copy)]
    enum Op {
        /// (layer, wire seq, timestamp, ms since start, switch) -> expected output
        Fwd(SpatialLayer, u16, u32, u64, bool, Option<(u16, u32)>),
        /// (layer, wire seq, timestamp, ms since start)
        Skip(SpatialLayer, u16, u32, u64),
    }
    use Op::*;

    /// Runs a table with one `SeqUnwrapper` per layer, as the edge does per incoming stream.
    fn run(name: &str, clock_rate: u32, ops: &[Op]) {
        let t0 = Instant::now();
        let mut unwrappers: Vec<SeqUnwrapper> = (0..3).map(|_| SeqUnwrapper::new()).collect();
        let mut rw = RtpRewriter::new(clock_rate);
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Fwd(layer, seq, ts, ms, switch, want) => {
                    let ext_seq = unwrappers[layer.0 as usize].extend(seq);
                    let input = RewriteInput {
                        layer,
                        ext_seq,
                        timestamp: ts,
                        arrival: t0 + Duration::from_millis(ms),
                    };
                    let got = rw.rewrite(&input, switch).map(|r| (r.seq, r.timestamp));
                    assert_eq!(got, want, "{name}: step {i}");
                }
                Skip(layer, seq, ts, ms) => {
                    let ext_seq = unwrappers[layer.0 as usize].extend(seq);
                    rw.skip(&RewriteInput {
                        layer,
                        ext_seq,
                        timestamp: ts,
                        arrival: t0 + Duration::from_millis(ms),
                    });
                }
            }
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, &[Op])] = &[
            (
                "first packet keeps its numbers, losses stay gaps",
                &[
                    Fwd(L0, 100, 9000, 0, true, Some((100, 9000))),
                    Fwd(L0, 101, 9000, 1, false, Some((101, 9000))),
                    Fwd(L0, 104, 12000, 33, false, Some((104, 12000))),
                    Fwd(L0, 103, 12000, 34, false, Some((103, 12000))), // reordered
                    Fwd(L0, 104, 12000, 35, false, Some((104, 12000))), // duplicate
                ],
            ),
            (
                "packets before the first switch are not forwarded",
                &[
                    Fwd(L0, 100, 9000, 0, false, None),
                    Fwd(L0, 101, 9000, 0, true, Some((101, 9000))),
                ],
            ),
            (
                "switch up: seq continues, ts advances by wall time",
                &[
                    Fwd(L0, 100, 1000, 0, true, Some((100, 1000))),
                    Fwd(L0, 101, 1000, 1, false, Some((101, 1000))),
                    // 20 ms later at 90 kHz = 1800 ticks.
                    Fwd(L1, 5000, 777_000, 21, true, Some((102, 2800))),
                    Fwd(L1, 5001, 777_000, 22, false, Some((103, 2800))),
                    Fwd(L1, 5002, 780_000, 55, false, Some((104, 5800))),
                    // Old layer after the switch: dropped.
                    Fwd(L0, 102, 4000, 56, false, None),
                    // New layer before the switch point: dropped.
                    Fwd(L1, 4999, 774_000, 57, false, None),
                    // Reordered after the switch point: mapped.
                    Fwd(L1, 5004, 783_000, 60, false, Some((106, 8800))),
                    Fwd(L1, 5003, 780_000, 61, false, Some((105, 5800))),
                ],
            ),
            (
                "switch in the same millisecond advances ts by at least 1",
                &[
                    Fwd(L1, 10, 500, 0, true, Some((10, 500))),
                    Fwd(L0, 900, 123, 0, true, Some((11, 501))),
                ],
            ),
            (
                "skip closes the gap, also with later reordering",
                &[
                    Fwd(L0, 10, 0, 0, true, Some((10, 0))),
                    Skip(L0, 11, 0, 1),
                    Fwd(L0, 13, 3000, 2, false, Some((12, 3000))),
                    Fwd(L0, 12, 3000, 3, false, Some((11, 3000))),
                    Skip(L0, 14, 6000, 4),
                    Skip(L0, 15, 6000, 4),
                    Fwd(L0, 17, 9000, 5, false, Some((14, 9000))), // 16 lost: gap at 13
                    Fwd(L0, 16, 9000, 6, false, Some((13, 9000))),
                    // A skipped packet offered again (duplicate): not forwarded, it would
                    // collide with its successor's number.
                    Fwd(L0, 15, 6000, 7, false, None),
                ],
            ),
            (
                "skip of an old packet leaves its gap; other layers' skips are ignored",
                &[
                    Fwd(L0, 10, 0, 0, true, Some((10, 0))),
                    Fwd(L0, 12, 0, 1, false, Some((12, 0))),
                    Skip(L0, 11, 0, 2),
                    Skip(L1, 13, 0, 2),
                    Fwd(L0, 13, 0, 3, false, Some((13, 0))),
                ],
            ),
            (
                "skipped tail before a switch does not leave a gap",
                &[
                    Fwd(L0, 10, 0, 0, true, Some((10, 0))),
                    Skip(L0, 11, 0, 10),
                    Skip(L0, 12, 0, 20),
                    // 100 ms since the last *forwarded* packet.
                    Fwd(L2, 60000, 5, 100, true, Some((11, 9000))),
                ],
            ),
            (
                "sequence and timestamp wrap",
                &[
                    Fwd(
                        L0,
                        65534,
                        u32::MAX - 1,
                        0,
                        true,
                        Some((65534, u32::MAX - 1)),
                    ),
                    Fwd(L0, 65535, u32::MAX, 0, false, Some((65535, u32::MAX))),
                    Fwd(L0, 0, 2999, 33, false, Some((0, 2999))),
                    Fwd(L0, 65535, u32::MAX, 34, false, Some((65535, u32::MAX))),
                    Fwd(L1, 7, 100, 43, true, Some((1, 2999 + 900))),
                ],
            ),
            (
                "switch across the output wrap",
                &[
                    Fwd(
                        L0,
                        65535,
                        u32::MAX - 100,
                        0,
                        true,
                        Some((65535, u32::MAX - 100)),
                    ),
                    Fwd(L1, 300, 1, 10, true, Some((0, 799))),
                    Fwd(L1, 301, 1, 11, false, Some((1, 799))),
                    Skip(L1, 302, 1, 12),
                    Fwd(L1, 303, 3001, 13, false, Some((2, 3799))),
                ],
            ),
        ];
        for (name, ops) in cases {
            run(name, 90_000, ops);
        }
    }

    #[test]
    fn audio_one_layer() {
        run(
            "opus",
            48_000,
            &[
                Fwd(L0, 1, 0, 0, true, Some((1, 0))),
                Fwd(L0, 2, 960, 20, false, Some((2, 960))),
                Skip(L0, 3, 1920, 40), // e.g. muted by the forwarder
                // Resume after 2 s: a "switch" on the same layer, 96000 ticks later.
                Fwd(L0, 103, 98880, 2020, true, Some((3, 960 + 96_000))),
                Fwd(L0, 104, 99840, 2040, false, Some((4, 960 + 96_960))),
            ],
        );
    }

    #[test]
    fn too_old_packets_are_dropped() {
        let t0 = Instant::now();
        let mut rw = RtpRewriter::new(90_000);
        let input = |ext_seq| RewriteInput {
            layer: L0,
            ext_seq,
            timestamp: 0,
            arrival: t0,
        };
        rw.rewrite(&input(100_000), true).unwrap();
        rw.rewrite(&input(100_000 + 2000), false).unwrap();
        assert_eq!(
            rw.rewrite(&input(100_000 + 2000 - MAX_REORDER - 1), false),
            None
        );
        assert!(rw
            .rewrite(&input(100_000 + 2000 - MAX_REORDER), false)
            .is_some());
        assert_eq!(rw.layer(), Some(L0));
    }

    /// Property: with in-order arrival, random loss, random skips and random switches, each
    /// forwarded packet's output seq is the previous one + 1 + the packets lost upstream in
    /// between (within a layer), + 1 exactly at a switch; timestamps never go backwards across
    /// a switch. Also pruning of old skipped entries keeps the mapping unchanged.
    #[test]
    fn property_contiguous_output() {
        for seed in 0..50 {
            let mut rng = TestRng::new(seed);
            let t0 = Instant::now();
            let mut rw = RtpRewriter::new(90_000);
            let mut next_seq = [rng.below(65536) as u16, 60000, 3];
            let mut next_ts = [rng.next_u64() as u32, u32::MAX - 5000, 0];
            let mut unwrappers: Vec<SeqUnwrapper> = (0..3).map(|_| SeqUnwrapper::new()).collect();
            let mut current = 0usize;
            let mut last_out: Option<(u16, u32)> = None;
            let mut lost_since_last = 0u16;
            for step in 0..5000u64 {
                let layer = rng.below(3) as usize;
                let seq = next_seq[layer];
                next_seq[layer] = seq.wrapping_add(1);
                next_ts[layer] = next_ts[layer].wrapping_add(rng.below(2) as u32 * 3000);
                let ext_seq = unwrappers[layer].extend(seq);
                let input = RewriteInput {
                    layer: SpatialLayer(layer as u8),
                    ext_seq,
                    timestamp: next_ts[layer],
                    arrival: t0 + Duration::from_millis(step),
                };
                let r = rng.below(100);
                let switch = last_out.is_none() || (layer != current && r < 5);
                if switch {
                    current = layer;
                    let out = rw.rewrite(&input, true).unwrap();
                    if let Some((s, ts)) = last_out {
                        assert_eq!(out.seq, s.wrapping_add(1), "seed {seed} step {step}");
                        let adv = out.timestamp.wrapping_sub(ts);
                        assert!((1..1 << 31).contains(&adv), "seed {seed} step {step}");
                    }
                    last_out = Some((out.seq, out.timestamp));
                    lost_since_last = 0;
                } else if layer != current {
                    assert_eq!(rw.rewrite(&input, false), None);
                } else if r < 10 {
                    lost_since_last += 1; // never reaches us
                } else if r < 40 {
                    rw.skip(&input);
                } else {
                    let out = rw.rewrite(&input, false).unwrap();
                    let (s, _) = last_out.unwrap();
                    assert_eq!(
                        out.seq,
                        s.wrapping_add(1 + lost_since_last),
                        "seed {seed} step {step}"
                    );
                    last_out = Some((out.seq, out.timestamp));
                    lost_since_last = 0;
                }
            }
        }
    }

    #[test]
    fn skipped_list_stays_bounded() {
        let t0 = Instant::now();
        let mut rw = RtpRewriter::new(90_000);
        let input = |ext_seq| RewriteInput {
            layer: L0,
            ext_seq,
            timestamp: 0,
            arrival: t0,
        };
        rw.rewrite(&input(70_000), true).unwrap();
        for i in 1..100_000u64 {
            if i % 2 == 0 {
                rw.skip(&input(70_000 + i));
            } else {
                rw.rewrite(&input(70_000 + i), false).unwrap();
            }
        }
        let m = rw.mapping.as_ref().unwrap();
        assert!(m.skipped.len() as u64 <= MAX_REORDER / 2 + 1);
        // 49_999 of the packets were skipped: the output is that much behind the input.
        let out = rw.rewrite(&input(70_000 + 100_001), false).unwrap();
        assert_eq!(out.seq, (70_000u64 + 100_001 - 49_999) as u16);
    }
}
