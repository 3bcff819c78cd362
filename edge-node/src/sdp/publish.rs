//! The publisher side (publisher PC, WHIP): a client's offer of what it will send, and our
//! answer (JSEP, RFC 9429 §5.3).

use std::collections::HashSet;

use super::codec::{self, PUBLISH_AUDIO_FB, PUBLISH_VIDEO_FB};
use super::error::SdpError;
use super::ext::{self, BundleExtCheck, ExtLine, Flow};
use super::parse::{parse, Media, Parsed};
use super::write::{self, MediaBuilder};
use super::{
    AcceptedMedia, Codec, Direction, HeaderExtIds, LocalTransport, MediaKind, PublishAnswer,
    RemoteTransport, SdpLimits, Setup, MAX_SIMULCAST_LAYERS,
};

/// RTP profiles we take: DTLS-SRTP with feedback (RFC 5764 §8), and its pre-RFC 5764 spelling.
pub(crate) const RTP_PROTOS: [&str; 2] = ["UDP/TLS/RTP/SAVPF", "RTP/SAVPF"];

/// Session version of our answers. We keep no state between answers, so a renegotiation's
/// answer carries the same version; RFC 3264 §8 asks for growth when the SDP changes, but the
/// clients we interoperate with (Chromium, aiortc) do not check it.
pub(crate) const ANSWER_VERSION: u64 = 2;

/// Answers a client's publish offer: one codec per audio/video m-line, simulcast rids, the
/// header extensions we read; everything else rejected with port 0. See the module doc of
/// [`crate::sdp`] for the policy.
///
/// An offer whose m-lines are all recvonly or inactive is still answered (every m-line
/// `inactive`): that is a renegotiation after the client removed its tracks, and the PC lives
/// on. Only an offer with no m-line we can bundle at all is refused (`sdp_unsupported`).
pub fn answer_publish(
    offer: &str,
    local: &LocalTransport,
    limits: &SdpLimits,
) -> Result<PublishAnswer, SdpError> {
    let parsed = parse(offer, limits)?;
    let (remote, bundled) = offer_transport(&parsed)?;

    let mut decisions = Vec::with_capacity(parsed.media.len());
    let mut ext_check = BundleExtCheck::default();
    for m in &parsed.media {
        let d = decide(m, &bundled, parsed.extmap_allow_mixed);
        if let Some(a) = &d {
            if a.live {
                ext_check.add(&a.ext_lines)?;
            }
        }
        decisions.push(d);
    }
    let live_mids: Vec<&str> = decisions
        .iter()
        .flatten()
        .filter(|a| a.live)
        .map(|a| a.mid)
        .collect();
    if live_mids.is_empty() {
        return Err(SdpError::NothingAccepted);
    }

    let mut sd = write::session(write::derived_session_id(&local.ice_ufrag), ANSWER_VERSION);
    write::session_common(&mut sd, &live_mids);
    if parsed.extmap_allow_mixed {
        write::session_attr(&mut sd, "extmap-allow-mixed", None);
    }
    let mut media = Vec::new();
    let mut rejected_mids = Vec::new();
    for (m, d) in parsed.media.iter().zip(&decisions) {
        match d {
            Some(a) if a.live => sd.media_descriptions.push(accepted_mline(m, a, local)),
            _ => sd.media_descriptions.push(rejected_mline(m)),
        }
        match d {
            Some(a) => media.push(AcceptedMedia {
                mid: a.mid.to_owned(),
                kind: a.kind,
                direction: m.direction,
                active: a.answer_direction == Direction::RecvOnly,
                codec: a.codec.clone(),
                ext: a.ext,
                rids: a.rids_low_to_high.clone(),
                ssrcs: if a.rids_offered.is_empty() {
                    m.ssrcs.clone()
                } else {
                    Vec::new()
                },
                msid: m.msid.clone(),
            }),
            None => rejected_mids.extend(m.mid.clone()),
        }
    }
    Ok(PublishAnswer {
        sdp: sd.marshal(),
        remote,
        media,
        rejected_mids,
    })
}

