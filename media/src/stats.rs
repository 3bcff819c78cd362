//! RTCP statistics of RTP streams (RFC 3550 §6.4, appendix A.3 and A.8): what goes into the
//! report blocks of our receiver reports about publishers' streams, the sender info of our sender
//! reports about streams we send, and the round-trip time from the report blocks we get back.
//!
//! How to drive it:
//! - per received stream, a [`ReceiveStats`]: [`ReceiveStats::handle_packet`] for each packet
//!   (with the extended sequence number the caller keeps),
//!   [`ReceiveStats::handle_sender_report`] for each SR of that SSRC,
//!   [`ReceiveStats::report_block`] when sending an RR/SR (each call closes a reporting interval);
//! - per sent stream, a [`SendStats`]: [`SendStats::handle_sent`] for each original packet sent,
//!   [`SendStats::sender_info`] when sending an SR;
//! - [`rtt_from_report_block`] on each report block received about a stream we send.
//!
//! Time model: sans-IO. Monotonic `Instant`s are passed in; NTP wall-clock timestamps (64-bit,
//! seconds since 1900 in the upper half, RFC 3550 §4) are passed in as well, built by the caller
//! with [`ntp_from_system_time`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01), RFC 868.
const NTP_UNIX_OFFSET_SECS: u64 = 2_208_988_800;

/// Largest positive value of the signed 24-bit cumulative loss field (RFC 3550 §6.4.1).
const MAX_TOTAL_LOST: u32 = 0x7F_FFFF;

/// The 64-bit NTP timestamp of `time` (RFC 3550 §4: seconds since 1900 in the upper 32 bits,
/// binary fraction in the lower 32). Times before 1900 give 0.
pub fn ntp_from_system_time(time: SystemTime) -> u64 {
    let since_1900 = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => Duration::from_secs(NTP_UNIX_OFFSET_SECS).saturating_add(d),
        Err(before) => Duration::from_secs(NTP_UNIX_OFFSET_SECS).saturating_sub(before.duration()),
    };
    let frac = (u64::from(since_1900.subsec_nanos()) << 32) / 1_000_000_000;
    // NTP seconds wrap in 2036 (era 1); the wire field is modular, so is this.
    (since_1900.as_secs() << 32) | frac
}

/// The middle 32 bits of an NTP timestamp, as LSR and DLSR use them (RFC 3550 §6.4.1).
pub fn ntp_compact(ntp: u64) -> u32 {
    // Truncation to the middle 32 bits is the definition.
    (ntp >> 16) as u32
}

/// `d` in units of 1/65536 s (the compact NTP format of DLSR), saturating.
fn compact_from_duration(d: Duration) -> u32 {
    let units = d.as_nanos() * 65_536 / 1_000_000_000;
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// One RTCP report block about a received stream (RFC 3550 §6.4.1), without its SSRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlock {
    /// Packets lost in the interval since the previous report, as a fraction of 256.
    pub fraction_lost: u8,
    /// Cumulative packets lost, clamped to 0..=0x7FFFFF (the field is signed 24-bit; duplicates
    /// can make the count negative, which is reported as 0).
    pub total_lost: u32,
    /// Extended highest sequence number received (cycles in the upper 16 bits).
    pub ext_highest_seq: u32,
    /// Interarrival jitter in RTP timestamp units (RFC 3550 §6.4.1, A.8).
    pub jitter: u32,
    /// Middle 32 bits of the NTP timestamp of the last SR received, 0 if none.
    pub lsr: u32,
    /// Delay since that SR in 1/65536 s, 0 if none.
    pub dlsr: u32,
}

/// Reception statistics of one incoming RTP stream.
#[derive(Debug, Clone)]
pub struct ReceiveStats {
    /// Lowest and highest extended sequence numbers seen.
    base_seq: Option<u64>,
    max_seq: u64,
    /// Packets received, duplicates included (RFC 3550 A.3).
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    /// Reference for expressing arrival times in RTP units.
    epoch: Option<Instant>,
    /// Relative transit time of the last in-order packet (A.8), in RTP units, modular.
    last_transit: Option<u32>,
    /// Jitter estimate in RTP units (kept as a float rather than A.8's fixed point).
    jitter: f64,
    /// Compact NTP time of the last SR and when it arrived.
    last_sr: Option<(u32, Instant)>,
}

