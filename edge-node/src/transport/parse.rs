//! Panic-free entry points to the rtp and rtcp crates' parsers.
//!
//! rtp 0.17 and rtcp 0.17 trust length fields inside packets and panic (`bytes` "advance out
//! of bounds") when one points past the data; `fuzz/fuzz_targets/rtp_rtcp.rs` finds such
//! inputs within seconds. A peer holding valid SRTP keys (any participant) can send them,
//! so parsing one unchecked would let a participant crash a shard. Every parse of peer bytes
//! goes through here:
//!
//! - [`check_rtp_header`] walks the RTP header (CSRCs, RFC 8285 extension elements) the way
//!   the rtp crate does and rejects what would over-read; [`parse_rtp`] then parses.
//!   [`super::srtp::SrtpSession::decrypt_rtp`] runs the check before decrypting, so its
//!   output is already safe to parse.
//! - [`check_rtcp_compound`] walks a compound RTCP packet (RFC 3550 §6.1) and checks the
//!   minimum sizes the rtcp crate reads but does not check (NACK, RRR, PLI, SLI, FIR, REMB).
//!   [`parse_rtcp`] runs that check, then the crate's parser inside `catch_unwind` as a last
//!   line for what the check does not cover yet (TWCC, SDES, XR internals): such a packet
//!   is dropped as [`ParseError::ParserPanicked`] instead of taking the thread down. That
//!   backstop needs `panic = "unwind"` (the default) in the profile, and the default panic
//!   hook still prints each caught panic, so gaps found by fuzzing belong in the check.

use std::panic::{self, AssertUnwindSafe};

use webrtc_util::Unmarshal;

/// Why a packet was not parsed. Drop the packet and count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("packet of {len} bytes is too short (minimum {min})")]
    TooShort { len: usize, min: usize },
    /// CSRC list or header extension does not fit the packet (RFC 3550 §5.1, §5.3.1;
    /// RFC 8285 §4.2, §4.3).
    #[error("malformed RTP header")]
    MalformedRtpHeader,
    /// A packet of the compound is not version 2, overruns the datagram, or is shorter than
    /// its type needs.
    #[error("malformed RTCP packet (type {packet_type}, format {format})")]
    MalformedRtcp { packet_type: u8, format: u8 },
    /// The rtp or rtcp crate returned an error.
    #[error("parser rejected the packet")]
    Rejected,
    /// The rtcp crate panicked on a packet [`check_rtcp_compound`] let through: a gap in the
    /// check, worth a fuzz target input and a fix.
    #[error("parser panicked")]
    ParserPanicked,
}

/// RTP fixed header (RFC 3550 §5.1).
const RTP_FIXED_HEADER_LEN: usize = 12;
/// RFC 8285 §4.2: profile of one-byte header extension elements.
const EXTENSION_PROFILE_ONE_BYTE: u16 = 0xBEDE;
/// RFC 8285 §4.3: profile of two-byte elements (the rtp crate knows only appbits 0).
const EXTENSION_PROFILE_TWO_BYTE: u16 = 0x1000;
/// RFC 8285 §4.2: one-byte ID 15 ends extension processing.
const ONE_BYTE_ID_STOP: u8 = 15;

