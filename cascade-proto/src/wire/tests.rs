//! Round trips over many generated values (seeded, so a failure replays), the byte layout of
//! docs/cascade.md pinned by examples, and every refusal the decoder makes.

use super::*;
use crate::ids::{Identity, ParticipantId, Role, TrackSource};
use crate::room::{
    Audience, EdgeId, Intent, ParticipantInfo, PresenceMode, Reply, RequestId, RoomError,
    RoomEvent, RoomEventBody, RoomSettings, RoomSnapshot, TrackInfo,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CASES: usize = 5_000;

fn label(rng: &mut StdRng) -> Label {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
    let len = rng.gen_range(1..=63);
    let mut s: String = (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect();
    s.replace_range(0..1, "a");
    if s.ends_with('-') {
        s.pop();
        s.push('z');
    }
    Label::new(s).expect("generated label is valid")
}

fn name(rng: &mut StdRng) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@";
    let len = rng.gen_range(1..=128);
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

fn room(rng: &mut StdRng) -> RoomId {
    RoomId::new(name(rng)).expect("generated room id is valid")
}

fn flow(rng: &mut StdRng) -> FlowId {
    // Cover every varint length, including the largest value.
    let v = match rng.gen_range(0..4) {
        0 => rng.gen_range(0..64),
        1 => rng.gen_range(64..16_384),
        2 => rng.gen_range(16_384..=FlowId::MAX),
        _ => FlowId::MAX,
    };
    FlowId::new(v).expect("in range")
}

fn layer(rng: &mut StdRng) -> Layer {
    Layer::new(rng.gen_range(0..=crate::link::MAX_LAYER)).expect("in range")
}

fn text(rng: &mut StdRng, max: usize) -> String {
    // Multi-byte characters too: lengths are in bytes.
    let pool = ['a', 'Z', ' ', 'é', '✓', '🙂', '\n', '"'];
    let mut s = String::new();
    while s.len() < max && rng.gen_bool(0.95) {
        let c = pool[rng.gen_range(0..pool.len())];
        if s.len() + c.len_utf8() > max {
            break;
        }
        s.push(c);
    }
    s
}

fn participant(rng: &mut StdRng) -> ParticipantInfo {
    ParticipantInfo {
        id: ParticipantId(rng.gen()),
        identity: Identity::new(name(rng)).unwrap(),
        name: text(rng, 40),
        role: [
            Role::Host,
            Role::CoHost,
            Role::Presenter,
            Role::Attendee,
            Role::Viewer,
        ][rng.gen_range(0..5)],
        edge: EdgeId(rng.gen()),
    }
}

fn source(rng: &mut StdRng) -> TrackSource {
    [
        TrackSource::Microphone,
        TrackSource::Camera,
        TrackSource::Screen,
        TrackSource::ScreenAudio,
    ][rng.gen_range(0..4)]
}

fn track_info(rng: &mut StdRng) -> TrackInfo {
    let source = source(rng);
    TrackInfo {
        id: TrackId(rng.gen()),
        participant: ParticipantId(rng.gen()),
        source,
        kind: source.kind(),
        codec: ["opus", "VP8", "H264"][rng.gen_range(0..3)].into(),
        layers: rng.gen_range(1..=3),
        muted: rng.gen(),
        host_muted: rng.gen(),
    }
}

fn to_origin(rng: &mut StdRng) -> EdgeToOrigin {
    let intent = match rng.gen_range(0..5) {
        0 => Intent::Join {
            identity: Identity::new(name(rng)).unwrap(),
            role: Role::Attendee,
            name: text(rng, 64),
        },
        1 => Intent::Leave {
            participant: ParticipantId(rng.gen()),
        },
        2 => Intent::Publish {
            participant: ParticipantId(rng.gen()),
            source: source(rng),
            codec: "VP8".into(),
            layers: rng.gen(),
        },
        3 => Intent::Unpublish {
            participant: ParticipantId(rng.gen()),
            track: TrackId(rng.gen()),
        },
        _ => Intent::SetMuted {
            participant: ParticipantId(rng.gen()),
            track: TrackId(rng.gen()),
            muted: rng.gen(),
        },
    };
    EdgeToOrigin::Request {
        id: RequestId(rng.gen()),
        room: room(rng),
        intent,
    }
}

fn to_edge(rng: &mut StdRng) -> OriginToEdge {
    if rng.gen() {
        let reply = match rng.gen_range(0..4) {
            0 => {
                let participants: Vec<ParticipantInfo> = (0..rng.gen_range(0..20))
                    .map(|_| participant(rng))
                    .collect();
                Reply::Joined(Box::new(RoomSnapshot {
                    you: participant(rng),
                    participant_count: participants.len() as u32,
                    participants,
                    presence: if rng.gen() {
                        PresenceMode::Interesting
                    } else {
                        PresenceMode::Full
                    },
                    tracks: (0..rng.gen_range(0..5)).map(|_| track_info(rng)).collect(),
                    chat: Vec::new(),
                    hands: (0..rng.gen_range(0..3))
                        .map(|_| ParticipantId(rng.gen()))
                        .collect(),
                    settings: RoomSettings {
                        locked: rng.gen(),
                        lobby: rng.gen(),
                        ..RoomSettings::default()
                    },
                    lobby: Vec::new(),
                    seq: rng.gen(),
                }))
            }
            1 => Reply::Published {
                track: track_info(rng),
            },
            2 => Reply::Done,
            _ => Reply::Refused(RoomError::RoomFull(rng.gen())),
        };
        OriginToEdge::Reply {
            id: RequestId(rng.gen()),
            reply,
        }
    } else {
        let body = match rng.gen_range(0..8) {
            0 => RoomEventBody::ParticipantsJoined(
                (0..rng.gen_range(1..10))
                    .map(|_| participant(rng))
                    .collect(),
            ),
            1 => RoomEventBody::ParticipantsLeft(
                (0..rng.gen_range(1..10))
                    .map(|_| ParticipantId(rng.gen()))
                    .collect(),
            ),
            2 => RoomEventBody::TrackPublished(track_info(rng)),
            3 => RoomEventBody::TrackUnpublished {
                track: TrackId(rng.gen()),
                participant: ParticipantId(rng.gen()),
            },
            4 => RoomEventBody::TrackMuted {
                track: TrackId(rng.gen()),
                muted: rng.gen(),
                host_muted: rng.gen(),
                by: ParticipantId(rng.gen()),
            },
            5 => RoomEventBody::ParticipantCount { count: rng.gen() },
            6 => RoomEventBody::Restored {
                settings: RoomSettings {
                    locked: rng.gen(),
                    spotlight: rng.gen::<bool>().then(|| ParticipantId(rng.gen())),
                    ..RoomSettings::default()
                },
                hands: (0..rng.gen_range(0..4))
                    .map(|_| ParticipantId(rng.gen()))
                    .collect(),
            },
            _ => RoomEventBody::RoomClosed {
                by: rng.gen::<bool>().then(|| ParticipantId(rng.gen())),
            },
        };
        OriginToEdge::Event(RoomEvent {
            room: room(rng),
            seq: rng.gen(),
            audience: if rng.gen() {
                Audience::All
            } else {
                Audience::Participant(ParticipantId(rng.gen()))
            },
            body,
        })
    }
}

pub(super) fn message(rng: &mut StdRng) -> ControlMessage {
    match rng.gen_range(0..12) {
        0 => ControlMessage::Hello(Hello {
            node: label(rng),
            region: label(rng),
            role: if rng.gen() {
                NodeRole::Edge
            } else {
                NodeRole::Origin
            },
            version: rng.gen(),
        }),
        1 => ControlMessage::Drain {
            deadline_ms: rng.gen(),
        },
        2 => ControlMessage::Goodbye {
            code: GoodbyeCode::from_u16(rng.gen_range(0..8)),
            reason: text(rng, MAX_REASON_LEN),
        },
        3 => ControlMessage::ToOrigin(to_origin(rng)),
        4 => ControlMessage::ToEdge(to_edge(rng)),
        5 => ControlMessage::Subscribe {
            flow: flow(rng),
            room: room(rng),
            // Track ids are origin counters; cover the full varint range anyway.
            track: TrackId(rng.gen_range(0..=(1u64 << 62) - 1)),
            layer: layer(rng),
        },
        6 => ControlMessage::Unsubscribe {
            flow: flow(rng),
            layer: layer(rng),
        },
        7 => ControlMessage::KeyframeRequest {
            flow: flow(rng),
            layer: layer(rng),
        },
        8 => ControlMessage::LayerDemand {
            flow: flow(rng),
            layers: LayerSet(rng.gen()),
        },
        9 => ControlMessage::Nack {
            flow: flow(rng),
            layer: layer(rng),
            entries: (0..rng.gen_range(1..=MAX_NACK_ENTRIES))
                .map(|_| NackEntry {
                    pid: rng.gen(),
                    blp: rng.gen(),
                })
                .collect(),
        },
        10 => ControlMessage::SubscribeRefused {
            flow: flow(rng),
            reason: text(rng, MAX_REASON_LEN),
        },
        _ => ControlMessage::Stats(LinkStats {
            rtt_micros: rng.gen(),
            datagrams_sent: rng.gen(),
            datagrams_received: rng.gen(),
            datagrams_dropped: rng.gen(),
            bytes_sent: rng.gen(),
        }),
    }
}

#[test]
fn every_generated_message_round_trips() {
    let mut rng = StdRng::seed_from_u64(0xca5c_ade1);
    let mut kinds = std::collections::BTreeSet::new();
    for _ in 0..CASES {
        let msg = message(&mut rng);
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf).expect("generated messages are encodable");
        assert_eq!(decode_frame(&buf), Ok(msg.clone()), "bytes {buf:02x?}");
        kinds.insert(msg.name());
    }
    assert_eq!(kinds.len(), 12, "the generator covers every message kind");
}

/// A stream of many frames, cut into arbitrary pieces, decodes to the same sequence.
#[test]
fn stream_split_anywhere_decodes_in_order() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let msgs: Vec<ControlMessage> = (0..rng.gen_range(1..40))
            .map(|_| message(&mut rng))
            .collect();
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut stream).unwrap();
        }
        let mut decoder = FrameDecoder::default();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len().min(300));
            decoder.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(m) = decoder.poll_message().expect("valid stream") {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(decoder.buffered(), 0);
    }
}

