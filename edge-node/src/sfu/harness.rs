//! A [`ShardCore`] with one publisher and N subscribers already connected (ICE nominated through
//! real Binding requests, SRTP keys installed), plus the client-side SRTP sessions, so tests and
//! the forward-path benchmark drive the core exactly as the UDP shell does, without sockets.

use super::*;
use crate::transport::dtls::{SrtpKeys, SrtpProfile};
use crate::transport::ice::{binding_request, IceCredentials};
use crate::transport::srtp::SrtpSession;
use std::net::{IpAddr, Ipv4Addr};

/// The publication every harness has: VP8, payload type 96, one layer with this SSRC.
pub const PUBLISHER_SSRC: u32 = 0x1111_1111;
pub const VIDEO_PT: u8 = 96;

/// One simulated client: its address and its side of the SRTP session.
pub struct Client {
    pub addr: SocketAddr,
    pub transport: TransportId,
    pub srtp: SrtpSession,
    /// The subscription (for subscribers).
    pub subscription: Option<SubscriptionId>,
    pub out_ssrc: u32,
}

/// A connected core.
pub struct Harness {
    pub core: ShardCore,
    pub publisher: Client,
    pub subscribers: Vec<Client>,
    pub publication: PublicationId,
    pub now: Instant,
}

/// Deterministic (server, client) SRTP keys for the harness's transport number `seed`.
pub fn test_keys(profile: SrtpProfile, seed: u8) -> (SrtpKeys, SrtpKeys) {
    let (klen, slen) = (profile.key_len(), profile.salt_len());
    let a: Vec<u8> = (0..klen as u8).map(|i| i ^ seed).collect();
    let b: Vec<u8> = (0..klen as u8)
        .map(|i| i.wrapping_add(seed).wrapping_mul(3))
        .collect();
    let sa: Vec<u8> = (0..slen as u8).map(|i| i ^ seed.wrapping_add(7)).collect();
    let sb: Vec<u8> = (0..slen as u8).map(|i| i.wrapping_mul(5) ^ seed).collect();
    let server = SrtpKeys {
        profile,
        local_key: a.clone(),
        local_salt: sa.clone(),
        remote_key: b.clone(),
        remote_salt: sb.clone(),
    };
    let client = SrtpKeys {
        profile,
        local_key: b,
        local_salt: sb,
        remote_key: a,
        remote_salt: sa,
    };
    (server, client)
}

