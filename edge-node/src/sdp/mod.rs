//! SDP offer/answer for the edge: what we accept from clients and what we offer them.
//!
//! # Why this module exists
//!
//! Every client reaches the edge through an SDP exchange (JSEP, RFC 9429): the *publisher* peer
//! connection and WHIP (the client offers, we answer), the *subscriber* peer connection (we offer,
//! the client answers) and WHEP (the client offers to receive, we answer with what we send). The
//! SDP text a client sends is hostile input: it is size-checked, parsed once into typed values
//! here, and nothing after this module sees SDP text again.
//!
//! # How
//!
//! * [`answer_publish`]: client offer → our answer + what the client will send ([`AcceptedMedia`]).
//! * [`subscriber_offer`] / [`parse_subscriber_answer`]: our offer for the subscriber PC, and the
//!   check of the client's answer.
//! * [`answer_subscribe`]: WHEP, client's recvonly offer → our sendonly answer, one
//!   [`WhepSource`] per m-line.
//!
//! Errors are [`SdpError`]s; [`SdpError::code`] gives the signaling error code (`sdp_invalid`
//! or `sdp_unsupported`). [`SdpLimits`] bound the input before the parser sees it.
//!
//! Tests run on real SDP from headless Chromium and aiortc (testdata/README.md), and
//! testdata/interop/run.sh feeds our SDP back to those clients' `setRemoteDescription`.
//!
//! Parsing and printing use webrtc-rs's `sdp` crate; the negotiation (codec choice, simulcast,
//! BUNDLE, DTLS roles) is ours. All functions are pure: no I/O, no clock, no randomness, so the
//! same input always gives the same SDP (the session id of an answer is derived from the local
//! ICE ufrag, which is random per session already).
//!
//! # What the edge is, in SDP terms
//!
//! * ICE-lite (RFC 8445 §2.5): session-level `a=ice-lite`, one UDP host candidate per configured
//!   address, `a=end-of-candidates` (we never trickle).
//! * DTLS server: `a=setup:passive` in answers, `a=setup:actpass` in our offers, after which the
//!   client must answer `active` (RFC 5763 §5, RFC 8842).
//! * BUNDLE (RFC 8843) and rtcp-mux (RFC 5761) are required: one 5-tuple per peer connection.
//!   An m-line outside the offer's first BUNDLE group or without `a=rtcp-mux` is rejected.
//!
//! # Codec policy (publish)
//!
//! Audio: opus/48000/2 only, the client's fmtp kept as is. Video, in this order: VP8, H264
//! (packetization-mode=1 with profile-level-id 42e01f first, then other constrained-baseline,
//! baseline, other profiles, then packetization-mode=0), VP9 (profile 0 before 2), AV1
//! (profile 0 first). One codec per m-line, plus its RTX payload type when offered. rtcp-fb in the
//! answer is the intersection of what the client offered with `nack`, `nack pli`, `ccm fir`,
//! `transport-cc` (video) or `transport-cc` (audio).
//!
//! # Simulcast layer order
//!
//! [`AcceptedMedia::rids`] lists layers lowest resolution first. SDP does not say which rid is
//! which resolution (RFC 8853 orders by preference, not size), so we decide as follows:
//! * rids that are all from `{q, h, f}` are ordered q < h < f (quarter, half, full);
//! * rids all from `{l, m, h}` are ordered l < m < h;
//! * rids that are all decimal numbers (`0`, `1`, `2`), or all `r` + number (`r0`, `r1`, `r2`),
//!   are ordered numerically;
//! * otherwise the offered order is taken as lowest → highest, which is our own client's
//!   convention (it lists encodings smallest first, as Chrome keeps the app's order).
//!
//! At most [`MAX_SIMULCAST_LAYERS`] rids are kept: the first ones in offered order; the rest are
//! left out of the answer, so the client does not send them.
//!
//! # What it does not do
//!
//! No data channels (`m=application` is rejected), no ICE candidates from the remote side (an
//! ICE-lite agent learns them as peer-reflexive), no SDES/SRTP keys, no trickle, no `a=rtcp-rsize`
//! (the client then sends compound RTCP, which our RTCP path reads either way), no per-rid
//! restrictions (`a=rid:q send max-width=...` restrictions are read past, not enforced).
//! Media kinds outside the IANA list (`audio video text application message image`) do not parse
//! in the `sdp` crate and so fail the whole offer with `sdp_invalid`; the known non-A/V kinds are
//! rejected per m-line.

