//! Zero-copy RTP header view and writer for the forwarding path.
//!
//! The `rtp` crate's `Header` allocates a `Vec` of extensions per packet; on the per-packet path
//! we only need a handful of fields and the ids of a few header extensions, so we read them in
//! place (RFC 3550 §5.1, RFC 8285 one- and two-byte extension headers) and write outgoing headers
//! straight into the send buffer.

/// Longest header we emit: 12 fixed + 4 extension header + room for a few extensions.
pub const MAX_OUT_HEADER: usize = 12 + 4 + 32;

/// A parsed view of an RTP packet. Borrowed from the packet buffer, nothing copied.
#[derive(Debug, Clone, Copy)]
pub struct RtpView<'a> {
    buf: &'a [u8],
    pub marker: bool,
    pub payload_type: u8,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// The extension block (without its 4-byte header), if any, and its profile.
    ext: Option<(u16, &'a [u8])>,
    payload_start: usize,
    payload_end: usize,
}

/// Why a datagram is not a usable RTP packet. Counted by the caller, never bubbled up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    #[error("shorter than an RTP header")]
    TooShort,
    #[error("RTP version is not 2")]
    BadVersion,
    #[error("CSRC list, extension or padding runs past the end")]
    Truncated,
}

impl<'a> RtpView<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Self, RtpError> {
        if buf.len() < 12 {
            return Err(RtpError::TooShort);
        }
        if buf[0] >> 6 != 2 {
            return Err(RtpError::BadVersion);
        }
        let padding = buf[0] & 0x20 != 0;
        let has_ext = buf[0] & 0x10 != 0;
        let cc = (buf[0] & 0x0f) as usize;
        let mut pos = 12 + 4 * cc;
        if buf.len() < pos {
            return Err(RtpError::Truncated);
        }
        let mut ext = None;
        if has_ext {
            if buf.len() < pos + 4 {
                return Err(RtpError::Truncated);
            }
            let profile = u16::from_be_bytes([buf[pos], buf[pos + 1]]);
            let words = u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize;
            let start = pos + 4;
            let end = start + 4 * words;
            if buf.len() < end {
                return Err(RtpError::Truncated);
            }
            ext = Some((profile, &buf[start..end]));
            pos = end;
        }
        let mut end = buf.len();
        if padding {
            let pad = buf[buf.len() - 1] as usize;
            if pad == 0 || pos + pad > end {
                return Err(RtpError::Truncated);
            }
            end -= pad;
        }
        Ok(Self {
            buf,
            marker: buf[1] & 0x80 != 0,
            payload_type: buf[1] & 0x7f,
            seq: u16::from_be_bytes([buf[2], buf[3]]),
            timestamp: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            ssrc: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
            ext,
            payload_start: pos,
            payload_end: end,
        })
    }

    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.payload_start..self.payload_end]
    }

    /// The whole packet this view was parsed from.
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// The value of header extension `id` (RFC 8285 §4.2 one-byte or §4.3 two-byte form).
    pub fn extension(&self, id: u8) -> Option<&'a [u8]> {
        let (profile, mut data) = self.ext?;
        if id == 0 {
            return None;
        }
        match profile {
            0xBEDE => {
                while let Some((&b, rest)) = data.split_first() {
                    if b == 0 {
                        data = rest; // padding
                        continue;
                    }
                    let eid = b >> 4;
                    if eid == 15 {
                        return None; // reserved: stop parsing (RFC 8285 §4.2)
                    }
                    let len = (b & 0x0f) as usize + 1;
                    if rest.len() < len {
                        return None;
                    }
                    if eid == id {
                        return Some(&rest[..len]);
                    }
                    data = &rest[len..];
                }
                None
            }
            p if p >> 4 == 0x100 => {
                while data.len() >= 2 {
                    let (eid, len) = (data[0], data[1] as usize);
                    if eid == 0 {
                        data = &data[1..];
                        continue;
                    }
                    if data.len() < 2 + len {
                        return None;
                    }
                    if eid == id {
                        return Some(&data[2..2 + len]);
                    }
                    data = &data[2 + len..];
                }
                None
            }
            _ => None,
        }
    }
}

/// Header extensions to put on an outgoing packet, with the subscriber's negotiated ids.
#[derive(Debug, Default, Clone, Copy)]
pub struct OutExtensions<'a> {
    /// abs-send-time: 24-bit 6.18 fixed-point seconds.
    pub abs_send_time: Option<(u8, u32)>,
    /// transport-wide sequence number.
    pub transport_cc: Option<(u8, u16)>,
    /// ssrc-audio-level byte (V bit + level).
    pub audio_level: Option<(u8, u8)>,
    /// mid (for WHEP and our subscriber PC: lets the client map the stream before SSRC signalling).
    pub mid: Option<(u8, &'a [u8])>,
}