/// The client's transport from an offer, and the mids of its BUNDLE group.
pub(crate) fn offer_transport(
    parsed: &Parsed,
) -> Result<(RemoteTransport, HashSet<&str>), SdpError> {
    // RFC 8445 §2.5: two lite agents never check connectivity, so never connect.
    if parsed.ice_lite {
        return Err(SdpError::IceLitePeer);
    }
    let bundle = parsed.bundle.as_ref().ok_or(SdpError::MissingBundle)?;
    let tag = bundle
        .first()
        .and_then(|mid| parsed.media_by_mid(mid))
        .ok_or(SdpError::MissingBundle)?;
    let remote = parsed.remote_transport(tag)?;
    // We are the DTLS server; a client that insists on being server cannot talk to us.
    if matches!(remote.setup, Setup::Passive | Setup::HoldConn) {
        return Err(SdpError::DtlsRole {
            setup: remote.setup,
        });
    }
    Ok((remote, bundle.iter().map(String::as_str).collect()))
}

/// Whether an offered m-line can share our one transport: audio/video with a mid in the
/// BUNDLE group, a DTLS-SRTP profile and rtcp-mux.
pub(crate) fn bundleable<'a>(
    m: &'a Media,
    bundled: &HashSet<&str>,
) -> Option<(MediaKind, &'a str)> {
    let kind = m.kind?;
    let mid = m.mid.as_deref()?;
    (bundled.contains(mid) && RTP_PROTOS.contains(&m.proto.as_str()) && m.rtcp_mux)
        .then_some((kind, mid))
}

/// What we take from one offered m-line.
struct Accepted<'a> {
    kind: MediaKind,
    mid: &'a str,
    /// In the answer's BUNDLE group with a non-zero port; false when the client offered the
    /// m-line with port 0 (a stopped transceiver), which we must answer with port 0 too.
    live: bool,
    answer_direction: Direction,
    codec: Codec,
    ext: HeaderExtIds,
    ext_lines: Vec<ExtLine>,
    /// Kept rids in offered order (for the answer's a=simulcast) and lowest first (for us).
    rids_offered: Vec<String>,
    rids_low_to_high: Vec<String>,
}

fn decide<'a>(m: &'a Media, bundled: &HashSet<&str>, allow_mixed: bool) -> Option<Accepted<'a>> {
    let (kind, mid) = bundleable(m, bundled)?;
    let offered = codec::choose_publish(kind, &m.codecs)?;
    let fb = match kind {
        MediaKind::Audio => PUBLISH_AUDIO_FB,
        MediaKind::Video => PUBLISH_VIDEO_FB,
    };
    let codec = codec::negotiated(offered, codec::rtx_for(&m.codecs, offered.pt), fb);
    // RFC 8843 §6: a bundle-only m-line has port 0 in the offer yet is accepted.
    let live = m.port != 0 || m.bundle_only;
    // We never send on a publisher PC: the client's send becomes our recv (RFC 3264 §6.1).
    let answer_direction = if live && m.direction.sends() {
        Direction::RecvOnly
    } else {
        Direction::Inactive
    };
    let (ext, ext_lines) = ext::negotiate(kind, Flow::Receive, &m.extmaps, allow_mixed);
    // Simulcast needs the rid header extension to tell layers apart (RFC 8852); without it the
    // client falls back to one stream, which is what an answer without a=simulcast asks for.
    let simulcast = answer_direction == Direction::RecvOnly
        && kind == MediaKind::Video
        && ext.rid.is_some()
        && m.simulcast_send.len() > 1;
    let rids_offered: Vec<String> = if simulcast {
        m.simulcast_send
            .iter()
            .take(MAX_SIMULCAST_LAYERS)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let rids_low_to_high = layer_order(&rids_offered);
    Some(Accepted {
        kind,
        mid,
        live,
        answer_direction,
        codec,
        ext,
        ext_lines,
        rids_offered,
        rids_low_to_high,
    })
}

