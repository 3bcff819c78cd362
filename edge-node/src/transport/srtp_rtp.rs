//! SRTP for RTP packets, in place: the per-packet half of [`super::srtp::SrtpSession`].
//!
//! Why not webrtc-srtp for RTP: its `Context` parses every header into an `rtp::Header`
//! (allocating vectors for CSRCs and extensions) and returns a freshly allocated buffer per
//! packet; at hundreds of thousands of packets per second per core that allocator traffic was
//! about a fifth of the edge's profile. Here a packet is transformed where it lies: decrypted in
//! the buffer it was received in, encrypted in the buffer it is sent from (or appended to a
//! caller's arena, see [`RtpTransform::encrypt_into`]). SRTCP is done here too, with the
//! same primitives ([`RtcpInbound`], [`RtcpOutbound`]): a subscriber sends transport-wide
//! feedback 10-20 times a second, and a load tester sends it for every simulated viewer.
//!
//! What it implements, for the two profiles we negotiate (RFC 5764 §4.1.2, RFC 7714 §14.2):
//! - session keys from the DTLS-exported master key and salt with the AES-CM PRF, key
//!   derivation rate 0 (RFC 3711 §4.3.1, §4.3.3; RFC 7714 §11). The 96-bit GCM master salt is
//!   placed as webrtc-srtp and libsrtp place it (left-aligned in the PRF input block), which is
//!   what browsers interoperate with;
//! - AES_CM_128_HMAC_SHA1_80: AES-128 in counter mode with the RFC 3711 §4.1.1 IV, HMAC-SHA1
//!   over header, ciphertext and ROC, tag truncated to 80 bits (§4.2);
//! - AEAD_AES_128_GCM: the header is associated data, the 12-byte IV is the session salt XOR
//!   (0, SSRC, ROC, SEQ) (RFC 7714 §8.1), 16-byte tag appended;
//! - the rollover counter per SSRC, estimated from the highest sequence number seen
//!   (RFC 3711 Appendix A), and, inbound, a replay window over the 48-bit packet index
//!   (RFC 3711 §3.3.2). State for an SSRC is only created or advanced by a packet that
//!   authenticated, so forged packets cannot move it.
//!
//! The cross-checks against webrtc-srtp and the RFC 3711 B.3 key-derivation vectors are in
//! this module's tests.

use aes::cipher::{BlockEncrypt, InnerIvInit, KeyInit, StreamCipher};
use aes::Aes128;
use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_128_GCM};
use sha1::Sha1;

use super::dtls::SrtpProfile;
use super::parse::check_rtp_header;
use super::srtp::SrtpError;

type Aes128Ctr = ctr::Ctr128BE<Aes128>;

/// RFC 3711 §4.3.1 key derivation labels: encryption, authentication, salt.
const SRTP_LABELS: [u8; 3] = [0x00, 0x01, 0x02];
/// RFC 3711 §4.3.2: the same for SRTCP.
const SRTCP_LABELS: [u8; 3] = [0x03, 0x04, 0x05];
/// SRTCP index with its E flag (RFC 3711 §3.4).
const SRTCP_INDEX_LEN: usize = 4;
/// RTCP header and sender SSRC: the part of an SRTCP packet never encrypted.
const RTCP_HEADER_LEN: usize = 8;
/// Sender SSRCs an inbound SRTCP transform keeps replay windows for; a browser uses a few.
const MAX_RTCP_STREAMS: usize = 32;
/// HMAC-SHA1 key length (RFC 3711 §8.2: n_a = 160 bits).
const AUTH_KEY_LEN: usize = 20;
const HMAC_TAG_LEN: usize = 10;
const GCM_TAG_LEN: usize = 16;

