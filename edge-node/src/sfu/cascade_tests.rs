//! Two shard cores joined by a simulated cascade link: edge A's publisher leaves A as link
//! datagrams (a link sink), enters edge B as a relayed publication, and B's subscriber decrypts
//! it with real SRTP. Keyframe requests and NACKs travel back up; a simulcast layer switch works
//! on the relayed side.

use super::harness::{Harness, VIDEO_PT};
use super::*;
use crate::transport::dtls::SrtpProfile;
use cascade_proto::wire::decode_datagram;

const LINK: LinkId = LinkId(7);
const RELAYED_PUB: PublicationId = PublicationId(5000);
const RELAYED_SUB: SubscriptionId = SubscriptionId(6000);

fn flow(n: u32) -> FlowId {
    FlowId::new(n).unwrap()
}

/// Edge B: a harness whose own publication is unused; its subscriber is moved onto a relayed
/// publication with `layers` layers, at `max_layer`.
fn edge_b(layers: u8, max_layer: u8) -> Harness {
    relayed_edge(layers, &[max_layer])
}

/// The subscription id of edge B's subscriber `i` on the relayed publication.
fn relayed_sub(i: usize) -> SubscriptionId {
    SubscriptionId(RELAYED_SUB.0 + i as u64)
}

/// Edge B with one subscriber per entry of `max_layers`, each moved onto a relayed publication
/// with `layers` layers at that max layer (subscriber `i` is [`relayed_sub`]`(i)`). What the
/// set-up emitted is drained.
fn relayed_edge(layers: u8, max_layers: &[u8]) -> Harness {
    let mut b = Harness::new(max_layers.len(), SrtpProfile::AeadAes128Gcm);
    let now = b.now;
    b.core.handle_command(
        Command::AddRelayedPublication {
            id: RELAYED_PUB,
            spec: RelayedPublicationSpec {
                room: "bench".into(),
                codec: MediaCodec::Video(VideoCodec::Vp8),
                clock_rate: 90_000,
                layers,
            },
        },
        now,
    );
    for (i, &max_layer) in max_layers.iter().enumerate() {
        let old = b.subscribers[i].subscription.take().unwrap();
        b.core
            .handle_command(Command::RemoveSubscription { id: old }, now);
        let transport = b.subscribers[i].transport;
        let ssrc = 0x3000_0000 + i as u32;
        b.subscribers[i].out_ssrc = ssrc;
        b.subscribers[i].subscription = Some(relayed_sub(i));
        b.core.handle_command(
            Command::AddSubscription {
                id: relayed_sub(i),
                spec: SubscriptionSpec {
                    transport,
                    publication: RELAYED_PUB,
                    mid: "0".into(),
                    ssrc,
                    rtx_ssrc: None,
                    payload_type: VIDEO_PT,
                    rtx_payload_type: None,
                    max_layer: Some(SpatialLayer(max_layer)),
                    paused: false,
                },
            },
            now,
        );
    }
    b.drain();
    b
}

/// The link datagrams A queued, decoded.
fn link_datagrams(core: &mut ShardCore) -> Vec<(LinkId, FlowId, u8, MediaFlags, Vec<u8>)> {
    let mut out = Vec::new();
    core.drain_link_datagrams(|link, bytes| {
        let d = decode_datagram(bytes).expect("shards encode valid datagrams");
        out.push((link, d.flow, d.layer.index(), d.flags, d.rtp.to_vec()));
    });
    out
}

/// What B's subscriber decrypts from B's transmits: (seq, payload).
fn received(b: &mut Harness, out: &[Transmit]) -> Vec<(u16, Vec<u8>)> {
    let sub = &mut b.subscribers[0];
    out.iter()
        .filter(|t| t.to == sub.addr)
        .filter_map(|t| sub.srtp.decrypt_rtp(&t.data).ok())
        .filter_map(|plain| {
            let v = RtpView::parse(&plain).ok()?;
            (v.ssrc == sub.out_ssrc).then(|| (v.seq, v.payload().to_vec()))
        })
        .collect()
}

