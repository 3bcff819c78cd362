//! Packet history for answering NACKs (RFC 4585 §6.2.1).
//!
//! A subscriber NACKs *output* sequence numbers; the packet to resend is a *source* packet of some
//! layer. Two rings bridge that, both fixed-size so the media path does not allocate per packet:
//!
//! - [`PacketCache`], one per incoming stream (publisher layer): the recently received packets,
//!   by extended sequence number. Slot buffers are reused, so after the first lap inserts copy
//!   into existing allocations.
//! - [`Sequencer`], one per output stream (subscriber, track): for recent output seqs, which
//!   source packet was sent and with which output timestamp, so the resend can be rewritten to
//!   the same header the subscriber is missing.
//!
//! Both index a ring by the extended (64-bit) number modulo the capacity and keep the full number
//! in the slot, so a slot's stale occupant from a previous lap is never mistaken for the packet
//! asked for.

use std::time::Instant;

use crate::seq::SeqUnwrapper;
use crate::units::SpatialLayer;

#[derive(Debug, Clone, Default)]
struct CacheSlot {
    /// The extended seq stored in `buf`, `None` while empty.
    ext_seq: Option<u64>,
    inserted: Option<Instant>,
    /// Reused across laps: `clear` + `extend_from_slice` keeps the allocation.
    buf: Vec<u8>,
}

/// Fixed-capacity ring of the recently received packets of one incoming stream.
#[derive(Debug, Clone)]
pub struct PacketCache {
    slots: Vec<CacheSlot>,
    highest: Option<u64>,
}

impl PacketCache {
    /// A cache of the last `capacity_packets` sequence numbers (at least 1).
    pub fn new(capacity_packets: usize) -> Self {
        Self {
            slots: vec![CacheSlot::default(); capacity_packets.max(1)],
            highest: None,
        }
    }

    /// How many sequence numbers the cache spans.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn index(&self, ext_seq: u64) -> usize {
        // The remainder is < len, which is a usize.
        (ext_seq % self.slots.len() as u64) as usize
    }

    /// Stores a copy of `bytes` as packet `ext_seq`. Returns whether it was stored: duplicates
    /// and packets older than the cache's span (`capacity` behind the newest) are ignored.
    pub fn insert(&mut self, ext_seq: u64, bytes: &[u8], now: Instant) -> bool {
        let cap = self.slots.len() as u64;
        if self
            .highest
            .is_some_and(|h| ext_seq.saturating_add(cap) <= h)
        {
            return false;
        }
        let i = self.index(ext_seq);
        let slot = &mut self.slots[i];
        if slot.ext_seq.is_some_and(|s| s >= ext_seq) {
            // The same packet again, or the slot already holds a newer one.
            return false;
        }
        slot.ext_seq = Some(ext_seq);
        slot.inserted = Some(now);
        slot.buf.clear();
        slot.buf.extend_from_slice(bytes);
        if self.highest.is_none_or(|h| ext_seq > h) {
            self.highest = Some(ext_seq);
        }
        true
    }

    /// The packet `ext_seq`, if still cached.
    pub fn get(&self, ext_seq: u64) -> Option<&[u8]> {
        let slot = &self.slots[self.index(ext_seq)];
        (slot.ext_seq == Some(ext_seq)).then_some(slot.buf.as_slice())
    }

    /// When packet `ext_seq` was inserted, if still cached (to skip resending stale packets).
    pub fn inserted_at(&self, ext_seq: u64) -> Option<Instant> {
        let slot = &self.slots[self.index(ext_seq)];
        if slot.ext_seq == Some(ext_seq) {
            slot.inserted
        } else {
            None
        }
    }

    /// The newest extended seq inserted.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

/// What was sent under one output sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentPacket {
    /// The layer the source packet came from (selects the [`PacketCache`]).
    pub layer: SpatialLayer,
    /// The source packet's extended seq in that layer's stream.
    pub ext_seq: u64,
    /// The output timestamp it was sent with.
    pub timestamp: u32,
}

/// Per output stream: for recent output seqs, the source packet that was sent.
#[derive(Debug, Clone)]
pub struct Sequencer {
    /// `(extended output seq, packet)`.
    slots: Vec<Option<(u64, SentPacket)>>,
    out_seqs: SeqUnwrapper,
}

