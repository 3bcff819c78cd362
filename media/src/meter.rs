//! Sliding-window bitrate of an incoming stream.
//!
//! The layer selector compares each simulcast layer's bitrate with a subscriber's budget, so the
//! edge measures every incoming layer. The window is a ring of fixed buckets (no allocation per
//! packet): bytes are added to the bucket of their arrival time, and the rate is the bytes of the
//! buckets inside the window divided by the time they cover.
//!
//! A layer that has sent nothing for [`SILENCE`] reports `None`: simulcast encoders stop sending
//! upper layers when the publisher's uplink or CPU cannot carry them, and such a layer must not be
//! selected.

use std::time::{Duration, Instant};

use crate::units::Bitrate;

/// Width of one bucket. 50 ms: fine enough that the window slides smoothly at 30 fps (one or two
/// frames per bucket), coarse enough that the ring stays small.
const BUCKET: Duration = Duration::from_millis(50);
/// Buckets in the window: 20 x 50 ms = 1 s, long enough to average a keyframe burst with the
/// following delta frames at typical keyframe sizes, short enough to follow a layer turning off.
const BUCKETS: usize = 20;
/// A stream with no packet for this long has no bitrate: equal to the window, so "no bytes in the
/// window" and "silent" mean the same thing.
pub const SILENCE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Bucket number since `epoch`.
    index: u64,
    bytes: u64,
}

/// Bitrate of one incoming stream over the last second.
#[derive(Debug, Clone, Default)]
pub struct BitrateMeter {
    /// Arrival of the first packet; bucket numbers count from here.
    epoch: Option<Instant>,
    last_packet: Option<Instant>,
    buckets: [Bucket; BUCKETS],
}

impl BitrateMeter {
    /// A meter that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn bucket_index(epoch: Instant, now: Instant) -> u64 {
        (now.saturating_duration_since(epoch).as_nanos() / BUCKET.as_nanos()) as u64
    }

    /// Counts a packet of `bytes` bytes arriving at `now`.
    pub fn handle_packet(&mut self, bytes: usize, now: Instant) {
        let epoch = *self.epoch.get_or_insert(now);
        let k = Self::bucket_index(epoch, now);
        let b = &mut self.buckets[(k % BUCKETS as u64) as usize];
        if b.index != k {
            *b = Bucket { index: k, bytes: 0 };
        }
        b.bytes = b.bytes.saturating_add(bytes as u64);
        if self.last_packet.is_none_or(|l| now > l) {
            self.last_packet = Some(now);
        }
    }

    /// The bitrate over the last second, `None` if nothing arrived for [`SILENCE`].
    pub fn bitrate(&self, now: Instant) -> Option<Bitrate> {
        let (epoch, last) = (self.epoch?, self.last_packet?);
        if now.saturating_duration_since(last) >= SILENCE {
            return None;
        }
        let k = Self::bucket_index(epoch, now);
        let oldest = (k + 1).saturating_sub(BUCKETS as u64);
        let bytes: u64 = self
            .buckets
            .iter()
            .filter(|b| b.index >= oldest && b.index <= k)
            .map(|b| b.bytes)
            .sum();
        // The window spans from the start of the oldest bucket (or the first packet) to now,
        // at least one bucket so a lone first packet does not read as an enormous rate.
        let elapsed = now.saturating_duration_since(epoch).as_nanos();
        let span = elapsed
            .saturating_sub(u128::from(oldest) * BUCKET.as_nanos())
            .max(BUCKET.as_nanos());
        let bps = u128::from(bytes) * 8 * 1_000_000_000 / span;
        Some(Bitrate::bps(u64::try_from(bps).unwrap_or(u64::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pps` packets/s of `size` bytes for `secs`, starting at `start`; returns the end time.
    fn feed(m: &mut BitrateMeter, start: Instant, pps: u64, size: usize, secs: u64) -> Instant {
        let step = Duration::from_micros(1_000_000 / pps);
        let mut t = start;
        for _ in 0..pps * secs {
            m.handle_packet(size, t);
            t += step;
        }
        t
    }

    fn within(got: Bitrate, want: u64, pct: u64) -> bool {
        got.as_bps().abs_diff(want) * 100 <= want * pct
    }

    #[test]
    fn steady_rates() {
        // (packets/s, bytes) -> bits/s
        for (pps, size) in [(50, 160), (100, 1000), (1000, 1200), (10, 100)] {
            let t0 = Instant::now();
            let mut m = BitrateMeter::new();
            let end = feed(&mut m, t0, pps, size, 5);
            let want = pps * size as u64 * 8;
            let got = m.bitrate(end).unwrap();
            assert!(within(got, want, 6), "{pps}x{size}: {got} vs {want}");
        }
    }

    #[test]
    fn young_stream_is_not_underestimated() {
        let t0 = Instant::now();
        let mut m = BitrateMeter::new();
        assert_eq!(m.bitrate(t0), None);
        let mut t = t0;
        for _ in 0..30 {
            m.handle_packet(1000, t);
            t += Duration::from_millis(10);
        }
        // 300 ms of 800 kbps.
        let got = m.bitrate(t).unwrap();
        assert!(within(got, 800_000, 10), "{got}");
    }

    #[test]
    fn follows_rate_changes_and_silence() {
        let t0 = Instant::now();
        let mut m = BitrateMeter::new();
        let t1 = feed(&mut m, t0, 100, 1000, 3); // 800 kbps
        let t2 = feed(&mut m, t1, 100, 250, 2); // 200 kbps
        assert!(within(m.bitrate(t2).unwrap(), 200_000, 6));
        // Half a second of silence: still measured, at about half the rate.
        let half = m.bitrate(t2 + Duration::from_millis(500)).unwrap();
        assert!(within(half, 100_000, 12), "{half}");
        assert_eq!(m.bitrate(t2 + SILENCE), None);
        // Comes back.
        let t3 = feed(&mut m, t2 + Duration::from_secs(10), 100, 1000, 2);
        assert!(within(m.bitrate(t3).unwrap(), 800_000, 6));
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut m = BitrateMeter::new();
        m.handle_packet(100, t0);
        m.handle_packet(100, t0 - Duration::from_secs(1));
        assert!(m.bitrate(t0 - Duration::from_secs(3)).is_some());
        assert!(m.bitrate(t0).is_some());
    }
}