mod codec;
mod error;
mod ext;
mod parse;
mod publish;
mod subscribe;
mod whep;
mod write;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod hostile;
#[cfg(test)]
mod interop;
#[cfg(test)]
mod tests_common;

use std::net::SocketAddr;

pub use error::{Location, SdpError};
pub use publish::answer_publish;
pub use subscribe::{parse_subscriber_answer, subscriber_offer};
pub use whep::answer_subscribe;

/// The most simulcast layers we receive per m-line: our layer selector knows low/mid/high.
pub const MAX_SIMULCAST_LAYERS: usize = 3;

/// Bounds on SDP text from a peer, checked before any parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdpLimits {
    /// Bytes of the whole SDP. Default 64 KiB: a Chrome offer with audio, simulcast video and a
    /// data channel is ~7 KB; 32 such m-lines stay under 64 KiB.
    pub max_bytes: usize,
    /// m-lines. Default 32: a meeting client publishes camera, screen, their audio, and a few
    /// spare transceivers; more is not a client we serve.
    pub max_media: usize,
    /// Bytes of one line. Default 4 KiB: the longest real lines (fmtp, BUNDLE groups,
    /// fingerprints) are under 300 bytes.
    pub max_line_bytes: usize,
}

impl Default for SdpLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024,
            max_media: 32,
            max_line_bytes: 4 * 1024,
        }
    }
}

/// A DTLS certificate fingerprint (RFC 8122 §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Hash function name as in SDP, lower case: `sha-256`, `sha-384`, `sha-512`.
    pub algorithm: String,
    /// Upper- or lower-case hex byte pairs separated by colons, as in SDP.
    pub value: String,
}

/// Our side of the transport: what goes into every SDP we write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTransport {
    pub ice_ufrag: String,
    pub ice_pwd: String,
    pub fingerprint: Fingerprint,
    /// One UDP host candidate is written per address, in this order (the first gets the
    /// highest priority).
    pub candidates: Vec<SocketAddr>,
}

/// DTLS role attribute (RFC 4145 §4, RFC 5763 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    Active,
    Passive,
    ActPass,
    HoldConn,
}

impl Setup {
    fn as_str(self) -> &'static str {
        match self {
            Setup::Active => "active",
            Setup::Passive => "passive",
            Setup::ActPass => "actpass",
            Setup::HoldConn => "holdconn",
        }
    }
}

impl std::fmt::Display for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The peer's side of the transport, as it stated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTransport {
    pub ice_ufrag: String,
    pub ice_pwd: String,
    /// The strongest fingerprint we can check (sha-256 preferred, then sha-384, sha-512).
    pub fingerprint: Fingerprint,
    /// As the peer wrote it; a missing attribute reads as `active` (RFC 4145 §4 default).
    pub setup: Setup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Audio,
    Video,
}

impl MediaKind {
    fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}

/// One RTP payload format, as negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codec {
    pub payload_type: u8,
    /// Encoding name as in SDP: "opus", "VP8", "H264", "VP9", "AV1" (compared case-insensitively).
    pub name: String,
    pub clock_rate: u32,
    pub channels: Option<u16>,
    pub fmtp: Option<String>,
    /// Feedback types, one space between words: "nack", "nack pli", "ccm fir", "goog-remb",
    /// "transport-cc".
    pub rtcp_fb: Vec<String>,
    pub rtx_payload_type: Option<u8>,
}

/// RTP header extension ids (RFC 8285) for the extensions the edge reads or writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderExtIds {
    pub mid: Option<u8>,
    pub rid: Option<u8>,
    pub repaired_rid: Option<u8>,
    pub abs_send_time: Option<u8>,
    pub transport_cc: Option<u8>,
    pub audio_level: Option<u8>,
}

impl HeaderExtIds {
    /// Each id from `self`, else from `other`. A BUNDLE group maps one URI to one id (RFC 8843
    /// §9.2) but each m-section lists only the extensions it uses (audio has no rid), so the
    /// transport's ids are the union over its m-sections.
    pub fn or(self, other: Self) -> Self {
        Self {
            mid: self.mid.or(other.mid),
            rid: self.rid.or(other.rid),
            repaired_rid: self.repaired_rid.or(other.repaired_rid),
            abs_send_time: self.abs_send_time.or(other.abs_send_time),
            transport_cc: self.transport_cc.or(other.transport_cc),
            audio_level: self.audio_level.or(other.audio_level),
        }
    }
}

