//! The SDP a simulated participant writes and the little it needs to read back.
//!
//! Why not the edge's `sdp` module: that one is the server side (it answers offers and writes
//! offers for subscribers). A client needs the mirror image, and only a few facts from the
//! remote description: ICE credentials, the DTLS fingerprint, the candidate to send to, the mids
//! and header-extension ids. Our offers follow the shape of Chromium's (BUNDLE, rtcp-mux,
//! `a=setup:actpass`, simulcast by `rid`), trimmed to the one codec per kind we send.

use std::fmt::Write as _;
use std::net::SocketAddr;

/// Header extension URIs (RFC 8285 registry names as browsers write them).
pub const EXT_AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
pub const EXT_TWCC: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";
pub const EXT_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
pub const EXT_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";

/// The header-extension ids our offers use (Chromium's numbering, so answers keep them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtIds {
    pub audio_level: Option<u8>,
    pub twcc: Option<u8>,
    pub mid: Option<u8>,
    pub rid: Option<u8>,
}

pub const OUR_EXT: ExtIds = ExtIds {
    audio_level: Some(1),
    twcc: Some(3),
    mid: Some(4),
    rid: Some(10),
};

/// Payload types we offer: Opus and VP8, the numbers Chromium uses.
pub const PT_OPUS: u8 = 111;
pub const PT_VP8: u8 = 96;

/// Simulcast rids, lowest layer first (the edge orders `q;h;f` as quarter < half < full).
pub const RIDS: [&str; 3] = ["q", "h", "f"];

/// Our side of a transport, as written into an SDP.
#[derive(Debug, Clone)]
pub struct LocalTransport {
    pub ufrag: String,
    pub pwd: String,
    pub fingerprint: String,
    pub candidate: SocketAddr,
}

/// What we publish on a publisher peer connection.
#[derive(Debug, Clone, Copy)]
pub struct PublishShape {
    pub audio: bool,
    /// Number of video encodings: 0 (no video), 1 (one layer) or 3 (simulcast q;h;f).
    pub video_layers: u8,
}

fn session_header(out: &mut String, mids: &[&str]) {
    let _ = write!(
        out,
        "v=0\r\no=- {} 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE {}\r\na=msid-semantic: WMS loadtest\r\n",
        rand::random::<u32>(),
        mids.join(" ")
    );
}

fn transport_lines(out: &mut String, local: &LocalTransport, setup: &str) {
    let _ = write!(
        out,
        "c=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\na=candidate:1 1 udp 2122260223 {} {} typ host\r\na=ice-ufrag:{}\r\na=ice-pwd:{}\r\na=fingerprint:sha-256 {}\r\na=setup:{}\r\n",
        local.candidate.ip(),
        local.candidate.port(),
        local.ufrag,
        local.pwd,
        local.fingerprint,
        setup
    );
}

fn audio_section(out: &mut String, local: &LocalTransport, mid: &str, direction: &str) {
    let _ = write!(out, "m=audio 9 UDP/TLS/RTP/SAVPF {PT_OPUS}\r\n");
    transport_lines(out, local, "actpass");
    let _ = write!(
        out,
        "a=mid:{mid}\r\na=extmap:1 {EXT_AUDIO_LEVEL}\r\na=extmap:3 {EXT_TWCC}\r\na=extmap:4 {EXT_MID}\r\na={direction}\r\na=rtcp-mux\r\na=rtpmap:{PT_OPUS} opus/48000/2\r\na=rtcp-fb:{PT_OPUS} transport-cc\r\na=fmtp:{PT_OPUS} minptime=10;useinbandfec=1\r\n"
    );
}