impl ReceiveStats {
    /// Statistics of a stream with no packets yet.
    pub fn new() -> Self {
        Self {
            base_seq: None,
            max_seq: 0,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            epoch: None,
            last_transit: None,
            jitter: 0.0,
            last_sr: None,
        }
    }

    /// A packet with extended sequence number `ext_seq` and RTP timestamp `rtp_ts` arrived at
    /// `arrival`; `clock_rate` is the payload format's RTP clock rate in Hz.
    pub fn handle_packet(&mut self, ext_seq: u64, rtp_ts: u32, arrival: Instant, clock_rate: u32) {
        self.received += 1;
        let in_order = match self.base_seq {
            None => {
                self.base_seq = Some(ext_seq);
                self.max_seq = ext_seq;
                true
            }
            Some(base) => {
                if ext_seq < base {
                    // Reordered packets from before the first one we saw still count.
                    self.base_seq = Some(ext_seq);
                }
                if ext_seq > self.max_seq {
                    self.max_seq = ext_seq;
                    true
                } else {
                    false
                }
            }
        };
        // A.8 over packets in sequence order only: a reordered or retransmitted packet's transit
        // says nothing about the path's jitter (libwebrtc does the same).
        if in_order && clock_rate > 0 {
            let epoch = *self.epoch.get_or_insert(arrival);
            let elapsed = arrival.saturating_duration_since(epoch);
            let arrival_rtp = (elapsed.as_nanos() * u128::from(clock_rate) / 1_000_000_000) as u32;
            let transit = arrival_rtp.wrapping_sub(rtp_ts);
            if let Some(last) = self.last_transit {
                // Both are modular; their difference is small and signed.
                let d = f64::from((transit.wrapping_sub(last) as i32).unsigned_abs());
                self.jitter += (d - self.jitter) / 16.0;
            }
            self.last_transit = Some(transit);
        }
    }

    /// A sender report for this stream arrived at `now` with NTP timestamp `ntp`.
    pub fn handle_sender_report(&mut self, ntp: u64, now: Instant) {
        self.last_sr = Some((ntp_compact(ntp), now));
    }

    /// The report block for a report sent at `now`; closes the loss interval (the next call's
    /// fraction lost counts from here). `None` before the first packet: RFC 3550 §6.4 reports
    /// only on sources heard from.
    pub fn report_block(&mut self, now: Instant) -> Option<ReportBlock> {
        let base = self.base_seq?;
        let expected = self.max_seq - base + 1;
        // i128: the extended numbers come from the caller and may be anywhere in u64.
        let lost = i128::from(expected) - i128::from(self.received);
        let total_lost = lost.clamp(0, i128::from(MAX_TOTAL_LOST)) as u32;

        let expected_interval = expected.saturating_sub(self.expected_prior);
        let received_interval = self.received - self.received_prior;
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = i128::from(expected_interval) - i128::from(received_interval);
        let fraction_lost = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / i128::from(expected_interval)).min(255) as u8
        };

        let (lsr, dlsr) = match self.last_sr {
            None => (0, 0),
            Some((lsr, at)) => (
                lsr,
                compact_from_duration(now.saturating_duration_since(at)),
            ),
        };
        Some(ReportBlock {
            fraction_lost,
            total_lost,
            // The wire carries the low 32 bits: 16 bits of cycles, 16 of sequence number.
            ext_highest_seq: self.max_seq as u32,
            jitter: self.jitter as u32,
            lsr,
            dlsr,
        })
    }
}

impl Default for ReceiveStats {
    fn default() -> Self {
        Self::new()
    }
}

/// The sender info of an RTCP SR (RFC 3550 §6.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderInfo {
    /// NTP timestamp of the report.
    pub ntp: u64,
    /// RTP timestamp corresponding to `ntp`.
    pub rtp_ts: u32,
    /// Packets sent, modulo 2^32.
    pub packets: u32,
    /// Payload octets sent, modulo 2^32.
    pub octets: u32,
}

/// Send statistics of one outgoing RTP stream.
#[derive(Debug, Clone, Default)]
pub struct SendStats {
    packets: u32,
    octets: u32,
    /// RTP timestamp of the last packet sent and when it was sent.
    last: Option<(u32, Instant)>,
}

