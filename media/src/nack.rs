//! Receiver-side loss recovery for streams received from publishers: decides which missing RTP
//! packets to ask for again with a generic NACK (RFC 4585 §6.2.1), when to ask again, and when to
//! give up and ask for a keyframe instead.
//!
//! The edge is the receiver of every publisher's streams, so it recovers losses on the first hop
//! once instead of letting every subscriber NACK a packet the edge never had.
//!
//! How to drive it: feed every received packet's extended sequence number (original packets and
//! packets recovered through RTX alike) to [`NackGenerator::handle_packet`]; call
//! [`NackGenerator::poll_nacks`] when [`NackGenerator::poll_timeout`] is due (or on a tick) and
//! send what it returns as generic NACK FCI entries, packed with [`nack_pairs`]; feed RTT
//! measurements to [`NackGenerator::set_rtt`]; check [`NackGenerator::poll_keyframe_needed`] and
//! forward a keyframe request when it says so.
//!
//! Time model: sans-IO; `now` is passed in, never read.
//!
//! A packet is missing when a higher sequence number has arrived. It is requested after a short
//! reorder allowance (most reordering on the public Internet is a few milliseconds), then again
//! every `max(rtt, min_retry_interval)` until it arrives, `max_retries` requests were sent, or it
//! is older than `max_age` (by then the jitter buffer downstream has moved on). When more than
//! `max_missing` packets are outstanding, or a single jump skips more than that, retransmission
//! cannot catch up: the list is dropped and a keyframe is asked for.
//!
//! Not done here: extending 16-bit sequence numbers (the caller's job), the RTX cache on the send
//! side, or building the RTCP packet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Tuning of a [`NackGenerator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackConfig {
    /// Time a gap may stay open before the first request, to let reordered packets arrive.
    /// Default 5 ms: reordering on real paths is mostly within a few milliseconds, and every
    /// millisecond waited here is a millisecond of recovery delay.
    pub reorder_allowance: Duration,
    /// Lower bound of the interval between two requests for the same packet; the interval is
    /// `max(rtt, min_retry_interval)`. Default 20 ms, below that the request and its answer
    /// cannot both have travelled even on a LAN plus pacing.
    pub min_retry_interval: Duration,
    /// Requests per packet before giving up. Default 10 (libwebrtc uses the same order).
    pub max_retries: u32,
    /// A packet missing for longer than this is given up. Default 1 s: the playout buffers
    /// downstream are far shorter, a packet this late is useless.
    pub max_age: Duration,
    /// More outstanding missing packets than this (or one gap larger than this) means the loss is
    /// too large for retransmission; the list is cleared and a keyframe requested. Default 500
    /// (about 2.5 s of a 2 Mbit/s video stream).
    pub max_missing: usize,
}

impl Default for NackConfig {
    fn default() -> Self {
        Self {
            reorder_allowance: Duration::from_millis(5),
            min_retry_interval: Duration::from_millis(20),
            max_retries: 10,
            max_age: Duration::from_secs(1),
            max_missing: 500,
        }
    }
}

/// One packet still missing.
#[derive(Debug, Clone, Copy)]
struct Missing {
    /// When the gap was noticed (a later packet arrived).
    detected: Instant,
    /// When it was last requested.
    last_request: Option<Instant>,
    /// How often it was requested.
    requests: u32,
}

/// Tracks missing packets of one received RTP stream and schedules NACKs for them.
#[derive(Debug, Clone)]
pub struct NackGenerator {
    config: NackConfig,
    /// Highest extended sequence number received so far.
    highest: Option<u64>,
    missing: BTreeMap<u64, Missing>,
    rtt: Option<Duration>,
    keyframe_needed: bool,
}

impl NackGenerator {
    /// A generator with the given tuning.
    pub fn new(config: NackConfig) -> Self {
        Self {
            config,
            highest: None,
            missing: BTreeMap::new(),
            rtt: None,
            keyframe_needed: false,
        }
    }

    /// A packet with extended sequence number `ext_seq` arrived (original or recovered).
    pub fn handle_packet(&mut self, ext_seq: u64, now: Instant) {
        let Some(highest) = self.highest else {
            self.highest = Some(ext_seq);
            return;
        };
        if ext_seq <= highest {
            // Late (reordered) or recovered: no longer missing. Duplicates are harmless.
            self.missing.remove(&ext_seq);
            return;
        }
        let gap = ext_seq - highest - 1;
        self.highest = Some(ext_seq);
        if gap == 0 {
            return;
        }
        if gap > self.config.max_missing as u64 {
            // Too much is gone for retransmission to repair in time.
            self.missing.clear();
            self.keyframe_needed = true;
            return;
        }
        for seq in highest + 1..ext_seq {
            self.missing.insert(
                seq,
                Missing {
                    detected: now,
                    last_request: None,
                    requests: 0,
                },
            );
        }
        if self.missing.len() > self.config.max_missing {
            self.missing.clear();
            self.keyframe_needed = true;
        }
    }