/// Media direction attribute (RFC 3264 §5.1); absent means `sendrecv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// Whether the side that wrote this direction sends media.
    fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// Whether the side that wrote this direction receives media.
    fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }
}

/// What the edge accepted in a client's offer for publishing (publisher PC, WHIP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAnswer {
    pub sdp: String,
    pub remote: RemoteTransport,
    /// Audio/video m-lines for which we chose a codec, in m-line order. An m-line the client
    /// offered with port 0 (a stopped transceiver) is here with `active: false`.
    pub media: Vec<AcceptedMedia>,
    /// Mids of m-lines we rejected (port 0 in the answer) for want of a codec, a BUNDLE group
    /// membership, rtcp-mux, or because of their kind (data channels); m-lines without a mid are
    /// rejected too but cannot be named here.
    pub rejected_mids: Vec<String>,
}

impl PublishAnswer {
    /// Extension ids on the packets the client will send: the union over the active m-lines
    /// (Chromium puts audio first, whose m-line has no rid extension).
    pub fn ext_in(&self) -> HeaderExtIds {
        self.media
            .iter()
            .filter(|m| m.active)
            .fold(HeaderExtIds::default(), |ids, m| ids.or(m.ext))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedMedia {
    pub mid: String,
    pub kind: MediaKind,
    /// As offered (sendonly/sendrecv = the client sends).
    pub direction: Direction,
    /// False if rejected (offered with port 0) or if the client does not send on it.
    pub active: bool,
    /// The one codec we accepted for this m-line, with its RTX payload type when the client
    /// offered RTX for it.
    pub codec: Codec,
    /// Ids the client will use.
    pub ext: HeaderExtIds,
    /// Simulcast rids, lowest resolution first (see the module doc); empty without simulcast.
    pub rids: Vec<String>,
    /// From `a=ssrc` / `a=ssrc-group:FID` (media ssrc + rtx ssrc), for non-simulcast or legacy
    /// (`a=ssrc-group:SIM`) simulcast; with SIM, in the SIM group's order (lowest first).
    pub ssrcs: Vec<SsrcInfo>,
    /// `(stream id, track id)` from `a=msid` (or the legacy `a=ssrc:<n> msid:`); the track id is
    /// empty when the client gave only a stream id.
    pub msid: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SsrcInfo {
    pub ssrc: u32,
    pub rtx_ssrc: Option<u32>,
}

/// One m-line of our subscriber offer (the edge sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMedia {
    pub mid: String,
    pub kind: MediaKind,
    /// The payload type we chose.
    pub codec: Codec,
    pub ssrc: u32,
    pub rtx_ssrc: Option<u32>,
    /// msid stream id; also the RTCP CNAME, so audio and video of one participant sync.
    pub stream_id: String,
    pub track_id: String,
    /// False = `a=inactive`, kept to preserve m-line order.
    pub active: bool,
}

/// What the client answered to our subscriber offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberAnswer {
    pub remote: RemoteTransport,
    /// Offered mids the client accepted (non-zero port, in its BUNDLE group), in m-line order.
    pub accepted_mids: Vec<String>,
    /// Header extension ids as answered (the union over accepted m-lines).
    pub ext: HeaderExtIds,
}

/// A source the edge can send to a WHEP client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhepSource<'a> {
    pub kind: MediaKind,
    /// Codec name we have, compared case-insensitively with the offer ("opus", "VP8", "H264"...).
    pub codec: &'a str,
    pub ssrc: u32,
    pub rtx_ssrc: Option<u32>,
    pub stream_id: &'a str,
    pub track_id: &'a str,
}

/// Our answer to a WHEP offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhepAnswer {
    pub sdp: String,
    pub remote: RemoteTransport,
    /// One entry per audio/video m-line of the offer, in order.
    pub media: Vec<WhepMedia>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhepMedia {
    pub mid: String,
    pub kind: MediaKind,
    /// The client's payload type for the codec we send; `None` when the m-line is rejected.
    pub codec: Option<Codec>,
    pub ext: HeaderExtIds,
    pub accepted: bool,
    /// Index into the `want` slice of the source sent on this m-line.
    pub source: Option<usize>,
}
