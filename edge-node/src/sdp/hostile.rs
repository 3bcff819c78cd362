//! Hostile-input tests across the whole module: oversized, garbage and mutated SDP must give
//! a typed error (never a panic), and whatever we do answer must itself be sound SDP.

use super::fixtures;
use super::parse::parse;
use super::tests_common::local;
use super::{
    answer_publish, answer_subscribe, parse_subscriber_answer, MediaKind, SdpError, SdpLimits,
    WhepSource,
};

const HEAD: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n";
const TRANSPORT: &str = "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n\
    a=fingerprint:sha-256 00:01:02:03:04:05:06:07:08:09:0A:0B:0C:0D:0E:0F:10:11:12:13:14:15:16:17:18:19:1A:1B:1C:1D:1E:1F\r\n\
    a=setup:actpass\r\n";

/// An offer of `n` opus m-lines, all bundled.
fn many_m_lines(n: usize) -> String {
    let mut s = String::from(HEAD);
    s.push_str("a=group:BUNDLE");
    for i in 0..n {
        s.push_str(&format!(" {i}"));
    }
    s.push_str("\r\n");
    s.push_str(TRANSPORT);
    for i in 0..n {
        s.push_str(&format!(
            "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:{i}\r\na=sendonly\r\n\
             a=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=ssrc:{} cname:x\r\n",
            i + 1
        ));
    }
    s
}

#[test]
fn ten_thousand_m_lines_are_refused_by_the_limits() {
    let offer = many_m_lines(10_000);
    let err = answer_publish(&offer, &local(), &SdpLimits::default()).unwrap_err();
    assert!(matches!(err, SdpError::TooLarge { .. }), "{err}");
    assert_eq!(err.code(), "sdp_invalid");
    // With the byte and line limits lifted, the m-line limit stops it before the parser runs.
    let limits = SdpLimits {
        max_bytes: usize::MAX,
        max_line_bytes: usize::MAX,
        ..SdpLimits::default()
    };
    let err = answer_publish(&offer, &local(), &limits).unwrap_err();
    assert_eq!(err, SdpError::TooManyMedia { max: 32 });
}

/// With every limit lifted, 10,000 m-lines are answered (the 16-character mid bound still
/// holds): per-m-line work is hash lookups, so this stays linear. Not timed (speed belongs to
/// benchmarks), but a quadratic step would make this test take minutes.
#[test]
fn ten_thousand_m_lines_within_lifted_limits_are_answered() {
    let offer = many_m_lines(10_000);
    let limits = SdpLimits {
        max_bytes: usize::MAX,
        max_media: usize::MAX,
        max_line_bytes: usize::MAX,
    };
    let a = answer_publish(&offer, &local(), &limits).unwrap();
    assert_eq!(a.media.len(), 10_000);
    assert!(a.media.iter().all(|m| m.active));
    assert_eq!(a.sdp.matches("a=recvonly\r\n").count(), 10_000);
}

#[test]
fn garbage_is_invalid() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let lossy = String::from_utf8_lossy(&bytes).into_owned();
    let cases = [
        "",
        "\r\n",
        "v=0",
        "v=1\r\n",
        "hello world",
        "v=0\r\no=- x 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 99999 UDP/TLS/RTP/SAVPF 96\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=foo 9 UDP/TLS/RTP/SAVPF 96\r\n",
        "\u{feff}v=0\r\n",
        lossy.as_str(),
    ];
    for text in cases {
        let err = answer_publish(text, &local(), &SdpLimits::default()).unwrap_err();
        assert_eq!(err.code(), "sdp_invalid", "{text:?}: {err}");
        assert!(err.to_string().len() < 400, "error echoes too much: {err}");
    }
}

#[test]
fn huge_attribute_lines_are_refused_and_not_echoed() {
    // Inside the 64 KiB message limit, over the 4 KiB line limit.
    let huge = "x".repeat(50_000);
    let offer = fixtures::CHROME_PUBLISH_SIMULCAST.replacen(
        "a=fmtp:111 minptime=10;useinbandfec=1",
        &format!("a=fmtp:111 minptime=10;{huge}"),
        1,
    );
    let err = answer_publish(&offer, &local(), &SdpLimits::default()).unwrap_err();
    assert!(matches!(err, SdpError::LineTooLong { .. }), "{err}");
    // A long invalid value inside the line limit is clipped in the error.
    let limits = SdpLimits {
        max_line_bytes: 100_000,
        max_bytes: 1 << 20,
        ..SdpLimits::default()
    };
    let offer = fixtures::CHROME_PUBLISH_SIMULCAST.replacen("a=mid:0", &format!("a=mid:{huge}"), 1);
    let err = answer_publish(&offer, &local(), &limits).unwrap_err();
    assert_eq!(err.code(), "sdp_invalid");
    assert!(err.to_string().len() < 300, "{err}");
}