/// Checks that an RTP header's CSRC list and header extension, down to every RFC 8285
/// element, lie inside `packet`, walking them as the rtp crate's `Header::unmarshal` does.
pub fn check_rtp_header(packet: &[u8]) -> Result<(), ParseError> {
    if packet.len() < RTP_FIXED_HEADER_LEN {
        return Err(ParseError::TooShort {
            len: packet.len(),
            min: RTP_FIXED_HEADER_LEN,
        });
    }
    let has_extension = packet[0] & 0x10 != 0;
    let csrc_count = usize::from(packet[0] & 0x0f);
    let ext_start = RTP_FIXED_HEADER_LEN + 4 * csrc_count;
    if !has_extension {
        return if packet.len() >= ext_start {
            Ok(())
        } else {
            Err(ParseError::MalformedRtpHeader)
        };
    }
    // RFC 3550 §5.3.1: 16-bit profile, 16-bit length in 32-bit words, then the data.
    let ext_header = packet
        .get(ext_start..ext_start + 4)
        .ok_or(ParseError::MalformedRtpHeader)?;
    let profile = u16::from_be_bytes([ext_header[0], ext_header[1]]);
    let words = usize::from(u16::from_be_bytes([ext_header[2], ext_header[3]]));
    let data = packet
        .get(ext_start + 4..ext_start + 4 + 4 * words)
        .ok_or(ParseError::MalformedRtpHeader)?;

    let mut pos = 0;
    match profile {
        EXTENSION_PROFILE_ONE_BYTE => {
            // RFC 8285 §4.2: ID (4 bits) | length - 1 (4 bits) | data; 0 bytes are padding.
            while let Some(&b) = data.get(pos) {
                if b == 0 {
                    pos += 1;
                    continue;
                }
                if b >> 4 == ONE_BYTE_ID_STOP {
                    break;
                }
                pos += 1 + usize::from(b & 0x0f) + 1;
                if pos > data.len() {
                    return Err(ParseError::MalformedRtpHeader);
                }
            }
        }
        EXTENSION_PROFILE_TWO_BYTE => {
            // RFC 8285 §4.3: ID (8 bits) | length (8 bits) | data; 0 bytes are padding.
            while let Some(&b) = data.get(pos) {
                if b == 0 {
                    pos += 1;
                    continue;
                }
                let len = *data.get(pos + 1).ok_or(ParseError::MalformedRtpHeader)?;
                pos += 2 + usize::from(len);
                if pos > data.len() {
                    return Err(ParseError::MalformedRtpHeader);
                }
            }
        }
        // Opaque RFC 3550 extension: its length was checked above.
        _ => {}
    }
    Ok(())
}

/// Parses a plain RTP packet from a peer (or from another node), without panicking.
pub fn parse_rtp(packet: &[u8]) -> Result<rtp::packet::Packet, ParseError> {
    check_rtp_header(packet)?;
    rtp::packet::Packet::unmarshal(&mut &packet[..]).map_err(|_| ParseError::Rejected)
}

/// RTCP common header (RFC 3550 §6.4.1).
const RTCP_HEADER_LEN: usize = 4;
/// Header plus sender SSRC plus media SSRC: the fixed part of every feedback message
/// (RFC 4585 §6.1).
const RTCP_FEEDBACK_MIN_LEN: usize = 12;
/// RFC 4585 §6.1 packet types.
const PT_RTPFB: u8 = 205;
const PT_PSFB: u8 = 206;
/// RFC 4585 §6.2.1 generic NACK, RFC 6051 RRR, draft-holmer-rmcat-transport-wide-cc-extensions
/// §3.1 transport-wide congestion control feedback.
const FMT_NACK: u8 = 1;
const FMT_RRR: u8 = 5;
const FMT_TWCC: u8 = 15;
/// TWCC: feedback header (12) + base seq (2) + status count (2) + reference time (3) +
/// feedback count (1).
const TWCC_FIXED_LEN: usize = 20;
/// The rtcp crate adds a status vector chunk's 7 or 14 symbols to a u16 counter before
/// clamping to the status count: counts this close to u16::MAX overflow it. No real feedback
/// comes near (a packet covers at most a few thousand media packets).
const TWCC_MAX_STATUS_COUNT: u16 = u16::MAX - 14;
/// RFC 4585 §6.3.1 PLI, §6.3.2 SLI; RFC 5104 §4.3.1 FIR; draft-alvestrand-rmcat-remb REMB.
const FMT_PLI: u8 = 1;
const FMT_SLI: u8 = 2;
const FMT_FIR: u8 = 4;
const FMT_AFB: u8 = 15;
/// RFC 5104 §4.3.1.1: a FIR entry is SSRC (4) + seq nr (1) + reserved (3).
const FIR_ENTRY_LEN: usize = 8;
/// REMB: feedback header (12) + "REMB" (4) + num SSRC, exp, mantissa (4).
const REMB_FIXED_LEN: usize = 20;

