//! Cache-line prefetch hints for fan-out loops.
//!
//! Why: a fan-out touches every receiver's state once per packet, and by the time the next
//! packet comes hundreds of receivers on, that state has left the cache. The loop knows which
//! receiver comes next, so it can ask for that receiver's lines while it works on the current
//! one, and the loads overlap with work instead of stalling it (the edge's shard and the load
//! tester's hub both do).
//!
//! A range is plain numbers, `(address, length)`, never dereferenced: a prefetch never faults
//! and never changes what the program reads, so a stale or wrong range costs one useless line
//! fetch and nothing else. That is what lets callers hand out ranges of their internals without
//! borrowing them.

/// Bytes per cache line on the machines we run on.
pub const LINE: usize = 64;

/// An `(address, length)` range of memory: `(0, 0)` for none.
pub type Range = (usize, usize);

/// The range `value` occupies.
pub fn range_of<T>(value: &T) -> Range {
    (std::ptr::from_ref(value) as usize, size_of::<T>())
}

/// Asks for the cache line holding `addr`, without waiting for it.
#[inline(always)]
pub fn prefetch_line(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint to the cache: it never faults and never reads into the
    // program, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// The cache lines `(addr, len)` spans, at most `max` of them from its start.
pub fn lines((addr, len): Range, max: usize) -> impl Iterator<Item = usize> {
    let first = addr / LINE;
    let count = if len == 0 {
        0
    } else {
        (addr.saturating_add(len - 1) / LINE - first + 1).min(max)
    };
    (first..first + count).map(|l| l * LINE)
}

/// Asks for the lines of `range`, at most `max` of them: more lines than a core has in flight
/// (about ten) make the prefetches themselves wait.
#[inline]
pub fn prefetch(range: Range, max: usize) {
    for line in lines(range, max) {
        prefetch_line(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_becomes_the_lines_it_spans_capped() {
        assert_eq!(lines((0, 0), 8).count(), 0, "nothing");
        assert_eq!(lines((130, 1), 8).collect::<Vec<_>>(), vec![128]);
        // 60..=69 straddles a line boundary.
        assert_eq!(lines((60, 10), 8).collect::<Vec<_>>(), vec![0, 64]);
        assert_eq!(lines((64, 64), 8).collect::<Vec<_>>(), vec![64]);
        assert_eq!(lines((64, 1000), 3).collect::<Vec<_>>(), vec![64, 128, 192]);
        let v = [0u64; 20];
        let (addr, len) = range_of(&v);
        assert_eq!((addr, len), (v.as_ptr() as usize, 160));
        // Prefetching anything, even nonsense, is harmless.
        prefetch((addr, len), 8);
        prefetch((usize::MAX - 10, 100), 8);
        prefetch((0, 64), 1);
    }
}
