//! RTP header extensions (RFC 8285) the edge understands, and their negotiation.

use std::collections::HashMap;

use super::error::SdpError;
use super::parse::ExtMap;
use super::{Direction, HeaderExtIds, MediaKind};

pub(crate) const MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
pub(crate) const RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
pub(crate) const REPAIRED_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id";
/// As Chrome writes it.
pub(crate) const ABS_SEND_TIME: &str = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";
/// Transport-wide congestion control, as Chrome writes it.
pub(crate) const TRANSPORT_CC: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";
pub(crate) const AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Which way media flows for the extension set: what a publisher sends us, or what we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// The peer sends: rid and repaired-rid matter (simulcast), we read them.
    Receive,
    /// We send one stream per m-line: no rids.
    Send,
}

/// The extensions we use for `kind` in `flow`, in the order we write them.
fn supported(kind: MediaKind, flow: Flow) -> &'static [&'static str] {
    match (kind, flow) {
        (MediaKind::Audio, _) => &[MID, ABS_SEND_TIME, TRANSPORT_CC, AUDIO_LEVEL],
        (MediaKind::Video, Flow::Receive) => &[MID, RID, REPAIRED_RID, ABS_SEND_TIME, TRANSPORT_CC],
        (MediaKind::Video, Flow::Send) => &[MID, ABS_SEND_TIME, TRANSPORT_CC],
    }
}

fn slot<'a>(ids: &'a mut HeaderExtIds, uri: &str) -> Option<&'a mut Option<u8>> {
    Some(match uri {
        MID => &mut ids.mid,
        RID => &mut ids.rid,
        REPAIRED_RID => &mut ids.repaired_rid,
        ABS_SEND_TIME => &mut ids.abs_send_time,
        TRANSPORT_CC => &mut ids.transport_cc,
        AUDIO_LEVEL => &mut ids.audio_level,
        _ => return None,
    })
}

/// One extension line of an answer or offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtLine {
    pub(crate) id: u8,
    pub(crate) uri: &'static str,
    pub(crate) direction: Option<Direction>,
}

/// Keeps the offered extensions we support, with the offered ids (RFC 8285 §7: the answer
/// reuses them). Ids 1-14 always; 16-255 only with `a=extmap-allow-mixed`, since without it
/// the peer may only use one-byte headers (id 15 is reserved there, RFC 8285 §4.2).
pub(crate) fn negotiate(
    kind: MediaKind,
    flow: Flow,
    offered: &[ExtMap],
    allow_mixed: bool,
) -> (HeaderExtIds, Vec<ExtLine>) {
    let mut ids = HeaderExtIds::default();
    let mut lines = Vec::new();
    for &uri in supported(kind, flow) {
        let Some(e) = offered.iter().find(|e| e.uri == uri) else {
            continue;
        };
        if !(1..=14).contains(&e.id) && !allow_mixed {
            continue;
        }
        // RFC 8285 §7 answer direction: the answer mirrors the offer's; an extension the
        // offerer will not send (or receive, when we send) is left out.
        let direction = match (flow, e.direction) {
            (_, None | Some(Direction::SendRecv)) => None,
            (Flow::Receive, Some(Direction::SendOnly)) => Some(Direction::RecvOnly),
            (Flow::Send, Some(Direction::RecvOnly)) => Some(Direction::SendOnly),
            _ => continue,
        };
        if let Some(s) = slot(&mut ids, uri) {
            *s = Some(e.id);
        }
        lines.push(ExtLine {
            id: e.id,
            uri,
            direction,
        });
    }
    (ids, lines)
}

