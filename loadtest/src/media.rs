//! Synthetic media with a realistic shape, and the probe every payload carries.
//!
//! Why synthetic: the edge never decodes media, so what costs it work is the packet pattern
//! (rate, sizes, bursts, keyframes, header extensions), not the pixels. Each source here produces
//! that pattern:
//!
//! - audio: Opus-like, one packet per 20 ms (50 pkt/s), with the audio-level extension
//!   (RFC 6464). Talking phases send ~80-byte payloads with the voice-activity bit and a loud
//!   level; silent phases send small payloads at level 127 (silence), as Opus with DTX off does.
//! - video: VP8, 30 fps, one to three simulcast layers (about 150, 500 and 1,500 kbit/s),
//!   packets up to [`MAX_PAYLOAD`], a keyframe (4x a delta frame) every
//!   [`VideoProfile::keyframe_interval`] and whenever a keyframe is requested (PLI/FIR). Each
//!   packet starts with a VP8 payload descriptor (RFC 7741 §4.2) with a 15-bit PictureID and
//!   TL0PICIDX, so the edge's keyframe detection and picture-id rewriting work as for a browser.
//! - screen share: one layer, low frame rate, large keyframes.
//!
//! Every payload then carries a [`Probe`]: sender id, stream id, sequence and send time (unix
//! microseconds). Receivers on the same host compute one-way delay through the server exactly.
//!
//! Sans-IO: [`AudioSource`] and [`VideoSource`] are fed `now` and return packets; the caller
//! encrypts and sends. Nothing here reads a clock or touches a socket.

use std::time::{Duration, Instant};

/// Largest RTP payload we put in a packet: 1,200-byte packets as libwebrtc sends them, minus
/// RTP header, extensions and SRTP tag.
pub const MAX_PAYLOAD: usize = 1100;

/// The probe's magic: "KL".
const PROBE_MAGIC: u16 = 0x4b4c;
/// Bytes of a serialized [`Probe`].
pub const PROBE_LEN: usize = 20;
/// VP8 payload descriptor we write (X, I (15-bit), L = 5 bytes), then the 10 bytes of a VP8
/// keyframe header (RFC 6386 §9.1: 3-byte frame tag, start code `9d 01 2a`, width, height).
/// Janus reads the start code to tell keyframes (and switches simulcast layers only on them);
/// delta frames keep the same room, zeroed but for the frame tag's P bit.
pub const VP8_PREFIX_LEN: usize = 15;
/// Picture size per simulcast layer, written into keyframe headers.
const LAYER_SIZE: [(u16, u16); 3] = [(320, 180), (640, 360), (1280, 720)];

/// What a receiver learns from each payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Sending participant (index in the run).
    pub sender: u32,
    /// 0 = audio, 1..=3 = video layer + 1, 4 = screen.
    pub stream: u8,
    /// First packet of a keyframe.
    pub keyframe: bool,
    /// Per-stream sequence of the sender (not the RTP one, which the edge rewrites).
    pub seq: u32,
    /// Unix time in microseconds when the packet left the sender.
    pub sent_us: u64,
}

impl Probe {
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&PROBE_MAGIC.to_be_bytes());
        out[2] = self.stream;
        out[3] = u8::from(self.keyframe);
        out[4..8].copy_from_slice(&self.sender.to_be_bytes());
        out[8..12].copy_from_slice(&self.seq.to_be_bytes());
        out[12..20].copy_from_slice(&self.sent_us.to_be_bytes());
    }

    /// Finds the probe in an RTP payload: at offset 0 (audio) or after the VP8 prefix.
    pub fn find(payload: &[u8]) -> Option<Probe> {
        [0, VP8_PREFIX_LEN]
            .iter()
            .find_map(|&at| Self::read(payload.get(at..at + PROBE_LEN)?))
    }

    fn read(b: &[u8]) -> Option<Probe> {
        if u16::from_be_bytes([b[0], b[1]]) != PROBE_MAGIC || b[2] > 4 {
            return None;
        }
        Some(Probe {
            stream: b[2],
            keyframe: b[3] != 0,
            sender: u32::from_be_bytes(b[4..8].try_into().ok()?),
            seq: u32::from_be_bytes(b[8..12].try_into().ok()?),
            sent_us: u64::from_be_bytes(b[12..20].try_into().ok()?),
        })
    }
}

/// Unix time in microseconds: the clock probes are stamped with (same host, so exact).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One RTP packet ready for SRTP, and what it was.
#[derive(Debug, Clone)]
pub struct OutPacket {
    /// Index of the stream within the source: audio 0; video layer 0..=2.
    pub layer: u8,
    pub marker: bool,
    pub timestamp: u32,
    pub audio_level: Option<u8>,
    pub payload: Vec<u8>,
}