    /// Latest round-trip time towards the publisher; sets the re-request interval.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = Some(rtt);
    }

    /// Wire sequence numbers of the packets due for a (re)request at `now`, in ascending order,
    /// or `None` if nothing is due. Each returned packet is counted as requested.
    pub fn poll_nacks(&mut self, now: Instant) -> Option<Vec<u16>> {
        self.expire(now);
        let retry = self.retry_interval();
        let allowance = self.config.reorder_allowance;
        let mut due = Vec::new();
        for (seq, m) in self.missing.iter_mut() {
            let ready = match m.last_request {
                None => now.saturating_duration_since(m.detected) >= allowance,
                Some(last) => now.saturating_duration_since(last) >= retry,
            };
            if ready {
                m.last_request = Some(now);
                m.requests += 1;
                // Truncation to the wire's 16 bits is the point here.
                due.push(*seq as u16);
            }
        }
        (!due.is_empty()).then_some(due)
    }

    /// `true` once after losses that retransmission cannot repair; the caller should request a
    /// keyframe from the publisher.
    pub fn poll_keyframe_needed(&mut self) -> bool {
        std::mem::take(&mut self.keyframe_needed)
    }

    /// When [`Self::poll_nacks`] next has something to do, if anything is missing.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retry = self.retry_interval();
        self.missing
            .values()
            .map(|m| match m.last_request {
                None => m.detected + self.config.reorder_allowance,
                Some(last) => last + retry,
            })
            .min()
    }

    /// Number of packets currently considered missing.
    pub fn missing_count(&self) -> usize {
        self.missing.len()
    }

    fn retry_interval(&self) -> Duration {
        self.rtt
            .unwrap_or(Duration::ZERO)
            .max(self.config.min_retry_interval)
    }

    /// Gives up on packets asked for too often or missing for too long.
    fn expire(&mut self, now: Instant) {
        let max_age = self.config.max_age;
        let max_retries = self.config.max_retries;
        self.missing.retain(|_, m| {
            m.requests < max_retries && now.saturating_duration_since(m.detected) < max_age
        });
    }
}

impl Default for NackGenerator {
    fn default() -> Self {
        Self::new(NackConfig::default())
    }
}

/// Packets a generic NACK entry covers: PID plus the 16 following sequence numbers (BLP).
const BLP_SPAN: u16 = 16;

/// Packs sequence numbers into generic NACK FCI entries `(pid, blp)` (RFC 4585 §6.2.1): bit `i`
/// of `blp` set means `pid + i + 1` is lost too. Sequence numbers in ascending RTP order (as
/// [`NackGenerator::poll_nacks`] returns them) pack into the fewest entries; duplicates are
/// dropped; any order is accepted.
pub fn nack_pairs(seqs: &[u16]) -> Vec<(u16, u16)> {
    let mut pairs: Vec<(u16, u16)> = Vec::new();
    'seqs: for &seq in seqs {
        for (pid, blp) in pairs.iter_mut() {
            let offset = seq.wrapping_sub(*pid);
            if offset == 0 {
                continue 'seqs;
            }
            if offset <= BLP_SPAN {
                *blp |= 1 << (offset - 1);
                continue 'seqs;
            }
        }
        pairs.push((seq, 0));
    }
    pairs
}

