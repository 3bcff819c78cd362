//! WHEP: the client offers to receive, we answer with what we send.

use super::codec::{self, SEND_AUDIO_FB, SEND_VIDEO_FB};
use super::error::SdpError;
use super::ext::{self, BundleExtCheck, Flow};
use super::parse::parse;
use super::publish::{bundleable, offer_transport, rejected_mline, ANSWER_VERSION};
use super::write::{self, MediaBuilder};
use super::{
    Direction, HeaderExtIds, LocalTransport, MediaKind, SdpLimits, Setup, WhepAnswer, WhepMedia,
    WhepSource,
};

/// Answers a WHEP offer with the sources in `want`.
///
/// Each offered audio/video m-line that can receive (recvonly or sendrecv) gets the first
/// not-yet-placed source of its kind whose codec the client offered on that m-line; so with one
/// m-line per kind (every WHEP player) the first m-line of each kind gets the first fitting
/// source, and a client offering two video m-lines gets two video sources. m-lines left without
/// a source are rejected (port 0). The codec is the client's payload type for the source's codec
/// (best H264/VP9/AV1 variant by our preference when several are offered), with RTX when the
/// source has an RTX ssrc and the client offered RTX for it.
pub fn answer_subscribe(
    offer: &str,
    local: &LocalTransport,
    want: &[WhepSource<'_>],
    limits: &SdpLimits,
) -> Result<WhepAnswer, SdpError> {
    let parsed = parse(offer, limits)?;
    let (remote, bundled) = offer_transport(&parsed)?;

    let mut placed = vec![false; want.len()];
    let mut media = Vec::new();
    let mut ext_check = BundleExtCheck::default();
    let mut lines = Vec::with_capacity(parsed.media.len());
    let mut bundle = Vec::new();
    for m in &parsed.media {
        let Some(kind) = m.kind else {
            lines.push(rejected_mline(m));
            continue;
        };
        let eligible = bundleable(m, &bundled)
            .filter(|_| (m.port != 0 || m.bundle_only) && m.direction.receives());
        let choice = eligible.and_then(|(_, mid)| {
            want.iter().enumerate().find_map(|(i, src)| {
                if placed[i] || src.kind != kind {
                    return None;
                }
                let offered = codec::choose_named(kind, src.codec, &m.codecs)?;
                Some((mid, i, src, offered))
            })
        });
        let Some((mid, i, src, offered)) = choice else {
            lines.push(rejected_mline(m));
            if let Some(mid) = &m.mid {
                media.push(WhepMedia {
                    mid: mid.clone(),
                    kind,
                    codec: None,
                    ext: HeaderExtIds::default(),
                    accepted: false,
                    source: None,
                });
            }
            continue;
        };
        placed[i] = true;
        let fb = match kind {
            MediaKind::Audio => SEND_AUDIO_FB,
            MediaKind::Video => SEND_VIDEO_FB,
        };
        let rtx = src
            .rtx_ssrc
            .and_then(|_| codec::rtx_for(&m.codecs, offered.pt));
        let codec = codec::negotiated(offered, rtx, fb);
        let (ids, ext_lines) =
            ext::negotiate(kind, Flow::Send, &m.extmaps, parsed.extmap_allow_mixed);
        ext_check.add(&ext_lines)?;

        let mut b = MediaBuilder::new(&m.kind_name, &m.proto, write::formats_of(&codec), false);
        b.attr("mid", mid);
        b.transport(local, Setup::Passive);
        b.direction(Direction::SendOnly);
        b.extmaps(&ext_lines);
        b.codec(&codec);
        b.source(
            src.ssrc,
            src.rtx_ssrc.filter(|_| rtx.is_some()),
            src.stream_id,
            src.track_id,
        );
        b.candidates(&local.candidates);
        lines.push(b.finish());
        bundle.push(mid);
        media.push(WhepMedia {
            mid: mid.to_owned(),
            kind,
            codec: Some(codec),
            ext: ids,
            accepted: true,
            source: Some(i),
        });
    }
    if bundle.is_empty() {
        return Err(SdpError::NothingAccepted);
    }
    let mut sd = write::session(write::derived_session_id(&local.ice_ufrag), ANSWER_VERSION);
    write::session_common(&mut sd, &bundle);
    if parsed.extmap_allow_mixed {
        write::session_attr(&mut sd, "extmap-allow-mixed", None);
    }
    sd.media_descriptions = lines;
    Ok(WhepAnswer {
        sdp: sd.marshal(),
        remote,
        media,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::fixtures;
    use crate::sdp::tests_common::{lines_of, local, mline_blocks};

    fn sources() -> Vec<WhepSource<'static>> {
        vec![
            WhepSource {
                kind: MediaKind::Video,
                codec: "VP8",
                ssrc: 2222,
                rtx_ssrc: Some(3333),
                stream_id: "alice",
                track_id: "alice-cam",
            },
            WhepSource {
                kind: MediaKind::Audio,
                codec: "opus",
                ssrc: 1111,
                rtx_ssrc: None,
                stream_id: "alice",
                track_id: "alice-mic",
            },
        ]
    }

    #[test]
    fn chrome_whep_offer_gets_audio_and_video() {
        let a = answer_subscribe(
            fixtures::CHROME_WHEP,
            &local(),
            &sources(),
            &SdpLimits::default(),
        )
        .unwrap();
        assert_eq!(a.remote.ice_ufrag, "YR0k");
        assert_eq!(a.media.len(), 2);
        assert_eq!(a.media[0].source, Some(1));
        assert_eq!(a.media[1].source, Some(0));
        let video = a.media[1].codec.as_ref().unwrap();
        assert_eq!((video.payload_type, video.rtx_payload_type), (96, Some(97)));
        assert!(video.rtcp_fb.contains(&"goog-remb".to_owned()));
        assert_eq!(a.media[1].ext.rid, None);
        assert_eq!(a.media[1].ext.mid, Some(4));
        assert!(lines_of(&a.sdp, "session").contains(&"a=group:BUNDLE 0 1".to_owned()));
        let blocks = mline_blocks(&a.sdp);
        assert!(blocks[1].contains(&"a=sendonly".to_owned()));
        assert!(blocks[1].contains(&"a=ssrc-group:FID 2222 3333".to_owned()));
        assert!(blocks[1].contains(&"a=msid:alice alice-cam".to_owned()));
        assert!(blocks[0].contains(&"a=ssrc:1111 cname:alice".to_owned()));
        assert!(blocks[0].contains(&"a=setup:passive".to_owned()));
        assert!(!a.sdp.contains("rtp-stream-id"));
    }

    #[test]
    fn aiortc_whep_offer_gets_h264_when_that_is_what_we_have() {
        let want = [WhepSource {
            codec: "h264",
            rtx_ssrc: None,
            ..sources()[0]
        }];
        let a = answer_subscribe(
            fixtures::AIORTC_WHEP,
            &local(),
            &want,
            &SdpLimits::default(),
        )
        .unwrap();
        // aiortc offers 42001f then 42e01f; we take 42e01f; no rtx without an rtx ssrc.
        assert!(!a.media[0].accepted);
        assert!(a.sdp.contains("m=audio 0 "));
        let video = a.media[1].codec.as_ref().unwrap();
        assert_eq!(video.name, "H264");
        assert!(video
            .fmtp
            .as_deref()
            .unwrap()
            .contains("profile-level-id=42e01f"));
        assert_eq!(video.rtx_payload_type, None);
        assert!(!a.sdp.contains("ssrc-group"));
        assert!(lines_of(&a.sdp, "session").contains(&"a=group:BUNDLE 1".to_owned()));
    }

    #[test]
    fn nothing_to_send_is_unsupported() {
        let want = [WhepSource {
            codec: "AV1",
            ..sources()[0]
        }];
        let err = answer_subscribe(
            fixtures::AIORTC_WHEP,
            &local(),
            &want,
            &SdpLimits::default(),
        )
        .unwrap_err();
        assert_eq!(err, SdpError::NothingAccepted);
        let err = answer_subscribe(fixtures::CHROME_WHEP, &local(), &[], &SdpLimits::default())
            .unwrap_err();
        assert_eq!(err.code(), "sdp_unsupported");
    }

    #[test]
    fn sendonly_m_lines_get_no_source() {
        // A publish offer sent to WHEP: nothing in it can receive.
        let err = answer_subscribe(
            fixtures::CHROME_PUBLISH_SIMULCAST,
            &local(),
            &sources(),
            &SdpLimits::default(),
        )
        .unwrap_err();
        assert_eq!(err, SdpError::NothingAccepted);
    }

    #[test]
    fn two_video_m_lines_get_two_sources() {
        let offer = fixtures::AIORTC_WHEP;
        let mut doubled = offer.to_owned();
        // Append a copy of the video m-line with mid 2 (and its own ssrcs) and bundle it.
        let video_start = offer.find("m=video").unwrap();
        doubled.push_str(
            &offer[video_start..]
                .replace("a=mid:1", "a=mid:2")
                .replace("700293715", "17")
                .replace("3332337609", "18"),
        );
        let doubled = doubled.replacen("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 2", 1);
        let want = [
            sources()[0],
            WhepSource {
                ssrc: 4444,
                rtx_ssrc: Some(5555),
                stream_id: "bob",
                track_id: "bob-cam",
                ..sources()[0]
            },
        ];
        let a = answer_subscribe(&doubled, &local(), &want, &SdpLimits::default()).unwrap();
        assert_eq!(
            a.media.iter().map(|m| m.source).collect::<Vec<_>>(),
            vec![None, Some(0), Some(1)]
        );
        assert!(a.sdp.contains("a=ssrc-group:FID 4444 5555"));
    }
}