impl SendStats {
    /// Statistics of a stream with nothing sent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// An original packet (not a retransmission on this SSRC) with `payload_bytes` of payload
    /// (header and padding excluded, RFC 3550 §6.4.1) and RTP timestamp `rtp_ts` was sent at
    /// `now`.
    pub fn handle_sent(&mut self, payload_bytes: usize, rtp_ts: u32, now: Instant) {
        self.packets = self.packets.wrapping_add(1);
        // The counter is modular on the wire; so is the addition.
        self.octets = self.octets.wrapping_add(payload_bytes as u32);
        self.last = Some((rtp_ts, now));
    }

    /// The sender info for an SR sent at `now` (wall clock `now_ntp`), with the RTP timestamp
    /// extrapolated from the last packet sent to `now` at `clock_rate` Hz. `None` before the
    /// first packet: there is no timestamp to relate.
    pub fn sender_info(&self, now_ntp: u64, now: Instant, clock_rate: u32) -> Option<SenderInfo> {
        let (last_ts, last_at) = self.last?;
        let elapsed = now.saturating_duration_since(last_at);
        let ticks = (elapsed.as_nanos() * u128::from(clock_rate) / 1_000_000_000) as u32;
        Some(SenderInfo {
            ntp: now_ntp,
            rtp_ts: last_ts.wrapping_add(ticks),
            packets: self.packets,
            octets: self.octets,
        })
    }
}