/// Opus-like audio with talk and silence phases.
#[derive(Debug)]
pub struct AudioSource {
    sender: u32,
    next: Instant,
    seq: u32,
    timestamp: u32,
    talking: bool,
    phase_ends: Instant,
}

/// Opus frame: 20 ms, 960 samples at 48 kHz.
pub const AUDIO_FRAME: Duration = Duration::from_millis(20);

impl AudioSource {
    pub fn new(sender: u32, now: Instant) -> Self {
        Self {
            sender,
            next: now,
            seq: 0,
            timestamp: rand::random(),
            talking: rand::random::<bool>(),
            phase_ends: now + phase_length(),
        }
    }

    /// When the next packet is due.
    pub fn next_due(&self) -> Instant {
        self.next
    }

    /// The packet due at `next_due`; `now` stamps the probe.
    pub fn poll(&mut self, now: Instant) -> OutPacket {
        if now >= self.phase_ends {
            self.talking = !self.talking;
            self.phase_ends = now + phase_length();
        }
        // ~32 kbit/s while talking, comfort-noise sized while silent.
        let len = if self.talking { 80 } else { PROBE_LEN + 4 };
        let mut payload = vec![0u8; len];
        Probe {
            sender: self.sender,
            stream: 0,
            keyframe: false,
            seq: self.seq,
            sent_us: unix_micros(),
        }
        .write(&mut payload);
        let pkt = OutPacket {
            layer: 0,
            marker: false,
            timestamp: self.timestamp,
            // RFC 6464: V bit (voice activity) and level in -dBov (127 = silence).
            audio_level: Some(if self.talking { 0x80 | 25 } else { 127 }),
            payload,
        };
        self.seq = self.seq.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(960);
        self.next += AUDIO_FRAME;
        pkt
    }
}

/// Talk and silence phases last 2 to 8 s.
fn phase_length() -> Duration {
    Duration::from_millis(2000 + rand::random::<u64>() % 6000)
}

/// How a video source sends.
#[derive(Debug, Clone, Copy)]
pub struct VideoProfile {
    pub fps: u32,
    /// Bitrate of each layer, lowest first; its length is the number of layers (1..=3).
    pub layer_kbps: [u32; 3],
    pub layers: u8,
    /// A keyframe on every layer this often, besides those requested.
    pub keyframe_interval: Duration,
    /// Keyframe size as a multiple of a delta frame.
    pub keyframe_factor: u32,
    /// Screen share: stream id 4 in probes.
    pub screen: bool,
}

impl VideoProfile {
    /// Camera simulcast: ~150 / 500 / 1,500 kbit/s at 30 fps, keyframe every 3 s.
    pub fn camera(layers: u8) -> Self {
        Self {
            fps: 30,
            layer_kbps: [150, 500, 1500],
            layers: layers.clamp(1, 3),
            keyframe_interval: Duration::from_secs(3),
            keyframe_factor: 4,
            screen: false,
        }
    }

    /// Screen share: one layer, 5 fps, 800 kbit/s, big keyframes every 10 s.
    pub fn screen() -> Self {
        Self {
            fps: 5,
            layer_kbps: [800, 0, 0],
            layers: 1,
            keyframe_interval: Duration::from_secs(10),
            keyframe_factor: 8,
            screen: true,
        }
    }
}

#[derive(Debug)]
struct LayerState {
    seq: u32,
    picture_id: u16,
    tl0: u8,
    keyframe_requested: bool,
    last_keyframe: Option<Instant>,
}

/// Simulcast VP8-shaped video.
#[derive(Debug)]
pub struct VideoSource {
    sender: u32,
    profile: VideoProfile,
    next: Instant,
    timestamp: u32,
    layers: Vec<LayerState>,
}

impl VideoSource {
    pub fn new(sender: u32, profile: VideoProfile, now: Instant) -> Self {
        let layers = (0..profile.layers)
            .map(|_| LayerState {
                seq: 0,
                picture_id: rand::random::<u16>() & 0x7fff,
                tl0: rand::random(),
                keyframe_requested: true,
                last_keyframe: None,
            })
            .collect();
        Self {
            sender,
            profile,
            next: now,
            timestamp: rand::random(),
            layers,
        }
    }

    pub fn next_due(&self) -> Instant {
        self.next
    }

    pub fn layers(&self) -> u8 {
        self.profile.layers
    }

    /// A keyframe was asked for (PLI/FIR) on `layer`.
    pub fn request_keyframe(&mut self, layer: u8) {
        if let Some(l) = self.layers.get_mut(usize::from(layer)) {
            l.keyframe_requested = true;
        }
    }