fn video_section(out: &mut String, local: &LocalTransport, mid: &str, direction: &str) {
    let _ = write!(out, "m=video 9 UDP/TLS/RTP/SAVPF {PT_VP8}\r\n");
    transport_lines(out, local, "actpass");
    let _ = write!(
        out,
        "a=mid:{mid}\r\na=extmap:3 {EXT_TWCC}\r\na=extmap:4 {EXT_MID}\r\na=extmap:10 {EXT_RID}\r\na={direction}\r\na=rtcp-mux\r\na=rtpmap:{PT_VP8} VP8/90000\r\na=rtcp-fb:{PT_VP8} goog-remb\r\na=rtcp-fb:{PT_VP8} transport-cc\r\na=rtcp-fb:{PT_VP8} ccm fir\r\na=rtcp-fb:{PT_VP8} nack\r\na=rtcp-fb:{PT_VP8} nack pli\r\n"
    );
}

/// The publisher PC's offer (WebSocket `produce` and WHIP). Returns the SDP and the mids in
/// order: video first as mid `0` (when published), then audio.
///
/// Why video first: the edge takes a publisher transport's header-extension ids from its first
/// active m-section only, and the audio section cannot carry the rid extension; with audio
/// first the simulcast layers' rids, and so their SSRCs, would go unrecognised. (Chromium
/// orders audio first; that is an edge limitation, reported with this tool's work.) The cost:
/// the edge then does not read our audio-level extension.
pub fn publish_offer(local: &LocalTransport, shape: PublishShape) -> (String, Vec<String>) {
    let video = shape.video_layers > 0;
    let mut mids = Vec::new();
    if video {
        mids.push("0".to_owned());
    }
    if shape.audio {
        mids.push(mids.len().to_string());
    }
    let mut out = String::with_capacity(2048);
    let refs: Vec<&str> = mids.iter().map(String::as_str).collect();
    session_header(&mut out, &refs);
    if video {
        video_section(&mut out, local, &mids[0], "sendonly");
        if shape.video_layers > 1 {
            let rids = &RIDS[..usize::from(shape.video_layers.min(3))];
            for rid in rids {
                let _ = write!(out, "a=rid:{rid} send\r\n");
            }
            let _ = write!(out, "a=simulcast:send {}\r\n", rids.join(";"));
        }
    }
    if shape.audio {
        audio_section(&mut out, local, &mids[mids.len() - 1], "sendonly");
    }
    (out, mids)
}

/// The WHEP offer: receive-only audio and video.
pub fn whep_offer(local: &LocalTransport) -> String {
    let mut out = String::with_capacity(2048);
    session_header(&mut out, &["0", "1"]);
    audio_section(&mut out, local, "0", "recvonly");
    video_section(&mut out, local, "1", "recvonly");
    out
}

/// Facts read from a remote description (an answer from the edge, or its subscriber offer).
#[derive(Debug, Clone, Default)]
pub struct RemoteDescription {
    pub ufrag: String,
    pub pwd: String,
    pub fingerprint: String,
    /// UDP host candidates, in the order given.
    pub candidates: Vec<SocketAddr>,
    pub media: Vec<RemoteMedia>,
}

/// One m-section of a remote description.
#[derive(Debug, Clone, Default)]
pub struct RemoteMedia {
    pub kind: String,
    pub port: u16,
    pub mid: Option<String>,
    pub direction: String,
    pub payload_types: Vec<u8>,
    /// The section's lines that an answer repeats: rtpmap, fmtp, rtcp-fb, extmap.
    pub codec_lines: Vec<String>,
    pub ext: ExtIds,
}

/// Why a remote description is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdpReadError {
    #[error("remote SDP has no {0}")]
    Missing(&'static str),
}