/// Round-trip time from a report block about one of our streams (RFC 3550 §6.4.1): the block's
/// `lsr` and `dlsr` and the NTP time `now_ntp` it arrived. `None` if the peer has not received
/// an SR yet (`lsr` 0) or the result is implausible (negative beyond rounding).
pub fn rtt_from_report_block(lsr: u32, dlsr: u32, now_ntp: u64) -> Option<Duration> {
    if lsr == 0 {
        return None;
    }
    /// Compact NTP rounding can make a near-zero RTT come out slightly negative: tolerate 1 ms.
    const ROUNDING: i32 = 66;
    let rtt = ntp_compact(now_ntp).wrapping_sub(lsr).wrapping_sub(dlsr) as i32;
    if rtt < -ROUNDING {
        return None;
    }
    let units = u64::from(rtt.max(0).unsigned_abs());
    Some(Duration::from_nanos(units * 1_000_000_000 / 65_536))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn ntp_of_known_instants() {
        assert_eq!(ntp_from_system_time(UNIX_EPOCH), NTP_UNIX_OFFSET_SECS << 32);
        let half = UNIX_EPOCH + Duration::from_millis(1500);
        assert_eq!(
            ntp_from_system_time(half),
            ((NTP_UNIX_OFFSET_SECS + 1) << 32) | 0x8000_0000
        );
        assert_eq!(
            ntp_from_system_time(UNIX_EPOCH - Duration::from_secs(NTP_UNIX_OFFSET_SECS + 5)),
            0
        );
    }

    #[test]
    fn ntp_compact_takes_middle_bits() {
        assert_eq!(ntp_compact(0x1234_5678_9ABC_DEF0), 0x5678_9ABC);
    }

    #[test]
    fn no_report_before_first_packet() {
        let mut s = ReceiveStats::new();
        assert_eq!(s.report_block(Instant::now()), None);
    }

    #[test]
    fn loss_counts_and_interval_fraction() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        // Interval 1: 100 expected (1000..=1099), every 4th lost → 25 lost.
        for seq in 1000..1100u64 {
            if seq % 4 != 1 {
                s.handle_packet(seq, 0, t0, 90_000);
            }
        }
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.total_lost, 25);
        assert_eq!(rb.fraction_lost, 64, "25/100 * 256");
        assert_eq!(rb.ext_highest_seq, 1099);
        // Interval 2: no loss.
        for seq in 1100..1200u64 {
            s.handle_packet(seq, 0, t0, 90_000);
        }
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.total_lost, 25);
        assert_eq!(rb.fraction_lost, 0);
        // Interval 3: nothing received.
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.fraction_lost, 0);
    }

    #[test]
    fn duplicates_make_loss_negative_which_clamps_to_zero() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        for seq in 0..10u64 {
            s.handle_packet(seq, 0, t0, 48_000);
            s.handle_packet(seq, 0, t0, 48_000);
        }
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.total_lost, 0);
        assert_eq!(rb.fraction_lost, 0);
    }

    #[test]
    fn total_lost_clamps_to_24_bits() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        s.handle_packet(0, 0, t0, 90_000);
        s.handle_packet(20_000_000, 0, t0, 90_000);
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.total_lost, MAX_TOTAL_LOST);
        assert_eq!(rb.fraction_lost, 255);
    }

    #[test]
    fn extended_highest_seq_carries_cycles() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        s.handle_packet(65_535, 0, t0, 90_000);
        s.handle_packet(65_536 + 2, 0, t0, 90_000);
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.ext_highest_seq, 0x0001_0002);
        assert_eq!(rb.total_lost, 2);
    }

    #[test]
    fn reordered_first_packets_still_count() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        for seq in [5u64, 3, 4, 6] {
            s.handle_packet(seq, 0, t0, 90_000);
        }
        let rb = s.report_block(t0).unwrap();
        assert_eq!(rb.total_lost, 0);
        assert_eq!(rb.ext_highest_seq, 6);
    }

    #[test]
    fn jitter_is_zero_for_a_perfectly_paced_stream() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        // 20 ms audio frames at 48 kHz, timestamps starting near the wrap.
        for i in 0..200u64 {
            let ts = (u32::MAX - 10_000).wrapping_add((i * 960) as u32);
            s.handle_packet(i, ts, t0 + ms(20 * i), 48_000);
        }
        assert_eq!(s.report_block(t0).unwrap().jitter, 0);
    }

    #[test]
    fn jitter_converges_to_mean_deviation() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        // Every other packet arrives 10 ms late: |D| is 10 ms = 480 units at 48 kHz each time.
        for i in 0..500u64 {
            let late = if i % 2 == 1 { 10 } else { 0 };
            s.handle_packet(i, (i * 960) as u32, t0 + ms(20 * i + late), 48_000);
        }
        let jitter = s.report_block(t0).unwrap().jitter;
        assert!((470..=480).contains(&jitter), "jitter {jitter}");
    }

    #[test]
    fn lsr_and_dlsr() {
        let t0 = Instant::now();
        let mut s = ReceiveStats::new();
        s.handle_packet(1, 0, t0, 90_000);
        assert_eq!(s.report_block(t0).unwrap().lsr, 0);
        let sr_ntp = 0xAAAA_BBBB_CCCC_DDDD;
        s.handle_sender_report(sr_ntp, t0);
        let rb = s.report_block(t0 + ms(500)).unwrap();
        assert_eq!(rb.lsr, 0xBBBB_CCCC);
        assert_eq!(rb.dlsr, 32_768, "0.5 s in 1/65536 s");
    }

    #[test]
    fn sender_info_extrapolates_rtp_timestamp() {
        let t0 = Instant::now();
        let mut s = SendStats::new();
        assert_eq!(s.sender_info(1, t0, 90_000), None);
        s.handle_sent(1000, 4_000_000_000, t0);
        s.handle_sent(500, u32::MAX - 100, t0 + ms(10));
        let info = s.sender_info(42, t0 + ms(110), 90_000).unwrap();
        assert_eq!(info.ntp, 42);
        assert_eq!(info.packets, 2);
        assert_eq!(info.octets, 1500);
        // 100 ms at 90 kHz = 9000 ticks past the last timestamp, wrapping.
        assert_eq!(info.rtp_ts, (u32::MAX - 100).wrapping_add(9000));
    }

    #[test]
    fn rtt_round_trip_through_a_receiver() {
        let t0 = Instant::now();
        let wall0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // We send an SR at wall0; it takes 40 ms there, the peer holds it 250 ms, 60 ms back.
        let sr_ntp = ntp_from_system_time(wall0);
        let mut peer = ReceiveStats::new();
        peer.handle_packet(1, 0, t0, 90_000);
        peer.handle_sender_report(sr_ntp, t0 + ms(40));
        let rb = peer.report_block(t0 + ms(290)).unwrap();
        let now_ntp = ntp_from_system_time(wall0 + ms(350));
        let rtt = rtt_from_report_block(rb.lsr, rb.dlsr, now_ntp).unwrap();
        let err = rtt.as_secs_f64() - 0.100;
        assert!(err.abs() < 0.001, "rtt {rtt:?}");
    }

    #[test]
    fn rtt_edge_cases() {
        let now = ntp_from_system_time(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(rtt_from_report_block(0, 0, now), None, "no SR received");
        let lsr = ntp_compact(now);
        assert_eq!(
            rtt_from_report_block(lsr, 10, now),
            Some(Duration::ZERO),
            "rounding"
        );
        assert_eq!(rtt_from_report_block(lsr, 65_536, now), None, "negative");
    }
}
