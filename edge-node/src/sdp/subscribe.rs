//! The subscriber PC: we offer what we send, the client answers (JSEP, RFC 9429 §5.2, §5.3).

use super::error::{Location, SdpError};
use super::ext;
use super::parse::parse;
use super::publish::RTP_PROTOS;
use super::write::{self, MediaBuilder};
use super::{
    Direction, HeaderExtIds, LocalTransport, OutgoingMedia, SdpLimits, Setup, SubscriberAnswer,
};

/// Our offer for a subscriber PC. Every m-line is `sendonly` (or `inactive` when `!active`, kept
/// so m-line order never changes across renegotiations, RFC 3264 §8), `a=setup:actpass` (the
/// client must answer `active`: we are the DTLS server), all mids in one BUNDLE group.
///
/// `session_id` must stay the same and `version` grow across the offers of one PC (RFC 3264 §8).
/// Mids are ours and must be SDP tokens; stream and track ids are made tokens (other characters
/// become `-`). The stream id is also the CNAME, so a participant's audio and video sync.
/// Header extensions: every `Some` id of `ext`, except audio-level on video and the rid ids on
/// audio.
pub fn subscriber_offer(
    session_id: u64,
    version: u64,
    local: &LocalTransport,
    media: &[OutgoingMedia],
    ext: &HeaderExtIds,
) -> String {
    let mut sd = write::session(session_id, version);
    let mids: Vec<&str> = media.iter().map(|m| m.mid.as_str()).collect();
    write::session_common(&mut sd, &mids);
    for m in media {
        let mut b = MediaBuilder::new(
            m.kind.as_str(),
            RTP_PROTOS[0],
            write::formats_of(&m.codec),
            false,
        );
        b.attr("mid", m.mid.as_str());
        b.transport(local, Setup::ActPass);
        b.direction(if m.active {
            Direction::SendOnly
        } else {
            Direction::Inactive
        });
        b.extmaps(&ext::offer_lines(m.kind, ext));
        b.codec(&m.codec);
        if m.active {
            let rtx = m.rtx_ssrc.filter(|_| m.codec.rtx_payload_type.is_some());
            b.source(m.ssrc, rtx, &m.stream_id, &m.track_id);
        }
        b.candidates(&local.candidates);
        sd.media_descriptions.push(b.finish());
    }
    sd.marshal()
}