/// Reads what a client needs from the edge's SDP. Tolerant: unknown lines are skipped.
pub fn read_remote(sdp: &str) -> Result<RemoteDescription, SdpReadError> {
    let mut d = RemoteDescription::default();
    let mut cur: Option<RemoteMedia> = None;
    for line in sdp.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("m=") {
            if let Some(done) = cur.take() {
                d.media.push(done);
            }
            let mut parts = m.split_whitespace();
            let kind = parts.next().unwrap_or_default().to_owned();
            let port = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let _proto = parts.next();
            let payload_types = parts.filter_map(|p| p.parse().ok()).collect();
            cur = Some(RemoteMedia {
                kind,
                port,
                direction: "sendrecv".to_owned(),
                payload_types,
                ext: ExtIds {
                    audio_level: None,
                    twcc: None,
                    mid: None,
                    rid: None,
                },
                ..Default::default()
            });
            continue;
        }
        let Some(attr) = line.strip_prefix("a=") else {
            continue;
        };
        let (name, value) = attr.split_once(':').unwrap_or((attr, ""));
        match name {
            "ice-ufrag" if d.ufrag.is_empty() => d.ufrag = value.to_owned(),
            "ice-pwd" if d.pwd.is_empty() => d.pwd = value.to_owned(),
            "fingerprint" if d.fingerprint.is_empty() => {
                if let Some(fp) = value.strip_prefix("sha-256 ") {
                    d.fingerprint = fp.trim().to_owned();
                }
            }
            "candidate" => {
                // foundation component transport priority address port typ host ...
                let f: Vec<&str> = value.split_whitespace().collect();
                if f.len() >= 8 && f[2].eq_ignore_ascii_case("udp") && f[7] == "host" {
                    if let Ok(addr) = format!("{}:{}", f[4], f[5]).parse::<SocketAddr>() {
                        if !d.candidates.contains(&addr) {
                            d.candidates.push(addr);
                        }
                    }
                }
            }
            _ => {}
        }
        let Some(m) = cur.as_mut() else { continue };
        match name {
            "mid" => m.mid = Some(value.to_owned()),
            "sendonly" | "recvonly" | "sendrecv" | "inactive" => m.direction = name.to_owned(),
            "rtpmap" | "fmtp" | "rtcp-fb" => m.codec_lines.push(line.to_owned()),
            "extmap" => {
                m.codec_lines.push(line.to_owned());
                let mut p = value.split_whitespace();
                let id = p.next().and_then(|i| i.split('/').next()?.parse().ok());
                match p.next() {
                    Some(EXT_AUDIO_LEVEL) => m.ext.audio_level = id,
                    Some(EXT_TWCC) => m.ext.twcc = id,
                    Some(EXT_MID) => m.ext.mid = id,
                    Some(EXT_RID) => m.ext.rid = id,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    if let Some(done) = cur.take() {
        d.media.push(done);
    }
    if d.ufrag.is_empty() || d.pwd.is_empty() {
        return Err(SdpReadError::Missing("ICE credentials"));
    }
    if d.fingerprint.is_empty() {
        return Err(SdpReadError::Missing("sha-256 fingerprint"));
    }
    if d.candidates.is_empty() {
        return Err(SdpReadError::Missing("UDP host candidate"));
    }
    Ok(d)
}

impl RemoteDescription {
    /// The candidate to send media to: `via` when given (a relay in the path), else the first
    /// candidate with the target's IP, else the first loopback one, else the first.
    pub fn pick_candidate(&self, target_ip: Option<std::net::IpAddr>) -> SocketAddr {
        target_ip
            .and_then(|ip| self.candidates.iter().find(|c| c.ip() == ip))
            .or_else(|| self.candidates.iter().find(|c| c.ip().is_loopback()))
            .or(self.candidates.first())
            .copied()
            .expect("read_remote checked there is a candidate")
    }

    /// The first header-extension ids found across the accepted m-sections.
    pub fn ext_ids(&self) -> ExtIds {
        let mut ext = ExtIds {
            audio_level: None,
            twcc: None,
            mid: None,
            rid: None,
        };
        for m in self.media.iter().filter(|m| m.port != 0) {
            ext.audio_level = ext.audio_level.or(m.ext.audio_level);
            ext.twcc = ext.twcc.or(m.ext.twcc);
            ext.mid = ext.mid.or(m.ext.mid);
            ext.rid = ext.rid.or(m.ext.rid);
        }
        ext
    }
}

/// Our answer to the edge's subscriber offer: every m-section mirrored in order, receive-only
/// (or inactive / rejected as offered), with the offered codec lines minus RTX (we want
/// retransmissions on the original SSRC, so the receiver sees the original sequence numbers).
pub fn subscriber_answer(offer: &RemoteDescription, local: &LocalTransport) -> String {
    let mids: Vec<&str> = offer
        .media
        .iter()
        .filter(|m| m.port != 0)
        .filter_map(|m| m.mid.as_deref())
        .collect();
    let mut out = String::with_capacity(1024 + 512 * offer.media.len());
    session_header(&mut out, &mids);
    for m in &offer.media {
        // Keep the primary codec (the first payload type), drop rtx and the rest.
        let pt = m.payload_types.first().copied().unwrap_or(0);
        if m.port == 0 {
            let _ = write!(
                out,
                "m={} 0 UDP/TLS/RTP/SAVPF {pt}\r\nc=IN IP4 0.0.0.0\r\n",
                m.kind
            );
            if let Some(mid) = &m.mid {
                let _ = write!(out, "a=mid:{mid}\r\n");
            }
            continue;
        }
        let _ = write!(out, "m={} 9 UDP/TLS/RTP/SAVPF {pt}\r\n", m.kind);
        transport_lines(&mut out, local, "active");
        if let Some(mid) = &m.mid {
            let _ = write!(out, "a=mid:{mid}\r\n");
        }
        let direction = match m.direction.as_str() {
            "inactive" | "recvonly" => "inactive",
            _ => "recvonly",
        };
        let _ = write!(out, "a={direction}\r\na=rtcp-mux\r\n");
        for line in &m.codec_lines {
            let keep = if line.starts_with("a=extmap") {
                true
            } else {
                // a=rtpmap:96 ..., a=fmtp:96 ..., a=rtcp-fb:96 ...
                line.split(':')
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|p| p.parse::<u8>().ok())
                    == Some(pt)
            };
            if keep {
                out.push_str(line);
                out.push_str("\r\n");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalTransport {
        LocalTransport {
            ufrag: "abcd".into(),
            pwd: "p".repeat(24),
            fingerprint: "AA:".repeat(31) + "AA",
            candidate: "127.0.0.1:5000".parse().unwrap(),
        }
    }

    #[test]
    fn offer_reads_back_with_its_facts() {
        let (sdp, mids) = publish_offer(
            &local(),
            PublishShape {
                audio: true,
                video_layers: 3,
            },
        );
        assert_eq!(mids, ["0", "1"]);
        assert!(sdp.contains("a=simulcast:send q;h;f\r\n"));
        let r = read_remote(&sdp).unwrap();
        assert_eq!(r.ufrag, "abcd");
        assert_eq!(
            r.candidates,
            ["127.0.0.1:5000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(r.media.len(), 2);
        assert_eq!(r.ext_ids(), OUR_EXT);
    }

    #[test]
    fn answer_mirrors_the_offer_and_drops_rtx() {
        let offer = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=ice-lite\r\na=group:BUNDLE 0 1\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 127.0.0.1\r\na=candidate:1 1 udp 1 127.0.0.1 4000 typ host\r\n\
a=ice-ufrag:srv1\r\na=ice-pwd:serverpassword\r\na=fingerprint:sha-256 BB:CC\r\na=setup:actpass\r\na=mid:0\r\n\
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=mid:1\r\na=sendonly\r\na=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=inactive\r\n";
        let r = read_remote(offer).unwrap();
        assert_eq!(
            r.candidates,
            ["127.0.0.1:4000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(r.ext_ids().twcc, Some(3));
        let a = subscriber_answer(&r, &local());
        assert!(a.contains("a=group:BUNDLE 0 1\r\n"), "{a}");
        assert!(a.contains("m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"));
        assert!(!a.contains("rtx"));
        assert!(a.contains("m=video 0 UDP/TLS/RTP/SAVPF 96\r\n"));
        assert_eq!(a.matches("a=setup:active").count(), 2);
        assert_eq!(a.matches("a=recvonly").count(), 2);
    }

    #[test]
    fn missing_facts_are_named() {
        let e = read_remote("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n").unwrap_err();
        assert!(e.to_string().contains("ICE credentials"));
    }
}
