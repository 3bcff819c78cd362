//! SRTP/SRTCP protection of one transport (RFC 3711, RFC 7714), synchronous.
//!
//! Built from the [`SrtpKeys`] the DTLS handshake exported: inbound state keyed with the
//! peer's (remote) master key decrypts what the peer sends, with replay protection; outbound
//! state keyed with ours (local) encrypts what we send. Plain `&mut self` calls, no I/O, so the
//! shard that owns the transport calls them inline on the packet path (decrypt once per
//! incoming packet, encrypt once per outgoing copy).
//!
//! RTP goes through our in-place transform (`super::srtp_rtp`, RFC 3711 / RFC 7714 for the
//! two profiles we negotiate): the hot paths are [`SrtpSession::decrypt_rtp_in_place`] (in
//! the receive buffer) and [`SrtpSession::encrypt_rtp_into`] (into the caller's arena), with
//! no allocation per packet; `decrypt_rtp` / `encrypt_rtp` are conveniences that allocate.
//! SRTCP goes through the same module's `RtcpInbound` and `RtcpOutbound` (every subscriber
//! sends transport-wide feedback 10-20 times a second; a load tester encrypts it for every
//! simulated viewer). webrtc-srtp, which all of this replaced, stays the oracle of the tests.
//!
//! Every input is peer-controlled. Rules kept from the guards webrtc-srtp 0.17 needed:
//! - RTP headers are walked by [`super::parse::check_rtp_header`] before anything parses them
//!   (the rtp crate 0.17.2 panics on an RFC 8285 header extension element that runs past the
//!   packet, found by `fuzz/fuzz_targets/rtp_rtcp.rs`);
//! - SRTCP lengths are checked before the packet is indexed from its tail;
//! - SRTCP with the E flag clear is refused outright ([`SrtpError::UnencryptedSrtcp`]): WebRTC
//!   always encrypts it, and webrtc-srtp with AES-CM returned such packets *without checking
//!   their authentication tag*, although RFC 3711 §3.4 makes authentication mandatory whatever
//!   the E flag says.
//!
//! Errors come back as [`SrtpError`] for the caller to drop and count.

use bytes::{Bytes, BytesMut};

use super::dtls::{SrtpKeys, SrtpProfile};
use super::parse::ParseError;
use super::srtp_rtp::{RtcpInbound, RtcpOutbound, RtpTransform};

/// Inbound SRTP replay window, in packets. RFC 3711 §3.3.2 asks for at least 64; video
/// arrives reordered by more than that at high bitrates, so we follow libwebrtc's 1024.
const SRTP_REPLAY_WINDOW: usize = 1024;
/// Inbound SRTCP replay window, in packets: RTCP is sparse and rarely reordered far.
const SRTCP_REPLAY_WINDOW: usize = 128;

/// Why a packet was not protected or unprotected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SrtpError {
    #[error("SRTP master key or salt has the wrong length for {profile:?}")]
    BadKeys { profile: SrtpProfile },
    #[error("packet of {len} bytes is too short (minimum {min})")]
    TooShort { len: usize, min: usize },
    /// SRTCP with the E flag clear (RFC 3711 §3.4): never sent by WebRTC peers.
    #[error("unencrypted SRTCP packet")]
    UnencryptedSrtcp,
    #[error("replayed or too old packet")]
    Replayed,
    #[error("authentication failed")]
    AuthFailed,
    /// The packet's index (ROC and sequence number, RFC 3711 §3.3.1) cannot be formed: 2^48
    /// packets (2^31 for SRTCP) were sent on the SSRC with this key (§9.2: none may follow).
    #[error("SRTP packet index out of range")]
    IndexOutOfRange,
    /// RTP header whose CSRC list or header extension does not fit the packet
    /// (RFC 3550 §5.1, §5.3.1; RFC 8285 §4.2, §4.3).
    #[error("malformed RTP header")]
    MalformedRtpHeader,
}

impl From<ParseError> for SrtpError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::TooShort { len, min } => SrtpError::TooShort { len, min },
            _ => SrtpError::MalformedRtpHeader,
        }
    }
}