/// Rids lowest resolution first; the rules and their reasons are in the module doc of
/// [`crate::sdp`].
fn layer_order(rids: &[String]) -> Vec<String> {
    const NAMED: [&[&str]; 2] = [&["q", "h", "f"], &["l", "m", "h"]];
    let mut out = rids.to_vec();
    for set in NAMED {
        let pos = |r: &String| set.iter().position(|s| s == r);
        if rids.iter().all(|r| pos(r).is_some()) {
            out.sort_by_key(pos);
            return out;
        }
    }
    for prefix in ["", "r"] {
        let num = |r: &String| {
            r.strip_prefix(prefix)
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())
        };
        if rids.iter().all(|r| num(r).is_some()) {
            out.sort_by_key(num);
            return out;
        }
    }
    out
}

fn accepted_mline(m: &Media, a: &Accepted<'_>, local: &LocalTransport) -> sdp::MediaDescription {
    let mut b = MediaBuilder::new(&m.kind_name, &m.proto, write::formats_of(&a.codec), false);
    b.attr("mid", a.mid);
    b.transport(local, Setup::Passive);
    b.direction(a.answer_direction);
    b.extmaps(&a.ext_lines);
    b.codec(&a.codec);
    if !a.rids_offered.is_empty() {
        for rid in &a.rids_offered {
            b.attr("rid", format!("{rid} recv"));
        }
        b.attr("simulcast", format!("recv {}", a.rids_offered.join(";")));
    }
    b.candidates(&local.candidates);
    b.finish()
}