/// The AES-CM PRF with key derivation rate 0 (RFC 3711 §4.3.1, §4.3.3): `out` is filled with
/// the keystream of AES-128(master_key) over (master_salt XOR label << 64) * 2^16 + i.
fn derive(master_key: &[u8], master_salt: &[u8], label: u8, out: &mut [u8]) {
    let aes = Aes128::new(master_key.into());
    let mut input = [0u8; 16];
    input[..master_salt.len()].copy_from_slice(master_salt);
    input[7] ^= label;
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut block = input;
        block[14..16].copy_from_slice(&(i as u16).to_be_bytes());
        let block = aes::Block::from_mut_slice(&mut block);
        aes.encrypt_block(block);
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

// One per transform and direction, never moved on the hot path; boxing the larger ring key would
// add a pointer chase to every packet (each packet of a fan-out finds another peer's key cold).
#[allow(clippy::large_enum_variant)]
enum Cipher {
    /// AES_CM_128_HMAC_SHA1_80: the expanded AES key (cloned into a counter-mode instance per
    /// packet, no key schedule per packet) and the keyed HMAC (cloned per packet likewise).
    AesCm { aes: Aes128, mac: Hmac<Sha1> },
    /// AEAD_AES_128_GCM through ring (BoringSSL's assembly: AES-NI and carry-less multiply
    /// over several blocks at once), about three times the RustCrypto `aes-gcm` rate here.
    Gcm(LessSafeKey),
}

/// RFC 3711 §3.3.2 replay list over the 48-bit packet index: one bit per index of the last
/// `size` indices, in a ring of 64-bit words addressed by `index % ring bits`. Advancing by one
/// packet clears one bit (webrtc-util's detector shifts its whole window instead: 3% of the
/// load tester's profile).
#[derive(Clone)]
struct ReplayWindow {
    size: u64,
    highest: Option<u64>,
    bits: Vec<u64>,
}

impl ReplayWindow {
    fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            size: size as u64,
            highest: None,
            bits: vec![0; size.div_ceil(64)],
        }
    }

    fn slot(&self, index: u64) -> (usize, u64) {
        let i = index % (self.bits.len() as u64 * 64);
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Whether `index` is new: ahead of the highest accepted, or within the window and unseen.
    fn check(&self, index: u64) -> bool {
        let Some(highest) = self.highest else {
            return true;
        };
        if index > highest {
            return true;
        }
        if highest - index >= self.size {
            return false;
        }
        let (w, m) = self.slot(index);
        self.bits[w] & m == 0
    }

    /// Records an authenticated `index` (that passed [`check`](Self::check)).
    fn accept(&mut self, index: u64) {
        match self.highest {
            Some(h) if index <= h => {}
            Some(h) => {
                let ring = self.bits.len() as u64 * 64;
                if index - h >= ring {
                    self.bits.fill(0);
                } else {
                    for skipped in h + 1..index {
                        let (w, m) = self.slot(skipped);
                        self.bits[w] &= !m;
                    }
                    let (w, m) = self.slot(index);
                    self.bits[w] &= !m;
                }
                self.highest = Some(index);
            }
            None => self.highest = Some(index),
        }
        let (w, m) = self.slot(index);
        self.bits[w] |= m;
    }
}

/// Rollover counter and replay window of one SSRC.
struct Stream {
    ssrc: u32,
    roc: u32,
    highest_seq: u16,
    replay: Option<ReplayWindow>,
}

impl Stream {
    /// RFC 3711 Appendix A: the ROC `v` a packet with `seq` most likely belongs to. Before
    /// the first rollover there is no ROC -1: a sequence number far below the first one
    /// counts as ROC 0, as webrtc-srtp and libsrtp guess. `None` when the ROC would overflow.
    fn estimate_roc(&self, seq: u16) -> Option<u32> {
        let s_l = self.highest_seq;
        let v = if s_l < 0x8000 {
            if seq > s_l && seq - s_l > 0x8000 {
                self.roc.saturating_sub(1)
            } else {
                self.roc
            }
        } else if s_l - 0x8000 > seq {
            self.roc.checked_add(1)?
        } else {
            self.roc
        };
        Some(v)
    }

    fn update(&mut self, roc: u32, seq: u16) {
        if roc > self.roc || (roc == self.roc && seq > self.highest_seq) {
            self.roc = roc;
            self.highest_seq = seq;
        }
    }
}

/// One direction of SRTP for RTP packets: see the module docs.
pub(super) struct RtpTransform {
    cipher: Cipher,
    /// Session salt: 14 bytes (AES-CM) or the first 12 (GCM).
    salt: [u8; 14],
    /// Few per transport (audio, three layers, their RTX), so a vector beats a map.
    streams: Vec<Stream>,
    /// Inbound: replay window size in packets; outbound: `None`.
    replay_window: Option<usize>,
}

/// Where an RTP packet's header ends, after checking that it fits the packet.
fn header_len(packet: &[u8]) -> Result<usize, SrtpError> {
    check_rtp_header(packet)?;
    let cc = usize::from(packet[0] & 0x0f);
    let mut len = 12 + 4 * cc;
    if packet[0] & 0x10 != 0 {
        let words = u16::from_be_bytes([packet[len + 2], packet[len + 3]]);
        len += 4 + 4 * usize::from(words);
    }
    Ok(len)
}

impl RtpTransform {
    pub(super) fn new(
        profile: SrtpProfile,
        master_key: &[u8],
        master_salt: &[u8],
        replay_window: Option<usize>,
    ) -> Option<Self> {
        let (cipher, salt) = session_keys(profile, master_key, master_salt, SRTP_LABELS)?;
        Some(Self {
            cipher,
            salt,
            streams: Vec::new(),
            replay_window,
        })
    }

    /// Bytes SRTP adds to an RTP packet.
    pub(super) fn overhead(&self) -> usize {
        match self.cipher {
            Cipher::AesCm { .. } => HMAC_TAG_LEN,
            Cipher::Gcm(_) => GCM_TAG_LEN,
        }
    }

