//! Errors of SDP negotiation; each says what the peer got wrong, in words it can act on.

use super::Setup;

/// Why an SDP from a peer was refused as a whole.
///
/// [`SdpError::code`] sorts them for the signaling error reply: `sdp_invalid` (the text is wrong
/// or over our limits) or `sdp_unsupported` (well-formed, but nothing we can do with it). Values
/// copied from the peer's SDP are clipped to [`MAX_ECHO`] characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    #[error("SDP is {len} bytes, more than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("SDP has more than {max} m-lines")]
    TooManyMedia { max: usize },
    #[error("SDP line {line} is {len} bytes, more than the limit of {max}")]
    LineTooLong { line: usize, len: usize, max: usize },
    #[error("SDP line {line} holds a control character (only CRLF or LF may end a line)")]
    ControlCharacter { line: usize },
    #[error("SDP does not parse: {reason}")]
    Syntax { reason: String },
    #[error("invalid a={attribute} {location}: {reason} (value {value:?})")]
    InvalidAttribute {
        attribute: &'static str,
        location: Location,
        value: String,
        reason: &'static str,
    },
    #[error("mid {mid:?} is used by more than one m-line")]
    DuplicateMid { mid: String },
    #[error("invalid rid {rid:?} in m-line {mid:?}: {reason}")]
    InvalidRid {
        mid: String,
        rid: String,
        reason: &'static str,
    },
    #[error("ssrc {ssrc} is used by more than one m-line (RFC 8843 §9.1)")]
    DuplicateSsrc { ssrc: u32 },
    #[error(
        "header extension id {id} means {first:?} in one m-line and {second:?} in another \
         (RFC 8843 §9.2)"
    )]
    ExtIdConflict {
        id: u8,
        first: String,
        second: String,
    },
    #[error("answer m-line {index} has mid {found:?}, the offer had {expected:?} (RFC 3264 §6)")]
    MediaMismatch {
        index: usize,
        expected: String,
        found: String,
    },
    #[error("answer has {found} m-lines, the offer had {expected} (RFC 3264 §6)")]
    MediaCount { expected: usize, found: usize },
    #[error("no a=group:BUNDLE: the edge needs all media on one transport (RFC 8843)")]
    MissingBundle,
    #[error("accepted m-line {mid:?} is not in the BUNDLE group (RFC 8843)")]
    NotBundled { mid: String },
    #[error("a=ice-lite: the edge is ICE-lite too, so the peer must run full ICE (RFC 8445 §2.5)")]
    IceLitePeer,
    #[error("no a=ice-ufrag / a=ice-pwd")]
    MissingIceCredentials,
    #[error("no a=fingerprint (RFC 8122)")]
    MissingFingerprint,
    #[error("no usable fingerprint: {algorithm:?} is not sha-256, sha-384 or sha-512")]
    UnsupportedFingerprint { algorithm: String },
    #[error("a=setup:{setup}: the edge is the DTLS server, the peer must be active (RFC 5763 §5)")]
    DtlsRole { setup: Setup },
    #[error("no m-line left that the edge can use (supported: opus, VP8, H264, VP9, AV1)")]
    NothingAccepted,
}

/// Where in an SDP an attribute was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Session,
    /// Zero-based m-line index.
    Media(usize),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Session => f.write_str("at session level"),
            Location::Media(i) => write!(f, "in m-line {i}"),
        }
    }
}

/// How many characters of a peer's value an error repeats: enough to recognise it, not enough to
/// echo a 64 KiB line back.
pub const MAX_ECHO: usize = 64;

/// The first [`MAX_ECHO`] characters of `s`.
pub(crate) fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

impl SdpError {
    /// The error code for the signaling reply: `sdp_invalid` or `sdp_unsupported`.
    pub fn code(&self) -> &'static str {
        match self {
            SdpError::TooLarge { .. }
            | SdpError::TooManyMedia { .. }
            | SdpError::LineTooLong { .. }
            | SdpError::ControlCharacter { .. }
            | SdpError::Syntax { .. }
            | SdpError::InvalidAttribute { .. }
            | SdpError::DuplicateMid { .. }
            | SdpError::InvalidRid { .. }
            | SdpError::DuplicateSsrc { .. }
            | SdpError::ExtIdConflict { .. }
            | SdpError::MediaMismatch { .. }
            | SdpError::MediaCount { .. } => "sdp_invalid",
            SdpError::MissingBundle
            | SdpError::NotBundled { .. }
            | SdpError::IceLitePeer
            | SdpError::MissingIceCredentials
            | SdpError::MissingFingerprint
            | SdpError::UnsupportedFingerprint { .. }
            | SdpError::DtlsRole { .. }
            | SdpError::NothingAccepted => "sdp_unsupported",
        }
    }

    pub(crate) fn attr(
        attribute: &'static str,
        location: Location,
        value: &str,
        reason: &'static str,
    ) -> Self {
        SdpError::InvalidAttribute {
            attribute,
            location,
            value: clip(value),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_values_and_cuts_long_ones_on_char_boundaries() {
        assert_eq!(clip("abc"), "abc");
        let long = "é".repeat(1000);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), MAX_ECHO + 3);
        assert!(clipped.ends_with("..."));
    }

    #[test]
    fn codes_split_invalid_from_unsupported() {
        assert_eq!(SdpError::MissingBundle.code(), "sdp_unsupported");
        assert_eq!(SdpError::NothingAccepted.code(), "sdp_unsupported");
        assert_eq!(SdpError::TooLarge { len: 2, max: 1 }.code(), "sdp_invalid");
        assert_eq!(
            SdpError::DuplicateMid { mid: "0".into() }.code(),
            "sdp_invalid"
        );
    }
}
