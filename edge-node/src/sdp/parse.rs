//! From a peer's SDP text to typed values: limits first, then the `sdp` crate's parser, then the
//! WebRTC attributes we use, each validated once here.
//!
//! Every step is linear in the input: per-m-line work uses hash maps, never a scan of earlier
//! m-lines, so 10,000 m-lines (if the limits allowed them) cost 10,000 times one m-line.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;

use sdp::SessionDescription;

use super::error::{clip, Location, SdpError};
use super::{Direction, Fingerprint, MediaKind, RemoteTransport, SdpLimits, Setup, SsrcInfo};

/// Longest mid we accept: 16 bytes is what a one-byte RTP header extension element can carry
/// (RFC 8285 §4.2), the form every browser sends mids in. Real stacks use "0", "1", ...
const MAX_MID_LEN: usize = 16;

/// Longest rid we accept, for the same reason as [`MAX_MID_LEN`] (RFC 8852 carries it in the
/// same header extension form).
const MAX_RID_LEN: usize = 16;

/// Most distinct ssrcs in one m-line: legacy simulcast with three layers, each with RTX and FEC,
/// is 9; anything far beyond that is not a client we serve.
const MAX_SSRCS_PER_MEDIA: usize = 16;

/// The parsed SDP: session-level facts and the m-lines.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// Mids of the first `a=group:BUNDLE` (RFC 8843 §7); later groups are ignored, so their
    /// m-lines are not bundled with ours and get rejected.
    pub(crate) bundle: Option<Vec<String>>,
    /// `a=extmap-allow-mixed` (RFC 8285 §6) at session level or on any m-line.
    pub(crate) extmap_allow_mixed: bool,
    /// Session-level `a=ice-lite` (RFC 8839 §5.3): the peer does no connectivity checks.
    pub(crate) ice_lite: bool,
    pub(crate) transport: TransportAttrs,
    pub(crate) media: Vec<Media>,
    by_mid: HashMap<String, usize>,
}

/// ICE and DTLS attributes of one level (session or m-line), not yet validated: only the ones
/// of the BUNDLE tag are used, so only those are checked.
#[derive(Debug, Default)]
pub(crate) struct TransportAttrs {
    pub(crate) ufrag: Option<String>,
    pub(crate) pwd: Option<String>,
    /// (algorithm in lower case, value).
    pub(crate) fingerprints: Vec<(String, String)>,
    pub(crate) setup: Option<Setup>,
}

#[derive(Debug)]
pub(crate) struct Media {
    pub(crate) index: usize,
    /// `None` for kinds other than audio and video.
    pub(crate) kind: Option<MediaKind>,
    pub(crate) kind_name: String,
    pub(crate) port: u16,
    /// The transport protocol as written, e.g. "UDP/TLS/RTP/SAVPF".
    pub(crate) proto: String,
    pub(crate) formats: Vec<String>,
    pub(crate) mid: Option<String>,
    pub(crate) direction: Direction,
    pub(crate) transport: TransportAttrs,
    pub(crate) rtcp_mux: bool,
    pub(crate) bundle_only: bool,
    /// Payload types with an rtpmap, in m= format order (audio/video only).
    pub(crate) codecs: Vec<OfferedCodec>,
    pub(crate) extmaps: Vec<ExtMap>,
    /// The rids of the peer's `a=simulcast:send` list, in its order (each checked against
    /// `a=rid ... send`); empty without `a=simulcast`.
    pub(crate) simulcast_send: Vec<String>,
    pub(crate) ssrcs: Vec<SsrcInfo>,
    pub(crate) msid: Option<(String, String)>,
}

/// A payload type from `a=rtpmap`, with its `a=fmtp` and `a=rtcp-fb`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OfferedCodec {
    pub(crate) pt: u8,
    pub(crate) name: String,
    pub(crate) clock_rate: u32,
    pub(crate) channels: Option<u16>,
    pub(crate) fmtp: Option<String>,
    pub(crate) rtcp_fb: Vec<String>,
}

impl OfferedCodec {
    /// The value of an fmtp parameter (`key=value;...`, RFC 4566 §6 format-specific).
    pub(crate) fn fmtp_param(&self, key: &str) -> Option<&str> {
        self.fmtp.as_deref().and_then(|f| fmtp_param(f, key))
    }
}

pub(crate) fn fmtp_param<'a>(fmtp: &'a str, key: &str) -> Option<&'a str> {
    fmtp.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
    })
}

/// `a=extmap:<id>[/<direction>] <uri>` (RFC 8285 §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtMap {
    pub(crate) id: u8,
    pub(crate) uri: String,
    pub(crate) direction: Option<Direction>,
}