fn requests(core: &mut ShardCore) -> Vec<CascadeRequest> {
    std::iter::from_fn(|| core.poll_cascade_request()).collect()
}

fn plis_at_publisher(a: &mut Harness, out: &[Transmit]) -> usize {
    out.iter()
        .filter(|t| t.to == a.publisher.addr)
        .filter_map(|t| a.publisher.srtp.decrypt_rtcp(&t.data).ok())
        .filter_map(|plain| crate::transport::parse::parse_rtcp(&plain).ok())
        .flatten()
        .filter(|p| {
            p.as_any()
                .downcast_ref::<rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication>()
                .is_some()
        })
        .count()
}

#[test]
fn a_publication_crosses_the_link_and_decrypts_at_the_far_subscriber() {
    let mut a = Harness::new(0, SrtpProfile::Aes128CmHmacSha1_80);
    let mut b = edge_b(1, 0);
    let now = a.now;
    let pid = a.publication;
    a.core.handle_command(
        Command::AddLinkSink {
            publication: pid,
            layer: 0,
            link: LINK,
            flow: flow(42),
        },
        now,
    );
    let mut sent_payloads = Vec::new();
    let mut got = Vec::new();
    let mut lost_seq = None;
    // Across the 16-bit wrap, one datagram lost on the link.
    for k in 0..30u16 {
        let seq = 65520u16.wrapping_add(k);
        let pkt = a.publisher_packet(seq, 3000 * u32::from(k), k == 0, 120 + usize::from(k));
        a.from_publisher(&pkt);
        a.drain();
        let datagrams = link_datagrams(&mut a.core);
        assert_eq!(datagrams.len(), 1, "one copy per packet for the one sink");
        let (link, f, layer, flags, rtp) = datagrams.into_iter().next().unwrap();
        assert_eq!((link, f, layer), (LINK, flow(42), 0));
        assert_eq!(
            flags.keyframe,
            k == 0,
            "keyframe flag set by the publisher's edge"
        );
        assert!(flags.end_of_frame, "marker copied");
        let view = RtpView::parse(&rtp).unwrap();
        assert_eq!(
            view.seq, seq,
            "the link carries the publisher's sequence numbers"
        );
        sent_payloads.push(view.payload().to_vec());
        if k == 12 {
            lost_seq = Some(seq);
            continue;
        }
        b.core.handle_relayed(RELAYED_PUB, 0, flags, &rtp, b.now);
        let out = b.drain();
        got.extend(received(&mut b, &out));
    }
    assert_eq!(got.len(), 29);
    // Rewritten sequence numbers follow the publisher's one for one: contiguous, with a gap
    // exactly where the link lost a datagram (so the subscriber can NACK it).
    let first = got[0].0;
    let expected: Vec<u16> = (0..30u16)
        .filter(|k| *k != 12)
        .map(|k| first.wrapping_add(k))
        .collect();
    assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), expected);
    // The gap is B's to fill: its NACK goes up as a cascade request...
    let mut nacked = Vec::new();
    for step in 1..=10u64 {
        b.core
            .handle_timeout(b.now + Duration::from_millis(10 * step));
        b.drain();
        for r in requests(&mut b.core) {
            if let CascadeRequest::Nack {
                publication,
                layer,
                seqs,
            } = r
            {
                assert_eq!((publication, layer), (RELAYED_PUB, 0));
                nacked.extend(seqs);
            }
        }
    }
    nacked.dedup();
    assert_eq!(nacked, vec![lost_seq.unwrap()]);
    // ...A answers it from its cache as a retransmission on the link...
    a.core.handle_command(
        Command::LinkNack {
            publication: pid,
            layer: 0,
            link: LINK,
            flow: flow(42),
            seqs: nacked.clone(),
        },
        now,
    );
    let resent = link_datagrams(&mut a.core);
    assert_eq!(resent.len(), 1);
    let (_, _, _, flags, rtp) = resent.into_iter().next().unwrap();
    assert!(flags.retransmission);
    // ...and B forwards it to its subscriber, in the slot the gap left.
    b.core.handle_relayed(RELAYED_PUB, 0, flags, &rtp, b.now);
    let out = b.drain();
    let late = received(&mut b, &out);
    assert_eq!(late.len(), 1);
    assert_eq!(
        late[0].0,
        first.wrapping_add(12),
        "the retransmission fills the gap"
    );
    assert_eq!(late[0].1, sent_payloads[12], "the lost payload arrives");
    let mut all = got.clone();
    all.extend(late);
    let mut payloads: Vec<Vec<u8>> = {
        all.sort_by_key(|(s, _)| s.wrapping_sub(got[0].0));
        all.into_iter().map(|(_, p)| p).collect()
    };
    assert_eq!(payloads.len(), 30);
    assert_eq!(
        std::mem::take(&mut payloads),
        sent_payloads,
        "B's subscriber decrypts exactly what A's publisher sent, in order"
    );
    assert_eq!(a.core.counters.link_packets_out, 30);
    assert_eq!(a.core.counters.link_retransmits_out, 1);
    assert_eq!(b.core.counters.relayed_in, 30);
}

