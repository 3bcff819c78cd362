//! Measurements: histograms, counters and the run-wide collector.
//!
//! Participants keep their own counters and flush them into the [`Collector`] every tick
//! (100 ms), so the shared lock is taken ten times a second per peer connection, not per packet.
//! The collector keeps run totals and the current second's figures; the runner closes each
//! second into a [`Second`] of the timeline.

use serde::Serialize;
use std::sync::{Arc, Mutex};

/// A latency histogram in microseconds: 10 µs buckets up to 100 ms, then 1 ms buckets up to
/// 10 s, then one overflow bucket. Fixed size, so merging and percentiles are cheap, and 10 µs
/// is finer than anything we report (the edge's target is 5 ms).
#[derive(Debug, Clone)]
pub struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u64,
    max_us: u64,
}

const FINE_STEP: u64 = 10;
const FINE_LIMIT: u64 = 100_000;
const COARSE_STEP: u64 = 1_000;
const COARSE_LIMIT: u64 = 10_000_000;
const FINE_BUCKETS: usize = (FINE_LIMIT / FINE_STEP) as usize;
const BUCKETS: usize = FINE_BUCKETS + ((COARSE_LIMIT - FINE_LIMIT) / COARSE_STEP) as usize + 1;

impl Default for Hist {
    fn default() -> Self {
        Self {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_us: 0,
            max_us: 0,
        }
    }
}

impl Hist {
    fn index(us: u64) -> usize {
        if us < FINE_LIMIT {
            (us / FINE_STEP) as usize
        } else if us < COARSE_LIMIT {
            FINE_BUCKETS + ((us - FINE_LIMIT) / COARSE_STEP) as usize
        } else {
            BUCKETS - 1
        }
    }

    /// Upper edge of a bucket, in µs.
    fn upper(i: usize) -> u64 {
        if i < FINE_BUCKETS {
            (i as u64 + 1) * FINE_STEP
        } else {
            FINE_LIMIT + (i - FINE_BUCKETS + 1) as u64 * COARSE_STEP
        }
    }