#[test]
fn every_generated_datagram_round_trips() {
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..CASES {
        let mut rtp = vec![0u8; rng.gen_range(MIN_RTP_LEN..1200)];
        rng.fill(&mut rtp[..]);
        rtp[0] = 0x80 | (rtp[0] & 0x3f);
        let d = MediaDatagram {
            flow: flow(&mut rng),
            layer: layer(&mut rng),
            flags: MediaFlags {
                keyframe: rng.gen(),
                end_of_frame: rng.gen(),
                retransmission: rng.gen(),
            },
            rtp: &rtp,
        };
        let mut buf = Vec::new();
        encode_datagram(&d, &mut buf);
        assert_eq!(buf.len(), datagram_header_len(d.flow) + rtp.len());
        assert_eq!(decode_datagram(&buf), Ok(d));
    }
}

/// The examples of docs/cascade.md, byte for byte.
#[test]
fn byte_layout_matches_the_documentation() {
    let mut buf = Vec::new();
    encode_frame(
        &ControlMessage::Hello(Hello {
            node: Label::new("edge-a").unwrap(),
            region: Label::new("eu").unwrap(),
            role: NodeRole::Edge,
            version: 3,
        }),
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        buf,
        [
            0x01, 0x01, 0x00, 0x00, 0x0d, // version, type hello, length 13
            0x00, 0x03, 0x01, // protocol version 3, role edge
            0x06, b'e', b'd', b'g', b'e', b'-', b'a', 0x02, b'e', b'u',
        ]
    );

    buf.clear();
    encode_frame(
        &ControlMessage::Subscribe {
            flow: FlowId::new(300).unwrap(),
            room: RoomId::new("r1").unwrap(),
            track: TrackId(5),
            layer: Layer::new(2).unwrap(),
        },
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        buf,
        [0x01, 0x20, 0x00, 0x00, 0x07, 0x41, 0x2c, 0x02, 0x05, 0x02, b'r', b'1']
    );

    buf.clear();
    let rtp = [0x80u8, 0x60, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
    encode_datagram(
        &MediaDatagram {
            flow: FlowId::new(5).unwrap(),
            layer: Layer::new(1).unwrap(),
            flags: MediaFlags {
                keyframe: true,
                end_of_frame: true,
                retransmission: false,
            },
            rtp: &rtp,
        },
        &mut buf,
    );
    assert_eq!(&buf[..3], [0x41, 0x03, 0x05]);
    assert_eq!(&buf[3..], rtp);
}

fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let len = (body.len() as u32).to_be_bytes();
    let mut v = vec![WIRE_VERSION, ty, len[1], len[2], len[3]];
    v.extend_from_slice(body);
    v
}

