//! The receiving side of a simulated subscriber, sans-IO: what a browser's RTP receiver does
//! that costs the server work (RFC 3550 receiver reports, RFC 4585 NACK and PLI,
//! transport-wide congestion control feedback), plus the measurements.
//!
//! Feed decrypted RTP with [`Receiver::handle_rtp`]; after a packet, when
//! [`Receiver::feedback_due`], send what [`Receiver::poll_feedback`] returns (NACK and PLI go out
//! at once); call [`Receiver::poll_rtcp`] every tick ([`TWCC_INTERVAL`]) for those and the
//! periodic feedback (transport-wide feedback every tick and receiver reports every second, as
//! a browser sends them on a timer), and encrypt and send what it returns.
//! Measurements accumulate in [`Receiver::pending`] for the caller to flush.
//!
//! Loss is counted on the sequence numbers the edge sends (they are contiguous per forwarded
//! stream, also across simulcast layer switches), so a layer the edge chooses not to forward is
//! not loss. One-way delay comes from the probe in each payload ([`crate::media::Probe`]).

use crate::media::{InRtp, Probe};
use crate::stats::Pending;
use rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtcp::receiver_report::ReceiverReport;
use rtcp::reception_report::ReceptionReport;
use rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
use std::time::{Duration, Instant};
use webrtc_util::Marshal;

/// Transport-wide feedback interval: libwebrtc sends it every 50-250 ms; 100 ms is its default.
pub const TWCC_INTERVAL: Duration = Duration::from_millis(100);
/// Receiver reports once a second (RFC 3550 §6.2 allows more than the 5 s minimum for media).
const RR_INTERVAL: Duration = Duration::from_secs(1);
/// Ask again for a keyframe at most this often while none has come.
const PLI_INTERVAL: Duration = Duration::from_secs(1);
/// Gaps wider than this are a stream restart, not loss to NACK.
const MAX_NACK_GAP: u64 = 256;
/// Sequence window for duplicate detection.
const WINDOW: u64 = 2048;

/// Plain RTCP packets back to back in one buffer that keeps its capacity, so the feedback
/// every simulated viewer sends ten times a second is built without an allocation.
#[derive(Debug, Default)]
pub struct RtcpPackets {
    bytes: Vec<u8>,
    /// Where each packet ends in `bytes`.
    ends: Vec<usize>,
}

impl RtcpPackets {
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    pub fn push(&mut self, packet: &[u8]) {
        self.bytes.extend_from_slice(packet);
        self.ends.push(self.bytes.len());
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let packet = &self.bytes[start..end];
            start = end;
            packet
        })
    }
}

#[derive(Debug)]
#[repr(C)]
struct Stream {
    video: bool,
    base: u64,
    max: u64,
    cycles: u64,
    last_seq: u16,
    received: u64,
    nacked: Vec<u64>,
    jitter_us: f64,
    last_transit: Option<i64>,
    last_stream_id: Option<u8>,
    keyframe_seen: bool,
    first_packet: Instant,
    last_pli: Option<Instant>,
    // For receiver reports.
    rr_expected_prior: u64,
    rr_received_prior: u64,
    /// Which of the last [`WINDOW`] sequence numbers arrived. Inline: a packet's bit is then
    /// in the stream's own allocation, not one more pointer away (a cache miss per packet
    /// when many viewers take turns). Last, so the counters above share few cache lines
    /// ([`Receiver::hot_lines`]).
    seen: [u64; (WINDOW / 64) as usize],
}

impl Stream {
    fn new(seq: u16, video: bool, now: Instant) -> Self {
        Self {
            video,
            base: u64::from(seq),
            max: u64::from(seq),
            cycles: 0,
            last_seq: seq,
            seen: [0; (WINDOW / 64) as usize],
            received: 0,
            nacked: Vec::new(),
            jitter_us: 0.0,
            last_transit: None,
            last_stream_id: None,
            keyframe_seen: false,
            first_packet: now,
            last_pli: None,
            rr_expected_prior: 0,
            rr_received_prior: 0,
        }
    }