impl Harness {
    /// A core with a VP8 publisher (one layer) and `subscribers` subscribers at `max_layer` 0.
    pub fn new(subscribers: usize, profile: SrtpProfile) -> Self {
        let now = Instant::now();
        let mut core = ShardCore::new((now, SystemTime::now()));
        let mut next = 1u64;
        let mut connect = |core: &mut ShardCore, i: u16, ext_out: ExtIds| -> Client {
            let id = TransportId(next);
            next += 1;
            let local = IceCredentials {
                ufrag: format!("srv{i:05}"),
                pwd: format!("serverpassword{i:010}"),
            };
            let remote = IceCredentials {
                ufrag: format!("cli{i:05}"),
                pwd: format!("clientpassword{i:010}"),
            };
            let username = format!("{}:{}", local.ufrag, remote.ufrag);
            let pwd = local.pwd.clone();
            core.handle_command(
                Command::AddTransport {
                    id,
                    owner: SessionId(id.0),
                    local,
                    remote: Some(remote),
                    ext_in: ExtIds::default(),
                    ext_out,
                },
                now,
            );
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 10_000 + i);
            core.handle_stun(addr, &binding_request(&username, &pwd, true), now);
            let (server, client) = test_keys(profile, i as u8);
            core.handle_command(Command::SetKeys { id, keys: server }, now);
            Client {
                addr,
                transport: id,
                // Fixed test keys of the right lengths always build a session.
                srtp: SrtpSession::new(&client).expect("srtp session"),
                subscription: None,
                out_ssrc: 0,
            }
        };
        let publisher = connect(&mut core, 0, ExtIds::default());
        let mut subs = Vec::with_capacity(subscribers);
        for i in 0..subscribers {
            subs.push(connect(
                &mut core,
                1 + i as u16,
                ExtIds {
                    transport_cc: Some(3),
                    abs_send_time: Some(2),
                    ..Default::default()
                },
            ));
        }
        let publication = PublicationId(1000);
        core.handle_command(
            Command::AddPublication {
                id: publication,
                spec: PublicationSpec {
                    room: "bench".into(),
                    transport: publisher.transport,
                    mid: "0".into(),
                    codec: MediaCodec::Video(VideoCodec::Vp8),
                    clock_rate: 90_000,
                    payload_type: VIDEO_PT,
                    rtx_payload_type: None,
                    layers: vec![LayerSpec {
                        rid: None,
                        ssrc: Some(PUBLISHER_SSRC),
                        rtx_ssrc: None,
                    }],
                    prefers_fir: false,
                },
            },
            now,
        );
        for (i, s) in subs.iter_mut().enumerate() {
            let id = SubscriptionId(2000 + i as u64);
            s.subscription = Some(id);
            s.out_ssrc = 0x2000_0000 + i as u32;
            core.handle_command(
                Command::AddSubscription {
                    id,
                    spec: SubscriptionSpec {
                        transport: s.transport,
                        publication,
                        mid: "0".into(),
                        ssrc: s.out_ssrc,
                        rtx_ssrc: None,
                        payload_type: VIDEO_PT,
                        rtx_payload_type: None,
                        max_layer: Some(SpatialLayer(0)),
                        paused: false,
                    },
                },
                now,
            );
        }
        let mut h = Self {
            core,
            publisher,
            subscribers: subs,
            publication,
            now,
        };
        h.drain();
        h
    }

    /// An SRTP packet from the publisher: VP8 (no picture id), keyframe or delta, `size` bytes
    /// of payload.
    pub fn publisher_packet(
        &mut self,
        seq: u16,
        timestamp: u32,
        keyframe: bool,
        size: usize,
    ) -> Bytes {
        let mut payload = vec![0u8; size.max(4)];
        payload[0] = 0x10; // S=1, PID=0, no extensions
        payload[1] = if keyframe { 0x00 } else { 0x01 }; // P bit: 0 = keyframe
        for (i, b) in payload.iter_mut().enumerate().skip(2) {
            *b = i as u8;
        }
        let mut buf = vec![0u8; MAX_OUT_HEADER + payload.len()];
        let n = rtp::write_header(
            &mut buf,
            true,
            VIDEO_PT,
            seq,
            timestamp,
            PUBLISHER_SSRC,
            &rtp::OutExtensions::default(),
        );
        buf.truncate(n);
        buf.extend_from_slice(&payload);
        // The test keys always encrypt.
        self.publisher.srtp.encrypt_rtp(&buf).expect("encrypt")
    }

    /// A second publication of the publisher's, at mid "1": one layer per SSRC in `ssrcs`, no
    /// RTX.
    pub fn publish(
        &mut self,
        id: PublicationId,
        codec: MediaCodec,
        payload_type: u8,
        ssrcs: &[u32],
    ) {
        let clock_rate = if codec == MediaCodec::Audio {
            48_000
        } else {
            90_000
        };
        let layers = ssrcs
            .iter()
            .map(|&ssrc| LayerSpec {
                rid: None,
                ssrc: Some(ssrc),
                rtx_ssrc: None,
            })
            .collect();
        self.core.handle_command(
            Command::AddPublication {
                id,
                spec: PublicationSpec {
                    room: "bench".into(),
                    transport: self.publisher.transport,
                    mid: "1".into(),
                    codec,
                    clock_rate,
                    payload_type,
                    rtx_payload_type: None,
                    layers,
                    prefers_fir: false,
                },
            },
            self.now,
        );
    }

    /// Feeds a datagram from the publisher.
    pub fn from_publisher(&mut self, data: &[u8]) {
        let addr = self.publisher.addr;
        self.core.handle_srtp(addr, data, false, self.now);
    }

    /// Takes everything the core queued.
    pub fn drain(&mut self) -> Vec<Transmit> {
        let mut out = Vec::new();
        self.core.poll_transmits(&mut out);
        while self.core.poll_event().is_some() {}
        out
    }
}