/// The lines we offer for `ids` on an m-line of `kind` (subscriber offers: we send).
pub(crate) fn offer_lines(kind: MediaKind, ids: &HeaderExtIds) -> Vec<ExtLine> {
    let all: [(Option<u8>, &'static str); 6] = [
        (ids.mid, MID),
        (ids.abs_send_time, ABS_SEND_TIME),
        (ids.transport_cc, TRANSPORT_CC),
        (ids.audio_level, AUDIO_LEVEL),
        (ids.rid, RID),
        (ids.repaired_rid, REPAIRED_RID),
    ];
    all.into_iter()
        .filter(|(_, uri)| match kind {
            MediaKind::Audio => ![RID, REPAIRED_RID].contains(uri),
            MediaKind::Video => *uri != AUDIO_LEVEL,
        })
        .filter_map(|(id, uri)| {
            id.map(|id| ExtLine {
                id,
                uri,
                direction: None,
            })
        })
        .collect()
}

/// Reads the ids of the extensions we know from a peer's lines (any direction).
pub(crate) fn ids_of(offered: &[ExtMap]) -> HeaderExtIds {
    let mut ids = HeaderExtIds::default();
    for e in offered {
        if let Some(s) = slot(&mut ids, &e.uri) {
            s.get_or_insert(e.id);
        }
    }
    ids
}

/// RFC 8843 §9.2: within a BUNDLE group an id means one extension, or the receiver cannot tell
/// what a packet carries before it knows the m-line. Checked over what we keep.
#[derive(Default)]
pub(crate) struct BundleExtCheck {
    seen: HashMap<u8, &'static str>,
}

impl BundleExtCheck {
    pub(crate) fn add(&mut self, lines: &[ExtLine]) -> Result<(), SdpError> {
        for l in lines {
            let first = *self.seen.entry(l.id).or_insert(l.uri);
            if first != l.uri {
                return Err(SdpError::ExtIdConflict {
                    id: l.id,
                    first: first.to_owned(),
                    second: l.uri.to_owned(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: u8, uri: &str, direction: Option<Direction>) -> ExtMap {
        ExtMap {
            id,
            uri: uri.to_owned(),
            direction,
        }
    }

    #[test]
    fn keeps_supported_with_offered_ids() {
        let offered = [
            e(14, "urn:ietf:params:rtp-hdrext:toffset", None),
            e(2, ABS_SEND_TIME, None),
            e(3, TRANSPORT_CC, None),
            e(4, MID, None),
            e(10, RID, None),
            e(11, REPAIRED_RID, None),
            e(1, AUDIO_LEVEL, None),
        ];
        let (ids, lines) = negotiate(MediaKind::Video, Flow::Receive, &offered, false);
        assert_eq!(
            ids,
            HeaderExtIds {
                mid: Some(4),
                rid: Some(10),
                repaired_rid: Some(11),
                abs_send_time: Some(2),
                transport_cc: Some(3),
                audio_level: None,
            }
        );
        assert_eq!(lines.len(), 5);
        let (ids, _) = negotiate(MediaKind::Video, Flow::Send, &offered, false);
        assert_eq!(ids.rid, None);
        let (ids, _) = negotiate(MediaKind::Audio, Flow::Receive, &offered, false);
        assert_eq!((ids.audio_level, ids.rid), (Some(1), None));
    }

    #[test]
    fn two_byte_ids_need_allow_mixed() {
        let offered = [e(15, MID, None), e(20, TRANSPORT_CC, None)];
        let (ids, _) = negotiate(MediaKind::Audio, Flow::Receive, &offered, false);
        assert_eq!(ids, HeaderExtIds::default());
        let (ids, _) = negotiate(MediaKind::Audio, Flow::Receive, &offered, true);
        assert_eq!((ids.mid, ids.transport_cc), (Some(15), Some(20)));
    }

    #[test]
    fn directions_are_mirrored_or_dropped() {
        let offered = [
            e(1, MID, Some(Direction::SendOnly)),
            e(2, ABS_SEND_TIME, Some(Direction::RecvOnly)),
            e(3, TRANSPORT_CC, Some(Direction::Inactive)),
        ];
        let (_, lines) = negotiate(MediaKind::Audio, Flow::Receive, &offered, false);
        assert_eq!(
            lines,
            vec![ExtLine {
                id: 1,
                uri: MID,
                direction: Some(Direction::RecvOnly)
            }]
        );
        let (_, lines) = negotiate(MediaKind::Audio, Flow::Send, &offered, false);
        assert_eq!(
            lines,
            vec![ExtLine {
                id: 2,
                uri: ABS_SEND_TIME,
                direction: Some(Direction::SendOnly)
            }]
        );
    }

    #[test]
    fn bundle_check_rejects_one_id_for_two_extensions() {
        let mut check = BundleExtCheck::default();
        let a = [ExtLine {
            id: 4,
            uri: MID,
            direction: None,
        }];
        let b = [ExtLine {
            id: 4,
            uri: TRANSPORT_CC,
            direction: None,
        }];
        check.add(&a).unwrap();
        check.add(&a).unwrap();
        assert!(matches!(
            check.add(&b),
            Err(SdpError::ExtIdConflict { id: 4, .. })
        ));
    }
}