    /// RFC 3550 Appendix A.1: extend a 16-bit sequence number.
    fn extend(&mut self, seq: u16) -> u64 {
        let diff = seq.wrapping_sub(self.last_seq) as i16;
        let mut ext = (self.cycles | u64::from(self.last_seq)) as i64 + i64::from(diff);
        if ext < 0 {
            ext = 0;
        }
        let ext = ext as u64;
        if diff > 0 {
            if seq < self.last_seq {
                self.cycles += 1 << 16;
            }
            self.last_seq = seq;
        }
        ext
    }

    fn bit(&mut self, ext: u64) -> (usize, u64) {
        let i = (ext % WINDOW) as usize;
        (i / 64, 1u64 << (i % 64))
    }
}

/// One subscriber peer connection's receive state.
#[derive(Debug)]
pub struct Receiver {
    our_ssrc: u32,
    nack: bool,
    /// By SSRC. A viewer receives a handful of streams (audio, a video or two), so a scan of a
    /// vector is cheaper per packet than hashing into a map.
    streams: Vec<(u32, Stream)>,
    /// (unwrapped transport-wide sequence number, arrival) in arrival order: a push per
    /// packet, sorted once per feedback (arrivals are nearly in order, so that is cheap).
    twcc_arrivals: Vec<(u64, Instant)>,
    twcc_last: u16,
    twcc_cycles: u64,
    twcc_started: bool,
    twcc_count: u8,
    twcc_media_ssrc: u32,
    epoch: Instant,
    next_twcc: Instant,
    next_rr: Instant,
    nack_out: Vec<(u32, Vec<u16>)>,
    pli_out: Vec<u32>,
    pub pending: Pending,
    pub first_media: Option<Instant>,
}

impl Receiver {
    pub fn new(nack: bool, now: Instant) -> Self {
        Self {
            our_ssrc: rand::random(),
            nack,
            streams: Vec::new(),
            twcc_arrivals: Vec::new(),
            twcc_last: 0,
            twcc_cycles: 0,
            twcc_started: false,
            twcc_count: 0,
            twcc_media_ssrc: 0,
            epoch: now,
            next_twcc: now + TWCC_INTERVAL,
            next_rr: now + RR_INTERVAL,
            nack_out: Vec::new(),
            pli_out: Vec::new(),
            pending: Pending::default(),
            first_media: None,
        }
    }

    /// Where handling the next packet of `ssrc` will read and write, as (address, length)
    /// ranges: the stream's counters, its window word for the next sequence number, and the
    /// ends of the arrival and delay lists (`(0, 0)` for a stream not seen yet). For the hub's
    /// prefetch ([`crate::prefetch`]).
    pub fn hot_lines(&self, ssrc: u32) -> [(usize, usize); 4] {
        let tail = |end: usize, len: usize| (end, len);
        let arrivals = tail(
            self.twcc_arrivals.as_ptr_range().end as usize,
            size_of::<(u64, Instant)>(),
        );
        let delays = tail(self.pending.delays_us.as_ptr_range().end as usize, 4);
        let Some((_, s)) = self.streams.iter().find(|(s, _)| *s == ssrc) else {
            return [(0, 0), (0, 0), arrivals, delays];
        };
        // `seen` is last (`repr(C)`): what is before it is the per-packet counters.
        let counters = (
            std::ptr::from_ref(s) as usize,
            std::mem::offset_of!(Stream, seen),
        );
        let i = ((s.max + 1) % WINDOW) as usize / 64;
        let word = (std::ptr::from_ref(&s.seen[i]) as usize, 8);
        [counters, word, arrivals, delays]
    }