#[test]
fn a_far_subscribers_pli_becomes_a_keyframe_request_and_a_pli_at_the_publisher() {
    let mut a = Harness::new(0, SrtpProfile::AeadAes128Gcm);
    let mut b = edge_b(1, 0);
    let pid = a.publication;
    let now = a.now;
    a.core.handle_command(
        Command::AddLinkSink {
            publication: pid,
            layer: 0,
            link: LINK,
            flow: flow(1),
        },
        now,
    );
    // Media flows (its keyframe satisfies the subscribe-time requests on both sides).
    let pkt = a.publisher_packet(1, 0, true, 100);
    a.from_publisher(&pkt);
    a.drain();
    for (_, _, layer, flags, rtp) in link_datagrams(&mut a.core) {
        b.core
            .handle_relayed(RELAYED_PUB, layer, flags, &rtp, b.now);
    }
    b.drain();
    b.core.handle_timeout(b.now);
    requests(&mut b.core);
    // B's subscriber loses the picture.
    let later = b.now + Duration::from_secs(2);
    let pli = rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
        sender_ssrc: 1,
        media_ssrc: b.subscribers[0].out_ssrc,
    };
    let plain =
        rtcp::packet::marshal(&[Box::new(pli) as Box<dyn rtcp::packet::Packet + Send + Sync>])
            .unwrap();
    let enc = b.subscribers[0].srtp.encrypt_rtcp(&plain).unwrap();
    let addr = b.subscribers[0].addr;
    b.core.handle_srtp(addr, &enc, true, later);
    b.core.handle_timeout(later);
    b.drain();
    let reqs = requests(&mut b.core);
    assert_eq!(
        reqs,
        vec![CascadeRequest::Keyframe {
            publication: RELAYED_PUB,
            layer: 0
        }],
        "one keyframe request up the link"
    );
    assert_eq!(b.core.counters.link_keyframe_requests_out, 1);
    // The cascade turns it into RequestKeyframe at A: a PLI reaches A's publisher.
    let later_a = now + Duration::from_secs(2);
    a.core.handle_command(
        Command::RequestKeyframe {
            publication: pid,
            layer: 0,
        },
        later_a,
    );
    a.core.handle_timeout(later_a);
    let out = a.drain();
    assert_eq!(plis_at_publisher(&mut a, &out), 1);
}