/// A small deterministic generator (xorshift64*), so a failing case replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Lines worth splicing into offers: the attributes this module reads, with edge-case values.
const SPLICE: &[&str] = &[
    "a=rid:x send",
    "a=rid:q recv",
    "a=simulcast:send x;~y,z",
    "a=simulcast:recv q",
    "a=simulcast:",
    "a=ssrc-group:FID 1",
    "a=ssrc-group:SIM 5 6 7",
    "a=ssrc-group:FID 4294967295 0",
    "a=ssrc:4294967295 msid:a",
    "a=extmap:15/sendonly urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=extmap:200 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "a=extmap:3/bogus x",
    "a=extmap-allow-mixed",
    "a=rtpmap:96 VP8/90000/2/3",
    "a=rtpmap:127 H264/90000",
    "a=rtpmap:111 opus/48000/2",
    "a=fmtp:127 packetization-mode=1;profile-level-id=zzzzzz",
    "a=fmtp:97 apt=",
    "a=rtcp-fb:* nack",
    "a=rtcp-fb:x nack",
    "a=group:BUNDLE",
    "a=group:BUNDLE 0 0",
    "a=bundle-only",
    "a=mid:",
    "a=mid:9",
    "a=setup:holdconn",
    "a=fingerprint:sha-256",
    "a=fingerprint:sha-512 00",
    "a=ice-ufrag:",
    "a=msid:",
    "a=inactive",
    "m=audio 0 UDP/TLS/RTP/SAVPF 111",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "m=video 9 RTP/AVP 96",
    "c=IN IP6 ::",
    "b=AS:30",
    "k=clear:x",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for _ in 0..=rng.below(3) {
        let n = lines.len().max(1);
        match rng.below(7) {
            0 if !lines.is_empty() => {
                lines.remove(rng.below(n));
            }
            1 if !lines.is_empty() => {
                let l = lines[rng.below(n)].clone();
                lines.insert(rng.below(n), l);
            }
            2 if !lines.is_empty() => {
                let (a, b) = (rng.below(n), rng.below(n));
                lines.swap(a, b);
            }
            3 if !lines.is_empty() => {
                let i = rng.below(n);
                let cut = rng.below(lines[i].len() + 1);
                let cut = (0..=cut)
                    .rev()
                    .find(|c| lines[i].is_char_boundary(*c))
                    .unwrap_or(0);
                lines[i].truncate(cut);
            }
            4 if !lines.is_empty() => {
                // Overwrite one byte with a printable ASCII character.
                let i = rng.below(n);
                let mut bytes = lines[i].clone().into_bytes();
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    if bytes[at].is_ascii() {
                        bytes[at] = b' ' + rng.below(95) as u8;
                    }
                }
                lines[i] = String::from_utf8(bytes).unwrap_or_default();
            }
            _ => {
                let l = SPLICE[rng.below(SPLICE.len())].to_owned();
                lines.insert(rng.below(n + 1), l);
            }
        }
    }
    let mut out = lines.join("\r\n");
    out.push_str("\r\n");
    out
}

/// Invariants of any answer we produce: it parses with our own parser, every BUNDLE mid is an
/// m-line with a non-zero port, every other m-line has port 0.
fn check_answer(sdp: &str) {
    let p = parse(sdp, &SdpLimits::default())
        .unwrap_or_else(|e| panic!("our answer does not parse ({e}):\n{sdp}"));
    let bundle = p.bundle.clone().expect("answers always bundle");
    assert!(!bundle.is_empty());
    for m in &p.media {
        let bundled = m.mid.as_ref().is_some_and(|mid| bundle.contains(mid));
        assert_eq!(bundled, m.port != 0, "m-line {} of:\n{sdp}", m.index);
    }
    let tag = p.media_by_mid(&bundle[0]).expect("tag m-line");
    p.remote_transport(tag).expect("our transport is valid");
}

#[test]
fn mutated_offers_never_panic_and_answers_stay_sound() {
    let want = [
        WhepSource {
            kind: MediaKind::Audio,
            codec: "opus",
            ssrc: 1,
            rtx_ssrc: None,
            stream_id: "s",
            track_id: "a",
        },
        WhepSource {
            kind: MediaKind::Video,
            codec: "VP8",
            ssrc: 2,
            rtx_ssrc: Some(3),
            stream_id: "s",
            track_id: "v",
        },
    ];
    let seeds = [
        fixtures::CHROME_PUBLISH_SIMULCAST,
        fixtures::CHROME_PUBLISH_DATACHANNEL,
        fixtures::CHROME_WHEP,
        fixtures::AIORTC_PUBLISH,
        fixtures::AIORTC_WHEP,
        fixtures::FIREFOX_STYLE,
        fixtures::LEGACY_SIM,
        fixtures::OBS_WHIP,
    ];
    let mut rng = Rng(0x5eed_f5d9);
    let (mut ok, mut refused) = (0u32, 0u32);
    for _ in 0..120 {
        for seed in seeds {
            let text = mutate(&mut rng, seed);
            match answer_publish(&text, &local(), &SdpLimits::default()) {
                Ok(a) => {
                    ok += 1;
                    check_answer(&a.sdp);
                }
                Err(e) => {
                    refused += 1;
                    assert!(["sdp_invalid", "sdp_unsupported"].contains(&e.code()));
                }
            }
            if let Ok(a) = answer_subscribe(&text, &local(), &want, &SdpLimits::default()) {
                check_answer(&a.sdp);
            }
            let _ = parse_subscriber_answer(&text, &["0", "1"], &SdpLimits::default());
        }
    }
    // The mutations must exercise both outcomes, or this test proves little.
    assert!(ok > 100 && refused > 100, "ok {ok}, refused {refused}");
}