    /// A decrypted media packet arrived at `now` (`now_us`: unix µs, the probes' clock).
    pub fn handle_rtp(&mut self, pkt: InRtp<'_>, now: Instant, now_us: u64) {
        self.first_media.get_or_insert(now);
        if let Some(t) = pkt.twcc {
            self.record_twcc(t, now);
            self.twcc_media_ssrc = pkt.ssrc;
        }
        let probe = Probe::find(pkt.payload);
        let video = probe.is_some_and(|p| p.stream != 0);
        let at = match self.streams.iter().position(|(ssrc, _)| *ssrc == pkt.ssrc) {
            Some(i) => i,
            None => {
                self.streams
                    .push((pkt.ssrc, Stream::new(pkt.seq, video, now)));
                self.streams.len() - 1
            }
        };
        let s = &mut self.streams[at].1;
        let ext = s.extend(pkt.seq);
        let c = &mut self.pending.counters;
        if ext + WINDOW <= s.max {
            // Too old to tell: count as a duplicate-or-stale arrival, nothing else.
            c.duplicates += 1;
            return;
        }
        let (word, mask) = s.bit(ext);
        if ext <= s.max && ext >= s.base && s.received > 0 {
            if s.seen[word] & mask != 0 {
                c.duplicates += 1;
                return;
            }
            s.seen[word] |= mask;
            c.reordered += 1;
            if s.nacked.contains(&ext) {
                c.recovered += 1;
                s.nacked.retain(|&n| n != ext);
            }
        } else if s.received > 0 && ext < s.base {
            // Older than the stream's first packet, which it was overtaken by: the stream
            // starts here. As for a gap, the numbers in between count as lost until they come
            // (then as reordered), and this one is a late arrival.
            for missing in ext + 1..s.base {
                let (w, m) = s.bit(missing);
                s.seen[w] &= !m;
            }
            s.seen[word] |= mask;
            let gap = s.base - ext;
            c.expected += gap;
            c.lost += gap;
            c.reordered += 1;
            s.base = ext;
        } else {
            let from = if s.received == 0 { ext } else { s.max + 1 };
            // Clear window bits for the sequence numbers we pass over.
            for missing in from..=ext {
                let (w, m) = s.bit(missing);
                s.seen[w] &= !m;
            }
            s.seen[word] |= mask;
            let gap = ext - from;
            c.expected += gap + 1;
            c.lost += gap;
            if gap > 0 && self.nack && gap <= MAX_NACK_GAP {
                let seqs: Vec<u16> = (from..ext).map(|e| e as u16).collect();
                s.nacked.extend(from..ext);
                if s.nacked.len() > 512 {
                    let cut = s.nacked.len() - 512;
                    s.nacked.drain(..cut);
                }
                self.nack_out.push((pkt.ssrc, seqs));
            }
            if s.received == 0 {
                s.base = ext;
            }
            s.max = ext;
        }
        s.received += 1;
        c.rx_packets += 1;
        if let Some(p) = probe {
            let stream = usize::from(p.stream.min(4));
            c.rx_bytes[stream] += pkt.payload.len() as u64;
            let delay = now_us.saturating_sub(p.sent_us);
            self.pending
                .delays_us
                .push(delay.min(u64::from(u32::MAX)) as u32);
            // RFC 3550 §6.4.1 interarrival jitter, on the probe's send time.
            let transit = now_us as i64 - p.sent_us as i64;
            if let Some(prev) = s.last_transit {
                let d = (transit - prev).unsigned_abs() as f64;
                s.jitter_us += (d - s.jitter_us) / 16.0;
            }
            s.last_transit = Some(transit);
            if p.stream != 0 {
                if s.last_stream_id.is_some_and(|l| l != p.stream) {
                    c.layer_switches += 1;
                }
                s.last_stream_id = Some(p.stream);
            }
            if p.keyframe {
                s.keyframe_seen = true;
                c.keyframes_received += 1;
            }
        }
        // A video stream that started mid-frame gets a PLI when no keyframe came in time.
        if s.video && !s.keyframe_seen {
            let due = s.last_pli.map_or(
                now.duration_since(s.first_packet) >= Duration::from_millis(200),
                |t| now.duration_since(t) >= PLI_INTERVAL,
            );
            if due {
                s.last_pli = Some(now);
                self.pli_out.push(pkt.ssrc);
            }
        }
    }

    fn record_twcc(&mut self, seq: u16, now: Instant) {
        if !self.twcc_started {
            self.twcc_started = true;
            self.twcc_last = seq;
        }
        let diff = seq.wrapping_sub(self.twcc_last) as i16;
        let ext =
            ((self.twcc_cycles | u64::from(self.twcc_last)) as i64 + i64::from(diff)).max(0) as u64;
        if diff > 0 {
            if seq < self.twcc_last {
                self.twcc_cycles += 1 << 16;
            }
            self.twcc_last = seq;
        }
        self.twcc_arrivals.push((ext, now));
    }