/// A VP8 packet of a relayed layer: payload byte 2 names the layer, so the receiver can tell.
fn relayed_vp8(layer: u8, seq: u16, ts: u32, keyframe: bool) -> Vec<u8> {
    let mut payload = vec![0u8; 60];
    payload[0] = 0x10;
    payload[1] = if keyframe { 0x00 } else { 0x01 };
    payload[2] = 0xa0 + layer;
    let mut buf = vec![0u8; MAX_OUT_HEADER + payload.len()];
    let n = rtp::write_header(
        &mut buf,
        true,
        VIDEO_PT,
        seq,
        ts,
        0x5000 + u32::from(layer),
        &rtp::OutExtensions::default(),
    );
    buf.truncate(n);
    buf.extend_from_slice(&payload);
    buf
}

#[test]
fn a_layer_switch_works_on_a_relayed_publication() {
    let mut b = edge_b(2, 1);
    let start = b.now;
    let mut seqs: [u16; 2] = [100, 9000];
    let mut layers_seen = Vec::new();
    let mut out_seqs = Vec::new();
    let mut switched_down_at = None;
    // 6 s at 30 frames/s, one packet per frame per layer, keyframes every second on each layer.
    for frame in 0..180u32 {
        let now = start + Duration::from_millis(u64::from(frame) * 33);
        if frame == 120 {
            b.core.handle_command(
                Command::SetMaxLayer {
                    id: RELAYED_SUB,
                    max: Some(SpatialLayer(0)),
                },
                now,
            );
            switched_down_at = Some(layers_seen.len());
        }
        for layer in 0..2u8 {
            let keyframe = frame % 30 == 0;
            let pkt = relayed_vp8(layer, seqs[usize::from(layer)], frame * 3000, keyframe);
            seqs[usize::from(layer)] = seqs[usize::from(layer)].wrapping_add(1);
            let flags = MediaFlags {
                keyframe,
                end_of_frame: true,
                retransmission: false,
            };
            b.core.handle_relayed(RELAYED_PUB, layer, flags, &pkt, now);
        }
        b.core.handle_timeout(now);
        let out = b.drain();
        for (seq, payload) in received(&mut b, &out) {
            layers_seen.push(payload[2] - 0xa0);
            out_seqs.push(seq);
        }
    }
    for w in out_seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0].wrapping_add(1),
            "contiguous across layer switches"
        );
    }
    let first_high = layers_seen.iter().position(|l| *l == 1);
    assert!(
        first_high.is_some(),
        "the subscriber is upgraded to layer 1: {layers_seen:?}"
    );
    let down = switched_down_at.unwrap();
    assert!(
        first_high.unwrap() < down,
        "upgraded before the cap is lowered"
    );
    assert_eq!(
        layers_seen.last(),
        Some(&0),
        "back on layer 0 after the cap"
    );
    assert!(b.core.subscription_layers(RELAYED_SUB).is_some());
}

#[test]
fn relayed_packets_for_unknown_publications_are_counted_not_forwarded() {
    let mut b = edge_b(1, 0);
    let pkt = relayed_vp8(0, 1, 0, true);
    let now = b.now;
    b.core
        .handle_relayed(PublicationId(999), 0, MediaFlags::default(), &pkt, now);
    // A layer the publication does not have.
    b.core
        .handle_relayed(RELAYED_PUB, 3, MediaFlags::default(), &pkt, now);
    // Not RTP.
    b.core
        .handle_relayed(RELAYED_PUB, 0, MediaFlags::default(), &[1, 2, 3], now);
    // A local publication is not fed from links.
    let local = b.publication;
    b.core
        .handle_relayed(local, 0, MediaFlags::default(), &pkt, now);
    assert!(b.drain().is_empty());
    assert_eq!(b.core.counters.relayed_rejected, 4);
    assert_eq!(b.core.counters.relayed_in, 0);
}

