//! Video codecs and keyframe detection from RTP payloads.
//!
//! The forwarder may switch a subscriber to another simulcast layer only at a keyframe of that
//! layer, so it must recognise "this packet is the first packet of a keyframe" without decoding.
//! Each codec's RTP payload format says so in its first bytes:
//!
//! - VP8 (RFC 7741 §4.2, §4.3): payload descriptor S=1, PID=0, then the VP8 payload header's
//!   inverse key frame bit P=0.
//! - VP9 (RFC 9628 §4.2): descriptor B=1 (start of frame), P=0 (not inter-picture predicted),
//!   and spatial layer id 0 when the layer indices are present.
//! - H.264 (RFC 6184 §5.4, §5.7.1, §5.8): an IDR slice (NAL type 5) or SPS (type 7), alone, in a
//!   STAP-A aggregate, or at the start (S=1) of an FU-A.
//! - AV1 (AV1 RTP payload format, §4.4 aggregation header): N=1, "first packet of a coded video
//!   sequence". Best effort: encoders set N on keyframes that start a new sequence.
//!
//! Nothing here panics on truncated or malformed payloads: a payload too short to tell is not a
//! keyframe.

use crate::vp8::Vp8Descriptor;

/// A video codec the media core understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// VP8, RFC 7741.
    Vp8,
    /// VP9, RFC 9628.
    Vp9,
    /// H.264, RFC 6184.
    H264,
    /// AV1, AOM's RTP payload format.
    Av1,
}

impl VideoCodec {
    /// The codec for an SDP `a=rtpmap` encoding name (case-insensitive, RFC 4566 §6).
    pub fn from_sdp_name(name: &str) -> Option<Self> {
        const NAMES: &[(&str, VideoCodec)] = &[
            ("VP8", VideoCodec::Vp8),
            ("VP9", VideoCodec::Vp9),
            ("H264", VideoCodec::H264),
            ("AV1", VideoCodec::Av1),
            // Chrome's pre-standard name for AV1 (M90 and earlier).
            ("AV1X", VideoCodec::Av1),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, c)| *c)
    }

    /// The SDP encoding name.
    pub fn sdp_name(self) -> &'static str {
        match self {
            VideoCodec::Vp8 => "VP8",
            VideoCodec::Vp9 => "VP9",
            VideoCodec::H264 => "H264",
            VideoCodec::Av1 => "AV1",
        }
    }
}

/// Whether this RTP payload is the first packet of a keyframe.
pub fn is_keyframe(codec: VideoCodec, payload: &[u8]) -> bool {
    match codec {
        VideoCodec::Vp8 => Vp8Descriptor::parse(payload).is_ok_and(|d| d.starts_keyframe(payload)),
        VideoCodec::Vp9 => vp9_is_keyframe(payload),
        VideoCodec::H264 => h264_is_keyframe(payload),
        VideoCodec::Av1 => av1_is_keyframe(payload),
    }
}

/// RFC 9628 §4.2: `|I|P|L|F|B|E|V|Z|`, then the picture id (I), then the layer indices (L).
fn vp9_is_keyframe(payload: &[u8]) -> bool {
    const I: u8 = 0x80;
    const P: u8 = 0x40;
    const L: u8 = 0x20;
    const B: u8 = 0x08;
    let Some(&b0) = payload.first() else {
        return false;
    };
    if b0 & P != 0 || b0 & B == 0 {
        return false;
    }
    if b0 & L == 0 {
        // No layer indices: a single spatial layer, so this is spatial layer 0.
        return true;
    }
    let mut at = 1;
    if b0 & I != 0 {
        // M bit: 15-bit picture id takes two octets.
        let Some(&pid) = payload.get(at) else {
            return false;
        };
        at += if pid & 0x80 != 0 { 2 } else { 1 };
    }
    // Layer indices octet: `|TID|U|SID|D|`.
    payload.get(at).is_some_and(|li| (li >> 1) & 0x07 == 0)
}

/// H.264 NAL unit types (RFC 6184 §5.4, ITU-T H.264 Table 7-1).
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

fn h264_is_keyframe(payload: &[u8]) -> bool {
    let Some(&hdr) = payload.first() else {
        return false;
    };
    let is_key = |t: u8| t == NAL_IDR || t == NAL_SPS;
    match hdr & 0x1F {
        // STAP-A (§5.7.1): header, then [16-bit size][NAL unit] repeated.
        NAL_STAP_A => {
            let mut rest = &payload[1..];
            while let [hi, lo, tail @ ..] = rest {
                let size = usize::from(u16::from_be_bytes([*hi, *lo]));
                let Some(&nal) = tail.first() else {
                    return false;
                };
                if size > 0 && is_key(nal & 0x1F) {
                    return true;
                }
                rest = tail.get(size..).unwrap_or(&[]);
            }
            false
        }
        // FU-A (§5.8): indicator, then `|S|E|R|Type|`.
        NAL_FU_A => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && is_key(fu & 0x1F)),
        t => is_key(t),
    }
}