    /// Whether a packet left NACKs or PLIs to send ([`Self::poll_feedback`]).
    pub fn feedback_due(&self) -> bool {
        !self.nack_out.is_empty() || !self.pli_out.is_empty()
    }

    /// Appends the NACKs and PLIs due to `out`, each a plain (unencrypted) RTCP packet.
    pub fn poll_feedback(&mut self, out: &mut RtcpPackets) {
        for (ssrc, seqs) in self.nack_out.drain(..) {
            let mut nacks: Vec<NackPair> = Vec::new();
            for seq in seqs {
                match nacks.last_mut() {
                    Some(p) if seq.wrapping_sub(p.packet_id).wrapping_sub(1) < 16 => {
                        p.lost_packets |= 1 << seq.wrapping_sub(p.packet_id).wrapping_sub(1);
                    }
                    _ => nacks.push(NackPair {
                        packet_id: seq,
                        lost_packets: 0,
                    }),
                }
            }
            let pkt = TransportLayerNack {
                sender_ssrc: self.our_ssrc,
                media_ssrc: ssrc,
                nacks,
            };
            if let Ok(b) = pkt.marshal() {
                out.push(&b);
                self.pending.counters.nack_sent += 1;
            }
        }
        for ssrc in self.pli_out.drain(..) {
            let pkt = PictureLossIndication {
                sender_ssrc: self.our_ssrc,
                media_ssrc: ssrc,
            };
            if let Ok(b) = pkt.marshal() {
                out.push(&b);
                self.pending.counters.pli_sent += 1;
            }
        }
    }

    /// Appends the RTCP packets due now to `out`, each a plain (unencrypted) RTCP packet:
    /// what [`Self::poll_feedback`] gives, transport-wide feedback and receiver reports. Call
    /// every [`TWCC_INTERVAL`]: a call up to half an interval early still sends, so ticks that
    /// jitter do not skip a report.
    pub fn poll_rtcp(&mut self, now: Instant, out: &mut RtcpPackets) {
        self.poll_feedback(out);
        let early = now + TWCC_INTERVAL / 2;
        if early >= self.next_twcc {
            self.next_twcc = now + TWCC_INTERVAL;
            if self.twcc_feedback(out) {
                self.pending.counters.twcc_sent += 1;
            }
            // Jitter samples for the report, once per tick per stream.
            for (_, s) in &self.streams {
                if s.last_transit.is_some() {
                    self.pending.jitter_us.push(s.jitter_us as u32);
                }
            }
        }
        if early >= self.next_rr {
            self.next_rr = now + RR_INTERVAL;
            if let Some(rr) = self.receiver_report() {
                out.push(&rr);
                self.pending.counters.rr_sent += 1;
            }
        }
    }

    fn receiver_report(&mut self) -> Option<bytes::Bytes> {
        if self.streams.is_empty() {
            return None;
        }
        let mut reports = Vec::new();
        for (ssrc, s) in self.streams.iter_mut().take(31) {
            let ssrc = *ssrc;
            let expected = s.max - s.base + 1;
            let lost = expected.saturating_sub(s.received);
            let exp_int = expected - s.rr_expected_prior;
            let rec_int = s.received - s.rr_received_prior;
            s.rr_expected_prior = expected;
            s.rr_received_prior = s.received;
            let lost_int = exp_int.saturating_sub(rec_int);
            let fraction = (lost_int * 256)
                .checked_div(exp_int)
                .map_or(0, |f| f.min(255) as u8);
            reports.push(ReceptionReport {
                ssrc,
                fraction_lost: fraction,
                total_lost: lost.min(0x7f_ffff) as u32,
                last_sequence_number: s.max as u32,
                // In RTP timestamp units: 90 kHz video, 48 kHz audio.
                jitter: (s.jitter_us * if s.video { 0.09 } else { 0.048 }) as u32,
                last_sender_report: 0,
                delay: 0,
            });
        }
        ReceiverReport {
            ssrc: self.our_ssrc,
            reports,
            profile_extensions: Default::default(),
        }
        .marshal()
        .ok()
    }

