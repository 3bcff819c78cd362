//! How long media packets stay in a node: a fixed-bucket histogram, the one layout behind every
//! `*_residence_seconds` series the nodes export.
//!
//! The edge counts client datagrams (kernel arrival stamp to the hand-off of their copies to the
//! kernel, `kcs_media_residence_seconds`) and cascade datagrams (quinn's delivery to the hand-off
//! of their copies, `kcs_cascade_residence_seconds`); the origin's relay counts the latter too.
//! Each owner (a shard, a relay) keeps a plain [`Residence`] and observes into it without atomics;
//! the process folds it into its shared totals on a tick or renders it under its own lock.
//!
//! Time model: sans-IO. The caller measures the stay with its own clock and passes the
//! [`Duration`] (or the instants); nothing here reads a clock.
//!
//! Quantiles read from these buckets are upper bounds (the bound of the bucket they fall in),
//! so a reported figure is never better than the truth.

use std::time::{Duration, Instant};

/// Upper bounds of the buckets, in microseconds: fine below the 5 ms a node may add to a packet
/// at half its capacity (and around the 2 ms a cascade hop may add), coarse above. The last
/// bucket (above 100 ms) is `+Inf`.
pub const BOUNDS_US: [u64; 13] = [
    100, 250, 500, 1_000, 2_000, 3_000, 4_000, 5_000, 7_500, 10_000, 20_000, 50_000, 100_000,
];
/// Buckets including `+Inf`.
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

/// Counts of stays by bucket, and their sum.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Residence {
    /// Per bucket, not cumulative: index `i` counts stays in `(BOUNDS_US[i-1], BOUNDS_US[i]]`.
    buckets: [u64; BUCKETS],
    sum_us: u64,
}

impl Residence {
    /// Records one stay (rounded down to whole microseconds).
    pub fn observe(&mut self, stay: Duration) {
        let us = stay.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Records the stay of every packet whose arrival is in `received` (drained), all handed on
    /// at the instant `now` gives: how a batch's packets are observed once their copies left.
    /// `now` (the caller's clock) is not read when there is nothing to record.
    pub fn observe_handed_on(
        &mut self,
        received: &mut Vec<Instant>,
        now: impl FnOnce() -> Instant,
    ) {
        if received.is_empty() {
            return;
        }
        let sent = now();
        for t in received.drain(..) {
            self.observe(sent.saturating_duration_since(t));
        }
    }

    /// Stays recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Sum of the stays, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// Per-bucket counts (not cumulative), `+Inf` last.
    pub fn buckets(&self) -> &[u64; BUCKETS] {
        &self.buckets
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Hands the counts over and starts again from zero (how a per-thread tally is folded into
    /// process-wide totals).
    pub fn take(&mut self) -> Residence {
        std::mem::take(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_the_last_bucket_is_open() {
        let mut r = Residence::default();
        for us in [0, 100, 101, 2_000, 2_001, 100_000, 100_001, 5_000_000] {
            r.observe(Duration::from_micros(us));
        }
        let b = r.buckets();
        assert_eq!(b[0], 2, "0 and 100 us are in the first bucket");
        assert_eq!(b[1], 1, "101 us");
        assert_eq!(b[4], 1, "2 ms is in the <= 2 ms bucket");
        assert_eq!(b[5], 1, "2.001 ms is in the <= 3 ms bucket");
        assert_eq!(b[12], 1, "100 ms exactly");
        assert_eq!(b[13], 2, "above 100 ms");
        assert_eq!(r.count(), 8);
        assert_eq!(
            r.sum_us(),
            100 + 101 + 2_000 + 2_001 + 100_000 + 100_001 + 5_000_000
        );
    }

    #[test]
    fn sub_microsecond_stays_round_down_and_take_resets() {
        let mut r = Residence::default();
        r.observe(Duration::from_nanos(999));
        assert_eq!((r.count(), r.sum_us()), (1, 0));
        let taken = r.take();
        assert!(r.is_empty());
        assert_eq!(r.sum_us(), 0);
        assert_eq!(taken.count(), 1);
    }

    #[test]
    fn a_batch_handed_on_is_observed_from_each_arrival_and_the_clock_read_only_when_needed() {
        let mut r = Residence::default();
        let t0 = Instant::now();
        let mut received = vec![
            t0,
            t0 + Duration::from_micros(1_500),
            t0 + Duration::from_millis(4),
        ];
        let sent = t0 + Duration::from_millis(5);
        r.observe_handed_on(&mut received, || sent);
        assert!(received.is_empty(), "drained");
        // Stays of 5 ms, 3.5 ms and 1 ms.
        assert_eq!(r.count(), 3);
        assert_eq!(r.sum_us(), 5_000 + 3_500 + 1_000);
        let b = r.buckets();
        assert_eq!((b[3], b[6], b[7]), (1, 1, 1), "{b:?}");
        // Nothing received: the clock is not read.
        r.observe_handed_on(&mut received, || {
            panic!("read the clock for an empty batch")
        });
        assert_eq!(r.count(), 3);
    }

    #[test]
    fn a_huge_stay_saturates_instead_of_overflowing() {
        let mut r = Residence::default();
        r.observe(Duration::MAX);
        r.observe(Duration::MAX);
        assert_eq!(r.sum_us(), u64::MAX);
        assert_eq!(r.buckets()[BUCKETS - 1], 2);
    }
}