/// Writes a 12-byte RTP header plus one-byte-form extensions into `out`, returning its length.
/// `out` must hold at least [`MAX_OUT_HEADER`] bytes.
pub fn write_header(
    out: &mut [u8],
    marker: bool,
    payload_type: u8,
    seq: u16,
    timestamp: u32,
    ssrc: u32,
    ext: &OutExtensions<'_>,
) -> usize {
    out[0] = 0x80;
    out[1] = (u8::from(marker) << 7) | (payload_type & 0x7f);
    out[2..4].copy_from_slice(&seq.to_be_bytes());
    out[4..8].copy_from_slice(&timestamp.to_be_bytes());
    out[8..12].copy_from_slice(&ssrc.to_be_bytes());
    let mut pos = 16;
    let mut put = |id: u8, val: &[u8], pos: &mut usize| {
        // One-byte form: ids 1..=14, 1..=16 bytes.
        if !(1..=14).contains(&id) || val.is_empty() || val.len() > 16 {
            return;
        }
        out[*pos] = (id << 4) | (val.len() as u8 - 1);
        out[*pos + 1..*pos + 1 + val.len()].copy_from_slice(val);
        *pos += 1 + val.len();
    };
    if let Some((id, v)) = ext.abs_send_time {
        put(id, &v.to_be_bytes()[1..], &mut pos);
    }
    if let Some((id, v)) = ext.transport_cc {
        put(id, &v.to_be_bytes(), &mut pos);
    }
    if let Some((id, v)) = ext.audio_level {
        put(id, &[v], &mut pos);
    }
    if let Some((id, v)) = ext.mid {
        if v.len() <= 16 {
            put(id, v, &mut pos);
        }
    }
    if pos == 16 {
        return 12;
    }
    while (pos - 16) % 4 != 0 {
        out[pos] = 0;
        pos += 1;
    }
    out[0] |= 0x10;
    out[12..14].copy_from_slice(&0xBEDEu16.to_be_bytes());
    out[14..16].copy_from_slice(&(((pos - 16) / 4) as u16).to_be_bytes());
    pos
}

/// abs-send-time value (6.18 fixed point seconds, 24 bits) for a time in microseconds.
pub fn abs_send_time(micros: u64) -> u32 {
    (((micros << 18) / 1_000_000) & 0x00ff_ffff) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_with(ext: &OutExtensions<'_>, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_OUT_HEADER + payload.len()];
        let n = write_header(&mut buf, true, 96, 65535, 0xdead_beef, 42, ext);
        buf.truncate(n);
        buf.extend_from_slice(payload);
        buf
    }

    #[test]
    fn written_headers_parse_back_with_extensions() {
        let ext = OutExtensions {
            abs_send_time: Some((3, 0x123456)),
            transport_cc: Some((5, 0xabcd)),
            audio_level: Some((1, 0x85)),
            mid: Some((4, b"0")),
        };
        let pkt = packet_with(&ext, b"hello");
        let v = RtpView::parse(&pkt).unwrap();
        assert!(v.marker);
        assert_eq!(
            (v.payload_type, v.seq, v.timestamp, v.ssrc),
            (96, 65535, 0xdead_beef, 42)
        );
        assert_eq!(v.extension(3), Some(&[0x12, 0x34, 0x56][..]));
        assert_eq!(v.extension(5), Some(&[0xab, 0xcd][..]));
        assert_eq!(v.extension(1), Some(&[0x85][..]));
        assert_eq!(v.extension(4), Some(&b"0"[..]));
        assert_eq!(v.extension(7), None);
        assert_eq!(v.payload(), b"hello");
        // Cross-check with the rtp crate.
        use webrtc_util::Unmarshal;
        let mut b = &pkt[..];
        let p = rtp::packet::Packet::unmarshal(&mut b).unwrap();
        assert_eq!(p.header.sequence_number, 65535);
        assert_eq!(p.header.get_extension(5).unwrap().as_ref(), &[0xab, 0xcd]);
        assert_eq!(&p.payload[..], b"hello");
    }

    #[test]
    fn no_extensions_gives_plain_header() {
        let pkt = packet_with(&OutExtensions::default(), b"x");
        assert_eq!(pkt.len(), 13);
        assert_eq!(pkt[0], 0x80);
        assert_eq!(RtpView::parse(&pkt).unwrap().payload(), b"x");
    }

    #[test]
    fn hostile_packets_never_panic() {
        let ext = OutExtensions {
            transport_cc: Some((5, 1)),
            ..Default::default()
        };
        let pkt = packet_with(&ext, b"payload");
        for n in 0..pkt.len() {
            let _ = RtpView::parse(&pkt[..n]).map(|v| (v.extension(5), v.payload().len()));
        }
        // Padding longer than the packet.
        let mut bad = pkt.clone();
        bad[0] |= 0x20;
        *bad.last_mut().unwrap() = 200;
        assert_eq!(RtpView::parse(&bad).unwrap_err(), RtpError::Truncated);
        // CSRC count past the end.
        let mut bad = pkt;
        bad[0] |= 0x0f;
        assert!(RtpView::parse(&bad[..20]).is_err());
        assert_eq!(
            RtpView::parse(&[0x40; 12]).unwrap_err(),
            RtpError::BadVersion
        );
    }

    #[test]
    fn two_byte_extensions_are_read() {
        let mut pkt = vec![0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 7];
        pkt.extend_from_slice(&[0x10, 0x00, 0, 2]); // profile 0x1000, 2 words
        pkt.extend_from_slice(&[9, 3, 1, 2, 3, 0, 0, 0]);
        pkt.extend_from_slice(b"p");
        let v = RtpView::parse(&pkt).unwrap();
        assert_eq!(v.extension(9), Some(&[1, 2, 3][..]));
        assert_eq!(v.payload(), b"p");
    }

    #[test]
    fn abs_send_time_is_6_18_fixed_point() {
        assert_eq!(abs_send_time(1_000_000), 1 << 18);
        assert_eq!(abs_send_time(500_000), 1 << 17);
        assert_eq!(abs_send_time(64_000_000), 0, "wraps every 64 s");
    }
}