    /// draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1: one feedback covering every
    /// transport sequence number from the lowest unreported to the highest received, appended
    /// to `out`. False when nothing arrived since the last one.
    fn twcc_feedback(&mut self, out: &mut RtcpPackets) -> bool {
        // Arrivals are nearly always in order: check before sorting. The sort is stable and
        // the dedup keeps the first, so the first arrival of a duplicate counts.
        if !self.twcc_arrivals.is_sorted_by_key(|&(seq, _)| seq) {
            self.twcc_arrivals.sort_by_key(|&(seq, _)| seq);
        }
        self.twcc_arrivals.dedup_by_key(|&mut (seq, _)| seq);
        let header = TwccHeader {
            sender_ssrc: self.our_ssrc,
            media_ssrc: self.twcc_media_ssrc,
            fb_pkt_count: self.twcc_count,
        };
        let Some(covered) = write_twcc(&mut out.bytes, header, self.epoch, &self.twcc_arrivals)
        else {
            return false;
        };
        out.ends.push(out.bytes.len());
        self.twcc_count = self.twcc_count.wrapping_add(1);
        self.twcc_arrivals.drain(..covered);
        true
    }
}

/// The fixed fields of a transport-wide feedback packet.
#[derive(Debug, Clone, Copy)]
struct TwccHeader {
    sender_ssrc: u32,
    media_ssrc: u32,
    fb_pkt_count: u8,
}

/// Most sequence numbers one feedback covers; later arrivals wait for the next.
const TWCC_MAX_SPAN: u64 = 8000;