    /// The packets of the frame due at `next_due`, all layers, each layer's packets in order.
    pub fn poll(&mut self, now: Instant) -> Vec<OutPacket> {
        let mut out = Vec::new();
        let fps = self.profile.fps.max(1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let keyframe = layer.keyframe_requested
                || layer
                    .last_keyframe
                    .is_none_or(|t| now.duration_since(t) >= self.profile.keyframe_interval);
            if keyframe {
                layer.keyframe_requested = false;
                layer.last_keyframe = Some(now);
            }
            let delta_bytes = (self.profile.layer_kbps[i] as usize * 1000 / 8) / fps as usize;
            let frame_bytes = if keyframe {
                delta_bytes * self.profile.keyframe_factor as usize
            } else {
                delta_bytes
            };
            let per_packet = MAX_PAYLOAD - VP8_PREFIX_LEN - PROBE_LEN;
            let packets = frame_bytes.div_ceil(per_packet).max(1);
            let body = frame_bytes.div_ceil(packets).max(1);
            let stream = if self.profile.screen { 4 } else { i as u8 + 1 };
            let sent_us = unix_micros();
            for p in 0..packets {
                let mut payload = vec![0u8; VP8_PREFIX_LEN + PROBE_LEN + body];
                // RFC 7741 §4.2: X=1, S on the first packet, PID 0; I (M=1, 15 bits) and L.
                payload[0] = if p == 0 { 0x90 } else { 0x80 };
                payload[1] = 0xc0;
                payload[2] = 0x80 | (layer.picture_id >> 8) as u8;
                payload[3] = layer.picture_id as u8;
                payload[4] = layer.tl0;
                // VP8 payload header (RFC 7741 §4.3): P bit 0 = keyframe; a keyframe's first
                // packet carries the start code and picture size (RFC 6386 §9.1).
                payload[5] = if keyframe { 0x10 } else { 0x11 };
                if keyframe && p == 0 {
                    let (w, h) = LAYER_SIZE[i.min(2)];
                    payload[8..11].copy_from_slice(&[0x9d, 0x01, 0x2a]);
                    payload[11..13].copy_from_slice(&w.to_le_bytes());
                    payload[13..15].copy_from_slice(&h.to_le_bytes());
                }
                Probe {
                    sender: self.sender,
                    stream,
                    keyframe: keyframe && p == 0,
                    seq: layer.seq,
                    sent_us,
                }
                .write(&mut payload[VP8_PREFIX_LEN..]);
                layer.seq = layer.seq.wrapping_add(1);
                out.push(OutPacket {
                    layer: i as u8,
                    marker: p + 1 == packets,
                    timestamp: self.timestamp,
                    audio_level: None,
                    payload,
                });
            }
            layer.picture_id = (layer.picture_id + 1) & 0x7fff;
            layer.tl0 = layer.tl0.wrapping_add(1);
        }
        self.timestamp = self.timestamp.wrapping_add(90_000 / fps);
        self.next += Duration::from_secs(1) / fps;
        out
    }
}

