//! Extending wrapping RTP counters to 64 bits.
//!
//! RTP sequence numbers are 16 bits and timestamps 32 bits (RFC 3550 §5.1); both wrap. Comparing,
//! indexing caches and computing offsets is only simple on monotonic 64-bit values, so every
//! incoming counter is "unwrapped" once at ingress.
//!
//! How: each new value is placed at the 64-bit position closest to the highest value seen so far,
//! i.e. a forward step of less than half the wire space is a newer packet, anything else is an
//! older (reordered or duplicated) one (RFC 3550 Appendix A.1 uses the same half-space rule).
//! The first value is placed one full wire cycle above zero, so a packet that arrives reordered
//! before the first one (at most half a cycle older) still has a non-negative position: results
//! never underflow.

/// Unwraps one counter of `BITS` bits (16 or 32).
#[derive(Debug, Clone, Default)]
struct Unwrapper<const BITS: u32> {
    /// The highest extended value seen so far, `None` before the first value.
    highest: Option<u64>,
}

impl<const BITS: u32> Unwrapper<BITS> {
    const CYCLE: u64 = 1 << BITS;
    const MASK: u64 = Self::CYCLE - 1;
    const HALF: u64 = Self::CYCLE / 2;

    fn peek(&self, value: u64) -> Option<u64> {
        let highest = self.highest?;
        let forward = value.wrapping_sub(highest) & Self::MASK;
        Some(if forward < Self::HALF {
            highest + forward
        } else {
            // Backward by `CYCLE - forward` <= HALF; `highest >= CYCLE` (first value is placed at
            // CYCLE or above and `highest` never decreases), so this never underflows.
            highest - (Self::CYCLE - forward)
        })
    }

    fn extend(&mut self, value: u64) -> u64 {
        let value = value & Self::MASK;
        let ext = self.peek(value).unwrap_or(Self::CYCLE + value);
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }
}

/// Extends 16-bit RTP sequence numbers to monotonic `u64`s.
///
/// Reordering and duplicates within half the sequence space (32768 packets) are placed correctly;
/// the first value maps to `65536 + seq`, so every result is at least 32768.
#[derive(Debug, Clone, Default)]
pub struct SeqUnwrapper {
    inner: Unwrapper<16>,
}

impl SeqUnwrapper {
    /// An unwrapper that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `seq` and records it.
    pub fn extend(&mut self, seq: u16) -> u64 {
        self.inner.extend(u64::from(seq))
    }

    /// What [`extend`](Self::extend) would return for `seq`, without recording it; `None` before
    /// the first value.
    pub fn peek(&self, seq: u16) -> Option<u64> {
        self.inner.peek(u64::from(seq))
    }

    /// The highest extended sequence number seen so far.
    pub fn highest(&self) -> Option<u64> {
        self.inner.highest
    }
}

/// Extends 32-bit RTP timestamps to monotonic `u64`s.
///
/// Same rule as [`SeqUnwrapper`] with half the space being 2^31 ticks (6.6 hours at 90 kHz); the
/// first value maps to `2^32 + ts`.
#[derive(Debug, Clone, Default)]
pub struct TsUnwrapper {
    inner: Unwrapper<32>,
}

impl TsUnwrapper {
    /// An unwrapper that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `ts` and records it.
    pub fn extend(&mut self, ts: u32) -> u64 {
        self.inner.extend(u64::from(ts))
    }

    /// What [`extend`](Self::extend) would return for `ts`, without recording it; `None` before
    /// the first value.
    pub fn peek(&self, ts: u32) -> Option<u64> {
        self.inner.peek(u64::from(ts))
    }

    /// The highest extended timestamp seen so far.
    pub fn highest(&self) -> Option<u64> {
        self.inner.highest
    }
}

/// A tiny deterministic generator for property-style tests across the crate (xorshift64*), so the
/// tests need no extra dependency and a failing seed replays.
#[cfg(test)]
pub(crate) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_value_is_offset_by_one_cycle() {
        let mut u = SeqUnwrapper::new();
        assert_eq!(u.peek(5), None);
        assert_eq!(u.extend(5), 65536 + 5);
        assert_eq!(u.highest(), Some(65536 + 5));
        let mut t = TsUnwrapper::new();
        assert_eq!(t.extend(7), (1 << 32) + 7);
    }

    #[test]
    fn table_of_steps() {
        // (previous values fed, next value, expected extended value)
        let cases: &[(&[u16], u16, u64)] = &[
            (&[0], 1, 65537),
            (&[65535], 0, 65536 * 2),
            (&[65535], 65534, 65536 + 65534),
            (&[0], 65535, 65535), // reordered before the first packet, across the wrap
            (&[0], 32768, 65536 - 32768), // exactly half: treated as older
            (&[0], 32767, 65536 + 32767),
            (&[65535, 0, 1], 65535, 65536 + 65535), // duplicate of an older one
            (&[10, 5], 11, 65536 + 11),             // reordering does not move `highest` back
        ];
        for (i, (prev, next, want)) in cases.iter().enumerate() {
            let mut u = SeqUnwrapper::new();
            for p in *prev {
                u.extend(*p);
            }
            assert_eq!(u.peek(*next), Some(*want), "case {i} peek");
            assert_eq!(u.extend(*next), *want, "case {i}");
        }
    }

    #[test]
    fn ts_wraps_at_32_bits() {
        let mut t = TsUnwrapper::new();
        let a = t.extend(u32::MAX - 10);
        let b = t.extend(20);
        assert_eq!(b - a, 31);
        let c = t.extend(u32::MAX - 20); // reordered, before the wrap
        assert_eq!(a - c, 10);
        assert_eq!(t.highest(), Some(b));
    }

    /// Property: for any start, any stream of forward steps < half the space with reordering of
    /// up to `max_back` packets, the unwrapped value equals the true 64-bit position.
    #[test]
    fn property_seq_matches_true_position() {
        for seed in 0..200 {
            let mut rng = TestRng::new(seed);
            let start = 1_000_000 + rng.below(1 << 16);
            let mut truth = start;
            let mut highest = start;
            let mut u = SeqUnwrapper::new();
            let base = u.extend(truth as u16);
            for _ in 0..2000 {
                // Mostly forward, sometimes big jumps (losses), sometimes reordered.
                let r = rng.below(100);
                truth = if r < 70 {
                    highest + 1
                } else if r < 80 {
                    highest + 1 + rng.below(30000)
                } else {
                    highest.saturating_sub(rng.below(30000)).max(start - 30000)
                };
                highest = highest.max(truth);
                let got = u.extend(truth as u16);
                assert_eq!(
                    got as i128 - base as i128,
                    truth as i128 - start as i128,
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn property_ts_matches_true_position() {
        for seed in 0..100 {
            let mut rng = TestRng::new(seed);
            let start = (1u64 << 40) + rng.below(1 << 32);
            let mut highest = start;
            let mut t = TsUnwrapper::new();
            let base = t.extend(start as u32);
            for _ in 0..2000 {
                let truth = if rng.below(4) == 0 {
                    highest - rng.below(1 << 30)
                } else {
                    highest + rng.below(1 << 30)
                };
                highest = highest.max(truth);
                let got = t.extend(truth as u32);
                assert_eq!(
                    got as i128 - base as i128,
                    truth as i128 - start as i128,
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn never_below_half_cycle() {
        for first in [0u16, 1, 32767, 32768, 65535] {
            let mut u = SeqUnwrapper::new();
            u.extend(first);
            for back in 0..=32768u16 {
                assert!(u.extend(first.wrapping_sub(back)) >= 32768);
            }
        }
    }
}
