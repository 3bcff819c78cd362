//! Which codec we take from an offer, and which RTCP feedback we agree to.
//!
//! One codec per m-line: an SFU forwards what it receives, so a second codec would only be a
//! second thing for every subscriber to decode.

use super::parse::{fmtp_param, OfferedCodec};
use super::{Codec, MediaKind};

/// RTCP feedback we agree to receive from a publisher and answer to (RFC 4585 §4.2): NACK and
/// PLI/FIR keep the publisher's stream repairable; transport-cc is our congestion signal.
/// goog-remb is left out: we estimate from transport-cc, never send REMB to publishers.
pub(crate) const PUBLISH_VIDEO_FB: &[&str] = &["nack", "nack pli", "ccm fir", "transport-cc"];
pub(crate) const PUBLISH_AUDIO_FB: &[&str] = &["transport-cc"];

/// RTCP feedback we want from a receiver of our streams: the publisher set, plus goog-remb for
/// receivers without transport-cc (aiortc sends REMB only).
pub(crate) const SEND_VIDEO_FB: &[&str] =
    &["nack", "nack pli", "ccm fir", "goog-remb", "transport-cc"];
pub(crate) const SEND_AUDIO_FB: &[&str] = &["transport-cc"];

/// Our preference for a codec, lower is better: (codec family, variant within the family).
/// `None` for codecs we do not forward.
fn rank(kind: MediaKind, c: &OfferedCodec) -> Option<(u8, u8)> {
    let name = c.name.as_str();
    match kind {
        MediaKind::Audio => {
            // RFC 7587 §7: opus is always signalled as opus/48000/2.
            (name.eq_ignore_ascii_case("opus") && c.clock_rate == 48_000 && c.channels == Some(2))
                .then_some((0, 0))
        }
        MediaKind::Video if c.clock_rate != 90_000 => None,
        MediaKind::Video if name.eq_ignore_ascii_case("VP8") => Some((0, 0)),
        MediaKind::Video if name.eq_ignore_ascii_case("H264") => h264_rank(c).map(|r| (1, r)),
        MediaKind::Video if name.eq_ignore_ascii_case("VP9") => {
            // RFC 9628 §6: profile-id absent means 0; 2 is 10-bit, fewer decoders have it.
            Some((
                2,
                match c.fmtp_param("profile-id").unwrap_or("0") {
                    "0" => 0,
                    "2" => 1,
                    _ => 2,
                },
            ))
        }
        MediaKind::Video if name.eq_ignore_ascii_case("AV1") => {
            // AV1 RTP spec §7.2: profile absent means 0 (Main).
            Some((3, u8::from(c.fmtp_param("profile").unwrap_or("0") != "0")))
        }
        MediaKind::Video => None,
    }
}

/// H264 variants, lower is better (RFC 6184 §8.1): packetization-mode=1 with 42e01f (what every
/// browser decodes), other constrained baseline, baseline, other profiles, then single-NAL mode.
/// Interleaved mode (2) is not WebRTC and not forwarded.
fn h264_rank(c: &OfferedCodec) -> Option<u8> {
    let mode = c.fmtp_param("packetization-mode").unwrap_or("0");
    // RFC 6184 §8.1: profile-level-id absent means 420010 (baseline, level 1.0).
    let plid = c.fmtp_param("profile-level-id").unwrap_or("420010");
    let bytes = (plid.len() == 6)
        .then(|| u32::from_str_radix(plid, 16).ok())
        .flatten();
    let (profile_idc, iop) = match bytes {
        Some(v) => ((v >> 16) as u8, (v >> 8) as u8),
        None => (0, 0),
    };
    // Constrained baseline: profile_idc 66 (0x42) with constraint_set1_flag (RFC 6184 Table 5).
    let constrained_baseline = profile_idc == 0x42 && iop & 0x40 != 0;
    match mode {
        "1" if plid.eq_ignore_ascii_case("42e01f") => Some(0),
        "1" if constrained_baseline => Some(1),
        "1" if profile_idc == 0x42 => Some(2),
        "1" => Some(3),
        "0" => Some(4),
        _ => None,
    }
}

/// The codec we take for a publisher's m-line: best rank, then earliest offered.
pub(crate) fn choose_publish(kind: MediaKind, codecs: &[OfferedCodec]) -> Option<&OfferedCodec> {
    codecs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| rank(kind, c).map(|r| (r, i, c)))
        .min_by_key(|(r, i, _)| (*r, *i))
        .map(|(_, _, c)| c)
}

/// The best offered variant of the codec named `name` (WHEP: the source's codec is fixed).
pub(crate) fn choose_named<'a>(
    kind: MediaKind,
    name: &str,
    codecs: &'a [OfferedCodec],
) -> Option<&'a OfferedCodec> {
    codecs
        .iter()
        .enumerate()
        .filter(|(_, c)| c.name.eq_ignore_ascii_case(name))
        .filter_map(|(i, c)| rank(kind, c).map(|r| (r, i, c)))
        .min_by_key(|(r, i, _)| (*r, *i))
        .map(|(_, _, c)| c)
}

/// The RTX payload type the offer pairs with `pt` (RFC 4588 §8.6: `a=fmtp:<rtx> apt=<pt>`).
pub(crate) fn rtx_for(codecs: &[OfferedCodec], pt: u8) -> Option<u8> {
    codecs
        .iter()
        .find(|c| {
            c.name.eq_ignore_ascii_case("rtx")
                && c.fmtp
                    .as_deref()
                    .and_then(|f| fmtp_param(f, "apt"))
                    .and_then(|apt| apt.parse::<u8>().ok())
                    == Some(pt)
        })
        .map(|c| c.pt)
}