/// SRTP state of one transport: see the module docs.
pub struct SrtpSession {
    /// SRTCP from the peer.
    rtcp_in: RtcpInbound,
    /// SRTCP to the peer.
    rtcp_out: RtcpOutbound,
    rtp_in: RtpTransform,
    rtp_out: RtpTransform,
    profile: SrtpProfile,
}

impl std::fmt::Debug for SrtpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpSession")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl SrtpSession {
    pub fn new(keys: &SrtpKeys) -> Result<Self, SrtpError> {
        let wrong_length = || SrtpError::BadKeys {
            profile: keys.profile,
        };
        // Inbound with replay windows; outbound needs none (we number what we send).
        let rtp_in = RtpTransform::new(
            keys.profile,
            &keys.remote_key,
            &keys.remote_salt,
            Some(SRTP_REPLAY_WINDOW),
        )
        .ok_or_else(wrong_length)?;
        let rtp_out = RtpTransform::new(keys.profile, &keys.local_key, &keys.local_salt, None)
            .ok_or_else(wrong_length)?;
        let rtcp_in = RtcpInbound::new(
            keys.profile,
            &keys.remote_key,
            &keys.remote_salt,
            SRTCP_REPLAY_WINDOW,
        )
        .ok_or_else(wrong_length)?;
        let rtcp_out = RtcpOutbound::new(keys.profile, &keys.local_key, &keys.local_salt)
            .ok_or_else(wrong_length)?;
        Ok(SrtpSession {
            rtcp_in,
            rtcp_out,
            rtp_in,
            rtp_out,
            profile: keys.profile,
        })
    }

    pub fn profile(&self) -> SrtpProfile {
        self.profile
    }

    /// Authenticates and decrypts an SRTP packet from the peer into plain RTP (a copy; the
    /// packet path uses [`decrypt_rtp_in_place`](Self::decrypt_rtp_in_place)). The header of
    /// what comes out has passed [`super::parse::check_rtp_header`], so the rtp crate can
    /// parse it (or use [`super::parse::parse_rtp`]).
    pub fn decrypt_rtp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        let mut buf = packet.to_vec();
        let n = self.rtp_in.decrypt(&mut buf)?;
        buf.truncate(n);
        Ok(buf.into())
    }

    /// Authenticates and decrypts the SRTP packet in `buf` where it lies; the plain RTP packet
    /// is then `buf[..n]` for the returned `n`, its header checked as for
    /// [`decrypt_rtp`](Self::decrypt_rtp). On error `buf` may hold garbage.
    pub fn decrypt_rtp_in_place(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        self.rtp_in.decrypt(buf)
    }

    /// Where decrypting the next RTP packet of `ssrc` from the peer will read: (address,
    /// length) ranges of the key, the stream table's header, the stream's state and its replay
    /// window's next word (`(0, 0)` for a stream not seen yet). Plain numbers, for a receiver of many transports
    /// to prefetch one datagram ahead (each datagram of a fan-out finds another transport's
    /// state cold); reading through them is never needed.
    pub fn inbound_rtp_lines(&self, ssrc: u32) -> [(usize, usize); 4] {
        self.rtp_in.hot_lines(ssrc)
    }

    /// Where encrypting the next RTP packet of `ssrc` for the peer finds its stream: the
    /// stream table's header and the stream's state (see [`Self::inbound_rtp_lines`]).
    pub fn outbound_rtp_lines(&self, ssrc: u32) -> [(usize, usize); 2] {
        let [_, table, entry, _] = self.rtp_out.hot_lines(ssrc);
        [table, entry]
    }

    /// Bytes SRTP adds to an RTP packet (the authentication tag).
    pub fn rtp_overhead(&self) -> usize {
        self.rtp_out.overhead()
    }

    /// Authenticates and decrypts an SRTCP packet from the peer into plain RTCP.
    pub fn decrypt_rtcp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        self.rtcp_in.decrypt(packet)
    }

    /// Encrypts and authenticates a plain RTP packet for the peer, into a new buffer.
    /// Forwarded packets may carry extension bytes a publisher chose: the header is checked.
    pub fn encrypt_rtp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        let mut buf = Vec::with_capacity(packet.len() + self.rtp_overhead());
        buf.extend_from_slice(packet);
        buf.resize(packet.len() + self.rtp_overhead(), 0);
        let n = self.rtp_out.encrypt(&mut buf, packet.len())?;
        buf.truncate(n);
        Ok(buf.into())
    }

    /// Encrypts `packet` into `arena` (which must be empty) and splits the result off: the
    /// packet path's way, one allocation per arena-full of packets instead of per packet.
    pub fn encrypt_rtp_into(
        &mut self,
        packet: &[u8],
        arena: &mut BytesMut,
    ) -> Result<Bytes, SrtpError> {
        self.rtp_out.encrypt_into(packet, arena)
    }

    /// Encrypts the plain RTP packet `buf[..len]` where it lies, appending the tag (`buf`
    /// needs [`rtp_overhead`](Self::rtp_overhead) bytes of room after it); returns the
    /// protected length.
    pub fn encrypt_rtp_in_place(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        self.rtp_out.encrypt(buf, len)
    }

    /// Encrypts and authenticates a plain RTCP (compound) packet for the peer.
    pub fn encrypt_rtcp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        self.rtcp_out.encrypt(packet)
    }

    /// [`Self::encrypt_rtcp`] into `arena` (which must be empty), split off as with
    /// [`Self::encrypt_rtp_into`]: for a sender of many RTCP packets (the load tester's
    /// simulated viewers), one allocation per arena-full instead of per packet.
    pub fn encrypt_rtcp_into(
        &mut self,
        packet: &[u8],
        arena: &mut BytesMut,
    ) -> Result<Bytes, SrtpError> {
        self.rtcp_out.encrypt_into(packet, arena)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use webrtc_util::{Marshal, Unmarshal};

    const PROFILES: [SrtpProfile; 2] =
        [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80];

    /// Mirrored key sets, as the DTLS client and server would export them.
    fn key_pair(profile: SrtpProfile) -> (SrtpKeys, SrtpKeys) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3711);
        let mut bytes = |n: usize| {
            let mut v = vec![0u8; n];
            rng.fill_bytes(&mut v);
            v
        };
        let (ck, cs, sk, ss) = (
            bytes(profile.key_len()),
            bytes(profile.salt_len()),
            bytes(profile.key_len()),
            bytes(profile.salt_len()),
        );
        let client = SrtpKeys {
            profile,
            local_key: ck.clone(),
            local_salt: cs.clone(),
            remote_key: sk.clone(),
            remote_salt: ss.clone(),
        };
        let server = SrtpKeys {
            profile,
            local_key: sk,
            local_salt: ss,
            remote_key: ck,
            remote_salt: cs,
        };
        (client, server)
    }

    fn rtp(seq: u16, payload: &[u8]) -> Vec<u8> {
        rtp::packet::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 111,
                sequence_number: seq,
                timestamp: 960 * u32::from(seq),
                ssrc: 0x1234_5678,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        }
        .marshal()
        .unwrap()
        .to_vec()
    }

    fn pli() -> Vec<u8> {
        rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
            sender_ssrc: 0x1234_5678,
            media_ssrc: 0x9abc_def0,
        }
        .marshal()
        .unwrap()
        .to_vec()
    }

    #[test]
    fn client_encrypts_server_decrypts_rtp_and_rtcp() {
        for profile in PROFILES {
            let (ck, sk) = key_pair(profile);
            let mut client = SrtpSession::new(&ck).unwrap();
            let mut server = SrtpSession::new(&sk).unwrap();

            for seq in [1u16, 2, 3, 65535, 0] {
                let plain = rtp(seq, b"opus frame");
                let protected = client.encrypt_rtp(&plain).unwrap();
                assert_ne!(
                    &protected[12..],
                    &plain[12..],
                    "{profile:?}: payload encrypted"
                );
                assert!(protected.len() > plain.len(), "{profile:?}: tag appended");
                let got = server.decrypt_rtp(&protected).unwrap();
                assert_eq!(&got[..], &plain[..], "{profile:?} seq {seq}");
                let parsed =
                    rtp::packet::Packet::unmarshal(&mut &got[..]).expect("decrypted RTP parses");
                assert_eq!(parsed.header.sequence_number, seq);
            }

            let plain = pli();
            let protected = client.encrypt_rtcp(&plain).unwrap();
            let got = server.decrypt_rtcp(&protected).unwrap();
            assert_eq!(&got[..], &plain[..], "{profile:?} RTCP");

            // And the other direction.
            let protected = server.encrypt_rtp(&rtp(9, b"down")).unwrap();
            assert_eq!(
                &client.decrypt_rtp(&protected).unwrap()[..],
                &rtp(9, b"down")[..]
            );
        }
    }

    /// RTCP encrypted into one arena: each packet is split off whole (the arena left empty for
    /// the next), decrypts on the other side, and is the same packet `encrypt_rtcp` gives
    /// from the same state; the packets share the arena's allocation.
    #[test]
    fn rtcp_encrypted_into_an_arena_is_split_off_whole() {
        for profile in PROFILES {
            let (ck, sk) = key_pair(profile);
            let (mut client, mut twin) = (
                SrtpSession::new(&ck).unwrap(),
                SrtpSession::new(&ck).unwrap(),
            );
            let mut server = SrtpSession::new(&sk).unwrap();
            let mut arena = BytesMut::with_capacity(4096);
            let mut sent = Vec::new();
            for _ in 0..3 {
                let protected = client.encrypt_rtcp_into(&pli(), &mut arena).unwrap();
                assert!(arena.is_empty(), "{profile:?}: split off whole");
                assert_eq!(protected, twin.encrypt_rtcp(&pli()).unwrap(), "{profile:?}");
                sent.push(protected);
            }
            assert_eq!(
                sent[0].as_ptr_range().end,
                sent[1].as_ptr(),
                "{profile:?}: one allocation"
            );
            for protected in &sent {
                assert_eq!(&server.decrypt_rtcp(protected).unwrap()[..], &pli()[..]);
            }
            assert!(client.encrypt_rtcp_into(&[0x80, 200], &mut arena).is_err());
            assert!(
                arena.is_empty(),
                "{profile:?}: nothing left behind by a refusal"
            );
        }
    }

    /// webrtc-srtp's SRTCP context for `key`/`salt`: the reference our transforms are checked
    /// against.
    fn reference(profile: SrtpProfile, key: &[u8], salt: &[u8]) -> webrtc_srtp::context::Context {
        use webrtc_srtp::protection_profile::ProtectionProfile;
        let profile = match profile {
            SrtpProfile::Aes128CmHmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            SrtpProfile::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
        };
        webrtc_srtp::context::Context::new(key, salt, profile, None, None).unwrap()
    }

    /// Our SRTCP against webrtc-srtp's, both ways: two senders, SRTCP indices past 2^16 (where
    /// the index's high half enters the IV); inbound, a packet reordered within the window is
    /// accepted once and one older than the window refused.
    #[test]
    fn srtcp_interoperates_with_webrtc_srtp_across_indices_and_senders() {
        let rr = |ssrc: u32, n: u32| {
            rtcp::receiver_report::ReceiverReport {
                ssrc,
                reports: vec![rtcp::reception_report::ReceptionReport {
                    ssrc: n,
                    last_sequence_number: n,
                    ..Default::default()
                }],
                ..Default::default()
            }
            .marshal()
            .unwrap()
            .to_vec()
        };
        for profile in PROFILES {
            let (ck, sk) = key_pair(profile);
            let mut client = reference(profile, &ck.local_key, &ck.local_salt);
            let mut server = SrtpSession::new(&sk).unwrap();
            let mut to_client = reference(profile, &ck.remote_key, &ck.remote_salt);
            let mut held = None;
            let mut oldest = None;
            // Sender A sends nine packets in ten: its SRTCP index passes 2^16 near n = 72,818.
            for n in 0..80_000u32 {
                let ssrc = if n % 10 == 9 {
                    0x0202_0202
                } else {
                    0x0101_0101
                };
                let plain = rr(ssrc, n);
                let protected = client.encrypt_rtcp(&plain).unwrap();
                // And the other way: ours encrypted, theirs decrypted.
                let down = server.encrypt_rtcp(&plain).unwrap();
                if n % 89 == 0 || (72_800..72_840).contains(&n) {
                    let got = to_client
                        .decrypt_rtcp(&down)
                        .unwrap_or_else(|e| panic!("{profile:?} packet {n} to the client: {e}"));
                    assert_eq!(&got[..], &plain[..], "{profile:?} packet {n} to the client");
                }
                match n {
                    100 => oldest = Some(protected),
                    72_815 => held = Some((protected, plain)),
                    _ if n % 97 == 0 || (72_800..72_840).contains(&n) || n >= 79_990 => {
                        let got = server
                            .decrypt_rtcp(&protected)
                            .unwrap_or_else(|e| panic!("{profile:?} packet {n}: {e}"));
                        assert_eq!(&got[..], &plain[..], "{profile:?} packet {n}");
                    }
                    _ => {}
                }
                if n == 72_830 {
                    // Delivered after its successors: accepted once.
                    let (protected, plain) = held.take().unwrap();
                    assert_eq!(&server.decrypt_rtcp(&protected).unwrap()[..], &plain[..]);
                    assert!(matches!(
                        server.decrypt_rtcp(&protected),
                        Err(SrtpError::Replayed)
                    ));
                }
            }
            assert!(
                matches!(
                    server.decrypt_rtcp(&oldest.unwrap()),
                    Err(SrtpError::Replayed)
                ),
                "{profile:?}: older than the window"
            );
        }
    }

    #[test]
    fn replayed_packets_are_rejected() {
        for profile in PROFILES {
            let (ck, sk) = key_pair(profile);
            let mut client = SrtpSession::new(&ck).unwrap();
            let mut server = SrtpSession::new(&sk).unwrap();

            let protected = client.encrypt_rtp(&rtp(100, b"x")).unwrap();
            server.decrypt_rtp(&protected).unwrap();
            assert!(
                matches!(server.decrypt_rtp(&protected), Err(SrtpError::Replayed)),
                "{profile:?} RTP replay"
            );

            let protected = client.encrypt_rtcp(&pli()).unwrap();
            server.decrypt_rtcp(&protected).unwrap();
            assert!(
                matches!(server.decrypt_rtcp(&protected), Err(SrtpError::Replayed)),
                "{profile:?} RTCP replay"
            );
        }
    }

    #[test]
    fn tampered_packets_are_rejected_and_do_not_poison_the_window() {
        for profile in PROFILES {
            let (ck, sk) = key_pair(profile);
            let mut client = SrtpSession::new(&ck).unwrap();
            let mut server = SrtpSession::new(&sk).unwrap();

            let protected = client.encrypt_rtp(&rtp(7, b"payload bytes")).unwrap();
            // Flip one bit in the header (authenticated), the payload and the tag.
            for at in [1, 14, protected.len() - 1] {
                let mut bad = protected.to_vec();
                bad[at] ^= 0x01;
                let got = server.decrypt_rtp(&bad);
                assert!(got.is_err(), "{profile:?}: byte {at} tampered, got {got:?}");
            }
            // The genuine packet still decrypts: failures did not mark seq 7 as seen.
            server.decrypt_rtp(&protected).unwrap();

            let protected = client.encrypt_rtcp(&pli()).unwrap();
            let mut bad = protected.to_vec();
            bad[9] ^= 0x80;
            assert!(
                matches!(server.decrypt_rtcp(&bad), Err(SrtpError::AuthFailed)),
                "{profile:?} RTCP"
            );
            server.decrypt_rtcp(&protected).unwrap();

            // A packet protected with other keys fails authentication.
            let (other, _) = key_pair(profile);
            let mut stranger = SrtpSession::new(&SrtpKeys {
                local_key: vec![0x42; profile.key_len()],
                ..other
            })
            .unwrap();
            let forged = stranger.encrypt_rtp(&rtp(8, b"forged")).unwrap();
            assert!(
                matches!(server.decrypt_rtp(&forged), Err(SrtpError::AuthFailed)),
                "{profile:?}"
            );
        }
    }

    #[test]
    fn short_and_garbage_input_is_an_error_not_a_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5764);
        for profile in PROFILES {
            let (_, sk) = key_pair(profile);
            let mut server = SrtpSession::new(&sk).unwrap();
            for len in 0..64 {
                for first in [0x80u8, 0x90, 0xa0, 0xbf] {
                    let mut buf = vec![0u8; len];
                    rng.fill_bytes(&mut buf);
                    if let Some(b) = buf.first_mut() {
                        *b = first;
                    }
                    assert!(server.decrypt_rtp(&buf).is_err(), "{profile:?} len {len}");
                    if len > 1 {
                        buf[1] = 200;
                    }
                    assert!(server.decrypt_rtcp(&buf).is_err(), "{profile:?} len {len}");
                    let _ = server.encrypt_rtcp(&buf);
                    let _ = server.encrypt_rtp(&buf);
                }
            }
        }
    }

    #[test]
    fn unauthenticated_plain_srtcp_is_rejected() {
        for profile in PROFILES {
            let (_, sk) = key_pair(profile);
            let mut server = SrtpSession::new(&sk).unwrap();
            // A forged BYE-like packet: plain RTCP, E=0 index, made-up tag. webrtc-srtp alone
            // returns it as genuine with AES-CM.
            let mut forged = pli();
            // HMAC-SHA1-80 (RFC 3711 §5.2) or AES-GCM (RFC 7714 §14.2).
            let tag_len = match profile {
                SrtpProfile::Aes128CmHmacSha1_80 => 10,
                SrtpProfile::AeadAes128Gcm => 16,
            };
            match profile {
                SrtpProfile::Aes128CmHmacSha1_80 => {
                    forged.extend_from_slice(&1u32.to_be_bytes());
                    forged.extend(std::iter::repeat_n(0xab, tag_len));
                }
                SrtpProfile::AeadAes128Gcm => {
                    forged.extend(std::iter::repeat_n(0xab, tag_len));
                    forged.extend_from_slice(&1u32.to_be_bytes());
                }
            }
            assert!(
                matches!(
                    server.decrypt_rtcp(&forged),
                    Err(SrtpError::UnencryptedSrtcp)
                ),
                "{profile:?}"
            );
            // With the E flag set the forgery is caught by authentication.
            let e_at = match profile {
                SrtpProfile::Aes128CmHmacSha1_80 => forged.len() - 4 - tag_len,
                SrtpProfile::AeadAes128Gcm => forged.len() - 4,
            };
            forged[e_at] |= 0x80;
            assert!(
                matches!(server.decrypt_rtcp(&forged), Err(SrtpError::AuthFailed)),
                "{profile:?}"
            );
        }
    }

    #[test]
    fn fuzzer_found_extension_overrun_is_rejected() {
        // fuzz/rtp_rtcp crash-5a25a76d: a one-byte extension element reading past the packet
        // made rtp::Header::unmarshal panic inside webrtc-srtp's decrypt_rtp.
        let crash: &[u8] = &[
            0xbb, 0xb0, 0x09, 0x00, 0x00, 0xbb, 0xbb, 0x10, 0x00, 0xfe, 0xff, 0xff, 0xff, 0x04,
            0xbb, 0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0x26, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x2e, 0x00, 0x00, 0x2e, 0xb9,
            0x10, 0x00, 0x00, 0x09, 0x00, 0x00, 0xbb, 0xbb, 0x10, 0x00, 0xfe, 0xff, 0xff, 0xff,
            0x04, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(crate::transport::parse::check_rtp_header(crash).is_err());
        for profile in PROFILES {
            let (_, sk) = key_pair(profile);
            let mut server = SrtpSession::new(&sk).unwrap();
            assert!(matches!(
                server.decrypt_rtp(crash),
                Err(SrtpError::MalformedRtpHeader)
            ));
        }
    }

    #[test]
    fn wrong_key_lengths_are_rejected() {
        let (mut keys, _) = key_pair(SrtpProfile::AeadAes128Gcm);
        keys.remote_salt.push(0);
        assert!(matches!(
            SrtpSession::new(&keys),
            Err(SrtpError::BadKeys { .. })
        ));
    }
}