    fn stream(&self, ssrc: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.ssrc == ssrc)
    }

    fn new_stream(&self, ssrc: u32, seq: u16) -> Stream {
        Stream {
            ssrc,
            roc: 0,
            highest_seq: seq,
            replay: self.replay_window.map(ReplayWindow::new),
        }
    }

    /// Encrypts the plain RTP packet in `buf[..len]` in place and appends the tag; `buf` must
    /// have room for [`overhead`](Self::overhead) more bytes. Returns the protected length.
    pub(super) fn encrypt(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let tag_len = self.overhead();
        if buf.len() < len + tag_len {
            return Err(SrtpError::TooShort {
                len: buf.len(),
                min: len + tag_len,
            });
        }
        let hlen = header_len(&buf[..len])?;
        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let at = match self.stream(ssrc) {
            Some(i) => i,
            None => {
                let s = self.new_stream(ssrc, seq);
                self.streams.push(s);
                self.streams.len() - 1
            }
        };
        // RFC 3711 §9.2: never reuse an index; the ROC running out ends the stream.
        let roc = self.streams[at]
            .estimate_roc(seq)
            .ok_or(SrtpError::IndexOutOfRange)?;
        let (head, rest) = buf.split_at_mut(hlen);
        let (body, tail) = rest.split_at_mut(len - hlen);
        match &self.cipher {
            Cipher::AesCm { aes, mac } => {
                let iv = cm_iv(&self.salt, ssrc, roc, seq);
                let mut ctr = keystream(aes, iv);
                ctr.apply_keystream(body);
                let mut mac = mac.clone();
                mac.update(head);
                mac.update(body);
                mac.update(&roc.to_be_bytes());
                let tag = mac.finalize().into_bytes();
                tail[..HMAC_TAG_LEN].copy_from_slice(&tag[..HMAC_TAG_LEN]);
            }
            Cipher::Gcm(gcm) => {
                let iv = gcm_iv(&self.salt, ssrc, roc, seq);
                let tag = gcm
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(iv),
                        Aad::from(&*head),
                        body,
                    )
                    .map_err(|_| SrtpError::AuthFailed)?;
                tail[..GCM_TAG_LEN].copy_from_slice(tag.as_ref());
            }
        }
        self.streams[at].update(roc, seq);
        Ok(len + tag_len)
    }

    /// Appends the protected form of `plain` to `arena` and splits it off: no allocation while
    /// the arena has room (and none at all once earlier packets were sent and dropped, as
    /// `BytesMut` then reuses its buffer).
    pub(super) fn encrypt_into(
        &mut self,
        plain: &[u8],
        arena: &mut BytesMut,
    ) -> Result<Bytes, SrtpError> {
        debug_assert!(arena.is_empty());
        let total = plain.len() + self.overhead();
        arena.reserve(total);
        arena.extend_from_slice(plain);
        arena.resize(total, 0);
        match self.encrypt(&mut arena[..], plain.len()) {
            Ok(_) => Ok(arena.split().freeze()),
            Err(e) => {
                arena.clear();
                Err(e)
            }
        }
    }

    /// The memory decrypting the next packet of `ssrc` reads, as (address, length) ranges:
    /// the key, the stream table's header, the stream's state, and the replay window's word
    /// for the next index (`(0, 0)` for a stream not seen yet). For callers that prefetch it
    /// ([`super::srtp::SrtpSession::inbound_rtp_lines`]).
    pub(super) fn hot_lines(&self, ssrc: u32) -> [(usize, usize); 4] {
        let key = match &self.cipher {
            Cipher::Gcm(key) => (std::ptr::from_ref(key) as usize, size_of_val(key)),
            cm => (std::ptr::from_ref(cm) as usize, size_of_val(cm)),
        };
        let table = (
            std::ptr::from_ref(&self.streams) as usize,
            size_of::<Vec<Stream>>(),
        );
        let Some(stream) = self.stream(ssrc).map(|i| &self.streams[i]) else {
            return [key, table, (0, 0), (0, 0)];
        };
        let word = stream.replay.as_ref().map_or((0, 0), |r| {
            let next = (u64::from(stream.roc) << 16 | u64::from(stream.highest_seq)) + 1;
            (std::ptr::from_ref(&r.bits[r.slot(next).0]) as usize, 8)
        });
        let entry = (std::ptr::from_ref(stream) as usize, size_of::<Stream>());
        [key, table, entry, word]
    }

    /// Authenticates and decrypts the SRTP packet in `buf` in place; returns the length of the
    /// plain RTP packet now in `buf[..n]`. Replays and packets older than the window fail.
    pub(super) fn decrypt(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        let tag_len = self.overhead();
        let hlen = header_len(buf)?;
        if buf.len() < hlen + tag_len {
            return Err(SrtpError::TooShort {
                len: buf.len(),
                min: hlen + tag_len,
            });
        }
        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let existing = self.stream(ssrc);
        let mut fresh = None;
        let stream = match existing {
            Some(i) => &mut self.streams[i],
            None => fresh.insert(self.new_stream(ssrc, seq)),
        };
        let roc = stream.estimate_roc(seq).ok_or(SrtpError::Replayed)?;
        let index = (u64::from(roc) << 16) | u64::from(seq);
        if stream.replay.as_ref().is_some_and(|r| !r.check(index)) {
            return Err(SrtpError::Replayed);
        }
        let plain_len = buf.len() - tag_len;
        let (head, rest) = buf.split_at_mut(hlen);
        let (body, tag) = rest.split_at_mut(plain_len - hlen);
        match &self.cipher {
            Cipher::AesCm { aes, mac } => {
                let mut mac = mac.clone();
                mac.update(head);
                mac.update(body);
                mac.update(&roc.to_be_bytes());
                mac.verify_truncated_left(tag)
                    .map_err(|_| SrtpError::AuthFailed)?;
                let iv = cm_iv(&self.salt, ssrc, roc, seq);
                let mut ctr = keystream(aes, iv);
                ctr.apply_keystream(body);
            }
            Cipher::Gcm(gcm) => {
                let iv = gcm_iv(&self.salt, ssrc, roc, seq);
                let tag = Tag::try_from(&*tag).map_err(|_| SrtpError::AuthFailed)?;
                gcm.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(iv),
                    Aad::from(&*head),
                    tag,
                    body,
                    0..,
                )
                .map_err(|_| SrtpError::AuthFailed)?;
            }
        }
        // Authenticated: now the packet may move the stream's state.
        let stream = match existing {
            Some(i) => &mut self.streams[i],
            None => {
                self.streams.push(fresh.take().expect("fresh stream"));
                self.streams.last_mut().expect("just pushed")
            }
        };
        if let Some(r) = stream.replay.as_mut() {
            r.accept(index);
        }
        stream.update(roc, seq);
        Ok(plain_len)
    }
}