impl Parsed {
    pub(crate) fn media_by_mid(&self, mid: &str) -> Option<&Media> {
        self.by_mid.get(mid).and_then(|&i| self.media.get(i))
    }

    /// The peer's ICE/DTLS parameters: those of the m-line `tag` (the BUNDLE tag, RFC 8843 §7),
    /// each falling back to the session level.
    pub(crate) fn remote_transport(&self, tag: &Media) -> Result<RemoteTransport, SdpError> {
        let loc = Location::Media(tag.index);
        let (ufrag, ufrag_loc) = match (&tag.transport.ufrag, &self.transport.ufrag) {
            (Some(u), _) => (u, loc),
            (None, Some(u)) => (u, Location::Session),
            (None, None) => return Err(SdpError::MissingIceCredentials),
        };
        let (pwd, pwd_loc) = match (&tag.transport.pwd, &self.transport.pwd) {
            (Some(p), _) => (p, loc),
            (None, Some(p)) => (p, Location::Session),
            (None, None) => return Err(SdpError::MissingIceCredentials),
        };
        // RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/"; ufrag 4-256, pwd 22-256 chars.
        check_ice_chars("ice-ufrag", ufrag_loc, ufrag, 4)?;
        check_ice_chars("ice-pwd", pwd_loc, pwd, 22)?;

        let (fingerprints, fp_loc) = if tag.transport.fingerprints.is_empty() {
            (&self.transport.fingerprints, Location::Session)
        } else {
            (&tag.transport.fingerprints, loc)
        };
        let fingerprint = choose_fingerprint(fingerprints, fp_loc)?;
        let setup = tag
            .transport
            .setup
            .or(self.transport.setup)
            .unwrap_or(Setup::Active);
        Ok(RemoteTransport {
            ice_ufrag: ufrag.clone(),
            ice_pwd: pwd.clone(),
            fingerprint,
            setup,
        })
    }
}

fn check_ice_chars(
    attribute: &'static str,
    loc: Location,
    value: &str,
    min: usize,
) -> Result<(), SdpError> {
    if value.len() < min || value.len() > 256 {
        return Err(SdpError::attr(
            attribute,
            loc,
            value,
            "wrong length (RFC 8839 §5.4)",
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return Err(SdpError::attr(
            attribute,
            loc,
            value,
            "characters other than letters, digits, + and /",
        ));
    }
    Ok(())
}

/// Hash functions we accept, strongest-supported-first by preference, with digest lengths.
/// sha-256 first: every WebRTC stack offers it (RFC 8827 §6.5) and our DTLS stack checks it.
const FINGERPRINT_ALGORITHMS: [(&str, usize); 3] =
    [("sha-256", 32), ("sha-384", 48), ("sha-512", 64)];

fn choose_fingerprint(
    fingerprints: &[(String, String)],
    loc: Location,
) -> Result<Fingerprint, SdpError> {
    let first = fingerprints.first().ok_or(SdpError::MissingFingerprint)?;
    for (algorithm, len) in FINGERPRINT_ALGORITHMS {
        if let Some((_, value)) = fingerprints.iter().find(|(a, _)| a == algorithm) {
            let parts: Vec<&str> = value.split(':').collect();
            let ok = parts.len() == len
                && parts
                    .iter()
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(SdpError::attr(
                    "fingerprint",
                    loc,
                    value,
                    "not colon-separated hex bytes of the hash's length (RFC 8122 §5)",
                ));
            }
            return Ok(Fingerprint {
                algorithm: algorithm.to_owned(),
                value: value.clone(),
            });
        }
    }
    Err(SdpError::UnsupportedFingerprint {
        algorithm: clip(&first.0),
    })
}

/// Size checks before any parsing, so an oversized or binary input costs one pass over bytes.
fn precheck(text: &str, limits: &SdpLimits) -> Result<(), SdpError> {
    if text.len() > limits.max_bytes {
        return Err(SdpError::TooLarge {
            len: text.len(),
            max: limits.max_bytes,
        });
    }
    let mut media = 0usize;
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() > limits.max_line_bytes {
            return Err(SdpError::LineTooLong {
                line: i + 1,
                len: line.len(),
                max: limits.max_line_bytes,
            });
        }
        // A lone CR would let a value carry a line break into SDP we echo it into; NUL and
        // other controls have no place in SDP text (RFC 8866 §9 text fields).
        if line.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(SdpError::ControlCharacter { line: i + 1 });
        }
        if line.starts_with("m=") {
            media += 1;
            if media > limits.max_media {
                return Err(SdpError::TooManyMedia {
                    max: limits.max_media,
                });
            }
        }
    }
    Ok(())
}

