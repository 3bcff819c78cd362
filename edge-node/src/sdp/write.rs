//! Building the SDP we send, on the `sdp` crate's types; shared by answers and offers.

use std::net::SocketAddr;

use sdp::description::common::{Address, Attribute, ConnectionInformation};
use sdp::description::media::{MediaDescription, MediaName, RangedPort};
use sdp::description::session::{Origin, SessionDescription, TimeDescription, Timing};

use super::ext::ExtLine;
use super::{Codec, Direction, LocalTransport, Setup};

/// Port for m-lines whose address is in the candidates (JSEP, RFC 9429 §5.2.1: "9" with
/// `c=IN IP4 0.0.0.0` when the default candidate is not given there).
const DISCARD_PORT: isize = 9;

/// A session id for an answer, derived from our ICE ufrag (random per session) so answers are
/// reproducible: FNV-1a, top bit cleared as JSEP §5.2.1 asks of session ids.
pub(crate) fn derived_session_id(ufrag: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ufrag.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h >> 1
}

pub(crate) fn session(session_id: u64, version: u64) -> SessionDescription {
    SessionDescription {
        version: 0,
        origin: Origin {
            username: "-".to_owned(),
            session_id,
            session_version: version,
            network_type: "IN".to_owned(),
            address_type: "IP4".to_owned(),
            unicast_address: "0.0.0.0".to_owned(),
        },
        session_name: "-".to_owned(),
        time_descriptions: vec![TimeDescription {
            timing: Timing {
                start_time: 0,
                stop_time: 0,
            },
            repeat_times: vec![],
        }],
        ..Default::default()
    }
}

pub(crate) fn session_attr(sd: &mut SessionDescription, key: &str, value: Option<String>) {
    sd.attributes.push(Attribute::new(key.to_owned(), value));
}

/// `a=group:BUNDLE ...` and `a=msid-semantic` (the session attributes every SDP of ours has).
pub(crate) fn session_common(sd: &mut SessionDescription, bundle: &[&str]) {
    session_attr(sd, "ice-lite", None);
    if !bundle.is_empty() {
        session_attr(sd, "group", Some(format!("BUNDLE {}", bundle.join(" "))));
    }
    // Chrome's spelling; "*" = every stream (draft-ietf-mmusic-msid-16 §4).
    session_attr(sd, "msid-semantic", Some(" WMS *".to_owned()));
}

/// One m-line under construction.
pub(crate) struct MediaBuilder(MediaDescription);

impl MediaBuilder {
    pub(crate) fn new(kind: &str, proto: &str, formats: Vec<String>, rejected: bool) -> Self {
        let protos = proto.split('/').map(str::to_owned).collect();
        Self(MediaDescription {
            media_name: MediaName {
                media: kind.to_owned(),
                port: RangedPort {
                    value: if rejected { 0 } else { DISCARD_PORT },
                    range: None,
                },
                protos,
                formats,
            },
            connection_information: Some(ConnectionInformation {
                network_type: "IN".to_owned(),
                address_type: "IP4".to_owned(),
                address: Some(Address {
                    address: "0.0.0.0".to_owned(),
                    ttl: None,
                    range: None,
                }),
            }),
            ..Default::default()
        })
    }

    pub(crate) fn attr(&mut self, key: &str, value: impl Into<String>) {
        self.0
            .attributes
            .push(Attribute::new(key.to_owned(), Some(value.into())));
    }

    pub(crate) fn flag(&mut self, key: &str) {
        self.0.attributes.push(Attribute::new(key.to_owned(), None));
    }

    pub(crate) fn direction(&mut self, d: Direction) {
        self.flag(d.as_str());
    }

    /// ICE credentials, fingerprint, DTLS role, rtcp-mux.
    pub(crate) fn transport(&mut self, local: &LocalTransport, setup: Setup) {
        self.attr("ice-ufrag", local.ice_ufrag.as_str());
        self.attr("ice-pwd", local.ice_pwd.as_str());
        self.attr(
            "fingerprint",
            format!(
                "{} {}",
                local.fingerprint.algorithm, local.fingerprint.value
            ),
        );
        self.attr("setup", setup.as_str());
        self.flag("rtcp-mux");
    }

    /// One host candidate per local address, then `a=end-of-candidates` (RFC 8840 §8.2: an
    /// ICE-lite agent has all its candidates at once).
    pub(crate) fn candidates(&mut self, addrs: &[SocketAddr]) {
        for (i, addr) in addrs.iter().enumerate() {
            self.attr("candidate", candidate(i, *addr));
        }
        self.flag("end-of-candidates");
    }