/// The session cipher and salt derived with `labels` (encryption, authentication, salt);
/// `None` for a master key or salt of the wrong length.
fn session_keys(
    profile: SrtpProfile,
    master_key: &[u8],
    master_salt: &[u8],
    [encryption, authentication, salt_label]: [u8; 3],
) -> Option<(Cipher, [u8; 14])> {
    if master_key.len() != 16 || master_salt.len() != profile.salt_len() {
        return None;
    }
    let mut key = [0u8; 16];
    derive(master_key, master_salt, encryption, &mut key);
    let mut salt = [0u8; 14];
    derive(
        master_key,
        master_salt,
        salt_label,
        &mut salt[..profile.salt_len()],
    );
    let cipher = match profile {
        SrtpProfile::Aes128CmHmacSha1_80 => {
            let mut auth = [0u8; AUTH_KEY_LEN];
            derive(master_key, master_salt, authentication, &mut auth);
            Cipher::AesCm {
                aes: Aes128::new(&key.into()),
                mac: <Hmac<Sha1> as Mac>::new_from_slice(&auth).ok()?,
            }
        }
        SrtpProfile::AeadAes128Gcm => {
            Cipher::Gcm(LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).ok()?))
        }
    };
    Some((cipher, salt))
}

/// SRTCP from the peer (RFC 3711 §3.4; RFC 7714 §9.1, §17), with the primitives the RTP
/// transform uses. Every subscriber sends transport-wide feedback 10-20 times a second, so a
/// busy edge decrypts thousands of these per second: through webrtc-srtp (a map per SSRC,
/// RustCrypto AES-GCM, a shifted replay window, an allocation) that was 4% of a shard.
///
/// The SRTCP index is 31 bits and has no rollover counter: the IVs are the RTP ones with
/// (ROC, SEQ) replaced by (index >> 16, index & 0xffff), which is exactly RFC 3711 §4.1.1's
/// and RFC 7714 §9.1's layout. Replay windows are per sender SSRC, created only by a packet
/// that authenticated.
pub(super) struct RtcpInbound {
    cipher: Cipher,
    salt: [u8; 14],
    streams: Vec<(u32, ReplayWindow)>,
    window: usize,
}

impl RtcpInbound {
    pub(super) fn new(
        profile: SrtpProfile,
        master_key: &[u8],
        master_salt: &[u8],
        window: usize,
    ) -> Option<Self> {
        let (cipher, salt) = session_keys(profile, master_key, master_salt, SRTCP_LABELS)?;
        Some(Self {
            cipher,
            salt,
            streams: Vec::new(),
            window,
        })
    }