/// Header extensions written on an outgoing packet.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutExt<'a> {
    pub audio_level: Option<(u8, u8)>,
    pub twcc: Option<(u8, u16)>,
    pub mid: Option<(u8, &'a str)>,
    pub rid: Option<(u8, &'a str)>,
}

/// The fixed RTP header fields of an outgoing packet (RFC 3550 §5.1).
#[derive(Debug, Clone, Copy)]
pub struct RtpHeader {
    pub pt: u8,
    pub marker: bool,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

/// Writes an RTP packet (RFC 3550 §5.1) with one-byte header extensions (RFC 8285 §4.2).
pub fn write_rtp(out: &mut Vec<u8>, h: RtpHeader, ext: OutExt<'_>, payload: &[u8]) {
    out.clear();
    out.extend_from_slice(&[0x90, (u8::from(h.marker) << 7) | h.pt]);
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.timestamp.to_be_bytes());
    out.extend_from_slice(&h.ssrc.to_be_bytes());
    out.extend_from_slice(&[0xbe, 0xde, 0, 0]);
    let start = out.len();
    let mut put = |id: u8, data: &[u8]| {
        out.push((id << 4) | (data.len() as u8 - 1));
        out.extend_from_slice(data);
    };
    if let Some((id, level)) = ext.audio_level {
        put(id, &[level]);
    }
    if let Some((id, s)) = ext.twcc {
        put(id, &s.to_be_bytes());
    }
    if let Some((id, mid)) = ext.mid {
        put(id, mid.as_bytes());
    }
    if let Some((id, rid)) = ext.rid {
        put(id, rid.as_bytes());
    }
    while !(out.len() - start).is_multiple_of(4) {
        out.push(0);
    }
    let words = ((out.len() - start) / 4) as u16;
    out[start - 2..start].copy_from_slice(&words.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The fields of a received RTP packet a receiver uses.
#[derive(Debug, Clone, Copy)]
pub struct InRtp<'a> {
    pub pt: u8,
    pub seq: u16,
    pub ssrc: u32,
    pub twcc: Option<u16>,
    pub payload: &'a [u8],
}

/// Parses a decrypted RTP packet; `None` if malformed. Reads the transport-wide sequence
/// number extension (one- or two-byte form) when `twcc_id` is given.
pub fn read_rtp(buf: &[u8], twcc_id: Option<u8>) -> Option<InRtp<'_>> {
    if buf.len() < 12 || buf[0] >> 6 != 2 {
        return None;
    }
    let cc = usize::from(buf[0] & 0x0f);
    let mut pos = 12 + 4 * cc;
    let mut twcc = None;
    if buf[0] & 0x10 != 0 {
        let hdr = buf.get(pos..pos + 4)?;
        let profile = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = 4 * usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        let block = buf.get(pos + 4..pos + 4 + len)?;
        pos += 4 + len;
        if let Some(want) = twcc_id {
            twcc = find_ext(profile, block, want)
                .and_then(|d| Some(u16::from_be_bytes(d.get(..2)?.try_into().ok()?)));
        }
    }
    let mut end = buf.len();
    if buf[0] & 0x20 != 0 {
        end = end.checked_sub(usize::from(*buf.last()?))?;
    }
    Some(InRtp {
        pt: buf[1] & 0x7f,
        seq: u16::from_be_bytes([buf[2], buf[3]]),
        ssrc: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        twcc,
        payload: buf.get(pos..end)?,
    })
}

fn find_ext(profile: u16, mut block: &[u8], want: u8) -> Option<&[u8]> {
    let two_byte = profile & 0xfff0 == 0x1000;
    if profile != 0xbede && !two_byte {
        return None;
    }
    while let Some(&b) = block.first() {
        if b == 0 {
            block = &block[1..];
            continue;
        }
        let (id, len, hdr) = if two_byte {
            (b, usize::from(*block.get(1)?), 2)
        } else {
            if b >> 4 == 15 {
                return None;
            }
            (b >> 4, usize::from(b & 0x0f) + 1, 1)
        };
        let data = block.get(hdr..hdr + len)?;
        if id == want {
            return Some(data);
        }
        block = &block[hdr + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_round_trip_with_extensions_and_probe() {
        let now = Instant::now();
        let mut v = VideoSource::new(7, VideoProfile::camera(3), now);
        let frame = v.poll(now);
        // First frame is a keyframe on all three layers; the top layer spans several packets.
        assert!(frame.iter().filter(|p| p.layer == 2).count() > 3);
        let first = &frame[0];
        assert!(kcs_media::codec::is_keyframe(
            kcs_media::codec::VideoCodec::Vp8,
            &first.payload
        ));
        let mut buf = Vec::new();
        write_rtp(
            &mut buf,
            RtpHeader {
                pt: 96,
                marker: first.marker,
                seq: 40000,
                timestamp: first.timestamp,
                ssrc: 0xabcd,
            },
            OutExt {
                twcc: Some((3, 513)),
                mid: Some((4, "1")),
                rid: Some((10, "q")),
                ..Default::default()
            },
            &first.payload,
        );
        let r = read_rtp(&buf, Some(3)).unwrap();
        assert_eq!(
            (r.pt, r.seq, r.ssrc, r.twcc),
            (96, 40000, 0xabcd, Some(513))
        );
        let p = Probe::find(r.payload).unwrap();
        assert_eq!((p.sender, p.stream, p.keyframe, p.seq), (7, 1, true, 0));
        // The next frame is a delta frame.
        let next = v.poll(v.next_due());
        assert!(!kcs_media::codec::is_keyframe(
            kcs_media::codec::VideoCodec::Vp8,
            &next[0].payload
        ));
        v.request_keyframe(1);
        let third = v.poll(v.next_due());
        let l1 = third.iter().find(|p| p.layer == 1).unwrap();
        assert!(Probe::find(&l1.payload).unwrap().keyframe);
    }

    #[test]
    fn audio_is_fifty_packets_per_second_with_level() {
        let now = Instant::now();
        let mut a = AudioSource::new(1, now);
        let mut n = 0;
        while a.next_due() < now + Duration::from_secs(1) {
            let p = a.poll(a.next_due());
            assert!(p.audio_level.is_some());
            assert_eq!(Probe::find(&p.payload).unwrap().stream, 0);
            n += 1;
        }
        assert_eq!(n, 50);
    }

    #[test]
    fn garbage_is_not_a_probe_or_rtp() {
        assert!(Probe::find(&[0u8; 40]).is_none());
        assert!(read_rtp(&[0x80; 5], None).is_none());
        assert!(read_rtp(
            &[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xbe, 0xde, 0, 9],
            Some(3)
        )
        .is_none());
    }
}