/// Appends one transport-wide feedback packet (RTCP PT 205, FMT 15) for `arrivals`
/// (unwrapped sequence number, arrival), sorted and without duplicates, to `buf`: run-length
/// status chunks, then a receive delta per received packet in 250 µs units (one byte when
/// 0-63.75 ms after the previous, else two, signed), padded to 32 bits (RFC 3550 padding:
/// P bit, count in the last byte). Returns how many arrivals it covered (`None` and nothing
/// written when there are none).
fn write_twcc(
    buf: &mut Vec<u8>,
    header: TwccHeader,
    epoch: Instant,
    arrivals: &[(u64, Instant)],
) -> Option<usize> {
    const NOT_RECEIVED: u16 = 0;
    const SMALL_DELTA: u16 = 1;
    const LARGE_DELTA: u16 = 2;
    const MAX_RUN: u16 = 0x1fff;
    let &(first, first_at) = arrivals.first()?;
    let last = arrivals
        .last()
        .map_or(first, |a| a.0)
        .min(first + TWCC_MAX_SPAN);
    // Reference time in 64 ms units (24 bits), deltas in 250 µs units from it.
    let ref_units = (first_at.duration_since(epoch).as_micros() / 64_000) as u32 & 0x00ff_ffff;
    let start = buf.len();
    buf.extend_from_slice(&[0x80 | 15, 205, 0, 0]);
    buf.extend_from_slice(&header.sender_ssrc.to_be_bytes());
    buf.extend_from_slice(&header.media_ssrc.to_be_bytes());
    buf.extend_from_slice(&(first as u16).to_be_bytes());
    buf.extend_from_slice(&((last - first + 1) as u16).to_be_bytes());
    buf.extend_from_slice(&(ref_units << 8 | u32::from(header.fb_pkt_count)).to_be_bytes());
    // Status chunks first; the deltas follow them all, from a second pass.
    let mut run: Option<(u16, u16)> = None;
    let push_run = |buf: &mut Vec<u8>, (symbol, n): (u16, u16)| {
        buf.extend_from_slice(&(symbol << 13 | n).to_be_bytes());
    };
    let symbol_of = |units: i64| {
        if (0..=255).contains(&units) {
            SMALL_DELTA
        } else {
            LARGE_DELTA
        }
    };
    let mut deltas = receive_deltas(epoch, ref_units, arrivals);
    let mut next = 0;
    for seq in first..=last {
        let symbol = match arrivals.get(next) {
            Some(&(s, _)) if s == seq => {
                next += 1;
                deltas.next().map_or(LARGE_DELTA, symbol_of)
            }
            _ => NOT_RECEIVED,
        };
        run = match run {
            Some((s, n)) if s == symbol && n < MAX_RUN => Some((s, n + 1)),
            Some(done) => {
                push_run(buf, done);
                Some((symbol, 1))
            }
            None => Some((symbol, 1)),
        };
    }
    if let Some(done) = run {
        push_run(buf, done);
    }
    for units in receive_deltas(epoch, ref_units, &arrivals[..next]) {
        if symbol_of(units) == SMALL_DELTA {
            buf.push(units as u8);
        } else {
            let units = units.clamp(i64::from(i16::MIN), i64::from(i16::MAX)) as i16;
            buf.extend_from_slice(&units.to_be_bytes());
        }
    }
    let padding = (4 - (buf.len() - start) % 4) % 4;
    if padding > 0 {
        // Zeros, then the padding's length in its last byte.
        buf.resize(buf.len() + padding - 1, 0);
        buf.push(padding as u8);
        buf[start] |= 0x20;
    }
    let words = ((buf.len() - start) / 4 - 1) as u16;
    buf[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
    Some(next)
}

/// Each arrival's receive delta in 250 µs units: from the reference time for the first, from
/// the previous one (as rounded) for the others.
fn receive_deltas(
    epoch: Instant,
    ref_units: u32,
    arrivals: &[(u64, Instant)],
) -> impl Iterator<Item = i64> + '_ {
    let mut prev_us = i64::from(ref_units) * 64_000;
    arrivals.iter().map(move |&(_, at)| {
        let us = at.duration_since(epoch).as_micros() as i64;
        let units = (us - prev_us) / 250;
        prev_us += units * 250;
        units
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{read_rtp, write_rtp, OutExt, RtpHeader, VideoProfile, VideoSource};
    use rand::{Rng, SeedableRng};
    use rtcp::transport_feedbacks::transport_layer_cc::{
        PacketStatusChunk, RecvDelta, RunLengthChunk, StatusChunkTypeTcc, SymbolTypeTcc,
        TransportLayerCc,
    };

    fn feed(r: &mut Receiver, seqs: &[u16], now: Instant) {
        let mut src = VideoSource::new(1, VideoProfile::camera(1), now);
        let payload = src.poll(now).remove(0).payload;
        let mut buf = Vec::new();
        for (i, &seq) in seqs.iter().enumerate() {
            write_rtp(
                &mut buf,
                RtpHeader {
                    pt: 96,
                    marker: false,
                    seq,
                    timestamp: 0,
                    ssrc: 42,
                },
                OutExt {
                    twcc: Some((3, i as u16)),
                    ..Default::default()
                },
                &payload,
            );
            let p = read_rtp(&buf, Some(3)).unwrap();
            r.handle_rtp(
                p,
                now + Duration::from_millis(i as u64),
                crate::media::unix_micros(),
            );
        }
    }

    /// A packet older than the first one received (it was overtaken) opens the stream
    /// earlier; it used to underflow the loss counters.
    #[test]
    fn hot_lines_name_the_state_the_next_packet_of_a_stream_uses() {
        let now = Instant::now();
        let mut r = Receiver::new(true, now);
        let [counters, seen, ..] = r.hot_lines(42);
        assert_eq!((counters, seen), ((0, 0), (0, 0)), "no stream yet");
        feed(&mut r, &[100, 127], now);
        let [counters, seen, arrivals, delays] = r.hot_lines(42);
        let s = &r.streams[0].1;
        let start = std::ptr::from_ref(s) as usize;
        assert_eq!(counters.0, start);
        // Everything but the window, which is last.
        let max = std::ptr::from_ref(&s.max) as usize;
        let received = std::ptr::from_ref(&s.received) as usize;
        assert!(max < start + counters.1 && received < start + counters.1);
        assert_eq!(counters.1 + size_of_val(&s.seen), size_of::<Stream>());
        // 128 is the next sequence number: bit 0 of word 2.
        assert_eq!(seen, (std::ptr::from_ref(&s.seen[2]) as usize, 8));
        assert_eq!(arrivals.0, r.twcc_arrivals.as_ptr_range().end as usize);
        assert_eq!(delays.0, r.pending.delays_us.as_ptr_range().end as usize);
    }

    #[test]
    fn a_packet_older_than_the_first_extends_the_stream_back() {
        let now = Instant::now();
        let mut r = Receiver::new(true, now);
        feed(&mut r, &[10, 7, 11, 9], now);
        let c = r.pending.counters;
        assert_eq!(c.expected, 5, "7..=11: {c:?}");
        assert_eq!(c.rx_packets, 4, "{c:?}");
        assert_eq!(c.net_lost(), 1, "8 never came: {c:?}");
        assert_eq!((c.lost, c.reordered, c.duplicates), (3, 2, 0), "{c:?}");
        feed(&mut r, &[8, 7], now);
        let c = r.pending.counters;
        assert_eq!((c.expected, c.net_lost(), c.duplicates), (5, 0, 1), "{c:?}");
    }

    #[test]
    fn loss_duplicates_reordering_and_wraparound() {
        let now = Instant::now();
        let mut r = Receiver::new(true, now);
        // 65534, 65535, (0 lost), 1, 1 again, 3, 2 late.
        feed(&mut r, &[65534, 65535, 1, 1, 3, 2], now);
        let c = r.pending.counters;
        assert_eq!(c.expected, 6, "{c:?}");
        assert_eq!(c.lost, 2, "gaps opened: {c:?}");
        assert_eq!(c.net_lost(), 1, "{c:?}");
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.recovered, 1, "2 was nacked, then arrived");
        assert_eq!(c.rx_packets, 5);
        let mut rtcp = RtcpPackets::default();
        r.poll_rtcp(now + Duration::from_secs(2), &mut rtcp);
        let parsed: Vec<_> = rtcp
            .iter()
            .flat_map(|b| edge_node::transport::parse::parse_rtcp(b).unwrap())
            .collect();
        let nack = parsed
            .iter()
            .find_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
            .unwrap();
        assert_eq!(nack.nacks[0].packet_id, 0);
        let twcc = parsed
            .iter()
            .find_map(|p| p.as_any().downcast_ref::<TransportLayerCc>())
            .unwrap();
        assert_eq!(twcc.packet_status_count, 6);
        assert!(parsed
            .iter()
            .any(|p| p.as_any().downcast_ref::<ReceiverReport>().is_some()));
    }

    /// The same feedback built with the rtcp crate's types and marshal (what the load tester
    /// sent before it wrote the packet itself): the reference for [`write_twcc`].
    fn twcc_by_rtcp_crate(
        header: TwccHeader,
        epoch: Instant,
        arrivals: &[(u64, Instant)],
    ) -> (Vec<u8>, usize) {
        let (first, first_at) = arrivals[0];
        let last = arrivals[arrivals.len() - 1].0.min(first + TWCC_MAX_SPAN);
        let ref_units = (first_at.duration_since(epoch).as_micros() / 64_000) as u32 & 0x00ff_ffff;
        let mut prev_us = i64::from(ref_units) * 64_000;
        let (mut chunks, mut deltas) = (Vec::new(), Vec::new());
        let mut run: Option<(SymbolTypeTcc, u16)> = None;
        let push_run = |chunks: &mut Vec<PacketStatusChunk>, sym, n| {
            chunks.push(PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                packet_status_symbol: sym,
                run_length: n,
            }));
        };
        let mut next = 0;
        for seq in first..=last {
            let sym = match arrivals.get(next) {
                Some(&(s, at)) if s == seq => {
                    next += 1;
                    let us = at.duration_since(epoch).as_micros() as i64;
                    let units = (us - prev_us) / 250;
                    prev_us += units * 250;
                    let sym = if (0..=255).contains(&units) {
                        SymbolTypeTcc::PacketReceivedSmallDelta
                    } else {
                        SymbolTypeTcc::PacketReceivedLargeDelta
                    };
                    deltas.push(RecvDelta {
                        type_tcc_packet: sym,
                        delta: units.clamp(i64::from(i16::MIN), i64::from(i16::MAX)) * 250,
                    });
                    sym
                }
                _ => SymbolTypeTcc::PacketNotReceived,
            };
            run = match run {
                Some((s, n)) if s == sym && n < 8191 => Some((s, n + 1)),
                Some((s, n)) => {
                    push_run(&mut chunks, s, n);
                    Some((sym, 1))
                }
                None => Some((sym, 1)),
            };
        }
        if let Some((s, n)) = run {
            push_run(&mut chunks, s, n);
        }
        let fb = TransportLayerCc {
            sender_ssrc: header.sender_ssrc,
            media_ssrc: header.media_ssrc,
            base_sequence_number: first as u16,
            packet_status_count: (last - first + 1) as u16,
            reference_time: ref_units,
            fb_pkt_count: header.fb_pkt_count,
            packet_chunks: chunks,
            recv_deltas: deltas,
        };
        (fb.marshal().unwrap().to_vec(), next)
    }

    /// Random arrival sets (loss runs, reordered and late arrivals, gaps past the one-byte
    /// delta and past what two bytes hold, spans past one feedback's limit): the packet written
    /// directly is the one the rtcp crate builds, byte for byte, and parses back.
    #[test]
    fn transport_feedback_is_byte_for_byte_what_the_rtcp_crate_builds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let epoch = Instant::now();
        let mut out = RtcpPackets::default();
        out.push(&[0x81, 201, 0, 1, 0, 0, 0, 9]);
        let mut large = 0;
        for case in 0..400 {
            let mut seq = rng.gen_range(0..70_000u64);
            let mut at = epoch + Duration::from_millis(rng.gen_range(0..100_000));
            let mut arrivals = Vec::new();
            let n = if case % 50 == 0 {
                3000
            } else {
                rng.gen_range(1..200)
            };
            for _ in 0..n {
                arrivals.push((seq, at));
                seq += match rng.gen_range(0..20) {
                    0 => rng.gen_range(2..40),
                    1 if case % 50 == 0 => 9000,
                    _ => 1,
                };
                at = match rng.gen_range(0..30) {
                    0 => at + Duration::from_millis(rng.gen_range(64..10_000)),
                    1 => at
                        .checked_sub(Duration::from_millis(rng.gen_range(1..90)))
                        .unwrap_or(at),
                    _ => at + Duration::from_micros(rng.gen_range(0..3_000)),
                };
            }
            let header = TwccHeader {
                sender_ssrc: rng.gen(),
                media_ssrc: rng.gen(),
                fb_pkt_count: rng.gen(),
            };
            let (want, want_covered) = twcc_by_rtcp_crate(header, epoch, &arrivals);
            let before = out.bytes.len();
            let covered = write_twcc(&mut out.bytes, header, epoch, &arrivals).unwrap();
            out.ends.push(out.bytes.len());
            assert_eq!(&out.bytes[before..], &want[..], "case {case}");
            assert_eq!(covered, want_covered, "case {case}");
            let parsed =
                edge_node::transport::parse::parse_rtcp(out.iter().last().unwrap()).unwrap();
            let fb = parsed[0]
                .as_any()
                .downcast_ref::<TransportLayerCc>()
                .unwrap();
            assert_eq!(fb.recv_deltas.len(), covered, "case {case}");
            large += fb
                .recv_deltas
                .iter()
                .filter(|d| d.delta.abs() > 63_750)
                .count();
        }
        assert!(large > 100, "the cases must reach two-byte deltas: {large}");
        assert_eq!(out.len(), 401);
        assert_eq!(out.iter().next(), Some(&[0x81, 201, 0, 1, 0, 0, 0, 9][..]));
        assert!(write_twcc(
            &mut out.bytes,
            TwccHeader {
                sender_ssrc: 1,
                media_ssrc: 2,
                fb_pkt_count: 0
            },
            epoch,
            &[]
        )
        .is_none());
    }
}