    /// Authenticates and decrypts an SRTCP packet into plain (compound) RTCP. Packets with the
    /// E flag clear are refused: WebRTC always encrypts SRTCP.
    pub(super) fn decrypt(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        // AES-CM (RFC 3711 §3.4): header | encrypted | E + index | tag (10).
        // AEAD (RFC 7714 §17):     header | encrypted + tag (16) | E + index.
        let (index_at, tag_len) = match self.cipher {
            Cipher::AesCm { .. } => (
                packet.len().wrapping_sub(SRTCP_INDEX_LEN + HMAC_TAG_LEN),
                HMAC_TAG_LEN,
            ),
            Cipher::Gcm(_) => (packet.len().wrapping_sub(SRTCP_INDEX_LEN), GCM_TAG_LEN),
        };
        let min = RTCP_HEADER_LEN + SRTCP_INDEX_LEN + tag_len;
        if packet.len() < min {
            return Err(SrtpError::TooShort {
                len: packet.len(),
                min,
            });
        }
        let e_index: [u8; 4] = packet[index_at..index_at + SRTCP_INDEX_LEN]
            .try_into()
            .map_err(|_| SrtpError::AuthFailed)?;
        let word = u32::from_be_bytes(e_index);
        if word & 0x8000_0000 == 0 {
            return Err(SrtpError::UnencryptedSrtcp);
        }
        let index = word & 0x7fff_ffff;
        let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let (roc, seq) = (index >> 16, index as u16);
        let stream = self.streams.iter().position(|(s, _)| *s == ssrc);
        if stream.is_some_and(|i| !self.streams[i].1.check(u64::from(index))) {
            return Err(SrtpError::Replayed);
        }
        let mut buf = packet.to_vec();
        let plain_len = match &self.cipher {
            Cipher::AesCm { aes, mac } => {
                let mut mac = mac.clone();
                mac.update(&packet[..index_at + SRTCP_INDEX_LEN]);
                mac.verify_truncated_left(&packet[index_at + SRTCP_INDEX_LEN..])
                    .map_err(|_| SrtpError::AuthFailed)?;
                let mut ctr = keystream(aes, cm_iv(&self.salt, ssrc, roc, seq));
                ctr.apply_keystream(&mut buf[RTCP_HEADER_LEN..index_at]);
                index_at
            }
            Cipher::Gcm(gcm) => {
                let aad = srtcp_aad(packet, e_index);
                let tag_at = index_at - GCM_TAG_LEN;
                let tag =
                    Tag::try_from(&packet[tag_at..index_at]).map_err(|_| SrtpError::AuthFailed)?;
                gcm.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(gcm_iv(&self.salt, ssrc, roc, seq)),
                    Aad::from(aad),
                    tag,
                    &mut buf[RTCP_HEADER_LEN..tag_at],
                    0..,
                )
                .map_err(|_| SrtpError::AuthFailed)?;
                tag_at
            }
        };
        // Authenticated: now the packet may move its sender's replay window.
        let at = match stream {
            Some(i) => i,
            None => {
                if self.streams.len() == MAX_RTCP_STREAMS {
                    self.streams.remove(0);
                }
                self.streams.push((ssrc, ReplayWindow::new(self.window)));
                self.streams.len() - 1
            }
        };
        self.streams[at].1.accept(u64::from(index));
        buf.truncate(plain_len);
        Ok(buf.into())
    }
}

/// SRTCP to the peer: the inverse of [`RtcpInbound`], with an SRTCP index per sender SSRC
/// counting from 0. Entries are never evicted: a restarted index would reuse IVs under the
/// same key (fatal for GCM); the SSRCs are ours, a handful per transport.
pub(super) struct RtcpOutbound {
    cipher: Cipher,
    salt: [u8; 14],
    next_index: Vec<(u32, u32)>,
}

impl RtcpOutbound {
    pub(super) fn new(profile: SrtpProfile, master_key: &[u8], master_salt: &[u8]) -> Option<Self> {
        let (cipher, salt) = session_keys(profile, master_key, master_salt, SRTCP_LABELS)?;
        Some(Self {
            cipher,
            salt,
            next_index: Vec::new(),
        })
    }

    /// Encrypts and authenticates a plain (compound) RTCP packet, E flag set.
    pub(super) fn encrypt(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        self.encrypt_into(packet, &mut BytesMut::new())
    }