/// Checks a client's answer to [`subscriber_offer`]: same m-lines in the same order (RFC 3264
/// §6), the accepted ones bundled, and `a=setup:active` (absent reads as active, RFC 4145 §4).
pub fn parse_subscriber_answer(
    answer: &str,
    offered_mids: &[&str],
    limits: &SdpLimits,
) -> Result<SubscriberAnswer, SdpError> {
    let parsed = parse(answer, limits)?;
    if parsed.ice_lite {
        return Err(SdpError::IceLitePeer);
    }
    if parsed.media.len() != offered_mids.len() {
        return Err(SdpError::MediaCount {
            expected: offered_mids.len(),
            found: parsed.media.len(),
        });
    }
    let bundle = parsed.bundle.as_deref().unwrap_or(&[]);
    let mut accepted_mids = Vec::new();
    for (index, (m, &expected)) in parsed.media.iter().zip(offered_mids).enumerate() {
        match m.mid.as_deref() {
            Some(mid) if mid == expected => {}
            // A rejected m-line may come back without its mid.
            None if m.port == 0 => continue,
            found => {
                return Err(SdpError::MediaMismatch {
                    index,
                    expected: expected.to_owned(),
                    found: found.unwrap_or("").to_owned(),
                })
            }
        }
        if m.port == 0 {
            continue;
        }
        if !bundle.iter().any(|b| b == expected) {
            return Err(SdpError::NotBundled {
                mid: expected.to_owned(),
            });
        }
        accepted_mids.push(expected.to_owned());
    }
    let tag = bundle
        .first()
        .and_then(|mid| parsed.media_by_mid(mid))
        .ok_or(if offered_mids.is_empty() || accepted_mids.is_empty() {
            SdpError::NothingAccepted
        } else {
            SdpError::MissingBundle
        })?;
    let remote = parsed.remote_transport(tag)?;
    match remote.setup {
        Setup::Active => {}
        Setup::ActPass => {
            return Err(SdpError::attr(
                "setup",
                Location::Media(tag.index),
                "actpass",
                "actpass is for offers, an answer picks a role (RFC 5763 §5)",
            ))
        }
        setup @ (Setup::Passive | Setup::HoldConn) => return Err(SdpError::DtlsRole { setup }),
    }
    let mut ext = HeaderExtIds::default();
    for m in parsed.media.iter().filter(|m| m.port != 0) {
        let ids = ext::ids_of(&m.extmaps);
        for (ours, theirs) in [
            (&mut ext.mid, ids.mid),
            (&mut ext.rid, ids.rid),
            (&mut ext.repaired_rid, ids.repaired_rid),
            (&mut ext.abs_send_time, ids.abs_send_time),
            (&mut ext.transport_cc, ids.transport_cc),
            (&mut ext.audio_level, ids.audio_level),
        ] {
            if ours.is_none() {
                *ours = theirs;
            }
        }
    }
    Ok(SubscriberAnswer {
        remote,
        accepted_mids,
        ext,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::fixtures;
    use crate::sdp::tests_common::{lines_of, local, mline_blocks};
    use crate::sdp::{Codec, MediaKind};

    fn outgoing() -> Vec<OutgoingMedia> {
        vec![
            OutgoingMedia {
                mid: "0".into(),
                kind: MediaKind::Audio,
                codec: Codec {
                    payload_type: 111,
                    name: "opus".into(),
                    clock_rate: 48_000,
                    channels: Some(2),
                    fmtp: Some("minptime=10;useinbandfec=1".into()),
                    rtcp_fb: vec!["transport-cc".into()],
                    rtx_payload_type: None,
                },
                ssrc: 1111,
                rtx_ssrc: None,
                stream_id: "alice".into(),
                track_id: "alice-mic".into(),
                active: true,
            },
            OutgoingMedia {
                mid: "1".into(),
                kind: MediaKind::Video,
                codec: Codec {
                    payload_type: 96,
                    name: "VP8".into(),
                    clock_rate: 90_000,
                    channels: None,
                    fmtp: None,
                    rtcp_fb: ["nack", "nack pli", "ccm fir", "goog-remb", "transport-cc"]
                        .map(String::from)
                        .to_vec(),
                    rtx_payload_type: Some(97),
                },
                ssrc: 2222,
                rtx_ssrc: Some(3333),
                stream_id: "alice".into(),
                track_id: "alice-cam".into(),
                active: true,
            },
            OutgoingMedia {
                mid: "2".into(),
                kind: MediaKind::Video,
                codec: Codec {
                    payload_type: 96,
                    name: "VP8".into(),
                    clock_rate: 90_000,
                    channels: None,
                    fmtp: None,
                    rtcp_fb: vec![],
                    rtx_payload_type: Some(97),
                },
                ssrc: 4444,
                rtx_ssrc: Some(5555),
                stream_id: "bob".into(),
                track_id: "bob-cam".into(),
                active: false,
            },
        ]
    }

    fn ext() -> HeaderExtIds {
        HeaderExtIds {
            mid: Some(4),
            abs_send_time: Some(2),
            transport_cc: Some(3),
            audio_level: Some(1),
            ..Default::default()
        }
    }

    fn offer() -> String {
        subscriber_offer(4242, 7, &local(), &outgoing(), &ext())
    }

    #[test]
    fn offer_has_actpass_sendonly_sources_and_bundle() {
        let sdp = offer();
        assert!(sdp.contains("o=- 4242 7 IN IP4 0.0.0.0\r\n"));
        let session = lines_of(&sdp, "session");
        assert!(session.contains(&"a=group:BUNDLE 0 1 2".to_owned()));
        assert!(session.contains(&"a=ice-lite".to_owned()));
        let blocks = mline_blocks(&sdp);
        assert_eq!(blocks[0][0], "m=audio 9 UDP/TLS/RTP/SAVPF 111");
        assert_eq!(blocks[1][0], "m=video 9 UDP/TLS/RTP/SAVPF 96 97");
        for b in &blocks {
            assert!(b.contains(&"a=setup:actpass".to_owned()));
            assert!(b.contains(&"a=rtcp-mux".to_owned()));
            assert!(b.contains(&"a=end-of-candidates".to_owned()));
        }
        let has = |b: &Vec<String>, l: &str| b.iter().any(|x| x == l);
        assert!(has(&blocks[0], "a=sendonly"));
        assert!(has(&blocks[0], "a=msid:alice alice-mic"));
        assert!(has(&blocks[0], "a=ssrc:1111 cname:alice"));
        assert!(has(
            &blocks[0],
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level"
        ));
        assert!(!blocks[0].iter().any(|l| l.starts_with("a=ssrc-group")));
        assert!(has(&blocks[1], "a=ssrc-group:FID 2222 3333"));
        assert!(has(&blocks[1], "a=ssrc:3333 cname:alice"));
        assert!(has(&blocks[1], "a=rtcp-fb:96 goog-remb"));
        assert!(has(&blocks[1], "a=fmtp:97 apt=96"));
        assert!(!blocks[1].iter().any(|l| l.contains("ssrc-audio-level")));
        assert!(has(&blocks[2], "a=inactive"));
        assert!(!blocks[2]
            .iter()
            .any(|l| l.starts_with("a=ssrc") || l.starts_with("a=msid")));
    }

    #[test]
    fn offer_parses_back() {
        let sdp = offer();
        let p = parse(&sdp, &SdpLimits::default()).unwrap();
        assert_eq!(p.media.len(), 3);
        assert_eq!(p.media[1].ssrcs[0].rtx_ssrc, Some(3333));
        assert_eq!(p.media[0].msid, Some(("alice".into(), "alice-mic".into())));
        assert_eq!(
            p.remote_transport(&p.media[0]).unwrap().setup,
            Setup::ActPass
        );
    }

    #[test]
    fn empty_offer_has_no_bundle_group() {
        let sdp = subscriber_offer(1, 1, &local(), &[], &ext());
        assert!(!sdp.contains("a=group"));
        assert!(!sdp.contains("m="));
    }

    /// A Chrome-shaped answer to `offer()`.
    fn chrome_answer() -> String {
        let mut s = String::from(
            "v=0\r\no=- 7390257329329958372 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
             a=group:BUNDLE 0 1 2\r\na=msid-semantic: WMS\r\n",
        );
        for (kind, mid, fmt, extra, dir) in [
            ("audio", "0", "111", "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\na=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=rtpmap:111 opus/48000/2\r\n", "recvonly"),
            ("video", "1", "96 97", "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\na=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n", "recvonly"),
            ("video", "2", "96 97", "a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n", "inactive"),
        ] {
            s.push_str(&format!(
                "m={kind} 9 UDP/TLS/RTP/SAVPF {fmt}\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
                 a=ice-ufrag:cLnT\r\na=ice-pwd:Jb6MZu0gXUDvQ7Ahh2dkP3xk\r\na=ice-options:trickle\r\n\
                 a=fingerprint:sha-256 21:A4:AC:85:47:06:46:AE:8B:BB:1E:08:65:18:D1:45:72:DE:97:D3:1C:E3:6B:69:70:80:36:56:05:C3:CF:DC\r\n\
                 a=setup:active\r\na=mid:{mid}\r\n{extra}a={dir}\r\na=rtcp-mux\r\n"
            ));
        }
        s
    }

    #[test]
    fn chrome_answer_is_accepted() {
        let a = parse_subscriber_answer(&chrome_answer(), &["0", "1", "2"], &SdpLimits::default())
            .unwrap();
        assert_eq!(a.accepted_mids, vec!["0", "1", "2"]);
        assert_eq!(a.remote.ice_ufrag, "cLnT");
        assert_eq!(a.remote.setup, Setup::Active);
        assert_eq!(
            a.ext,
            HeaderExtIds {
                mid: Some(4),
                transport_cc: Some(3),
                audio_level: Some(1),
                ..Default::default()
            }
        );
    }

    #[test]
    fn answer_errors() {
        let base = chrome_answer();
        let limits = SdpLimits::default();
        let mids = ["0", "1", "2"];
        let cases: Vec<(String, &[&str], &str)> = vec![
            (base.clone(), &["0", "1"], "sdp_invalid"),
            (base.replacen("a=mid:1", "a=mid:7", 1), &mids, "sdp_invalid"),
            (
                base.replace("a=setup:active", "a=setup:passive"),
                &mids,
                "sdp_unsupported",
            ),
            (
                base.replace("a=setup:active", "a=setup:actpass"),
                &mids,
                "sdp_invalid",
            ),
            (
                base.replacen("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 0 1", 1),
                &mids,
                "sdp_unsupported",
            ),
            (
                base.replacen("a=group:BUNDLE 0 1 2\r\n", "", 1),
                &mids,
                "sdp_unsupported",
            ),
            (
                base.replace("a=ice-ufrag:cLnT\r\n", ""),
                &mids,
                "sdp_unsupported",
            ),
            ("garbage".into(), &mids, "sdp_invalid"),
            (
                base.replacen("t=0 0\r\n", "t=0 0\r\na=ice-lite\r\n", 1),
                &mids,
                "sdp_unsupported",
            ),
        ];
        for (answer, offered, code) in cases {
            let err = parse_subscriber_answer(&answer, offered, &limits).unwrap_err();
            assert_eq!(err.code(), code, "{err}");
        }
        let setup_error = parse_subscriber_answer(
            &base.replace("a=setup:active", "a=setup:passive"),
            &mids,
            &limits,
        )
        .unwrap_err();
        assert_eq!(
            setup_error,
            SdpError::DtlsRole {
                setup: Setup::Passive
            }
        );
    }

    #[test]
    fn rejected_m_lines_are_not_accepted() {
        let answer = chrome_answer()
            .replacen(
                "m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0",
                "m=video 0 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0",
                2,
            )
            .replacen("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 0", 1);
        let a = parse_subscriber_answer(&answer, &["0", "1", "2"], &SdpLimits::default()).unwrap();
        assert_eq!(a.accepted_mids, vec!["0"]);
        // A missing setup reads as active (RFC 4145 §4).
        let no_setup = chrome_answer().replace("a=setup:active\r\n", "");
        let a =
            parse_subscriber_answer(&no_setup, &["0", "1", "2"], &SdpLimits::default()).unwrap();
        assert_eq!(a.remote.setup, Setup::Active);
    }

    /// Real answers of Chromium and aiortc to our interop offer (interop.rs, mids 0 1 2).
    #[test]
    fn real_client_answers_are_accepted() {
        let limits = SdpLimits::default();
        let chrome = parse_subscriber_answer(
            fixtures::CHROME_SUBSCRIBER_ANSWER,
            &["0", "1", "2"],
            &limits,
        )
        .unwrap();
        assert_eq!(chrome.accepted_mids, vec!["0", "1", "2"]);
        assert_eq!(chrome.remote.ice_ufrag, "bTTW");
        assert_eq!(chrome.remote.setup, Setup::Active);
        assert_eq!(chrome.ext.transport_cc, Some(3));
        let aiortc = parse_subscriber_answer(
            fixtures::AIORTC_SUBSCRIBER_ANSWER,
            &["0", "1", "2"],
            &limits,
        )
        .unwrap();
        assert_eq!(aiortc.accepted_mids, vec!["0", "1", "2"]);
        assert_eq!(aiortc.remote.setup, Setup::Active);
        // aiortc does not do transport-wide congestion control.
        assert_eq!(aiortc.ext.transport_cc, None);
        assert_eq!(aiortc.ext.mid, Some(4));
    }

    #[test]
    fn interop_offer_is_what_the_clients_answered() {
        use crate::sdp::interop::{interop_outgoing, INTEROP_EXT};
        let sdp = subscriber_offer(
            7_000_000_001,
            1,
            &local(),
            &interop_outgoing(),
            &INTEROP_EXT,
        );
        let p = parse(&sdp, &SdpLimits::default()).unwrap();
        let mids: Vec<_> = p.media.iter().filter_map(|m| m.mid.clone()).collect();
        assert_eq!(mids, vec!["0", "1", "2"]);
    }
}
