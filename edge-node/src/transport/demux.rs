//! Demultiplexing of the one UDP port: which protocol a datagram belongs to.
//!
//! WebRTC runs STUN, DTLS, SRTP and SRTCP over one 5-tuple. RFC 7983 §7 tells them apart by
//! the first byte alone, so classification is a constant-time look at one or two bytes,
//! before any parsing. RTP and RTCP share the range 128..=191 (version 2); RFC 5761 §4 keeps
//! them apart by the second byte: RTCP packet types 192..=223 never collide with the RTP
//! marker bit plus a dynamic payload type, because payload types 64..=95 are not used for RTP.
//!
//! ZRTP (16..=19) and TURN channel data (64..=79) are not spoken here: they are [`PacketClass::Unknown`].

/// What a datagram on the shared port is, by RFC 7983 §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketClass {
    /// STUN (ICE connectivity checks), first byte 0..=3.
    Stun,
    /// DTLS record, first byte 20..=63.
    Dtls,
    /// SRTP, first byte 128..=191 and second byte outside 192..=223.
    Rtp,
    /// SRTCP, first byte 128..=191 and second byte (packet type) 192..=223.
    Rtcp,
    /// Anything else: drop and count.
    Unknown,
}

/// RFC 7983 §7: STUN messages start with the two most significant bits 0b00.
const STUN_FIRST_BYTE: std::ops::RangeInclusive<u8> = 0..=3;
/// RFC 7983 §7: DTLS content types (20 change_cipher_spec .. 63, reserved for DTLS).
const DTLS_FIRST_BYTE: std::ops::RangeInclusive<u8> = 20..=63;
/// RFC 7983 §7: RTP/RTCP version 2 (first two bits 0b10).
const RTP_FIRST_BYTE: std::ops::RangeInclusive<u8> = 128..=191;
/// RFC 5761 §4: RTCP packet types (SR 200, RR 201, SDES 202, BYE 203, APP 204, RTPFB 205,
/// PSFB 206, XR 207, ...) sit in 192..=223, which RTP avoids by not using payload types
/// 64..=95 (with or without the marker bit).
const RTCP_SECOND_BYTE: std::ops::RangeInclusive<u8> = 192..=223;

/// Classifies a datagram received on the shared port (RFC 7983 §7, RFC 5761 §4).
///
/// Looks at the first byte (and the second for RTP/RTCP); it does not validate the packet.
/// An RTP-range datagram shorter than two bytes is [`PacketClass::Unknown`], as is an empty one.
pub fn classify(buf: &[u8]) -> PacketClass {
    let Some(&first) = buf.first() else {
        return PacketClass::Unknown;
    };
    if STUN_FIRST_BYTE.contains(&first) {
        PacketClass::Stun
    } else if DTLS_FIRST_BYTE.contains(&first) {
        PacketClass::Dtls
    } else if RTP_FIRST_BYTE.contains(&first) {
        match buf.get(1) {
            Some(second) if RTCP_SECOND_BYTE.contains(second) => PacketClass::Rtcp,
            Some(_) => PacketClass::Rtp,
            None => PacketClass::Unknown,
        }
    } else {
        PacketClass::Unknown
    }
}

/// The SSRC of an RTP datagram (RFC 3550 §5.1: bytes 8-11, in the clear under SRTP), without
/// parsing or decrypting it; `None` for anything else or a datagram too short to carry one.
pub fn rtp_ssrc(buf: &[u8]) -> Option<u32> {
    match (classify(buf), buf.get(8..12)) {
        (PacketClass::Rtp, Some(b)) => Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_ssrc_is_read_from_rtp_only() {
        let mut rtp = [0u8; 12];
        rtp[0] = 0x80;
        rtp[1] = 96;
        rtp[8..12].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert_eq!(rtp_ssrc(&rtp), Some(0xdead_beef));
        assert_eq!(rtp_ssrc(&rtp[..11]), None, "too short");
        let mut rtcp = rtp;
        rtcp[1] = 200;
        assert_eq!(rtp_ssrc(&rtcp), None, "RTCP");
        assert_eq!(
            rtp_ssrc(&[0x00, 0x01, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
            None,
            "STUN"
        );
    }

    #[test]
    fn classify_table() {
        let cases: &[(&[u8], PacketClass, &str)] = &[
            (&[], PacketClass::Unknown, "empty"),
            (&[0x00, 0x01], PacketClass::Stun, "binding request"),
            (&[0x01, 0x01], PacketClass::Stun, "binding success"),
            (&[0x03], PacketClass::Stun, "upper STUN bound"),
            (&[4], PacketClass::Unknown, "just above STUN"),
            (&[16], PacketClass::Unknown, "ZRTP is not spoken"),
            (&[19], PacketClass::Unknown, "upper ZRTP"),
            (&[20], PacketClass::Dtls, "change_cipher_spec"),
            (&[22, 0xfe, 0xfd], PacketClass::Dtls, "handshake"),
            (&[23], PacketClass::Dtls, "application_data"),
            (&[63], PacketClass::Dtls, "upper DTLS"),
            (&[64], PacketClass::Unknown, "TURN channel"),
            (&[79], PacketClass::Unknown, "upper TURN channel"),
            (&[127, 0], PacketClass::Unknown, "just below RTP"),
            (&[0x80], PacketClass::Unknown, "RTP range but one byte"),
            (&[0x80, 96], PacketClass::Rtp, "RTP PT 96"),
            (
                &[0x80, 96 | 0x80],
                PacketClass::Rtp,
                "RTP PT 96 with marker",
            ),
            (&[0x80, 0], PacketClass::Rtp, "RTP PT 0 (PCMU)"),
            (&[0x80, 191], PacketClass::Rtp, "just below RTCP types"),
            (&[0x80, 192], PacketClass::Rtcp, "lower RTCP bound"),
            (&[0x80, 200], PacketClass::Rtcp, "sender report"),
            (&[0x81, 201], PacketClass::Rtcp, "receiver report"),
            (&[0x8f, 206], PacketClass::Rtcp, "PSFB (PLI)"),
            (&[0x80, 223], PacketClass::Rtcp, "upper RTCP bound"),
            (&[0x80, 224], PacketClass::Rtp, "just above RTCP types"),
            (&[0x90, 111], PacketClass::Rtp, "RTP with extension"),
            (&[191, 200], PacketClass::Rtcp, "upper RTP-range first byte"),
            (&[192, 200], PacketClass::Unknown, "above RTP range"),
            (&[255], PacketClass::Unknown, "0xff"),
        ];
        for (buf, want, what) in cases {
            assert_eq!(classify(buf), *want, "{what}: {buf:?}");
        }
    }

    #[test]
    fn every_first_byte_has_the_rfc7983_class() {
        for b in 0..=u8::MAX {
            let got = classify(&[b, 96]);
            let want = match b {
                0..=3 => PacketClass::Stun,
                20..=63 => PacketClass::Dtls,
                128..=191 => PacketClass::Rtp,
                _ => PacketClass::Unknown,
            };
            assert_eq!(got, want, "first byte {b}");
        }
    }
}