    pub fn record(&mut self, us: u64) {
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &Hist) {
        if other.count == 0 {
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q`-quantile (0..=1) in µs (a bucket's upper edge, capped at the max seen).
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Self::upper(i).min(self.max_us));
            }
        }
        Some(self.max_us)
    }

    pub fn summary_ms(&self) -> Option<Summary> {
        Some(Summary {
            count: self.count,
            p50: self.quantile(0.50)? as f64 / 1000.0,
            p95: self.quantile(0.95)? as f64 / 1000.0,
            p99: self.quantile(0.99)? as f64 / 1000.0,
            max: self.max_us as f64 / 1000.0,
            mean: self.sum_us as f64 / self.count as f64 / 1000.0,
        })
    }

    /// Points of the cumulative distribution (ms, fraction), at most ~200 of them.
    pub fn cdf_ms(&self) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        if self.count == 0 {
            return out;
        }
        let mut seen = 0;
        let step = (self.count / 200).max(1);
        let mut next = step;
        for (i, n) in self.buckets.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            seen += n;
            if seen >= next || seen == self.count {
                out.push((
                    Self::upper(i).min(self.max_us) as f64 / 1000.0,
                    seen as f64 / self.count as f64,
                ));
                next = seen + step;
            }
        }
        out
    }
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Packet counters; the same struct serves run totals, one second, and a peer's unflushed part.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    /// Media packets received (first copies), and their payload bytes by stream (audio, video
    /// layers 0..=2, screen).
    pub rx_packets: u64,
    pub rx_bytes: [u64; 5],
    /// Packets expected from the forwarded sequence numbers, and those missing when a later one
    /// arrived (a gap); late arrivals that fill a gap are in `reordered`.
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Packets that arrived after we asked for them (NACK) — counted in rx_packets too.
    pub recovered: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub nack_sent: u64,
    pub pli_sent: u64,
    pub twcc_sent: u64,
    pub rr_sent: u64,
    pub nack_received: u64,
    pub pli_received: u64,
    pub twcc_received: u64,
    pub retransmitted: u64,
    pub layer_switches: u64,
    pub keyframes_received: u64,
    pub srtp_errors: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.rx_packets += o.rx_packets;
        for (a, b) in self.rx_bytes.iter_mut().zip(o.rx_bytes) {
            *a += b;
        }
        self.expected += o.expected;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.recovered += o.recovered;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.nack_sent += o.nack_sent;
        self.pli_sent += o.pli_sent;
        self.twcc_sent += o.twcc_sent;
        self.rr_sent += o.rr_sent;
        self.nack_received += o.nack_received;
        self.pli_received += o.pli_received;
        self.twcc_received += o.twcc_received;
        self.retransmitted += o.retransmitted;
        self.layer_switches += o.layer_switches;
        self.keyframes_received += o.keyframes_received;
        self.srtp_errors += o.srtp_errors;
    }

    /// Packets never received: gaps not filled later.
    pub fn net_lost(&self) -> u64 {
        self.lost.saturating_sub(self.reordered)
    }

    /// Loss as a fraction of expected packets.
    pub fn loss(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.net_lost() as f64 / self.expected as f64
        }
    }
}

/// What a peer connection accumulates between flushes.
#[derive(Debug, Default)]
pub struct Pending {
    pub counters: Counters,
    pub delays_us: Vec<u32>,
    pub jitter_us: Vec<u32>,
    /// The tool's own receive lag: per read, how long its oldest datagram had waited.
    pub read_lag_us: Vec<u32>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.delays_us.is_empty()
            && self.jitter_us.is_empty()
            && self.read_lag_us.is_empty()
            && self.counters.rx_packets == 0
            && self.counters.tx_packets == 0
    }
}

/// Join time of one participant, split by phase (ms). `None`: the phase did not happen (a
/// viewer does not publish) or did not finish.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct JoinTimes {
    pub signaling_ms: Option<f64>,
    pub ice_ms: Option<f64>,
    pub dtls_ms: Option<f64>,
    /// From the start of the join to the first media packet received.
    pub first_media_ms: Option<f64>,
    /// Neither publishes nor subscribes: joined means the join ack (no ICE, DTLS or media).
    pub signaling_only: bool,
}

/// Run-wide figures, behind one lock.
#[derive(Debug, Default)]
pub struct Collector {
    pub total: Counters,
    pub second: Counters,
    /// Delays of the closed seconds; [`Collector::delay_total`] adds the open one. Each delay
    /// is recorded once, into `delay_second`, and the second's histogram is merged in when it
    /// closes ([`Collector::close_delay_second`]): one histogram write per packet, not two.
    delay_closed: Hist,
    pub delay_second: Hist,
    pub jitter_total: Hist,
    pub lag_total: Hist,
    pub lag_second: Hist,
    /// The tool's receive lag ([`Pending::read_lag_us`]) over the run, and in the open second.
    pub read_lag_total: Hist,
    pub read_lag_second: Hist,
    pub joins: Vec<JoinTimes>,
    pub connected: usize,
    /// Participants whose join completed (signaling ack, and the peer connections they need),
    /// counted when it happens: `joins` is filled as participants end, and a run that has to
    /// cut slow participants off at the end loses their records.
    pub joined: usize,
    /// Signaling join times (ms x 1000), recorded with `joined`.
    pub join_signaling: Hist,
    pub failed: usize,
    pub failures: Vec<String>,
    /// Events received by WS sessions, summed at their end.
    pub signaling_events: u64,
    /// Presence entries (participants listed in joins and leaves) those sessions received.
    pub presence_entries: u64,
    /// Each WS session's room size as it saw it at the end (see `roster`).
    pub roster_views: Vec<u64>,
}

pub type Shared = Arc<Mutex<Collector>>;

impl Collector {
    pub fn flush(&mut self, p: &mut Pending) {
        self.total.add(&p.counters);
        self.second.add(&p.counters);
        for &d in &p.delays_us {
            self.delay_second.record(u64::from(d));
        }
        for &j in &p.jitter_us {
            self.jitter_total.record(u64::from(j));
        }
        for &l in &p.read_lag_us {
            self.read_lag_total.record(u64::from(l));
            self.read_lag_second.record(u64::from(l));
        }
        p.counters = Counters::default();
        p.delays_us.clear();
        p.jitter_us.clear();
        p.read_lag_us.clear();
    }

    /// Closes the current second's delays: returns them, and the run's total keeps them.
    pub fn close_delay_second(&mut self) -> Hist {
        let d = std::mem::take(&mut self.delay_second);
        self.delay_closed.merge(&d);
        d
    }

    /// Every delay recorded in the run, the open second's included.
    pub fn delay_total(&self) -> Hist {
        let mut total = self.delay_closed.clone();
        total.merge(&self.delay_second);
        total
    }

    pub fn record_lag(&mut self, us: u64) {
        self.lag_total.record(us);
        self.lag_second.record(us);
    }

    /// Notes a failure; the first 50 distinct messages are kept for the report.
    pub fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 50 && !self.failures.contains(&what) {
            self.failures.push(what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Hist::default();
        for us in 1..=10_000u64 {
            h.record(us * 10); // 10 µs .. 100 ms, uniform
        }
        let s = h.summary_ms().unwrap();
        assert!((s.p50 - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99 - 99.0).abs() < 1.1, "{s:?}");
        assert_eq!(s.max, 100.0);
        let mut other = Hist::default();
        other.record(5_000_000);
        h.merge(&other);
        assert_eq!(h.summary_ms().unwrap().max, 5000.0);
        let cdf = h.cdf_ms();
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(cdf.last().unwrap().1, 1.0);
        assert!(Hist::default().quantile(0.5).is_none());
    }

    /// The run's delay histogram is the same whether or not seconds were closed in between.
    #[test]
    fn delay_total_counts_closed_and_open_seconds() {
        let mut c = Collector::default();
        let mut p = Pending::default();
        p.delays_us.extend([100, 2_000, 150_000]);
        c.flush(&mut p);
        let first = c.close_delay_second();
        assert_eq!(first.count(), 3);
        p.delays_us.extend([300, 20_000_000]);
        c.flush(&mut p);
        let mut expect = Hist::default();
        for d in [100, 2_000, 150_000, 300, 20_000_000] {
            expect.record(d);
        }
        let total = c.delay_total();
        assert_eq!(total.summary_ms(), expect.summary_ms());
        assert_eq!(total.cdf_ms(), expect.cdf_ms());
        assert_eq!(c.delay_second.count(), 2, "the open second");
    }
}