    /// [`Self::encrypt`] into the arena `out` (which must be empty), split off as with
    /// [`RtpTransform::encrypt_into`]: no allocation while the arena has room.
    pub(super) fn encrypt_into(
        &mut self,
        packet: &[u8],
        out: &mut BytesMut,
    ) -> Result<Bytes, SrtpError> {
        debug_assert!(out.is_empty());
        if packet.len() < RTCP_HEADER_LEN {
            return Err(SrtpError::TooShort {
                len: packet.len(),
                min: RTCP_HEADER_LEN,
            });
        }
        let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let at = match self.next_index.iter().position(|(s, _)| *s == ssrc) {
            Some(i) => i,
            None => {
                self.next_index.push((ssrc, 0));
                self.next_index.len() - 1
            }
        };
        // RFC 3711 §9.2: 2^31 packets under one key, then no more.
        let index = self.next_index[at].1;
        if index > 0x7fff_ffff {
            return Err(SrtpError::IndexOutOfRange);
        }
        self.next_index[at].1 = index + 1;
        let e_index = (0x8000_0000 | index).to_be_bytes();
        let (roc, seq) = (index >> 16, index as u16);
        let tag_len = match self.cipher {
            Cipher::AesCm { .. } => HMAC_TAG_LEN,
            Cipher::Gcm(_) => GCM_TAG_LEN,
        };
        out.reserve(packet.len() + SRTCP_INDEX_LEN + tag_len);
        out.extend_from_slice(packet);
        match &self.cipher {
            Cipher::AesCm { aes, mac } => {
                let mut ctr = keystream(aes, cm_iv(&self.salt, ssrc, roc, seq));
                ctr.apply_keystream(&mut out[RTCP_HEADER_LEN..]);
                out.extend_from_slice(&e_index);
                let mut mac = mac.clone();
                mac.update(out);
                let tag = mac.finalize().into_bytes();
                out.extend_from_slice(&tag[..HMAC_TAG_LEN]);
            }
            Cipher::Gcm(gcm) => {
                let aad = srtcp_aad(packet, e_index);
                let tag = gcm
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(gcm_iv(&self.salt, ssrc, roc, seq)),
                        Aad::from(aad),
                        &mut out[RTCP_HEADER_LEN..],
                    )
                    .map_err(|_| {
                        out.clear();
                        SrtpError::AuthFailed
                    })?;
                out.extend_from_slice(tag.as_ref());
                out.extend_from_slice(&e_index);
            }
        }
        Ok(out.split().freeze())
    }
}

/// RFC 7714 §17: an SRTCP packet's associated data is its first 8 octets (header and sender
/// SSRC) and the E flag with the SRTCP index.
fn srtcp_aad(
    packet: &[u8],
    e_index: [u8; SRTCP_INDEX_LEN],
) -> [u8; RTCP_HEADER_LEN + SRTCP_INDEX_LEN] {
    let mut aad = [0u8; RTCP_HEADER_LEN + SRTCP_INDEX_LEN];
    aad[..RTCP_HEADER_LEN].copy_from_slice(&packet[..RTCP_HEADER_LEN]);
    aad[RTCP_HEADER_LEN..].copy_from_slice(&e_index);
    aad
}

/// AES-CM with an expanded key: a copy of the key schedule, not a new one per packet.
fn keystream(aes: &Aes128, iv: [u8; 16]) -> Aes128Ctr {
    Aes128Ctr::from_core(ctr::CtrCore::inner_iv_init(aes.clone(), &iv.into()))
}

/// RFC 3711 §4.1.1: IV = (salt * 2^16) XOR (SSRC * 2^64) XOR (index * 2^16).
fn cm_iv(salt: &[u8; 14], ssrc: u32, roc: u32, seq: u16) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..14].copy_from_slice(salt);
    for (b, x) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
        *b ^= x;
    }
    for (b, x) in iv[8..12].iter_mut().zip(roc.to_be_bytes()) {
        *b ^= x;
    }
    for (b, x) in iv[12..14].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= x;
    }
    iv
}