/// The negotiated codec: the offered one with its fmtp, the feedback both sides want, and RTX.
pub(crate) fn negotiated(c: &OfferedCodec, rtx: Option<u8>, allowed_fb: &[&str]) -> Codec {
    let mut rtcp_fb: Vec<String> = Vec::new();
    for fb in &c.rtcp_fb {
        if allowed_fb.contains(&fb.as_str()) && !rtcp_fb.contains(fb) {
            rtcp_fb.push(fb.clone());
        }
    }
    Codec {
        payload_type: c.pt,
        name: c.name.clone(),
        clock_rate: c.clock_rate,
        channels: c.channels,
        fmtp: c.fmtp.clone(),
        rtcp_fb,
        rtx_payload_type: rtx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(pt: u8, name: &str, clock: u32, fmtp: Option<&str>) -> OfferedCodec {
        OfferedCodec {
            pt,
            name: name.to_owned(),
            clock_rate: clock,
            channels: (name == "opus").then_some(2),
            fmtp: fmtp.map(str::to_owned),
            rtcp_fb: vec![],
        }
    }

    #[test]
    fn video_preference_table() {
        let h264 = |pt, f: &str| c(pt, "H264", 90_000, Some(f));
        // (offered codecs, expected pt)
        let cases: Vec<(Vec<OfferedCodec>, Option<u8>)> = vec![
            (
                vec![c(98, "VP9", 90_000, None), c(96, "VP8", 90_000, None)],
                Some(96),
            ),
            (
                vec![c(45, "AV1", 90_000, None), c(98, "VP9", 90_000, None)],
                Some(98),
            ),
            (
                vec![
                    c(45, "AV1", 90_000, None),
                    h264(102, "packetization-mode=0"),
                ],
                Some(102),
            ),
            (
                vec![
                    h264(102, "packetization-mode=1;profile-level-id=42001f"),
                    h264(104, "packetization-mode=0;profile-level-id=42e01f"),
                    h264(108, "packetization-mode=1;profile-level-id=42e01f"),
                    h264(112, "packetization-mode=1;profile-level-id=64001f"),
                ],
                Some(108),
            ),
            (
                vec![
                    h264(112, "packetization-mode=1;profile-level-id=64001f"),
                    h264(102, "packetization-mode=1;profile-level-id=42001f"),
                    h264(106, "packetization-mode=1;profile-level-id=42e034"),
                ],
                Some(106),
            ),
            (
                vec![
                    h264(112, "packetization-mode=1;profile-level-id=64001f"),
                    h264(102, "packetization-mode=1;profile-level-id=42001f"),
                ],
                Some(102),
            ),
            (vec![h264(99, "packetization-mode=2")], None),
            (
                vec![
                    c(100, "VP9", 90_000, Some("profile-id=2")),
                    c(98, "VP9", 90_000, Some("profile-id=0")),
                ],
                Some(98),
            ),
            (vec![c(96, "vp8", 90_000, None)], Some(96)),
            (vec![c(96, "VP8", 48_000, None)], None),
            (
                vec![
                    c(96, "rtx", 90_000, Some("apt=97")),
                    c(118, "red", 90_000, None),
                ],
                None,
            ),
        ];
        for (offered, want) in cases {
            let got = choose_publish(MediaKind::Video, &offered).map(|c| c.pt);
            assert_eq!(got, want, "{offered:?}");
        }
    }

    #[test]
    fn audio_takes_opus_stereo_at_48k_only() {
        let mut mono = c(111, "opus", 48_000, None);
        mono.channels = Some(1);
        assert_eq!(choose_publish(MediaKind::Audio, &[mono]), None);
        let offered = [
            c(0, "PCMU", 8000, None),
            c(111, "opus", 48_000, Some("minptime=10")),
        ];
        assert_eq!(
            choose_publish(MediaKind::Audio, &offered).map(|c| c.pt),
            Some(111)
        );
        // A video codec name on an audio m-line is not taken.
        assert_eq!(
            choose_publish(MediaKind::Audio, &[c(96, "VP8", 90_000, None)]),
            None
        );
    }

    #[test]
    fn rtx_is_found_by_apt() {
        let offered = [
            c(96, "VP8", 90_000, None),
            c(97, "rtx", 90_000, Some("apt=96")),
            c(99, "rtx", 90_000, Some("apt=98;rtx-time=3000")),
        ];
        assert_eq!(rtx_for(&offered, 96), Some(97));
        assert_eq!(rtx_for(&offered, 98), Some(99));
        assert_eq!(rtx_for(&offered, 100), None);
    }

    #[test]
    fn feedback_is_the_intersection_without_duplicates() {
        let mut vp8 = c(96, "VP8", 90_000, None);
        vp8.rtcp_fb = [
            "goog-remb",
            "transport-cc",
            "ccm fir",
            "nack",
            "nack pli",
            "nack",
        ]
        .map(str::to_owned)
        .to_vec();
        let got = negotiated(&vp8, Some(97), PUBLISH_VIDEO_FB);
        assert_eq!(
            got.rtcp_fb,
            vec!["transport-cc", "ccm fir", "nack", "nack pli"]
        );
        assert_eq!(got.rtx_payload_type, Some(97));
    }
}
