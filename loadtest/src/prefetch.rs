//! Prefetch hints: where a hub peer's next RTP packet will read, so the hub's receive loop can
//! ask for those cache lines one datagram ahead.
//!
//! Why: in a fan-out, each datagram a hub socket reads is for another viewer, and by the time
//! a viewer's next packet comes (milliseconds later, hundreds of viewers on), its lock, SRTP
//! transform, stream and replay window and its receiver's stream have left the cache. In the
//! profile at 250 viewers about a fifth of the tool's CPU went to stalls on those loads, one
//! after the other (the transform, then its stream vector, then the window's word...). Yet a
//! peer knows where its next packet will read, and the hub knows which peer the next datagram
//! is for (its destination address) and its stream (the RTP header is not encrypted). So,
//! while it handles datagram `i`, the hub prefetches what datagrams `i + 1` and `i + 2` need
//! ([`Hints::prefetch_stream`], [`Hints::prefetch_fixed`]) and the loads overlap with the
//! work instead of stalling it.
//!
//! The hints are plain numbers, never dereferenced. A prefetch never faults and never changes
//! what the program reads, so a stale hint (a vector that grew since, a peer that left) costs
//! a wasted line fetch and nothing else.
//!
//! Per peer: the ranges every packet touches ([`FIXED`]: its lock, SRTP key and stream table,
//! receiver)
//! and, for its two latest SSRCs (a viewer gets audio and one video layer at a time), the
//! ranges of that stream ([`PER_SSRC`]). The peer writes them as it handles a packet (under
//! its lock: one writer), on the hub thread that reads them.

use kcs_media::prefetch::LINE;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Ranges every packet of a peer touches.
pub const FIXED: usize = 4;
/// Ranges of one stream.
pub const PER_SSRC: usize = 6;
/// Lines prefetched per range at most: an AES-GCM key is 9. More lines than the core can
/// have in flight make the prefetches themselves wait.
const MAX_LINES: usize = 10;
/// Low bits of a packed range holding its line count (up to [`MAX_LINES`]).
const COUNT_BITS: u32 = 5;

/// An (address, length) range packed into one word: first line number and line count; 0 for
/// nothing.
fn pack((addr, len): (usize, usize)) -> u64 {
    if addr == 0 || len == 0 {
        return 0;
    }
    let first = addr / LINE;
    let last = addr.saturating_add(len - 1) / LINE;
    let lines = (last - first + 1).min(MAX_LINES);
    (first as u64) << COUNT_BITS | lines as u64
}

/// The line numbers a packed range covers.
fn lines(packed: u64) -> std::ops::Range<usize> {
    let first = (packed >> COUNT_BITS) as usize;
    first..first + (packed & ((1 << COUNT_BITS) - 1)) as usize
}

fn fetch(packed: u64) {
    for line in lines(packed) {
        prefetch_line(line * LINE);
    }
}

pub use kcs_media::prefetch::prefetch_line;
/// One peer's hints (see the module docs).
#[derive(Debug, Default)]
pub struct Hints {
    fixed: [AtomicU64; FIXED],
    ssrcs: [AtomicU32; 2],
    streams: [[AtomicU64; PER_SSRC]; 2],
    /// Which of the two stream slots was written last (the other is replaced next).
    latest: AtomicU32,
}

impl Hints {
    /// Records where the peer's packets read (`fixed`) and where the next packet of `ssrc`
    /// will (`stream`), as (address, length) ranges; `(0, 0)` for none.
    pub fn record(
        &self,
        fixed: [(usize, usize); FIXED],
        ssrc: u32,
        stream: [(usize, usize); PER_SSRC],
    ) {
        for (slot, range) in self.fixed.iter().zip(fixed) {
            slot.store(pack(range), Relaxed);
        }
        let at = self
            .ssrcs
            .iter()
            .position(|s| s.load(Relaxed) == ssrc)
            .unwrap_or(1 - (self.latest.load(Relaxed) as usize & 1));
        self.ssrcs[at].store(ssrc, Relaxed);
        for (slot, range) in self.streams[at].iter().zip(stream) {
            slot.store(pack(range), Relaxed);
        }
        self.latest.store(at as u32, Relaxed);
    }

    /// Prefetches what every packet of the peer reads. The hub asks for this two datagrams
    /// ahead and for [`Self::prefetch_stream`] one ahead, so each datagram's handling overlaps
    /// about half of the lines, fewer than the core can have in flight.
    pub fn prefetch_fixed(&self) {
        for f in &self.fixed {
            fetch(f.load(Relaxed));
        }
    }

    /// Prefetches what a packet of `ssrc` reads of its stream.
    pub fn prefetch_stream(&self, ssrc: u32) {
        if let Some(i) = self.ssrcs.iter().position(|s| s.load(Relaxed) == ssrc) {
            for r in &self.streams[i] {
                fetch(r.load(Relaxed));
            }
        }
    }

    /// The line numbers the hints for `ssrc` cover, in order (for tests).
    #[cfg(test)]
    fn covered(&self, ssrc: u32) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .fixed
            .iter()
            .flat_map(|f| lines(f.load(Relaxed)))
            .collect();
        if let Some(i) = self.ssrcs.iter().position(|s| s.load(Relaxed) == ssrc) {
            out.extend(self.streams[i].iter().flat_map(|r| lines(r.load(Relaxed))));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_the_lines_they_span_capped() {
        assert_eq!(lines(pack((0, 8))), 0..0, "no address: nothing");
        assert_eq!(
            lines(pack((64 * 10 + 60, 8))),
            10..12,
            "straddles two lines"
        );
        assert_eq!(lines(pack((64 * 10, 64))), 10..11);
        assert_eq!(lines(pack((64 * 10, 64 * 100))), 10..10 + MAX_LINES);
    }

    #[test]
    fn the_two_latest_streams_keep_their_hints() {
        let h = Hints::default();
        let fixed = [(640, 64), (0, 0), (0, 0), (0, 0)];
        let stream = |line: usize| [(line * 64, 8), (0, 0), (0, 0), (0, 0), (0, 0), (0, 0)];
        h.record(fixed, 1, stream(100));
        h.record(fixed, 2, stream(200));
        h.record(fixed, 1, stream(101));
        assert_eq!(h.covered(1), [10, 101]);
        assert_eq!(h.covered(2), [10, 200]);
        // A third stream replaces the one written longest ago (2), not the latest (1).
        h.record(fixed, 3, stream(300));
        assert_eq!(h.covered(3), [10, 300]);
        assert_eq!(h.covered(1), [10, 101]);
        assert_eq!(h.covered(2), [10], "forgotten: only the peer's fixed lines");
        h.prefetch_fixed();
        h.prefetch_stream(3);
        h.prefetch_stream(2);
    }
}