/// The shard shell's bookkeeping for `kcs_cascade_residence_seconds` (`crate::udp`), driven
/// through a real core: a relayed packet is timed in a series only if it made copies of that
/// kind (SRTP for a local subscriber, a datagram for a child edge).
#[test]
fn a_relayed_packet_is_timed_only_where_it_made_copies() {
    use crate::udp::{CascadeStays, RelayedPacket};
    let mut b = edge_b(1, 0);
    let now = b.now;
    let packet = |publication, seq: u16, keyframe| RelayedPacket {
        publication,
        layer: 0,
        flags: MediaFlags {
            keyframe,
            end_of_frame: true,
            retransmission: false,
        },
        rtp: bytes::Bytes::from(relayed_vp8(0, seq, u32::from(seq) * 3000, keyframe)),
        received: now,
    };
    let mut stays = CascadeStays::default();
    let counts = |s: &CascadeStays| (s.to_links.len(), s.to_subscribers.len());
    // A local subscriber, no child edge: to subscribers only.
    stays.relay(&mut b.core, packet(RELAYED_PUB, 1, true), now);
    assert_eq!(counts(&stays), (0, 1));
    // A child edge's sink too: both.
    b.core.handle_command(
        Command::AddLinkSink {
            publication: RELAYED_PUB,
            layer: 0,
            link: LINK,
            flow: flow(9),
        },
        now,
    );
    stays.relay(&mut b.core, packet(RELAYED_PUB, 2, false), now);
    assert_eq!(counts(&stays), (1, 2));
    // Nobody's publication: neither.
    stays.relay(&mut b.core, packet(PublicationId(999), 3, false), now);
    assert_eq!(counts(&stays), (1, 2));
    // The subscriber leaves: to the child only.
    b.core
        .handle_command(Command::RemoveSubscription { id: relayed_sub(0) }, now);
    stays.relay(&mut b.core, packet(RELAYED_PUB, 4, false), now);
    assert_eq!(counts(&stays), (2, 2));
    // The flush: each series records its own and is emptied.
    stays
        .links
        .observe_handed_on(&mut stays.to_links, Instant::now);
    stays
        .subscribers
        .observe_handed_on(&mut stays.to_subscribers, Instant::now);
    assert_eq!(counts(&stays), (0, 0));
    assert_eq!((stays.links.count(), stays.subscribers.count()), (2, 2));
    // Every packet taken from the inbox is timed in the shard wait, copies or not.
    assert_eq!(stays.shard_wait.count(), 4);
    // What the core queued is what was counted.
    assert_eq!(link_datagrams(&mut b.core).len(), 2);
    let out = b.drain();
    assert_eq!(received(&mut b, &out).len(), 2);
}

// ---- layer demand ---------------------------------------------------------------------------