pub(crate) fn parse(text: &str, limits: &SdpLimits) -> Result<Parsed, SdpError> {
    precheck(text, limits)?;
    let desc = SessionDescription::unmarshal(&mut Cursor::new(text.as_bytes())).map_err(|e| {
        SdpError::Syntax {
            reason: clip(&e.to_string()),
        }
    })?;

    let mut transport = TransportAttrs::default();
    let mut bundle = None;
    let mut extmap_allow_mixed = false;
    let mut ice_lite = false;
    for a in &desc.attributes {
        let value = a.value.as_deref().unwrap_or("");
        match a.key.as_str() {
            "group" => {
                let mut tokens = value.split_whitespace();
                if tokens.next() == Some("BUNDLE") && bundle.is_none() {
                    bundle = Some(tokens.map(str::to_owned).collect::<Vec<_>>());
                }
            }
            "extmap-allow-mixed" => extmap_allow_mixed = true,
            "ice-lite" => ice_lite = true,
            _ => read_transport_attr(&mut transport, &a.key, value, Location::Session)?,
        }
    }

    let mut media = Vec::with_capacity(desc.media_descriptions.len());
    let mut by_mid = HashMap::new();
    let mut all_ssrcs = HashSet::new();
    for (index, md) in desc.media_descriptions.iter().enumerate() {
        let (m, allow_mixed) = parse_media(index, md)?;
        extmap_allow_mixed |= allow_mixed;
        if let Some(mid) = &m.mid {
            if by_mid.insert(mid.clone(), index).is_some() {
                return Err(SdpError::DuplicateMid { mid: mid.clone() });
            }
        }
        for s in &m.ssrcs {
            for ssrc in std::iter::once(s.ssrc).chain(s.rtx_ssrc) {
                if !all_ssrcs.insert(ssrc) {
                    return Err(SdpError::DuplicateSsrc { ssrc });
                }
            }
        }
        media.push(m);
    }

    if let Some(group) = &bundle {
        let mut seen = HashSet::new();
        for mid in group {
            if !by_mid.contains_key(mid) {
                return Err(SdpError::attr(
                    "group",
                    Location::Session,
                    mid,
                    "BUNDLE names a mid no m-line has",
                ));
            }
            if !seen.insert(mid) {
                return Err(SdpError::attr(
                    "group",
                    Location::Session,
                    mid,
                    "BUNDLE names a mid twice",
                ));
            }
        }
    }

    Ok(Parsed {
        bundle,
        extmap_allow_mixed,
        ice_lite,
        transport,
        media,
        by_mid,
    })
}

fn read_transport_attr(
    t: &mut TransportAttrs,
    key: &str,
    value: &str,
    loc: Location,
) -> Result<(), SdpError> {
    match key {
        "ice-ufrag" => t.ufrag = Some(value.trim().to_owned()),
        "ice-pwd" => t.pwd = Some(value.trim().to_owned()),
        "fingerprint" => {
            let (alg, v) = value.trim().split_once(' ').ok_or_else(|| {
                SdpError::attr("fingerprint", loc, value, "expected `<hash> <value>`")
            })?;
            t.fingerprints
                .push((alg.to_ascii_lowercase(), v.trim().to_owned()));
        }
        "setup" => {
            t.setup = Some(match value.trim() {
                "active" => Setup::Active,
                "passive" => Setup::Passive,
                "actpass" => Setup::ActPass,
                "holdconn" => Setup::HoldConn,
                _ => return Err(SdpError::attr("setup", loc, value, "unknown role")),
            })
        }
        _ => {}
    }
    Ok(())
}

