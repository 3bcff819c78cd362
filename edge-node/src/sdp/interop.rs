//! A hook for interop runs against real WebRTC stacks (testdata/interop/): an ignored test that
//! reads an SDP from `KCS_SDP_IN`, runs one of our functions on it (`KCS_SDP_MODE`) and writes
//! the result to `KCS_SDP_OUT`. The scripts drive headless Chromium and aiortc through it; the
//! SDPs the clients wrote back are kept as fixtures for the ordinary tests.

use super::{
    answer_publish, answer_subscribe, parse_subscriber_answer, subscriber_offer, Codec,
    Fingerprint, HeaderExtIds, LocalTransport, MediaKind, OutgoingMedia, SdpLimits, WhepSource,
};

/// Our side in interop runs: candidates on loopback's discard port, where nothing answers, so a
/// client's connectivity checks go nowhere beyond this machine.
fn local() -> LocalTransport {
    LocalTransport {
        ice_ufrag: "KcSe".to_owned(),
        ice_pwd: "kcsedgeinteroppassword0".to_owned(),
        fingerprint: Fingerprint {
            algorithm: "sha-256".to_owned(),
            value: ["5A"; 32].join(":"),
        },
        candidates: vec!["127.0.0.1:9".parse().expect("literal")],
    }
}

/// What the interop subscriber offer carries: opus and VP8 with RTX, as the edge would send.
pub(crate) fn interop_outgoing() -> Vec<OutgoingMedia> {
    let fb = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
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
                rtcp_fb: fb(&["transport-cc"]),
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
                rtcp_fb: fb(&["nack", "nack pli", "ccm fir", "goog-remb", "transport-cc"]),
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
                rtcp_fb: fb(&["nack", "nack pli"]),
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

pub(crate) const INTEROP_EXT: HeaderExtIds = HeaderExtIds {
    mid: Some(4),
    rid: None,
    repaired_rid: None,
    abs_send_time: Some(2),
    transport_cc: Some(3),
    audio_level: Some(1),
};

#[test]
#[ignore = "driven by testdata/interop scripts"]
fn interop_step() {
    let (Ok(mode), Ok(out)) = (std::env::var("KCS_SDP_MODE"), std::env::var("KCS_SDP_OUT")) else {
        return;
    };
    let input = std::env::var("KCS_SDP_IN")
        .ok()
        .map(|p| std::fs::read_to_string(p).expect("KCS_SDP_IN readable"))
        .unwrap_or_default();
    let limits = SdpLimits::default();
    let want = [
        WhepSource {
            kind: MediaKind::Audio,
            codec: "opus",
            ssrc: 1111,
            rtx_ssrc: None,
            stream_id: "alice",
            track_id: "alice-mic",
        },
        WhepSource {
            kind: MediaKind::Video,
            codec: "VP8",
            ssrc: 2222,
            rtx_ssrc: Some(3333),
            stream_id: "alice",
            track_id: "alice-cam",
        },
    ];
    let result = match mode.as_str() {
        "publish" => answer_publish(&input, &local(), &limits)
            .map(|a| a.sdp)
            .map_err(|e| e.to_string()),
        "whep" => answer_subscribe(&input, &local(), &want, &limits)
            .map(|a| a.sdp)
            .map_err(|e| e.to_string()),
        "suboffer" => Ok(subscriber_offer(
            7_000_000_001,
            1,
            &local(),
            &interop_outgoing(),
            &INTEROP_EXT,
        )),
        "subanswer" => parse_subscriber_answer(&input, &["0", "1", "2"], &limits)
            .map(|a| {
                format!(
                    "accepted={:?} setup={} ext={:?}",
                    a.accepted_mids, a.remote.setup, a.ext
                )
            })
            .map_err(|e| e.to_string()),
        other => Err(format!("unknown mode {other}")),
    };
    let text = match result {
        Ok(s) => s,
        Err(e) => format!("ERROR {e}"),
    };
    std::fs::write(out, text).expect("KCS_SDP_OUT writable");
}