    pub(crate) fn extmaps(&mut self, lines: &[ExtLine]) {
        for l in lines {
            match l.direction {
                Some(d) => self.attr("extmap", format!("{}/{} {}", l.id, d.as_str(), l.uri)),
                None => self.attr("extmap", format!("{} {}", l.id, l.uri)),
            }
        }
    }

    /// rtpmap, rtcp-fb and fmtp of `codec`, then its RTX payload type (RFC 4588 §8.6).
    pub(crate) fn codec(&mut self, codec: &Codec) {
        let pt = codec.payload_type;
        match codec.channels {
            Some(ch) => self.attr(
                "rtpmap",
                format!("{pt} {}/{}/{ch}", codec.name, codec.clock_rate),
            ),
            None => self.attr(
                "rtpmap",
                format!("{pt} {}/{}", codec.name, codec.clock_rate),
            ),
        }
        for fb in &codec.rtcp_fb {
            self.attr("rtcp-fb", format!("{pt} {fb}"));
        }
        if let Some(fmtp) = &codec.fmtp {
            self.attr("fmtp", format!("{pt} {fmtp}"));
        }
        if let Some(rtx) = codec.rtx_payload_type {
            self.attr("rtpmap", format!("{rtx} rtx/{}", codec.clock_rate));
            self.attr("fmtp", format!("{rtx} apt={pt}"));
        }
    }

    /// `a=msid`, `a=ssrc-group:FID` and `a=ssrc ... cname/msid` for a stream we send.
    pub(crate) fn source(&mut self, ssrc: u32, rtx_ssrc: Option<u32>, stream: &str, track: &str) {
        let stream = msid_token(stream);
        let track = msid_token(track);
        self.attr("msid", format!("{stream} {track}"));
        if let Some(rtx) = rtx_ssrc {
            self.attr("ssrc-group", format!("FID {ssrc} {rtx}"));
        }
        for s in std::iter::once(ssrc).chain(rtx_ssrc) {
            self.attr("ssrc", format!("{s} cname:{stream}"));
            self.attr("ssrc", format!("{s} msid:{stream} {track}"));
        }
    }

    pub(crate) fn finish(self) -> MediaDescription {
        self.0
    }
}

/// The formats of an m-line for `codec` (and its RTX).
pub(crate) fn formats_of(codec: &Codec) -> Vec<String> {
    std::iter::once(codec.payload_type)
        .chain(codec.rtx_payload_type)
        .map(|pt| pt.to_string())
        .collect()
}

/// `<foundation> 1 udp <priority> <ip> <port> typ host` (RFC 8839 §5.1). Priority by RFC 8445
/// §5.1.2.1: type preference 126 (host), local preference falling with the address's position
/// so the first configured address is tried first, component 1.
fn candidate(index: usize, addr: SocketAddr) -> String {
    let local_pref = 65_535u32.saturating_sub(u32::try_from(index).unwrap_or(u32::MAX));
    let priority = (126u32 << 24) | (local_pref << 8) | (256 - 1);
    format!(
        "{} 1 udp {priority} {} {} typ host",
        index + 1,
        addr.ip(),
        addr.port()
    )
}

/// msid ids are 1-64 token characters (RFC 8830 §2); anything else in ours is replaced by `-`,
/// so a peer-chosen track name can never break the SDP we write.
fn msid_token(s: &str) -> String {
    let out: String = s
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii() && super::parse::is_token_char(c as u8) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if out.is_empty() {
        "-".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_priorities_fall_with_position() {
        assert_eq!(
            candidate(0, "192.0.2.1:40000".parse().unwrap()),
            "1 1 udp 2130706431 192.0.2.1 40000 typ host"
        );
        assert_eq!(
            candidate(1, "[2001:db8::1]:40000".parse().unwrap()),
            "2 1 udp 2130706175 2001:db8::1 40000 typ host"
        );
    }

    #[test]
    fn msid_ids_are_made_tokens() {
        assert_eq!(msid_token("alice's cam\r\na=x"), "alice's-cam--a-x");
        assert_eq!(msid_token(""), "-");
        assert_eq!(msid_token(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn session_ids_are_stable_and_63_bit() {
        assert_eq!(derived_session_id("abcd"), derived_session_id("abcd"));
        assert_ne!(derived_session_id("abcd"), derived_session_id("abce"));
        assert!(derived_session_id("abcd") < 1 << 63);
    }
}