/// Walks a compound RTCP packet (RFC 3550 §6.1): every packet is version 2, fits the
/// datagram by its length field, and is as long as the rtcp crate will read for its type.
pub fn check_rtcp_compound(packet: &[u8]) -> Result<(), ParseError> {
    if packet.len() < RTCP_HEADER_LEN {
        return Err(ParseError::TooShort {
            len: packet.len(),
            min: RTCP_HEADER_LEN,
        });
    }
    let mut rest = packet;
    while !rest.is_empty() {
        let Some(header) = rest.get(..RTCP_HEADER_LEN) else {
            return Err(ParseError::TooShort {
                len: rest.len(),
                min: RTCP_HEADER_LEN,
            });
        };
        let (format, packet_type) = (header[0] & 0x1f, header[1]);
        let malformed = ParseError::MalformedRtcp {
            packet_type,
            format,
        };
        if header[0] >> 6 != 2 {
            return Err(malformed);
        }
        // RFC 3550 §6.4.1: length in 32-bit words minus one.
        let len = (usize::from(u16::from_be_bytes([header[2], header[3]])) + 1) * 4;
        let one = rest.get(..len).ok_or(malformed)?;
        if !rtcp_packet_fits(packet_type, format, one) {
            return Err(malformed);
        }
        rest = &rest[len..];
    }
    Ok(())
}

/// Per-type minimums for the reads the rtcp crate makes without checking.
fn rtcp_packet_fits(packet_type: u8, format: u8, p: &[u8]) -> bool {
    match (packet_type, format) {
        (PT_RTPFB, FMT_NACK | FMT_RRR) | (PT_PSFB, FMT_PLI | FMT_SLI) => {
            p.len() >= RTCP_FEEDBACK_MIN_LEN
        }
        (PT_RTPFB, FMT_TWCC) => {
            p.len() >= TWCC_FIXED_LEN && u16::from_be_bytes([p[14], p[15]]) <= TWCC_MAX_STATUS_COUNT
        }
        (PT_PSFB, FMT_FIR) => {
            p.len() >= RTCP_FEEDBACK_MIN_LEN
                && (p.len() - RTCP_FEEDBACK_MIN_LEN).is_multiple_of(FIR_ENTRY_LEN)
        }
        (PT_PSFB, FMT_AFB) => {
            // Only REMB is parsed; other application feedback becomes a raw packet, but an
            // AFB too short to tell is rejected either way.
            p.len() >= REMB_FIXED_LEN
                && (&p[12..16] != b"REMB" || p.len() >= REMB_FIXED_LEN + 4 * usize::from(p[16]))
        }
        _ => true,
    }
}