impl Sequencer {
    /// A sequencer remembering at least the last `capacity` output seqs (rounded up to a power
    /// of two, so that a slot is found with a mask instead of a division on every copy sent).
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: vec![None; capacity.max(1).next_power_of_two()],
            out_seqs: SeqUnwrapper::new(),
        }
    }

    fn index(&self, ext: u64) -> usize {
        (ext & (self.slots.len() as u64 - 1)) as usize
    }

    /// Remembers that output seq `out_seq` carried `packet`. A record older than the remembered
    /// span is ignored.
    pub fn record(&mut self, out_seq: u16, packet: SentPacket) {
        let ext = self.out_seqs.extend(out_seq);
        let i = self.index(ext);
        let slot = &mut self.slots[i];
        if slot.is_some_and(|(e, _)| e > ext) {
            return;
        }
        *slot = Some((ext, packet));
    }

    /// Where the next output seq will be recorded (for [`crate::prefetch`]).
    pub fn next_slot(&self) -> crate::prefetch::Range {
        let next = self.out_seqs.highest().map_or(0, |h| h + 1);
        crate::prefetch::range_of(&self.slots[self.index(next)])
    }

    /// What was sent as output seq `out_seq`, if still remembered.
    pub fn lookup(&self, out_seq: u16) -> Option<SentPacket> {
        let ext = self.out_seqs.peek(out_seq)?;
        match self.slots[self.index(ext)] {
            Some((e, p)) if e == ext => Some(p),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cache_stores_and_overwrites() {
        let t0 = Instant::now();
        let mut c = PacketCache::new(4);
        assert_eq!(c.get(100), None);
        assert!(c.insert(100, &[1, 2, 3], t0));
        assert_eq!(c.get(100), Some(&[1, 2, 3][..]));
        assert_eq!(c.inserted_at(100), Some(t0));
        assert_eq!(c.get(104), None, "same slot, different seq");
        // Duplicate is ignored, the original stays.
        assert!(!c.insert(100, &[9], t0 + Duration::from_millis(1)));
        assert_eq!(c.get(100), Some(&[1, 2, 3][..]));
        // A lap later the slot is reused.
        assert!(c.insert(104, &[4], t0));
        assert_eq!(c.get(100), None);
        assert_eq!(c.get(104), Some(&[4][..]));
        // Out of order within the span is fine.
        assert!(c.insert(102, &[2], t0));
        assert!(c.insert(101, &[1], t0));
        assert_eq!(c.get(101), Some(&[1][..]));
        // Older than the span: ignored, even into an empty or stale slot.
        assert!(!c.insert(100, &[0], t0));
        assert!(!c.insert(99, &[0], t0));
        assert_eq!(c.highest(), Some(104));
        assert_eq!(c.capacity(), 4);
    }

    #[test]
    fn cache_capacity_zero_is_one() {
        let mut c = PacketCache::new(0);
        assert!(c.insert(5, &[5], Instant::now()));
        assert_eq!(c.get(5), Some(&[5][..]));
    }

    #[test]
    fn cache_reuses_buffers_after_warm_up() {
        let t0 = Instant::now();
        let mut c = PacketCache::new(8);
        let big = [0u8; 1200];
        for s in 0..8 {
            c.insert(s, &big, t0);
        }
        let ptrs: Vec<*const u8> = c.slots.iter().map(|s| s.buf.as_ptr()).collect();
        for s in 8..800 {
            c.insert(s, &big[..(s as usize % 1200)], t0);
        }
        let after: Vec<*const u8> = c.slots.iter().map(|s| s.buf.as_ptr()).collect();
        assert_eq!(ptrs, after);
        assert_eq!(c.get(799).map(<[u8]>::len), Some(799));
    }

    #[test]
    fn cache_matches_a_model() {
        // Against a map of everything inserted: `get` returns exactly the packets within the span
        // that were inserted first.
        use std::collections::HashMap;
        let t0 = Instant::now();
        let mut rng = crate::seq::TestRng::new(3);
        let mut c = PacketCache::new(64);
        let mut model: HashMap<u64, u8> = HashMap::new();
        let mut highest = 1000u64;
        for _ in 0..20_000 {
            let s = if rng.below(4) == 0 {
                highest.saturating_sub(rng.below(100))
            } else {
                highest + rng.below(3)
            };
            let v = rng.next_u64() as u8;
            if c.insert(s, &[v], t0) {
                assert!(!model.contains_key(&s) || s + 64 <= highest);
                model.insert(s, v);
            }
            highest = highest.max(s);
            // A packet within the span is present iff it was inserted, and holds its bytes.
            for q in highest + 1 - 64..=highest {
                let got = c.get(q).map(|b| &b[0]);
                assert_eq!(got, model.get(&q), "seq {q} highest {highest}");
            }
        }
    }

    fn sent(ext_seq: u64) -> SentPacket {
        SentPacket {
            layer: SpatialLayer((ext_seq % 3) as u8),
            ext_seq,
            timestamp: ext_seq as u32 * 10,
        }
    }

    #[test]
    fn sequencer_wraps() {
        // 100 rounds up to 128 slots: the last 128 of 200 are remembered.
        let mut q = Sequencer::new(100);
        assert_eq!(q.lookup(0), None);
        for i in 0..200u64 {
            let out = (65_500 + i) as u16; // crosses 65535 -> 0
            q.record(out, sent(i));
        }
        for i in 0..200u64 {
            let out = (65_500 + i) as u16;
            let want = (i >= 200 - 128).then(|| sent(i));
            assert_eq!(q.lookup(out), want, "i {i}");
        }
        // A lap later, the same wire seq that was not re-recorded does not find the old packet.
        let mut q = Sequencer::new(100);
        q.record(5, sent(1));
        for k in 1..=66u64 {
            q.record((5 + k * 1000) as u16, sent(k));
        }
        assert_eq!(q.lookup(5), None);
        assert_eq!(q.lookup((5 + 66_000u64) as u16), Some(sent(66)));
    }

    #[test]
    fn next_slot_is_where_the_next_seq_is_recorded() {
        let mut q = Sequencer::new(16);
        let at = |q: &Sequencer, i: usize| crate::prefetch::range_of(&q.slots[i]);
        assert_eq!(q.next_slot(), at(&q, 0), "nothing recorded yet");
        q.record(65_534, sent(1));
        // 65534 extends to 2^16 + 65534; the next, 65535, goes to slot 15 of 16.
        assert_eq!(q.next_slot(), at(&q, 15));
        q.record(65_535, sent(2));
        assert_eq!(q.next_slot(), at(&q, 0));
    }

    #[test]
    fn sequencer_out_of_order_and_gaps() {
        let mut q = Sequencer::new(16);
        q.record(10, sent(10));
        q.record(12, sent(12));
        q.record(11, sent(11));
        assert_eq!(q.lookup(11), Some(sent(11)));
        assert_eq!(q.lookup(13), None);
        // A record older than the span is dropped rather than evicting a newer one.
        q.record(40, sent(40));
        q.record(24, sent(24)); // slot 24 % 16 == 40 % 16
        assert_eq!(q.lookup(24), None);
        assert_eq!(q.lookup(40), Some(sent(40)));
    }
}