/// AV1 aggregation header `|Z|Y|W W|N|-|-|-|`: N=1 marks the first packet of a coded video
/// sequence, which starts with a keyframe.
fn av1_is_keyframe(payload: &[u8]) -> bool {
    const Z: u8 = 0x80;
    const N: u8 = 0x08;
    payload.first().is_some_and(|h| h & N != 0 && h & Z == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_names() {
        let cases = [
            ("VP8", Some(VideoCodec::Vp8)),
            ("vp8", Some(VideoCodec::Vp8)),
            ("Vp9", Some(VideoCodec::Vp9)),
            ("h264", Some(VideoCodec::H264)),
            ("AV1", Some(VideoCodec::Av1)),
            ("av1x", Some(VideoCodec::Av1)),
            ("opus", None),
            ("H265", None),
            ("", None),
        ];
        for (name, want) in cases {
            assert_eq!(VideoCodec::from_sdp_name(name), want, "{name}");
        }
        for c in [
            VideoCodec::Vp8,
            VideoCodec::Vp9,
            VideoCodec::H264,
            VideoCodec::Av1,
        ] {
            assert_eq!(VideoCodec::from_sdp_name(c.sdp_name()), Some(c));
        }
    }

    /// (codec, payload, is first packet of a keyframe)
    fn samples() -> Vec<(VideoCodec, Vec<u8>, bool)> {
        use VideoCodec::*;
        vec![
            // VP8: X=1 S=1 PID=0, I with 15-bit id, L, T; payload header P=0.
            (
                Vp8,
                vec![0x90, 0xE0, 0x81, 0x23, 0x05, 0x40, 0x10, 0x02, 0x00, 0x9D],
                true,
            ),
            (Vp8, vec![0x10, 0x10, 0x02, 0x00, 0x9D], true),
            // P=1: inter frame.
            (
                Vp8,
                vec![0x90, 0xE0, 0x81, 0x23, 0x05, 0x40, 0x11, 0x02],
                false,
            ),
            // S=0: continuation packet of a keyframe.
            (
                Vp8,
                vec![0x80, 0xE0, 0x81, 0x23, 0x05, 0x40, 0x10, 0x02],
                false,
            ),
            // S=1 but PID=1.
            (Vp8, vec![0x11, 0x10, 0x02], false),
            // VP9 I=1 (15-bit), L=1, B=1, P=0, SID=0.
            (Vp9, vec![0xA8, 0x81, 0x02, 0x00, 0x07, 0xAA], true),
            // Same with SID=1 (`|TID|U|SID|D|` = 0b000_0_001_0).
            (Vp9, vec![0xA8, 0x81, 0x02, 0x02, 0x07, 0xAA], false),
            // P=1.
            (Vp9, vec![0xE8, 0x81, 0x02, 0x00, 0x07, 0xAA], false),
            // B=0: middle of a frame.
            (Vp9, vec![0xA0, 0x81, 0x02, 0x00, 0x07, 0xAA], false),
            // No L, 7-bit picture id, flexible mode.
            (Vp9, vec![0x98, 0x05, 0xAA], true),
            // H.264 single NAL IDR / SPS / non-IDR slice / PPS.
            (H264, vec![0x65, 0x88, 0x84], true),
            (H264, vec![0x67, 0x42, 0xC0, 0x1F], true),
            (H264, vec![0x41, 0x9A, 0x02], false),
            (H264, vec![0x68, 0xCE, 0x3C, 0x80], false),
            // STAP-A: SEI (type 6) then SPS.
            (
                H264,
                vec![0x78, 0x00, 0x02, 0x06, 0x05, 0x00, 0x03, 0x67, 0x42, 0xC0],
                true,
            ),
            // STAP-A: two non-key NALs.
            (
                H264,
                vec![0x78, 0x00, 0x02, 0x06, 0x05, 0x00, 0x02, 0x68, 0xCE],
                false,
            ),
            // FU-A start of IDR, continuation of IDR, start of non-IDR.
            (H264, vec![0x7C, 0x85, 0x88, 0x84], true),
            (H264, vec![0x7C, 0x05, 0x88, 0x84], false),
            (H264, vec![0x7C, 0x81, 0x9A, 0x02], false),
            // AV1: N=1 / N=0.
            (Av1, vec![0x18, 0x0A, 0x0B], true),
            (Av1, vec![0x10, 0x0A, 0x0B], false),
            (Av1, vec![0x88, 0x0A, 0x0B], false),
        ]
    }

    #[test]
    fn keyframe_table() {
        for (i, (codec, payload, want)) in samples().iter().enumerate() {
            assert_eq!(is_keyframe(*codec, payload), *want, "sample {i} {codec:?}");
        }
    }

    /// No prefix of a sample panics, and the empty payload is never a keyframe.
    #[test]
    fn every_prefix_is_safe() {
        for (codec, payload, _) in samples() {
            for n in 0..=payload.len() {
                let _ = is_keyframe(codec, &payload[..n]);
            }
            assert!(!is_keyframe(codec, &[]));
        }
    }

    #[test]
    fn stap_a_with_lying_sizes_is_safe() {
        // Size points past the end; zero sizes; a size field cut in half.
        for p in [
            vec![0x78, 0xFF, 0xFF, 0x41],
            vec![0x78, 0x00, 0x00, 0x00, 0x00],
            vec![0x78, 0x00],
            vec![0x78, 0x00, 0x01, 0x41, 0x00, 0x05, 0x65],
        ] {
            let _ = is_keyframe(VideoCodec::H264, &p);
        }
        // A truncated second unit is still recognised by its header.
        assert!(is_keyframe(
            VideoCodec::H264,
            &[0x78, 0x00, 0x01, 0x41, 0x00, 0x05, 0x65]
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = crate::seq::TestRng::new(7);
        for _ in 0..20_000 {
            let len = rng.below(24) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            for codec in [
                VideoCodec::Vp8,
                VideoCodec::Vp9,
                VideoCodec::H264,
                VideoCodec::Av1,
            ] {
                let _ = is_keyframe(codec, &bytes);
            }
        }
    }
}