/// Parses a plain (decrypted) compound RTCP packet without panicking. See the module docs.
pub fn parse_rtcp(
    packet: &[u8],
) -> Result<Vec<Box<dyn rtcp::packet::Packet + Send + Sync>>, ParseError> {
    check_rtcp_compound(packet)?;
    // The parser only reads `packet` and builds fresh values: a panic midway leaves nothing
    // of ours half-updated, so asserting unwind safety is sound.
    match panic::catch_unwind(AssertUnwindSafe(|| {
        rtcp::packet::unmarshal(&mut &packet[..])
    })) {
        Ok(Ok(packets)) => Ok(packets),
        Ok(Err(_)) => Err(ParseError::Rejected),
        Err(_) => Err(ParseError::ParserPanicked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use webrtc_util::Marshal;

    #[test]
    fn rtp_header_check_table() {
        let fixed = |b0: u8| {
            let mut p = vec![b0, 111, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
            p.extend_from_slice(&[0xaa; 4]);
            p
        };
        let with_ext = |profile: u16, data: &[u8], tail: &[u8]| {
            let mut p = vec![0x90, 111, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
            p.extend_from_slice(&profile.to_be_bytes());
            p.extend_from_slice(&((data.len() / 4) as u16).to_be_bytes());
            p.extend_from_slice(data);
            p.extend_from_slice(tail);
            p
        };
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("plain", fixed(0x80), true),
            ("11 bytes", fixed(0x80)[..11].to_vec(), false),
            ("one CSRC present", fixed(0x81), true),
            ("two CSRCs, one present", fixed(0x82)[..16].to_vec(), false),
            (
                "X set, no extension header",
                fixed(0x90)[..12].to_vec(),
                false,
            ),
            (
                "one-byte: abs-send-time (3 bytes) + pad",
                with_ext(0xBEDE, &[0x32, 1, 2, 3], &[]),
                true,
            ),
            (
                "one-byte: element overruns block into payload",
                with_ext(0xBEDE, &[0x1f, 1, 2, 3], &[0; 20]),
                false,
            ),
            (
                "one-byte: element overruns packet",
                with_ext(0xBEDE, &[0, 0, 0, 0x1f], &[]),
                false,
            ),
            (
                "one-byte: padding only",
                with_ext(0xBEDE, &[0, 0, 0, 0], &[]),
                true,
            ),
            (
                "one-byte: ID 15 stops processing",
                with_ext(0xBEDE, &[0xff, 0xff, 0xff, 0xff], &[]),
                true,
            ),
            (
                "two-byte: 2-byte element",
                with_ext(0x1000, &[5, 2, 9, 9], &[]),
                true,
            ),
            (
                "two-byte: length byte missing",
                with_ext(0x1000, &[0, 0, 0, 5], &[]),
                false,
            ),
            (
                "two-byte: element overruns",
                with_ext(0x1000, &[5, 200, 9, 9], &[0; 8]),
                false,
            ),
            (
                "RFC 3550 extension, length fits",
                with_ext(0x1234, &[0xff; 8], &[]),
                true,
            ),
            (
                "extension length beyond packet",
                {
                    let mut p = with_ext(0xBEDE, &[0; 4], &[]);
                    p[15] = 9;
                    p
                },
                false,
            ),
        ];
        for (what, packet, ok) in cases {
            let got = check_rtp_header(&packet);
            assert_eq!(got.is_ok(), ok, "{what}: {got:?}");
            if ok {
                // Whatever passes, the rtp crate parses without panicking.
                let _ = parse_rtp(&packet);
            }
        }
    }

    #[test]
    fn fuzzer_found_rtp_extension_overrun_is_rejected() {
        // fuzz/rtp_rtcp crash-5a25a76d: a one-byte extension element reading past the packet
        // made rtp::Header::unmarshal panic (also inside webrtc-srtp's decrypt_rtp).
        assert!(check_rtp_header(FUZZ_RTP_EXTENSION_OVERRUN).is_err());
        assert!(parse_rtp(FUZZ_RTP_EXTENSION_OVERRUN).is_err());
    }

    /// fuzz/rtp_rtcp crash-5a25a76d.
    pub(crate) const FUZZ_RTP_EXTENSION_OVERRUN: &[u8] = &[
        0xbb, 0xb0, 0x09, 0x00, 0x00, 0xbb, 0xbb, 0x10, 0x00, 0xfe, 0xff, 0xff, 0xff, 0x04, 0xbb,
        0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0x26, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x2e, 0x00, 0x00, 0x2e, 0xb9, 0x10, 0x00, 0x00, 0x09,
        0x00, 0x00, 0xbb, 0xbb, 0x10, 0x00, 0xfe, 0xff, 0xff, 0xff, 0x04, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff,
    ];

    fn marshal(p: impl Marshal) -> Vec<u8> {
        p.marshal().unwrap().to_vec()
    }

    #[test]
    fn browser_rtcp_parses() {
        use rtcp::payload_feedbacks::full_intra_request::{FirEntry, FullIntraRequest};
        use rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
        use rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
        use rtcp::receiver_report::ReceiverReport;
        use rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};

        let mut compound = marshal(ReceiverReport {
            ssrc: 1,
            ..Default::default()
        });
        compound.extend(marshal(PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: 2,
        }));
        compound.extend(marshal(TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: 2,
            nacks: vec![NackPair {
                packet_id: 10,
                lost_packets: 0b101,
            }],
        }));
        compound.extend(marshal(FullIntraRequest {
            sender_ssrc: 1,
            media_ssrc: 0,
            fir: vec![FirEntry {
                ssrc: 2,
                sequence_number: 3,
            }],
        }));
        compound.extend(marshal(ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate: 1_500_000.0,
            ssrcs: vec![2, 3],
        }));
        let packets = parse_rtcp(&compound).unwrap();
        assert_eq!(packets.len(), 5);
    }

    #[test]
    fn rtcp_check_table() {
        let h = |b0: u8, pt: u8, words: u16| {
            let mut p = vec![b0, pt];
            p.extend_from_slice(&words.to_be_bytes());
            p.resize(4 + 4 * usize::from(words), 0);
            p
        };
        let mut remb_short = h(0x8f, 206, 5);
        remb_short[12..16].copy_from_slice(b"REMB");
        remb_short[16] = 3; // three SSRCs announced, none present
        let mut remb_ok = h(0x8f, 206, 6);
        remb_ok[12..16].copy_from_slice(b"REMB");
        remb_ok[16] = 1;
        // fuzz/rtp_rtcp: 0xffff statuses, one two-bit status vector chunk.
        let mut twcc_overflow = h(0x8f, 205, 5);
        twcc_overflow[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        twcc_overflow[20] = 0xc0;
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("empty", vec![], false),
            ("receiver report, no blocks", h(0x80, 201, 1), true),
            ("version 1", h(0x40, 201, 1), false),
            ("length past datagram", h(0x80, 201, 1)[..6].to_vec(), false),
            (
                "trailing partial header",
                [h(0x80, 201, 1), vec![0x80]].concat(),
                false,
            ),
            (
                "NACK with one SSRC only (rtcp crate over-read)",
                h(0x81, 205, 1),
                false,
            ),
            ("NACK with both SSRCs", h(0x81, 205, 2), true),
            ("PLI with one SSRC only", h(0x81, 206, 1), false),
            ("SLI with one SSRC only", h(0x82, 206, 1), false),
            ("RRR with one SSRC only", h(0x85, 205, 1), false),
            ("FIR with no entries", h(0x84, 206, 2), true),
            ("FIR with half an entry (over-read)", h(0x84, 206, 3), false),
            ("FIR with one entry", h(0x84, 206, 4), true),
            ("REMB announcing missing SSRCs", remb_short, false),
            ("REMB with its SSRC", remb_ok, true),
            ("AFB too short", h(0x8f, 206, 3), false),
            ("TWCC without its fixed part", h(0x8f, 205, 3), false),
            ("TWCC, zero statuses", h(0x8f, 205, 4), true),
            (
                "TWCC with a status count overflowing the crate's counter",
                twcc_overflow,
                false,
            ),
        ];
        for (what, packet, ok) in cases {
            let got = check_rtcp_compound(&packet);
            assert_eq!(got.is_ok(), ok, "{what}: {got:?}");
            // Whatever passes must not panic the parser (catch_unwind would hide it, so
            // call the crate directly).
            if ok {
                let _ = rtcp::packet::unmarshal(&mut &packet[..]);
            }
        }
    }
}