/// The layer demands B emitted since the last call, as bit sets.
fn demands(core: &mut ShardCore) -> Vec<u8> {
    requests(core)
        .into_iter()
        .filter_map(|r| match r {
            CascadeRequest::LayerDemand {
                publication,
                layers,
            } => {
                assert_eq!(publication, RELAYED_PUB);
                Some(layers.0)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn layer_demand_follows_the_highest_max_layer_and_is_emitted_only_on_change() {
    let mut b = relayed_edge(3, &[0]);
    let now = b.now;
    assert_eq!(
        demands(&mut b.core),
        vec![0b001],
        "the first subscriber wants layer 0"
    );
    let set_max = |b: &mut Harness, sub: usize, max: u8| {
        b.core.handle_command(
            Command::SetMaxLayer {
                id: relayed_sub(sub),
                max: Some(SpatialLayer(max)),
            },
            now,
        );
        demands(&mut b.core)
    };
    assert_eq!(
        set_max(&mut b, 0, 2),
        vec![0b111],
        "a bigger tile wants 0..=2"
    );
    assert_eq!(
        set_max(&mut b, 0, 2),
        Vec::<u8>::new(),
        "unchanged: nothing sent"
    );
    assert_eq!(set_max(&mut b, 0, 1), vec![0b011], "a smaller tile narrows");
    // A max layer above what the publisher sends is capped at its top layer.
    assert_eq!(set_max(&mut b, 0, 7), vec![0b111]);
    // A second subscriber at layer 0 changes nothing; the first leaving narrows to its 0.
    let transport = b.subscribers[0].transport;
    b.core.handle_command(
        Command::AddSubscription {
            id: SubscriptionId(7000),
            spec: SubscriptionSpec {
                transport,
                publication: RELAYED_PUB,
                mid: "1".into(),
                ssrc: 0x3100_0000,
                rtx_ssrc: None,
                payload_type: VIDEO_PT,
                rtx_payload_type: None,
                max_layer: Some(SpatialLayer(0)),
                paused: false,
            },
        },
        now,
    );
    assert_eq!(demands(&mut b.core), Vec::<u8>::new());
    b.core
        .handle_command(Command::RemoveSubscription { id: relayed_sub(0) }, now);
    assert_eq!(demands(&mut b.core), vec![0b001]);
    b.core.handle_command(
        Command::RemoveSubscription {
            id: SubscriptionId(7000),
        },
        now,
    );
    assert_eq!(
        demands(&mut b.core),
        vec![0],
        "nobody consumes it: nothing wanted"
    );
}

/// A demand the cascade's queue dropped is not lost: the next timeout sends it again, as it
/// then stands, even though it did not change.
#[test]
fn a_dropped_layer_demand_goes_out_again_on_the_next_timeout() {
    let mut b = relayed_edge(3, &[2]);
    let now = b.now;
    assert_eq!(demands(&mut b.core), vec![0b111]);
    b.core.layer_demand_dropped(RELAYED_PUB);
    assert_eq!(
        demands(&mut b.core),
        Vec::<u8>::new(),
        "not before the tick"
    );
    b.core.handle_timeout(now + Duration::from_millis(20));
    assert_eq!(demands(&mut b.core), vec![0b111], "sent again unchanged");
    b.core.handle_timeout(now + Duration::from_millis(40));
    assert_eq!(demands(&mut b.core), Vec::<u8>::new(), "and only once");
    // An unknown publication is ignored.
    b.core.layer_demand_dropped(PublicationId(424242));
    b.core.handle_timeout(now + Duration::from_millis(60));
    assert_eq!(demands(&mut b.core), Vec::<u8>::new());
}

#[test]
fn layer_demand_is_empty_when_every_subscriber_paused_and_returns_on_resume() {
    let mut b = relayed_edge(3, &[2, 0]);
    let now = b.now;
    assert_eq!(demands(&mut b.core).last(), Some(&0b111));
    let pause = |b: &mut Harness, sub: usize, paused: bool| {
        b.core.handle_command(
            Command::SetPaused {
                id: relayed_sub(sub),
                paused,
            },
            now,
        );
        demands(&mut b.core)
    };
    assert_eq!(pause(&mut b, 0, true), vec![0b001], "the big tile paused");
    assert_eq!(
        pause(&mut b, 1, true),
        vec![0],
        "all paused: no layer crosses"
    );
    // A paused subscriber's max layer may change without waking the track.
    b.core.handle_command(
        Command::SetMaxLayer {
            id: relayed_sub(1),
            max: Some(SpatialLayer(1)),
        },
        now,
    );
    assert_eq!(demands(&mut b.core), Vec::<u8>::new());
    assert_eq!(
        pause(&mut b, 1, false),
        vec![0b011],
        "resumed at its new max"
    );
}

#[test]
fn layer_demand_unites_child_edges_sinks_with_local_subscribers() {
    let mut b = relayed_edge(3, &[0]);
    let now = b.now;
    demands(&mut b.core);
    let sink = |b: &mut Harness, add: bool, layer: u8, f: u32| {
        let (publication, link, flow) = (RELAYED_PUB, LINK, flow(f));
        b.core.handle_command(
            if add {
                Command::AddLinkSink {
                    publication,
                    layer,
                    link,
                    flow,
                }
            } else {
                Command::RemoveLinkSink {
                    publication,
                    layer,
                    link,
                    flow,
                }
            },
            now,
        );
        demands(&mut b.core)
    };
    assert_eq!(
        sink(&mut b, true, 2, 9),
        vec![0b101],
        "a child takes layer 2 too"
    );
    assert_eq!(sink(&mut b, true, 0, 9), Vec::<u8>::new());
    assert_eq!(sink(&mut b, false, 2, 9), vec![0b001]);
    // Child sinks alone (no local subscriber) keep the track wanted, with layer 0.
    b.core
        .handle_command(Command::RemoveSubscription { id: relayed_sub(0) }, now);
    assert_eq!(
        demands(&mut b.core),
        Vec::<u8>::new(),
        "the child's layer 0 still"
    );
    assert_eq!(sink(&mut b, true, 1, 10), vec![0b011]);
    assert_eq!(sink(&mut b, false, 0, 9), Vec::<u8>::new());
    assert_eq!(sink(&mut b, false, 1, 10), vec![0]);
}

#[test]
fn single_layer_and_local_publications_emit_no_layer_demand() {
    // One layer (audio, plain video): nothing to narrow, so nothing is sent.
    let mut b = relayed_edge(1, &[0]);
    let now = b.now;
    b.core.handle_command(
        Command::SetPaused {
            id: relayed_sub(0),
            paused: true,
        },
        now,
    );
    assert!(demands(&mut b.core).is_empty());
    // A local publication's link sinks are served from its publisher: no demand either.
    let local = b.publication;
    b.core.handle_command(
        Command::AddLinkSink {
            publication: local,
            layer: 0,
            link: LINK,
            flow: flow(3),
        },
        now,
    );
    assert!(requests(&mut b.core).is_empty());
}

#[test]
fn a_wider_demand_brings_the_higher_layer_to_a_growing_tile() {
    // B's subscriber starts as a thumbnail: only layer 0 is demanded, so only layer 0 arrives.
    let mut b = relayed_edge(3, &[0]);
    assert_eq!(demands(&mut b.core), vec![0b001]);
    let start = b.now;
    let mut demanded = 0b001u8;
    let mut seqs: [u16; 3] = [100, 5000, 9000];
    let mut grew_at = None;
    let mut first_top = None;
    // 30 frames/s, keyframes every second on each layer; the tile grows at 2 s.
    for frame in 0..240u32 {
        let now = start + Duration::from_millis(u64::from(frame) * 33);
        if frame == 60 {
            b.core.handle_command(
                Command::SetMaxLayer {
                    id: relayed_sub(0),
                    max: Some(SpatialLayer(2)),
                },
                now,
            );
            grew_at = Some(now);
        }
        // What upstream sends follows the demand B sent it.
        if let Some(&d) = demands(&mut b.core).last() {
            demanded = d;
        }
        for layer in 0..3u8 {
            if demanded & (1 << layer) == 0 {
                continue;
            }
            let keyframe = frame % 30 == 0;
            let pkt = relayed_vp8(layer, seqs[usize::from(layer)], frame * 3000, keyframe);
            seqs[usize::from(layer)] = seqs[usize::from(layer)].wrapping_add(1);
            let flags = MediaFlags {
                keyframe,
                end_of_frame: true,
                retransmission: false,
            };
            b.core.handle_relayed(RELAYED_PUB, layer, flags, &pkt, now);
        }
        b.core.handle_timeout(now);
        let out = b.drain();
        for (_, payload) in received(&mut b, &out) {
            let layer = payload[2] - 0xa0;
            assert!(
                grew_at.is_some() || layer == 0,
                "only layer 0 before the tile grows"
            );
            if layer == 2 && first_top.is_none() {
                first_top = Some(now);
            }
        }
    }
    assert_eq!(demanded, 0b111, "the grown tile demands every layer");
    let took = first_top.expect("layer 2 reaches the subscriber") - grew_at.unwrap();
    println!("layer 2 reached the subscriber {took:?} after the tile grew");
    assert!(
        took <= Duration::from_secs(5),
        "within a few keyframe intervals (simulated time): {took:?}"
    );
}