/// RFC 7714 §8.1: IV = (00 00 || SSRC || ROC || SEQ) XOR salt.
fn gcm_iv(salt: &[u8; 14], ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..10].copy_from_slice(&roc.to_be_bytes());
    iv[10..12].copy_from_slice(&seq.to_be_bytes());
    for (b, s) in iv.iter_mut().zip(salt) {
        *b ^= s;
    }
    iv
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};
    use webrtc_srtp::context::Context;
    use webrtc_srtp::protection_profile::ProtectionProfile;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3711 Appendix B.3: key derivation test vectors.
    #[test]
    fn key_derivation_matches_rfc3711_b3() {
        let key = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let salt = hex("0EC675AD498AFEEBB6960B3AABE6");
        let mut cipher_key = [0u8; 16];
        derive(&key, &salt, SRTP_LABELS[0], &mut cipher_key);
        assert_eq!(cipher_key.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut cipher_salt = [0u8; 14];
        derive(&key, &salt, SRTP_LABELS[2], &mut cipher_salt);
        assert_eq!(cipher_salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        let mut auth = [0u8; 20];
        derive(&key, &salt, SRTP_LABELS[1], &mut auth);
        assert_eq!(
            auth.to_vec(),
            hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")
        );
    }

    fn webrtc_profile(p: SrtpProfile) -> ProtectionProfile {
        match p {
            SrtpProfile::Aes128CmHmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            SrtpProfile::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
        }
    }

    /// A plain RTP packet with CSRCs and a one-byte-header extension, as forwarded packets have.
    fn rtp_packet(rng: &mut impl Rng, ssrc: u32, seq: u16) -> Vec<u8> {
        let mut p = vec![0x92, 96, 0, 0]; // V=2, X, two CSRCs; PT 96
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&rng.gen::<u32>().to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // two CSRCs
        p.extend_from_slice(&[0xbe, 0xde, 0, 2, 0x22, 1, 2, 3, 0x51, 9, 9, 0]);
        let n = rng.gen_range(0..1200);
        p.extend((0..n).map(|_| rng.gen::<u8>()));
        p
    }

    fn keys(profile: SrtpProfile, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut k = vec![0u8; 16];
        let mut s = vec![0u8; profile.salt_len()];
        rng.fill_bytes(&mut k);
        rng.fill_bytes(&mut s);
        (k, s)
    }

    /// Both directions against webrtc-srtp (an independent implementation that browsers
    /// interoperate with), both profiles, across a sequence-number wrap (ROC 0 -> 1) and with
    /// some reordering: byte-identical output, and each decrypts the other's packets.
    #[test]
    fn interoperates_with_webrtc_srtp_across_rollover() {
        for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
            let (k, s) = keys(profile, 7714);
            let mut ours_out = RtpTransform::new(profile, &k, &s, None).unwrap();
            let mut ours_in = RtpTransform::new(profile, &k, &s, Some(1024)).unwrap();
            let mut theirs_out = Context::new(&k, &s, webrtc_profile(profile), None, None).unwrap();
            let mut theirs_in = Context::new(&k, &s, webrtc_profile(profile), None, None).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(3711);
            let mut seqs: Vec<u16> = (0..600u32).map(|i| (65_300 + i) as u16).collect();
            seqs.swap(100, 103);
            seqs.swap(250, 240); // 65,550 -> 14 after the wrap: sent before 65,540
            for (n, &seq) in seqs.iter().enumerate() {
                for ssrc in [0x1111_1111u32, 0x2222_2222] {
                    let plain = rtp_packet(&mut rng, ssrc, seq);
                    let theirs = theirs_out.encrypt_rtp(&plain).unwrap();
                    let mut buf = plain.clone();
                    buf.resize(plain.len() + ours_out.overhead(), 0);
                    let len = ours_out.encrypt(&mut buf, plain.len()).unwrap();
                    assert_eq!(&buf[..len], &theirs[..], "{profile:?} packet {n}");
                    let back = theirs_in.decrypt_rtp(&buf[..len]).unwrap();
                    assert_eq!(&back[..], &plain[..]);
                    let mut again = theirs.to_vec();
                    let plain_len = ours_in.decrypt(&mut again).unwrap();
                    assert_eq!(&again[..plain_len], &plain[..]);
                }
            }
            assert_eq!(ours_in.streams[0].roc, 1);
        }
    }

    #[test]
    fn replay_window_accepts_new_and_reordered_refuses_seen_and_too_old() {
        let mut w = ReplayWindow::new(100);
        for i in [5u64, 7, 6, 200, 150, 101] {
            assert!(w.check(i), "{i} is new");
            w.accept(i);
        }
        for i in [200u64, 150, 101] {
            assert!(!w.check(i), "{i} was seen");
        }
        assert!(!w.check(100), "100 behind the highest: outside the window");
        assert!(!w.check(7), "far behind");
        assert!(w.check(199) && w.check(102), "inside the window, unseen");
        // A jump past the whole ring forgets everything but the new index.
        w.accept(10_000);
        assert!(!w.check(10_000) && w.check(9_999) && !w.check(200));
        // Bits of indices skipped over are cleared, not left from a lap before.
        let mut w = ReplayWindow::new(64);
        w.accept(0);
        w.accept(64);
        assert!(!w.check(0), "too old");
        w.accept(70);
        assert!(w.check(66) && w.check(69) && !w.check(64));
    }

    #[test]
    fn encrypt_into_an_arena_matches_in_place_encryption() {
        let profile = SrtpProfile::AeadAes128Gcm;
        let (k, s) = keys(profile, 1);
        let mut a = RtpTransform::new(profile, &k, &s, None).unwrap();
        let mut b = RtpTransform::new(profile, &k, &s, None).unwrap();
        let mut arena = BytesMut::with_capacity(4096);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut kept = Vec::new();
        for seq in 0..20u16 {
            let plain = rtp_packet(&mut rng, 5, seq);
            let out = a.encrypt_into(&plain, &mut arena).unwrap();
            let mut buf = plain.clone();
            buf.resize(plain.len() + 16, 0);
            let len = b.encrypt(&mut buf, plain.len()).unwrap();
            assert_eq!(&out[..], &buf[..len]);
            kept.push((out, buf[..len].to_vec()));
        }
        // Earlier packets are not overwritten by later ones sharing the arena.
        for (out, expected) in kept {
            assert_eq!(&out[..], &expected[..]);
        }
    }

    #[test]
    fn hot_lines_name_the_state_the_next_packet_of_a_stream_uses() {
        let within = |(addr, len): (usize, usize), p: usize| addr <= p && p < addr + len;
        for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
            let (k, s) = keys(profile, 3);
            let mut tx = RtpTransform::new(profile, &k, &s, None).unwrap();
            let mut rx = RtpTransform::new(profile, &k, &s, Some(1024)).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let [key, table, entry, word] = rx.hot_lines(77);
            // The key's range is the key: inside the cipher, the whole of it for AES-CM.
            let cipher = std::ptr::from_ref(&rx.cipher) as usize;
            assert!(key.0 >= cipher && key.0 + key.1 <= cipher + size_of::<Cipher>());
            assert!(key.1 >= 176, "at least the AES-128 round keys");
            assert!(within(table, std::ptr::from_ref(&rx.streams) as usize));
            assert_eq!((entry, word), ((0, 0), (0, 0)), "no stream yet");
            for (ssrc, seq) in [(77, 63), (78, 500)] {
                let plain = rtp_packet(&mut rng, ssrc, seq);
                let mut buf = plain.clone();
                buf.resize(plain.len() + tx.overhead(), 0);
                let len = tx.encrypt(&mut buf, plain.len()).unwrap();
                buf.truncate(len);
                rx.decrypt(&mut buf).unwrap();
            }
            for (i, (ssrc, next)) in [(77u32, 64u64), (78, 501)].into_iter().enumerate() {
                let [_, _, entry, word] = rx.hot_lines(ssrc);
                let stream = &rx.streams[i];
                assert_eq!(stream.ssrc, ssrc);
                assert_eq!(
                    entry,
                    (std::ptr::from_ref(stream) as usize, size_of::<Stream>())
                );
                // The word the next index's bit is cleared and set in.
                let r = stream.replay.as_ref().unwrap();
                let bit = std::ptr::from_ref(&r.bits[r.slot(next).0]) as usize;
                assert_eq!(word, (bit, 8));
            }
        }
    }

    #[test]
    fn forged_replayed_and_malformed_packets_are_refused_without_moving_state() {
        for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
            let (k, s) = keys(profile, 9);
            let mut tx = RtpTransform::new(profile, &k, &s, None).unwrap();
            let mut rx = RtpTransform::new(profile, &k, &s, Some(64)).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(4);
            let protect = |tx: &mut RtpTransform, seq: u16, rng: &mut rand::rngs::StdRng| {
                let plain = rtp_packet(rng, 77, seq);
                let mut buf = plain.clone();
                buf.resize(plain.len() + tx.overhead(), 0);
                let len = tx.encrypt(&mut buf, plain.len()).unwrap();
                buf.truncate(len);
                buf
            };
            let first = protect(&mut tx, 1000, &mut rng);
            // A forged packet far ahead (would move the ROC estimate) fails and leaves no state.
            let mut other_tx = RtpTransform::new(profile, &k, &s, None).unwrap();
            let mut forged = protect(&mut other_tx, 40_000, &mut rng);
            let last = forged.len() - 1;
            forged[last] ^= 1;
            assert!(matches!(
                rx.decrypt(&mut forged),
                Err(SrtpError::AuthFailed)
            ));
            assert!(rx.streams.is_empty());
            let mut p = first.clone();
            assert!(rx.decrypt(&mut p).is_ok());
            let mut p = first.clone();
            assert!(matches!(rx.decrypt(&mut p), Err(SrtpError::Replayed)));
            // Older than the window.
            let later = protect(&mut tx, 1200, &mut rng);
            assert!(rx.decrypt(&mut later.clone()).is_ok());
            let old = protect(&mut tx, 1100, &mut rng);
            assert!(matches!(
                rx.decrypt(&mut old.clone()),
                Err(SrtpError::Replayed)
            ));
            // Headers that do not fit, and packets shorter than header + tag.
            assert!(rx.decrypt(&mut [0x80u8; 5]).is_err());
            let mut ext_overrun = first[..16].to_vec();
            ext_overrun[0] |= 0x10;
            assert!(rx.decrypt(&mut ext_overrun).is_err());
            // 32 bytes of header (fixed, two CSRCs, extension) and 3 of payload: no room for a tag.
            assert!(matches!(
                rx.decrypt(&mut first[..35].to_vec()),
                Err(SrtpError::TooShort { .. })
            ));
        }
    }
}