/// The sequence numbers a list of generic NACK entries asks for, in entry order (the inverse of
/// [`nack_pairs`]).
pub fn expand_nack_pairs(pairs: &[(u16, u16)]) -> Vec<u16> {
    let mut seqs = Vec::new();
    for &(pid, blp) in pairs {
        seqs.push(pid);
        for bit in 0..BLP_SPAN {
            if blp & (1 << bit) != 0 {
                seqs.push(pid.wrapping_add(bit + 1));
            }
        }
    }
    seqs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn in_order_stream_never_nacks() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        for i in 0..100u64 {
            g.handle_packet(1000 + i, t0 + ms(i * 10));
        }
        assert_eq!(g.poll_nacks(t0 + ms(2000)), None);
        assert_eq!(g.poll_timeout(), None);
        assert!(!g.poll_keyframe_needed());
    }

    #[test]
    fn gap_is_requested_after_reorder_allowance() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.handle_packet(10, t0);
        g.handle_packet(13, t0 + ms(1));
        // Within the allowance nothing is due.
        assert_eq!(g.poll_nacks(t0 + ms(3)), None);
        assert_eq!(g.poll_timeout(), Some(t0 + ms(6)));
        assert_eq!(g.poll_nacks(t0 + ms(6)), Some(vec![11, 12]));
        // Not again before the retry interval.
        assert_eq!(g.poll_nacks(t0 + ms(10)), None);
    }

    #[test]
    fn reordered_packet_within_allowance_is_not_requested() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.handle_packet(1, t0);
        g.handle_packet(3, t0 + ms(1));
        g.handle_packet(2, t0 + ms(2));
        assert_eq!(g.poll_nacks(t0 + ms(50)), None);
        assert_eq!(g.missing_count(), 0);
    }

    #[test]
    fn rerequests_follow_rtt_and_stop_when_recovered() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.set_rtt(ms(50));
        g.handle_packet(1, t0);
        g.handle_packet(3, t0);
        assert_eq!(g.poll_nacks(t0 + ms(5)), Some(vec![2]));
        assert_eq!(g.poll_nacks(t0 + ms(30)), None, "rtt 50 ms > 20 ms floor");
        assert_eq!(g.poll_nacks(t0 + ms(55)), Some(vec![2]));
        // Recovered through RTX: no more requests.
        g.handle_packet(2, t0 + ms(70));
        assert_eq!(g.poll_nacks(t0 + ms(200)), None);
    }

    #[test]
    fn min_retry_interval_applies_when_rtt_is_small() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.set_rtt(ms(2));
        g.handle_packet(1, t0);
        g.handle_packet(3, t0);
        assert!(g.poll_nacks(t0 + ms(5)).is_some());
        assert_eq!(g.poll_nacks(t0 + ms(20)), None);
        assert!(g.poll_nacks(t0 + ms(25)).is_some());
    }

    #[test]
    fn gives_up_after_max_retries() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.handle_packet(1, t0);
        g.handle_packet(3, t0);
        let mut sent = 0;
        for step in 0..100u64 {
            if g.poll_nacks(t0 + ms(5 + step * 20)).is_some() {
                sent += 1;
            }
        }
        assert_eq!(sent, NackConfig::default().max_retries);
        assert_eq!(g.missing_count(), 0);
    }

    #[test]
    fn gives_up_after_max_age() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.set_rtt(ms(300));
        g.handle_packet(1, t0);
        g.handle_packet(3, t0);
        let mut sent = 0;
        for step in 0..40u64 {
            if g.poll_nacks(t0 + ms(5 + step * 50)).is_some() {
                sent += 1;
            }
        }
        // Requests at 5, 305, 605, 905 ms; the packet is dropped at 1 s.
        assert_eq!(sent, 4);
        assert_eq!(g.missing_count(), 0);
    }

    #[test]
    fn huge_gap_asks_for_keyframe_instead() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.handle_packet(1, t0);
        g.handle_packet(10_000, t0);
        assert_eq!(g.missing_count(), 0);
        assert!(g.poll_keyframe_needed());
        assert!(!g.poll_keyframe_needed(), "reported once");
        assert_eq!(g.poll_nacks(t0 + ms(10)), None);
    }

    #[test]
    fn accumulated_losses_ask_for_keyframe() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        let mut seq = 0;
        g.handle_packet(seq, t0);
        // Lose every other packet, without ever polling.
        for _ in 0..600 {
            seq += 2;
            g.handle_packet(seq, t0);
        }
        assert!(g.poll_keyframe_needed());
        assert!(g.missing_count() <= NackConfig::default().max_missing);
    }

    #[test]
    fn wire_seqs_wrap() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.handle_packet(65_534, t0);
        g.handle_packet(65_538, t0);
        assert_eq!(g.poll_nacks(t0 + ms(5)), Some(vec![65_535, 0, 1]));
    }

    type PairsCase<'a> = (&'a [u16], &'a [(u16, u16)]);

    #[test]
    fn nack_pairs_table() {
        let cases: &[PairsCase] = &[
            (&[], &[]),
            (&[5], &[(5, 0)]),
            (&[5, 6], &[(5, 0b1)]),
            (&[5, 6, 21], &[(5, 0b1000_0000_0000_0001)]),
            (&[5, 22], &[(5, 0), (22, 0)]),
            (&[65_535, 0, 1], &[(65_535, 0b11)]),
            (&[7, 7, 8], &[(7, 0b1)]),
            (&[10, 3, 12], &[(10, 0b10), (3, 0)]),
        ];
        for (seqs, pairs) in cases {
            assert_eq!(&nack_pairs(seqs), pairs, "{seqs:?}");
        }
    }

    #[test]
    fn nack_pairs_round_trip() {
        let mut state = 0x1234_5678_u32;
        for _ in 0..200 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let start = state as u16;
            let mut seqs: Vec<u16> = (0..60u16)
                .filter(|i| (state >> (i % 32)) & 1 == 1)
                .map(|i| start.wrapping_add(i))
                .collect();
            seqs.dedup();
            let pairs = nack_pairs(&seqs);
            assert_eq!(expand_nack_pairs(&pairs), seqs);
        }
    }
}