#[test]
fn refusals_name_their_reason() {
    use frame_type::*;
    let cases: Vec<(Vec<u8>, WireError)> = vec![
        (vec![2, HELLO, 0, 0, 0], WireError::UnsupportedVersion(2)),
        (frame(0x7f, &[]), WireError::UnknownType(0x7f)),
        (
            frame(HELLO, &[0, 1, 9, 1, b'a', 1, b'b']),
            WireError::BadValue {
                frame: "hello",
                field: "role",
            },
        ),
        (
            frame(HELLO, &[0, 1, 1, 1, b'A', 1, b'b']),
            WireError::BadValue {
                frame: "hello",
                field: "node",
            },
        ),
        (
            frame(HELLO, &[0, 1, 1, 5, b'a']),
            WireError::Truncated { frame: "hello" },
        ),
        (
            frame(DRAIN, &[0, 0, 0, 1, 9]),
            WireError::TrailingBytes {
                frame: "drain",
                extra: 1,
            },
        ),
        (
            frame(GOODBYE, &[0, 0, 0, 2, 0xff, 0xfe]),
            WireError::BadUtf8 {
                frame: "goodbye",
                field: "reason",
            },
        ),
        (
            frame(UNSUBSCRIBE, &[1, 8]),
            WireError::BadValue {
                frame: "unsubscribe",
                field: "layer",
            },
        ),
        (
            // A flow id over 2^30 - 1 in an 8-byte varint.
            frame(KEYFRAME_REQUEST, &[0xc0, 0, 0, 0, 0x40, 0, 0, 0, 0]),
            WireError::BadValue {
                frame: "keyframe_request",
                field: "flow",
            },
        ),
        (
            frame(NACK, &[1, 0, 0]),
            WireError::BadValue {
                frame: "nack",
                field: "entry count",
            },
        ),
        (
            frame(SUBSCRIBE, &[1, 0, 1, 3, b'a', b'/', b'b']),
            WireError::BadValue {
                frame: "subscribe",
                field: "room",
            },
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(decode_frame(&bytes), Err(want.clone()), "{bytes:02x?}");
        assert!(want.code() > 0x100);
    }
    let bad_json = decode_frame(&frame(TO_ORIGIN, b"{\"Request\":1}"));
    assert!(
        matches!(bad_json, Err(WireError::BadRoomMessage(_))),
        "{bad_json:?}"
    );
}

#[test]
fn a_long_body_is_refused_from_its_header_alone() {
    let mut d = FrameDecoder::new(1024);
    d.push(&[WIRE_VERSION, frame_type::TO_EDGE, 0x00, 0x04, 0x01]);
    assert_eq!(
        d.poll_message(),
        Err(WireError::TooLong {
            len: 1025,
            max: 1024
        })
    );
    // Failed for good: later bytes are not interpreted.
    d.push(&frame(frame_type::DRAIN, &[0, 0, 0, 1]));
    assert!(d.poll_message().is_err());
}

#[test]
fn a_wrong_version_is_refused_from_its_first_byte() {
    let mut d = FrameDecoder::default();
    d.push(b"G");
    assert_eq!(d.poll_message(), Err(WireError::UnsupportedVersion(b'G')));
}

#[test]
fn datagram_refusals() {
    assert_eq!(decode_datagram(&[]), Err(WireError::ShortDatagram));
    assert_eq!(decode_datagram(&[0x40, 0]), Err(WireError::ShortDatagram));
    assert_eq!(
        decode_datagram(&[0x80, 0, 1]),
        Err(WireError::UnsupportedVersion(2))
    );
    assert!(matches!(
        decode_datagram(&[0x48, 0, 1]),
        Err(WireError::BadValue { .. })
    ));
    assert!(matches!(
        decode_datagram(&[0x40, 0x80, 1]),
        Err(WireError::BadValue { .. })
    ));
    assert_eq!(decode_datagram(&[0x40, 0, 1, 0x80]), Err(WireError::NotRtp));
    let mut not_v2 = vec![0x40, 0, 1];
    not_v2.extend_from_slice(&[0x40; 12]);
    assert_eq!(decode_datagram(&not_v2), Err(WireError::NotRtp));
}

#[test]
fn unencodable_values_leave_the_buffer_alone() {
    let mut buf = vec![9, 9];
    let too_many = ControlMessage::Nack {
        flow: FlowId::new(1).unwrap(),
        layer: Layer::LOWEST,
        entries: vec![NackEntry { pid: 0, blp: 0 }; MAX_NACK_ENTRIES + 1],
    };
    assert!(encode_frame(&too_many, &mut buf).is_err());
    let long_reason = ControlMessage::Goodbye {
        code: GoodbyeCode::Normal,
        reason: "x".repeat(MAX_REASON_LEN + 1),
    };
    assert!(encode_frame(&long_reason, &mut buf).is_err());
    assert_eq!(buf, [9, 9]);
}

/// Random bytes and mutated valid frames never panic the decoder (the fuzz target does this
/// at scale; this keeps a cheap version in every test run).
#[test]
fn garbage_and_mutations_never_panic() {
    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..CASES {
        let mut buf = Vec::new();
        encode_frame(&message(&mut rng), &mut buf).unwrap();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..buf.len());
            buf[i] = rng.gen();
        }
        buf.truncate(rng.gen_range(0..=buf.len()));
        let _ = decode_frame(&buf);
        let _ = decode_datagram(&buf);
        let mut d = FrameDecoder::new(4096);
        d.push(&buf);
        while let Ok(Some(_)) = d.poll_message() {}
    }
}

/// The fuzz corpus seeds (fuzz/corpus/cascade_wire) are valid inputs, so fuzzing starts from
/// every message kind and not from noise.
#[test]
fn fuzz_corpus_seeds_decode() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/cascade_wire");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("corpus directory") {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "datagram" {
            decode_datagram(&bytes).expect("datagram seed");
        } else {
            let mut d = FrameDecoder::default();
            d.push(&bytes);
            let mut n = 0;
            while d
                .poll_message()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .is_some()
            {
                n += 1;
            }
            assert!(n >= 1 && d.buffered() == 0, "{name}");
        }
        seen += 1;
    }
    assert!(seen >= 12);
}