/// Raw per-m-line attributes, gathered before they can be checked against each other
/// (attribute order within an m-line is free).
#[derive(Default)]
struct Raw<'a> {
    rtpmaps: HashMap<u8, (&'a str, u32, Option<u16>)>,
    fmtps: HashMap<u8, &'a str>,
    rtcp_fb: HashMap<u8, Vec<String>>,
    rtcp_fb_all: Vec<String>,
    rids: Vec<(&'a str, &'a str)>,
    simulcast: Option<&'a str>,
    ssrc_order: Vec<u32>,
    ssrc_seen: HashSet<u32>,
    ssrc_msid: Option<(String, String)>,
    groups: Vec<(&'a str, Vec<u32>)>,
}

fn parse_media(index: usize, md: &sdp::MediaDescription) -> Result<(Media, bool), SdpError> {
    let loc = Location::Media(index);
    let kind_name = md.media_name.media.clone();
    let kind = match kind_name.as_str() {
        "audio" => Some(MediaKind::Audio),
        "video" => Some(MediaKind::Video),
        _ => None,
    };
    // The sdp crate parsed the port as u16 already; 0 means rejected/stopped (RFC 3264 §6).
    let port = u16::try_from(md.media_name.port.value).unwrap_or(0);
    let proto = md.media_name.protos.join("/");
    let formats = md.media_name.formats.clone();

    let mut pts = Vec::new();
    if kind.is_some() {
        let mut seen = HashSet::new();
        for f in &formats {
            let pt = f
                .parse::<u8>()
                .ok()
                .filter(|pt| *pt <= 127)
                .ok_or_else(|| SdpError::attr("m", loc, f, "payload type is not 0-127"))?;
            if !seen.insert(pt) {
                return Err(SdpError::attr("m", loc, f, "payload type listed twice"));
            }
            pts.push(pt);
        }
    }

    let mut m = Media {
        index,
        kind,
        kind_name,
        port,
        proto,
        formats,
        mid: None,
        direction: Direction::SendRecv,
        transport: TransportAttrs::default(),
        rtcp_mux: false,
        bundle_only: false,
        codecs: Vec::new(),
        extmaps: Vec::new(),
        simulcast_send: Vec::new(),
        ssrcs: Vec::new(),
        msid: None,
    };
    let mut allow_mixed = false;
    let mut raw = Raw::default();
    let mut ext_ids = HashSet::new();

    for a in &md.attributes {
        let value = a.value.as_deref().unwrap_or("");
        match a.key.as_str() {
            "mid" => {
                let mid = value.trim();
                let token_ok = mid.bytes().all(is_token_char);
                if mid.is_empty() || mid.len() > MAX_MID_LEN || !token_ok {
                    return Err(SdpError::attr(
                        "mid",
                        loc,
                        value,
                        "not a token of 1-16 characters",
                    ));
                }
                m.mid = Some(mid.to_owned());
            }
            "sendrecv" => m.direction = Direction::SendRecv,
            "sendonly" => m.direction = Direction::SendOnly,
            "recvonly" => m.direction = Direction::RecvOnly,
            "inactive" => m.direction = Direction::Inactive,
            "rtcp-mux" => m.rtcp_mux = true,
            "bundle-only" => m.bundle_only = true,
            "extmap-allow-mixed" => allow_mixed = true,
            "rtpmap" if kind.is_some() => {
                let (pt, rest) = split_pt("rtpmap", loc, value)?;
                let mut parts = rest.trim().split('/');
                let name = parts.next().unwrap_or("");
                let clock = parts.next().and_then(|c| c.parse::<u32>().ok());
                let channels = match parts.next() {
                    None => Ok(None),
                    Some(c) => c.parse::<u16>().map(Some),
                };
                let (Some(clock), Ok(channels), None, false) =
                    (clock, channels, parts.next(), name.is_empty())
                else {
                    return Err(SdpError::attr(
                        "rtpmap",
                        loc,
                        value,
                        "expected `<pt> <name>/<clock>[/<channels>]`",
                    ));
                };
                if raw.rtpmaps.insert(pt, (name, clock, channels)).is_some() {
                    return Err(SdpError::attr(
                        "rtpmap",
                        loc,
                        value,
                        "payload type mapped twice",
                    ));
                }
            }
            "fmtp" if kind.is_some() => {
                let (pt, rest) = split_pt("fmtp", loc, value)?;
                if !rest.trim().is_empty() {
                    raw.fmtps.entry(pt).or_insert(rest.trim());
                }
            }
            "rtcp-fb" if kind.is_some() => {
                let (pt, rest) = value.trim().split_once(' ').ok_or_else(|| {
                    SdpError::attr("rtcp-fb", loc, value, "expected `<pt> <type>`")
                })?;
                let fb = rest.split_whitespace().collect::<Vec<_>>().join(" ");
                if pt == "*" {
                    raw.rtcp_fb_all.push(fb);
                } else {
                    let pt = pt.parse::<u8>().map_err(|_| {
                        SdpError::attr("rtcp-fb", loc, value, "payload type is not a number")
                    })?;
                    raw.rtcp_fb.entry(pt).or_default().push(fb);
                }
            }
            "extmap" => {
                let e = parse_extmap(loc, value)?;
                if !ext_ids.insert(e.id) {
                    return Err(SdpError::attr("extmap", loc, value, "id used twice"));
                }
                m.extmaps.push(e);
            }
            "rid" => {
                let mut parts = value.trim().splitn(3, ' ');
                let id = parts.next().unwrap_or("");
                let dir = parts.next().unwrap_or("");
                raw.rids.push((id, dir));
            }
            "simulcast" => raw.simulcast = Some(value),
            "ssrc" => {
                let (ssrc, attr) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
                let ssrc = ssrc.parse::<u32>().map_err(|_| {
                    SdpError::attr("ssrc", loc, value, "ssrc is not a 32-bit number")
                })?;
                if raw.ssrc_seen.insert(ssrc) {
                    if raw.ssrc_seen.len() > MAX_SSRCS_PER_MEDIA {
                        return Err(SdpError::attr("ssrc", loc, value, "more than 16 ssrcs"));
                    }
                    raw.ssrc_order.push(ssrc);
                }
                if let Some(msid) = attr.strip_prefix("msid:") {
                    if raw.ssrc_msid.is_none() {
                        raw.ssrc_msid = parse_msid(msid);
                    }
                }
            }
            "ssrc-group" => {
                let mut parts = value.split_whitespace();
                let semantics = parts.next().unwrap_or("");
                let ssrcs = parts
                    .map(|s| s.parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        SdpError::attr("ssrc-group", loc, value, "ssrc is not a 32-bit number")
                    })?;
                if ssrcs.len() > MAX_SSRCS_PER_MEDIA {
                    return Err(SdpError::attr(
                        "ssrc-group",
                        loc,
                        value,
                        "more than 16 ssrcs",
                    ));
                }
                raw.groups.push((semantics, ssrcs));
            }
            "msid" => {
                if m.msid.is_none() {
                    m.msid = parse_msid(value);
                }
            }
            key => read_transport_attr(&mut m.transport, key, value, loc)?,
        }
    }
    if m.msid.is_none() {
        m.msid = raw.ssrc_msid.take();
    }

    for &pt in &pts {
        if let Some(&(name, clock_rate, channels)) = raw.rtpmaps.get(&pt) {
            let mut rtcp_fb = raw.rtcp_fb.remove(&pt).unwrap_or_default();
            rtcp_fb.extend(raw.rtcp_fb_all.iter().cloned());
            m.codecs.push(OfferedCodec {
                pt,
                name: name.to_owned(),
                clock_rate,
                channels,
                fmtp: raw.fmtps.get(&pt).map(|f| (*f).to_owned()),
                rtcp_fb,
            });
        }
    }
    m.ssrcs = ssrc_infos(loc, &raw)?;
    m.simulcast_send = simulcast_send(&m, &raw)?;
    Ok((m, allow_mixed))
}