/// A rejected m-line (RFC 3264 §6, JSEP §5.3.1): port 0, the first offered format, the mid.
pub(crate) fn rejected_mline(m: &Media) -> sdp::MediaDescription {
    let format = m.formats.first().cloned().unwrap_or_else(|| "0".to_owned());
    let mut b = MediaBuilder::new(&m.kind_name, &m.proto, vec![format], true);
    if let Some(mid) = &m.mid {
        b.attr("mid", mid.as_str());
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::fixtures;
    use crate::sdp::tests_common::{lines_of, local, mline_blocks};
    use crate::sdp::{Fingerprint, SsrcInfo};

    fn answer(offer: &str) -> PublishAnswer {
        answer_publish(offer, &local(), &SdpLimits::default())
            .unwrap_or_else(|e| panic!("offer refused: {e}"))
    }

    #[test]
    fn transport_extension_ids_are_the_union_of_the_m_lines() {
        // Audio first, as Chromium offers: rid and repaired-rid appear only on video.
        let ids = answer(fixtures::CHROME_PUBLISH_SIMULCAST).ext_in();
        assert_eq!(ids.audio_level, Some(1));
        assert_eq!(ids.transport_cc, Some(3));
        assert_eq!(ids.mid, Some(4));
        assert_eq!(ids.rid, Some(10));
        assert_eq!(ids.repaired_rid, Some(11));
    }

    #[test]
    fn chrome_simulcast_offer_is_answered() {
        let a = answer(fixtures::CHROME_PUBLISH_SIMULCAST);
        assert_eq!(a.remote.ice_ufrag, "Zhex");
        assert_eq!(a.remote.ice_pwd, "RBKTFlZtXXfHQrX4NragnhFA");
        assert_eq!(a.remote.setup, Setup::ActPass);
        assert_eq!(
            a.remote.fingerprint,
            Fingerprint {
                algorithm: "sha-256".into(),
                value: "6A:A3:14:40:E5:94:58:47:5D:AA:10:48:F0:B4:B9:3C:B4:1D:39:18:F1:DD:B0:C5:96:54:B1:39:7B:F1:29:56".into(),
            }
        );
        assert!(a.rejected_mids.is_empty());
        assert_eq!(a.media.len(), 2);

        let audio = &a.media[0];
        assert_eq!((audio.mid.as_str(), audio.kind), ("0", MediaKind::Audio));
        assert!(audio.active);
        assert_eq!(audio.direction, Direction::SendOnly);
        assert_eq!(audio.codec.payload_type, 111);
        assert_eq!(
            audio.codec.fmtp.as_deref(),
            Some("minptime=10;useinbandfec=1")
        );
        assert_eq!(audio.codec.rtcp_fb, vec!["transport-cc"]);
        assert_eq!(
            audio.ext,
            HeaderExtIds {
                mid: Some(4),
                abs_send_time: Some(2),
                transport_cc: Some(3),
                audio_level: Some(1),
                ..Default::default()
            }
        );
        assert_eq!(
            audio.ssrcs,
            vec![SsrcInfo {
                ssrc: 2991828682,
                rtx_ssrc: None
            }]
        );
        assert!(audio.rids.is_empty());

        let video = &a.media[1];
        assert_eq!(video.codec.name, "VP8");
        assert_eq!(video.codec.payload_type, 96);
        assert_eq!(video.codec.rtx_payload_type, Some(97));
        assert_eq!(
            video.codec.rtcp_fb,
            vec!["transport-cc", "ccm fir", "nack", "nack pli"]
        );
        assert_eq!(video.rids, vec!["q", "h", "f"]);
        assert!(video.ssrcs.is_empty());
        assert_eq!(
            video.ext,
            HeaderExtIds {
                mid: Some(4),
                rid: Some(10),
                repaired_rid: Some(11),
                abs_send_time: Some(2),
                transport_cc: Some(3),
                audio_level: None,
            }
        );
        assert_eq!(
            video.msid.as_ref().map(|(s, _)| s.as_str()),
            Some("3a0a7ea5-ede2-4c80-a07e-d1a29363d3b2")
        );
    }

    #[test]
    fn answer_text_has_what_the_edge_promises() {
        let a = answer(fixtures::CHROME_PUBLISH_SIMULCAST);
        let session = lines_of(&a.sdp, "session");
        for want in [
            "a=ice-lite",
            "a=group:BUNDLE 0 1",
            "a=msid-semantic: WMS *",
            "a=extmap-allow-mixed",
        ] {
            assert!(
                session.contains(&want.to_owned()),
                "session lacks {want}:\n{}",
                a.sdp
            );
        }
        let blocks = mline_blocks(&a.sdp);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0][0], "m=audio 9 UDP/TLS/RTP/SAVPF 111");
        assert_eq!(blocks[1][0], "m=video 9 UDP/TLS/RTP/SAVPF 96 97");
        for block in &blocks {
            for want in [
                "c=IN IP4 0.0.0.0",
                "a=ice-ufrag:EdGe",
                "a=ice-pwd:edgepasswordedgepassword",
                "a=setup:passive",
                "a=rtcp-mux",
                "a=recvonly",
                "a=candidate:1 1 udp 2130706431 192.0.2.1 40000 typ host",
                "a=candidate:2 1 udp 2130706175 2001:db8::1 40000 typ host",
                "a=end-of-candidates",
            ] {
                assert!(
                    block.iter().any(|l| l == want),
                    "m-line lacks {want}: {block:?}"
                );
            }
            assert!(block
                .iter()
                .any(|l| l.starts_with("a=fingerprint:sha-256 AB:CD:")));
            assert!(!block
                .iter()
                .any(|l| l == "a=rtcp-rsize" || l.contains("goog-remb")));
        }
        let video = &blocks[1];
        for want in [
            "a=mid:1",
            "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
            "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
            "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
            "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
            "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
            "a=rtpmap:96 VP8/90000",
            "a=rtcp-fb:96 nack pli",
            "a=rtpmap:97 rtx/90000",
            "a=fmtp:97 apt=96",
            "a=rid:q recv",
            "a=rid:h recv",
            "a=rid:f recv",
            "a=simulcast:recv q;h;f",
        ] {
            assert!(
                video.iter().any(|l| l == want),
                "video lacks {want}: {video:?}"
            );
        }
        assert!(!video
            .iter()
            .any(|l| l.contains("toffset") || l.contains("dependency")));
        assert!(blocks[0]
            .iter()
            .any(|l| l == "a=fmtp:111 minptime=10;useinbandfec=1"));
        assert!(blocks[0]
            .iter()
            .any(|l| l == "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level"));
    }

    #[test]
    fn answer_parses_back_as_a_valid_sdp() {
        for offer in [
            fixtures::CHROME_PUBLISH_SIMULCAST,
            fixtures::CHROME_PUBLISH_DATACHANNEL,
            fixtures::AIORTC_PUBLISH,
            fixtures::FIREFOX_STYLE,
            fixtures::OBS_WHIP,
            fixtures::LEGACY_SIM,
        ] {
            let a = answer(offer);
            let p = parse(&a.sdp, &SdpLimits::default()).expect("our answer parses");
            let tag = p.media_by_mid(&p.bundle.as_ref().unwrap()[0]).unwrap();
            let t = p.remote_transport(tag).unwrap();
            assert_eq!(t.setup, Setup::Passive);
            assert_eq!(t.ice_ufrag, "EdGe");
            assert!(a.sdp.ends_with("\r\n"));
        }
    }

    #[test]
    fn data_channel_is_rejected_and_media_kept() {
        let a = answer(fixtures::CHROME_PUBLISH_DATACHANNEL);
        assert_eq!(a.rejected_mids, vec!["2"]);
        assert_eq!(a.media.len(), 2);
        assert_eq!(
            a.media[1].ssrcs,
            vec![SsrcInfo {
                ssrc: 3663166277,
                rtx_ssrc: Some(2997860586)
            }]
        );
        let blocks = mline_blocks(&a.sdp);
        assert_eq!(
            blocks[2][0],
            "m=application 0 UDP/DTLS/SCTP webrtc-datachannel"
        );
        assert!(blocks[2].contains(&"a=mid:2".to_owned()));
        assert!(!blocks[2].iter().any(|l| l.starts_with("a=candidate")));
        assert!(lines_of(&a.sdp, "session").contains(&"a=group:BUNDLE 0 1".to_owned()));
    }

    #[test]
    fn aiortc_sendrecv_offer_is_answered_recvonly_with_h264_skipped_for_vp8() {
        let a = answer(fixtures::AIORTC_PUBLISH);
        assert_eq!(a.media[0].direction, Direction::SendRecv);
        assert!(a.media[0].active);
        assert_eq!(a.media[0].codec.name, "opus");
        assert_eq!(a.media[0].codec.fmtp, None);
        assert_eq!(a.media[0].ext.audio_level, Some(2));
        assert_eq!(a.media[1].codec.name, "VP8");
        assert_eq!(a.media[1].codec.rtx_payload_type, Some(98));
        // aiortc offers no transport-cc, so none is answered.
        assert_eq!(a.media[1].codec.rtcp_fb, vec!["nack", "nack pli"]);
        assert_eq!(
            a.media[1].ssrcs,
            vec![SsrcInfo {
                ssrc: 4227723284,
                rtx_ssrc: Some(3301386872)
            }]
        );
        assert_eq!(a.remote.ice_ufrag, "7ds4");
        let sendonly = answer(fixtures::AIORTC_PUBLISH_SENDONLY);
        assert!(sendonly
            .media
            .iter()
            .all(|m| m.active && m.direction == Direction::SendOnly));
    }

    #[test]
    fn obs_whip_offer_takes_h264_and_session_level_transport() {
        let a = answer(fixtures::OBS_WHIP);
        assert_eq!(a.remote.ice_ufrag, "Hv2S");
        assert_eq!(a.media[1].codec.name, "H264");
        assert_eq!(
            a.media[1].codec.fmtp.as_deref(),
            Some("profile-level-id=42e01f;packetization-mode=1;level-asymmetry-allowed=1")
        );
        assert_eq!(a.media[1].codec.rtx_payload_type, None);
        assert_eq!(
            a.media[0].msid,
            Some(("obs-stream".into(), "obs-audio".into()))
        );
        assert_eq!(a.media[0].ext, HeaderExtIds::default());
    }

    #[test]
    fn firefox_style_offer_orders_h_m_l_as_l_m_h() {
        let a = answer(fixtures::FIREFOX_STYLE);
        let video = &a.media[1];
        assert_eq!(video.codec.name, "VP8");
        assert_eq!(video.codec.payload_type, 120);
        assert_eq!(video.codec.rtx_payload_type, Some(124));
        assert_eq!(video.rids, vec!["l", "m", "h"]);
        assert!(a.sdp.contains("a=simulcast:recv h;m;l\r\n"));
        // a=extmap:6/recvonly (playout-delay) is unknown to us anyway; csrc-audio-level too.
        assert_eq!(a.media[0].ext.mid, Some(3));
        assert!(!a.sdp.contains("csrc-audio-level"));
    }

    #[test]
    fn legacy_sim_simulcast_keeps_sim_order() {
        let a = answer(fixtures::LEGACY_SIM);
        let ssrcs: Vec<_> = a.media[0]
            .ssrcs
            .iter()
            .map(|s| (s.ssrc, s.rtx_ssrc))
            .collect();
        assert_eq!(
            ssrcs,
            vec![(101, Some(201)), (102, Some(202)), (103, Some(203))]
        );
        assert!(a.media[0].rids.is_empty());
    }

    #[test]
    fn layer_order_table() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["q", "h", "f"], &["q", "h", "f"]),
            (&["f", "h", "q"], &["q", "h", "f"]),
            (&["h", "q"], &["q", "h"]),
            (&["h", "m", "l"], &["l", "m", "h"]),
            (&["m", "h"], &["m", "h"]),
            (&["2", "0", "1"], &["0", "1", "2"]),
            (&["10", "9"], &["9", "10"]),
            (&["r2", "r1", "r0"], &["r0", "r1", "r2"]),
            (&["hi", "lo", "mid"], &["hi", "lo", "mid"]),
            (&["r1", "0"], &["r1", "0"]),
            (&["f", "m", "q"], &["f", "m", "q"]),
        ];
        for (input, want) in cases {
            let input: Vec<String> = input.iter().map(|s| (*s).to_owned()).collect();
            assert_eq!(layer_order(&input), *want, "{input:?}");
        }
    }

    #[test]
    fn more_than_three_rids_keep_the_first_three() {
        let offer = fixtures::CHROME_PUBLISH_SIMULCAST
            .replacen("a=rid:f send\r\n", "a=rid:f send\r\na=rid:x send\r\n", 1)
            .replacen("a=simulcast:send q;h;f", "a=simulcast:send x;q;h;f", 1);
        let a = answer(&offer);
        // x is not a named layer, so the offered order stands.
        assert_eq!(a.media[1].rids, vec!["x", "q", "h"]);
        assert!(a.sdp.contains("a=simulcast:recv x;q;h\r\n"));
        assert!(!a.sdp.contains("a=rid:f"));
    }

    #[test]
    fn simulcast_without_rid_extension_is_answered_as_one_stream() {
        let offer = fixtures::CHROME_PUBLISH_SIMULCAST.replacen(
            "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n",
            "",
            1,
        );
        let a = answer(&offer);
        assert!(a.media[1].rids.is_empty());
        assert!(!a.sdp.contains("a=simulcast"));
    }

    #[test]
    fn h264_only_offer_prefers_42e01f_packetization_mode_1() {
        // Keep only the H264 payload types of the Chrome offer.
        let offer = fixtures::CHROME_PUBLISH_SIMULCAST.replacen(
            "UDP/TLS/RTP/SAVPF 96 97 102 103 104 107 108 109 114 115 116 117 39 40 45 46 98 99 100 101 118 119 120",
            "UDP/TLS/RTP/SAVPF 102 103 104 107 108 109 114 115 116 117",
            1,
        );
        let a = answer(&offer);
        assert_eq!(a.media[1].codec.payload_type, 108);
        assert_eq!(a.media[1].codec.rtx_payload_type, Some(109));
        let only_vp9_av1 = fixtures::CHROME_PUBLISH_SIMULCAST.replacen(
            "UDP/TLS/RTP/SAVPF 96 97 102 103 104 107 108 109 114 115 116 117 39 40 45 46 98 99 100 101 118 119 120",
            "UDP/TLS/RTP/SAVPF 45 46 100 101 98 99",
            1,
        );
        assert_eq!(answer(&only_vp9_av1).media[1].codec.payload_type, 98);
    }

    #[test]
    fn unknown_codecs_only_are_unsupported() {
        let offer = fixtures::OBS_WHIP
            .replace("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 speex/16000")
            .replace("a=rtpmap:96 H264/90000", "a=rtpmap:96 H265/90000");
        let err = answer_publish(&offer, &local(), &SdpLimits::default()).unwrap_err();
        assert_eq!(err, SdpError::NothingAccepted);
        assert_eq!(err.code(), "sdp_unsupported");
    }

    #[test]
    fn one_unsupported_m_line_is_rejected_alone() {
        let offer = fixtures::OBS_WHIP.replace("a=rtpmap:96 H264/90000", "a=rtpmap:96 H265/90000");
        let a = answer(&offer);
        assert_eq!(a.rejected_mids, vec!["1"]);
        assert_eq!(a.media.len(), 1);
        assert!(a.sdp.contains("m=video 0 UDP/TLS/RTP/SAVPF 96\r\n"));
        assert!(lines_of(&a.sdp, "session").contains(&"a=group:BUNDLE 0".to_owned()));
    }

    #[test]
    fn transport_and_bundle_problems_are_unsupported() {
        let base = fixtures::CHROME_PUBLISH_SIMULCAST;
        let cases: Vec<(String, SdpError)> = vec![
            (
                base.replacen("a=group:BUNDLE 0 1\r\n", "", 1),
                SdpError::MissingBundle,
            ),
            (
                base.replace("a=ice-ufrag:Zhex\r\n", ""),
                SdpError::MissingIceCredentials,
            ),
            (
                base.replace("a=ice-pwd:RBKTFlZtXXfHQrX4NragnhFA\r\n", ""),
                SdpError::MissingIceCredentials,
            ),
            (
                base.lines()
                    .filter(|l| !l.starts_with("a=fingerprint"))
                    .map(|l| format!("{l}\r\n"))
                    .collect(),
                SdpError::MissingFingerprint,
            ),
            (
                base.replace("a=fingerprint:sha-256", "a=fingerprint:md5"),
                SdpError::UnsupportedFingerprint {
                    algorithm: "md5".into(),
                },
            ),
            (
                base.replace("a=setup:actpass", "a=setup:passive"),
                SdpError::DtlsRole {
                    setup: Setup::Passive,
                },
            ),
        ];
        for (offer, want) in cases {
            let err = answer_publish(&offer, &local(), &SdpLimits::default()).unwrap_err();
            assert_eq!(err, want);
            assert_eq!(err.code(), "sdp_unsupported");
        }
        // setup:active (the client is DTLS client) is what we want too.
        let active = base.replace("a=setup:actpass", "a=setup:active");
        assert_eq!(answer(&active).remote.setup, Setup::Active);
    }

    #[test]
    fn bad_credentials_are_invalid() {
        let base = fixtures::CHROME_PUBLISH_SIMULCAST;
        for offer in [
            base.replace("a=ice-ufrag:Zhex", "a=ice-ufrag:Zh"),
            base.replace("a=ice-ufrag:Zhex", "a=ice-ufrag:Zh;x"),
            base.replace("a=ice-pwd:RBKTFlZtXXfHQrX4NragnhFA", "a=ice-pwd:short"),
            base.replace("6A:A3:14:40", "6A:A3:14"),
            base.replace("6A:A3:14:40", "6A:A3:14:4G"),
        ] {
            let err = answer_publish(&offer, &local(), &SdpLimits::default()).unwrap_err();
            assert_eq!(err.code(), "sdp_invalid", "{err}");
        }
    }

    #[test]
    fn m_lines_outside_bundle_or_without_rtcp_mux_are_rejected() {
        let base = fixtures::CHROME_PUBLISH_SIMULCAST;
        let a = answer(&base.replacen("a=group:BUNDLE 0 1", "a=group:BUNDLE 0", 1));
        assert_eq!(a.rejected_mids, vec!["1"]);
        let no_mux = base.replacen("a=rtcp-mux\r\n", "", 1);
        let a = answer(&no_mux);
        assert_eq!(a.rejected_mids, vec!["0"]);
        assert!(a.sdp.contains("a=group:BUNDLE 1\r\n"));
    }

    #[test]
    fn stopped_and_recvonly_m_lines() {
        let base = fixtures::CHROME_PUBLISH_SIMULCAST;
        // Port 0 in the offer: a stopped transceiver; answered port 0, reported inactive.
        let a = answer(&base.replacen("m=audio 44261", "m=audio 0", 1));
        assert!(!a.media[0].active);
        assert!(a.sdp.contains("m=audio 0 UDP/TLS/RTP/SAVPF 111\r\n"));
        assert!(a.sdp.contains("a=group:BUNDLE 1\r\n"));
        // bundle-only with port 0 is live (RFC 8843 §6).
        let a = answer(&base.replacen("m=video 37539", "m=video 0", 1).replacen(
            "a=mid:1\r\n",
            "a=mid:1\r\na=bundle-only\r\n",
            1,
        ));
        assert!(a.media[1].active);
        assert!(a.sdp.contains("a=group:BUNDLE 0 1\r\n"));
        // recvonly on a publisher PC: kept in BUNDLE but inactive, no simulcast.
        let a = answer(&base.replacen("a=sendonly", "a=recvonly", 2));
        assert!(a.media.iter().all(|m| !m.active && m.rids.is_empty()));
        assert_eq!(a.sdp.matches("a=inactive\r\n").count(), 2);
    }

    #[test]
    fn ext_id_conflict_across_bundle_is_invalid() {
        // Audio's mid extension moved to id 10, which video uses for rtp-stream-id.
        let offer = fixtures::CHROME_PUBLISH_SIMULCAST.replacen(
            "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
            "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:mid",
            1,
        );
        let err = answer_publish(&offer, &local(), &SdpLimits::default()).unwrap_err();
        assert!(
            matches!(err, SdpError::ExtIdConflict { id: 10, .. }),
            "{err}"
        );
    }

    #[test]
    fn answers_are_deterministic() {
        let a = answer(fixtures::CHROME_PUBLISH_SIMULCAST);
        let b = answer(fixtures::CHROME_PUBLISH_SIMULCAST);
        assert_eq!(a, b);
    }

    /// When the offer's BUNDLE tag (its first mid) is an m-line we reject, its transport
    /// attributes still describe the bundle transport, and our group starts at the first
    /// accepted mid.
    #[test]
    fn rejected_bundle_tag_keeps_the_transport() {
        let offer = fixtures::CHROME_PUBLISH_DATACHANNEL.replacen(
            "a=group:BUNDLE 0 1 2",
            "a=group:BUNDLE 2 0 1",
            1,
        );
        let a = answer(&offer);
        assert_eq!(a.rejected_mids, vec!["2"]);
        assert_eq!(
            a.media.iter().map(|m| m.mid.as_str()).collect::<Vec<_>>(),
            vec!["0", "1"]
        );
        assert!(lines_of(&a.sdp, "session").contains(&"a=group:BUNDLE 0 1".to_owned()));
        assert_eq!(a.remote.ice_ufrag, "RO09");
        assert!(a
            .sdp
            .contains("m=application 0 UDP/DTLS/SCTP webrtc-datachannel\r\n"));
    }
}