/// RFC 4566 §9 token characters.
pub(crate) fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`{|}~".contains(&b)
}

fn split_pt<'a>(
    attribute: &'static str,
    loc: Location,
    value: &'a str,
) -> Result<(u8, &'a str), SdpError> {
    let (pt, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    let pt = pt
        .parse::<u8>()
        .ok()
        .filter(|pt| *pt <= 127)
        .ok_or_else(|| SdpError::attr(attribute, loc, value, "payload type is not 0-127"))?;
    Ok((pt, rest))
}

fn parse_direction(s: &str) -> Option<Direction> {
    Some(match s {
        "sendrecv" => Direction::SendRecv,
        "sendonly" => Direction::SendOnly,
        "recvonly" => Direction::RecvOnly,
        "inactive" => Direction::Inactive,
        _ => return None,
    })
}

fn parse_extmap(loc: Location, value: &str) -> Result<ExtMap, SdpError> {
    let mut parts = value.split_whitespace();
    let (Some(id_dir), Some(uri)) = (parts.next(), parts.next()) else {
        return Err(SdpError::attr(
            "extmap",
            loc,
            value,
            "expected `<id> <uri>`",
        ));
    };
    let (id, direction) = match id_dir.split_once('/') {
        Some((id, dir)) => (
            id,
            Some(
                parse_direction(dir)
                    .ok_or_else(|| SdpError::attr("extmap", loc, value, "unknown direction"))?,
            ),
        ),
        None => (id_dir, None),
    };
    // RFC 8285 §5: ids 1-14 (one-byte form) and 1-255 (two-byte form); 0 is never valid.
    let id = id
        .parse::<u8>()
        .ok()
        .filter(|id| *id != 0)
        .ok_or_else(|| SdpError::attr("extmap", loc, value, "id is not 1-255"))?;
    Ok(ExtMap {
        id,
        uri: uri.to_owned(),
        direction,
    })
}

/// `a=msid:<stream> [<track>]` (RFC 8830 §2).
fn parse_msid(value: &str) -> Option<(String, String)> {
    let mut parts = value.split_whitespace();
    let stream = parts.next()?;
    let track = parts.next().unwrap_or("");
    Some((stream.to_owned(), track.to_owned()))
}

/// Media ssrcs with their RTX ssrcs, from `a=ssrc` and `a=ssrc-group` (RFC 5576, RFC 4588 §8).
fn ssrc_infos(loc: Location, raw: &Raw<'_>) -> Result<Vec<SsrcInfo>, SdpError> {
    let mut rtx_of = HashMap::new();
    let mut secondary = HashSet::new();
    let mut sim: Option<&Vec<u32>> = None;
    for (semantics, ssrcs) in &raw.groups {
        match *semantics {
            "FID" | "FEC-FR" | "FEC" => {
                let [primary, second] = ssrcs[..] else {
                    return Err(SdpError::attr(
                        "ssrc-group",
                        loc,
                        semantics,
                        "FID/FEC groups pair exactly two ssrcs",
                    ));
                };
                if *semantics == "FID" {
                    rtx_of.entry(primary).or_insert(second);
                }
                secondary.insert(second);
            }
            "SIM" if sim.is_none() => sim = Some(ssrcs),
            _ => {}
        }
    }
    let primaries: Vec<u32> = match sim {
        Some(sim) => sim.clone(),
        None => {
            let mut order = raw.ssrc_order.clone();
            let listed: HashSet<u32> = order.iter().copied().collect();
            // A FID primary without its own a=ssrc line still identifies a stream.
            for (_, ssrcs) in raw.groups.iter().filter(|(s, _)| *s == "FID") {
                if let Some(p) = ssrcs.first() {
                    if !listed.contains(p) {
                        order.push(*p);
                    }
                }
            }
            order.retain(|s| !secondary.contains(s));
            order
        }
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(primaries.len());
    for ssrc in primaries {
        if seen.insert(ssrc) {
            out.push(SsrcInfo {
                ssrc,
                rtx_ssrc: rtx_of.get(&ssrc).copied(),
            });
        }
    }
    Ok(out)
}

/// Validates `a=rid` (RFC 8851 §10) and `a=simulcast` (RFC 8853 §5.1) and returns the rids the
/// peer will send, in the order of its `a=simulcast:send` list (first alternative of each
/// stream, `~` paused marks dropped: a paused layer may start later).
fn simulcast_send(m: &Media, raw: &Raw<'_>) -> Result<Vec<String>, SdpError> {
    let mid = m.mid.clone().unwrap_or_else(|| format!("#{}", m.index));
    let bad = |rid: &str, reason| SdpError::InvalidRid {
        mid: mid.clone(),
        rid: clip(rid),
        reason,
    };
    let mut declared: HashMap<&str, bool> = HashMap::new();
    for &(id, dir) in &raw.rids {
        if id.is_empty()
            || id.len() > MAX_RID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(id, "not 1-16 letters, digits, - or _"));
        }
        let send = match dir {
            "send" => true,
            "recv" => false,
            _ => return Err(bad(id, "direction is neither send nor recv")),
        };
        if declared.insert(id, send).is_some() {
            return Err(bad(id, "declared twice"));
        }
    }
    let Some(value) = raw.simulcast else {
        return Ok(Vec::new());
    };
    let tokens: Vec<&str> = value.split_whitespace().collect();
    let pairs = tokens.chunks_exact(2);
    if tokens.is_empty() || !pairs.remainder().is_empty() {
        return Err(bad(value, "a=simulcast is not `send <list> [recv <list>]`"));
    }
    let mut send = Vec::new();
    let mut seen = HashSet::new();
    for pair in pairs {
        let is_send = match pair[0] {
            "send" => true,
            "recv" => false,
            _ => return Err(bad(value, "a=simulcast direction is neither send nor recv")),
        };
        // draft-ietf-mmusic-sdp-simulcast-03 (old Firefox) wrote `send rid=a;b`.
        let list = pair[1].strip_prefix("rid=").unwrap_or(pair[1]);
        for stream in list.split(';') {
            let first = stream.split(',').next().unwrap_or("");
            let rid = first.strip_prefix('~').unwrap_or(first);
            match declared.get(rid) {
                None => return Err(bad(rid, "in a=simulcast but not declared by a=rid")),
                Some(&d) if d != is_send => {
                    return Err(bad(rid, "a=simulcast direction differs from its a=rid"))
                }
                Some(_) => {}
            }
            if !seen.insert(rid) {
                return Err(bad(rid, "listed twice in a=simulcast"));
            }
            if is_send {
                send.push(rid.to_owned());
            }
        }
    }
    Ok(send)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::fixtures;

    fn parse_ok(text: &str) -> Parsed {
        parse(text, &SdpLimits::default()).expect("fixture parses")
    }

    #[test]
    fn chrome_simulcast_offer_is_read_completely() {
        let p = parse_ok(fixtures::CHROME_PUBLISH_SIMULCAST);
        assert_eq!(
            p.bundle.as_deref(),
            Some(&["0".to_owned(), "1".to_owned()][..])
        );
        assert!(p.extmap_allow_mixed);
        assert_eq!(p.media.len(), 2);
        let audio = &p.media[0];
        assert_eq!(audio.kind, Some(MediaKind::Audio));
        assert_eq!(audio.mid.as_deref(), Some("0"));
        assert_eq!(audio.direction, Direction::SendOnly);
        assert!(audio.rtcp_mux);
        assert_eq!(audio.codecs[0].name, "opus");
        assert_eq!(audio.codecs[0].channels, Some(2));
        assert_eq!(
            audio.codecs[0].fmtp.as_deref(),
            Some("minptime=10;useinbandfec=1")
        );
        assert_eq!(audio.codecs[0].rtcp_fb, vec!["transport-cc"]);
        assert_eq!(
            audio.ssrcs,
            vec![SsrcInfo {
                ssrc: 2991828682,
                rtx_ssrc: None
            }]
        );
        let video = &p.media[1];
        assert_eq!(video.simulcast_send, vec!["q", "h", "f"]);
        assert!(video.ssrcs.is_empty());
        assert_eq!(video.codecs.len(), 23);
        assert_eq!(
            video.msid,
            Some((
                "3a0a7ea5-ede2-4c80-a07e-d1a29363d3b2".to_owned(),
                "3be3a665-334b-47b1-8070-1dcafabab5ff".to_owned()
            ))
        );
        let t = p.remote_transport(audio).unwrap();
        assert_eq!(t.ice_ufrag, "Zhex");
        assert_eq!(t.setup, Setup::ActPass);
        assert_eq!(t.fingerprint.algorithm, "sha-256");
    }

    #[test]
    fn fid_groups_pair_media_and_rtx_ssrcs() {
        let p = parse_ok(fixtures::AIORTC_PUBLISH);
        assert_eq!(
            p.media[1].ssrcs,
            vec![SsrcInfo {
                ssrc: 4227723284,
                rtx_ssrc: Some(3301386872)
            }]
        );
    }

    #[test]
    fn sim_group_orders_legacy_simulcast() {
        let p = parse_ok(fixtures::LEGACY_SIM);
        let ssrcs: Vec<(u32, Option<u32>)> = p.media[0]
            .ssrcs
            .iter()
            .map(|s| (s.ssrc, s.rtx_ssrc))
            .collect();
        assert_eq!(
            ssrcs,
            vec![(101, Some(201)), (102, Some(202)), (103, Some(203))]
        );
    }

    #[test]
    fn aiortc_offers_three_fingerprints_and_we_pick_sha_256() {
        let p = parse_ok(fixtures::AIORTC_PUBLISH);
        assert_eq!(p.media[0].transport.fingerprints.len(), 3);
        let t = p.remote_transport(&p.media[0]).unwrap();
        assert_eq!(t.fingerprint.algorithm, "sha-256");
        assert!(t.fingerprint.value.starts_with("C5:04:86"));
    }

    #[test]
    fn session_level_transport_is_the_fallback() {
        let p = parse_ok(fixtures::FIREFOX_STYLE);
        let t = p.remote_transport(&p.media[0]).unwrap();
        assert_eq!(t.ice_ufrag, "f1a2b3c4");
        assert_eq!(t.fingerprint.algorithm, "sha-256");
    }

    #[test]
    fn fmtp_params_are_found_case_insensitively() {
        assert_eq!(fmtp_param("a=1; Apt=96", "apt"), Some("96"));
        assert_eq!(fmtp_param("minptime=10", "apt"), None);
        assert_eq!(fmtp_param("", "apt"), None);
    }

    /// Table of small edits to a valid offer and the error each must give.
    #[test]
    fn attribute_errors_are_reported() {
        let base = fixtures::CHROME_PUBLISH_SIMULCAST;
        let cases: &[(&str, &str, &str)] = &[
            ("a=mid:1\r\n", "a=mid:0\r\n", "sdp_invalid"),
            (
                "a=mid:1\r\n",
                "a=mid:this-mid-is-far-too-long\r\n",
                "sdp_invalid",
            ),
            ("a=rid:h send\r\n", "a=rid:q send\r\n", "sdp_invalid"),
            ("a=rid:h send\r\n", "a=rid:h sideways\r\n", "sdp_invalid"),
            ("a=rid:h send\r\n", "a=rid:h/x send\r\n", "sdp_invalid"),
            (
                "a=simulcast:send q;h;f",
                "a=simulcast:send q;h;x",
                "sdp_invalid",
            ),
            (
                "a=simulcast:send q;h;f",
                "a=simulcast:send q;h;h",
                "sdp_invalid",
            ),
            ("a=simulcast:send q;h;f", "a=simulcast:send", "sdp_invalid"),
            (
                "a=extmap:13 urn:3gpp",
                "a=extmap:14 urn:3gpp",
                "sdp_invalid",
            ),
            ("a=extmap:13 urn:3gpp", "a=extmap:0 urn:3gpp", "sdp_invalid"),
            (
                "a=extmap:13 urn:3gpp",
                "a=extmap:256 urn:3gpp",
                "sdp_invalid",
            ),
            ("a=rtpmap:96 VP8/90000", "a=rtpmap:96 VP8", "sdp_invalid"),
            (
                "a=rtpmap:97 rtx/90000",
                "a=rtpmap:96 rtx/90000",
                "sdp_invalid",
            ),
            (
                "m=video 37539 UDP/TLS/RTP/SAVPF 96",
                "m=video 37539 UDP/TLS/RTP/SAVPF 300",
                "sdp_invalid",
            ),
            (
                "m=video 37539 UDP/TLS/RTP/SAVPF 96 97",
                "m=video 37539 UDP/TLS/RTP/SAVPF 96 96",
                "sdp_invalid",
            ),
            (
                "a=ssrc:2991828682 cname",
                "a=ssrc:99999999999 cname",
                "sdp_invalid",
            ),
            (
                "a=setup:actpass\r\na=mid:0",
                "a=setup:sideways\r\na=mid:0",
                "sdp_invalid",
            ),
            ("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 7", "sdp_invalid"),
            ("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 1", "sdp_invalid"),
        ];
        for (from, to, code) in cases {
            assert!(base.contains(from), "fixture lacks {from:?}");
            let text = base.replacen(from, to, 1);
            let err = parse(&text, &SdpLimits::default())
                .err()
                .unwrap_or_else(|| panic!("{to:?} was accepted"));
            assert_eq!(err.code(), *code, "{to:?}: {err}");
        }
    }

    #[test]
    fn limits_are_checked_before_parsing() {
        let limits = SdpLimits {
            max_bytes: 100,
            ..SdpLimits::default()
        };
        let err = parse(fixtures::CHROME_PUBLISH_SIMULCAST, &limits).unwrap_err();
        assert!(matches!(err, SdpError::TooLarge { max: 100, .. }), "{err}");

        let long_line = format!("v=0\r\na={}\r\n", "x".repeat(5000));
        let err = parse(&long_line, &SdpLimits::default()).unwrap_err();
        assert!(
            matches!(err, SdpError::LineTooLong { line: 2, .. }),
            "{err}"
        );

        let lone_cr = fixtures::CHROME_PUBLISH_SIMULCAST.replacen("a=mid:0", "a=mid:0\rm=x", 1);
        let err = parse(&lone_cr, &SdpLimits::default()).unwrap_err();
        assert!(matches!(err, SdpError::ControlCharacter { .. }), "{err}");

        let nul = fixtures::CHROME_PUBLISH_SIMULCAST.replacen("a=mid:0", "a=mid:0\0", 1);
        assert!(matches!(
            parse(&nul, &SdpLimits::default()).unwrap_err(),
            SdpError::ControlCharacter { .. }
        ));
    }

    #[test]
    fn lf_only_line_endings_parse_too() {
        let lf = fixtures::CHROME_PUBLISH_SIMULCAST.replace("\r\n", "\n");
        let p = parse_ok(&lf);
        assert_eq!(p.media[1].simulcast_send, vec!["q", "h", "f"]);
    }

    #[test]
    fn simulcast_alternatives_pauses_and_old_syntax() {
        let base = fixtures::CHROME_PUBLISH_SIMULCAST;
        for (line, want) in [
            ("a=simulcast:send f;h;q", vec!["f", "h", "q"]),
            ("a=simulcast:send ~q;h,f", vec!["q", "h"]),
            ("a=simulcast: send rid=q;h;f", vec!["q", "h", "f"]),
        ] {
            let p = parse_ok(&base.replacen("a=simulcast:send q;h;f", line, 1));
            assert_eq!(p.media[1].simulcast_send, want, "{line}");
        }
    }
}
