//! The relay between simulated links: every test plays the peers' control messages and
//! datagrams by hand and checks exactly what the relay sends each of them.

use super::*;

const SOURCE: LinkId = LinkId(1);
const EDGE_B: LinkId = LinkId(2);
const EDGE_C: LinkId = LinkId(3);

fn room() -> RoomId {
    RoomId::new("r1").unwrap()
}
fn flow(n: u32) -> FlowId {
    FlowId::new(n).unwrap()
}
fn layer(n: u8) -> Layer {
    Layer::new(n).unwrap()
}
fn rtp(seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]);
    p.extend_from_slice(payload);
    p
}
fn datagram(flow: FlowId, layer: Layer, flags: MediaFlags, rtp: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_datagram(
        &MediaDatagram {
            flow,
            layer,
            flags,
            rtp,
        },
        &mut out,
    );
    out
}

/// A relay with a source link and two downstream links up, track 5 of r1 published behind
/// the source.
fn relay() -> Relay {
    let mut r = Relay::new(RelayConfig::default());
    for l in [SOURCE, EDGE_B, EDGE_C] {
        r.handle_link_up(l);
    }
    r.set_track_source(room(), TrackId(5), SOURCE);
    r
}

fn subscribe(r: &mut Relay, link: LinkId, f: u32, l: u8, now: Instant) {
    r.handle_control(
        link,
        ControlMessage::Subscribe {
            flow: flow(f),
            room: room(),
            track: TrackId(5),
            layer: layer(l),
        },
        now,
    )
    .unwrap();
}

fn control(r: &mut Relay) -> Vec<(LinkId, ControlMessage)> {
    std::iter::from_fn(|| r.poll_control()).collect()
}

/// Decoded `(link, flow, layer, flags, rtp)` of every queued datagram.
fn datagrams(r: &mut Relay) -> Vec<(LinkId, FlowId, Layer, MediaFlags, Vec<u8>)> {
    let mut out = Vec::new();
    r.drain_datagrams(|link, bytes| {
        let d = wire::decode_datagram(bytes).expect("the relay encodes valid datagrams");
        out.push((link, d.flow, d.layer, d.flags, d.rtp.to_vec()));
    });
    out
}

/// The upstream flow the relay chose, from its subscribe.
fn upstream_flow(msgs: &[(LinkId, ControlMessage)]) -> FlowId {
    msgs.iter()
        .find_map(|(l, m)| match m {
            ControlMessage::Subscribe { flow, .. } if *l == SOURCE => Some(*flow),
            _ => None,
        })
        .expect("a subscribe upstream")
}

#[test]
fn subscribes_upstream_once_per_layer_and_fans_out_restamped() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    subscribe(&mut r, EDGE_C, 300, 0, now);
    subscribe(&mut r, EDGE_C, 300, 2, now);
    let msgs = control(&mut r);
    let up = upstream_flow(&msgs);
    let subscribes: Vec<_> = msgs
        .iter()
        .filter_map(|(l, m)| match m {
            ControlMessage::Subscribe {
                flow, track, layer, ..
            } => Some((*l, *flow, *track, *layer)),
            _ => None,
        })
        .collect();
    // Layer 0 once although two links want it; layer 2 once.
    assert_eq!(
        subscribes,
        vec![
            (SOURCE, up, TrackId(5), layer(0)),
            (SOURCE, up, TrackId(5), layer(2))
        ]
    );
    assert_eq!(r.upstream_layers(&room(), TrackId(5)), LayerSet(0b101));

    let flags = MediaFlags {
        keyframe: true,
        end_of_frame: true,
        retransmission: false,
    };
    let p0 = rtp(1000, b"layer zero");
    r.handle_datagram(SOURCE, &datagram(up, layer(0), flags, &p0));
    let p2 = rtp(50, b"layer two");
    r.handle_datagram(SOURCE, &datagram(up, layer(2), MediaFlags::default(), &p2));
    let out = datagrams(&mut r);
    assert_eq!(
        out,
        vec![
            (EDGE_B, flow(7), layer(0), flags, p0.clone()),
            (EDGE_C, flow(300), layer(0), flags, p0),
            (EDGE_C, flow(300), layer(2), MediaFlags::default(), p2),
        ]
    );
    assert_eq!(r.counters.datagrams_out, 3);
}

#[test]
fn last_unsubscribe_of_a_layer_unsubscribes_upstream() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 1, now);
    subscribe(&mut r, EDGE_C, 8, 1, now);
    let up = upstream_flow(&control(&mut r));
    r.handle_control(
        EDGE_B,
        ControlMessage::Unsubscribe {
            flow: flow(7),
            layer: layer(1),
        },
        now,
    )
    .unwrap();
    assert_eq!(control(&mut r), vec![], "EDGE_C still wants layer 1");
    r.handle_control(
        EDGE_C,
        ControlMessage::Unsubscribe {
            flow: flow(8),
            layer: layer(1),
        },
        now,
    )
    .unwrap();
    assert_eq!(
        control(&mut r),
        vec![(
            SOURCE,
            ControlMessage::Unsubscribe {
                flow: up,
                layer: layer(1)
            }
        )]
    );
    // The old upstream flow is no longer accepted.
    r.handle_datagram(
        SOURCE,
        &datagram(up, layer(1), MediaFlags::default(), &rtp(1, b"x")),
    );
    assert!(datagrams(&mut r).is_empty());
    assert_eq!(r.counters.unsolicited, 1);
    // And the downstream flow is unbound: a keyframe request on it is refused.
    assert!(matches!(
        r.handle_control(
            EDGE_B,
            ControlMessage::KeyframeRequest {
                flow: flow(7),
                layer: layer(1)
            },
            now
        ),
        Err(RelayError::UnknownFlow { .. })
    ));
}

#[test]
fn keyframe_requests_coalesce_per_layer_per_interval() {
    let t0 = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, t0);
    subscribe(&mut r, EDGE_C, 8, 0, t0);
    subscribe(&mut r, EDGE_C, 8, 1, t0);
    let kf = |f: u32, l: u8| ControlMessage::KeyframeRequest {
        flow: flow(f),
        layer: layer(l),
    };
    // Each subscribe asked for a keyframe of its layer at t0 (B's layer 0, C's layer 1; C's
    // layer 0 coalesced with B's).
    r.handle_control(EDGE_B, kf(7, 0), t0 + Duration::from_millis(100))
        .unwrap();
    r.handle_control(EDGE_C, kf(8, 0), t0 + Duration::from_millis(200))
        .unwrap();
    r.handle_control(EDGE_C, kf(8, 1), t0 + Duration::from_millis(200))
        .unwrap();
    r.handle_control(EDGE_B, kf(7, 0), t0 + Duration::from_millis(350))
        .unwrap();
    let msgs = control(&mut r);
    let up = upstream_flow(&msgs);
    let up_requests: Vec<_> = msgs
        .into_iter()
        .filter(|(_, m)| matches!(m, ControlMessage::KeyframeRequest { .. }))
        .collect();
    assert_eq!(
        up_requests,
        vec![
            (
                SOURCE,
                ControlMessage::KeyframeRequest {
                    flow: up,
                    layer: layer(0)
                }
            ),
            (
                SOURCE,
                ControlMessage::KeyframeRequest {
                    flow: up,
                    layer: layer(1)
                }
            ),
            (
                SOURCE,
                ControlMessage::KeyframeRequest {
                    flow: up,
                    layer: layer(0)
                }
            ),
        ]
    );
    assert_eq!(r.counters.keyframe_requests_coalesced, 4);
    assert_eq!(r.counters.keyframe_requests_up, 3);
}

#[test]
fn layer_demand_is_the_union_and_filters_forwarding() {
    let now = Instant::now();
    let mut r = relay();
    for l in 0..3 {
        subscribe(&mut r, EDGE_B, 7, l, now);
        subscribe(&mut r, EDGE_C, 8, l, now);
    }
    let up = upstream_flow(&control(&mut r));
    let demand = |f: u32, bits: u8| ControlMessage::LayerDemand {
        flow: flow(f),
        layers: LayerSet(bits),
    };
    r.handle_control(EDGE_B, demand(7, 0b001), now).unwrap();
    // C has not narrowed: it still wants all three, so the union is unchanged... but the first
    // narrowing makes the relay state the demand upstream.
    assert_eq!(
        control(&mut r),
        vec![(
            SOURCE,
            ControlMessage::LayerDemand {
                flow: up,
                layers: LayerSet(0b111)
            }
        )]
    );
    r.handle_control(EDGE_C, demand(8, 0b010), now).unwrap();
    assert_eq!(
        control(&mut r),
        vec![(
            SOURCE,
            ControlMessage::LayerDemand {
                flow: up,
                layers: LayerSet(0b011)
            }
        )]
    );
    // Same union again: nothing sent.
    r.handle_control(EDGE_C, demand(8, 0b010), now).unwrap();
    assert!(control(&mut r).is_empty());
    // Forwarding follows each link's demand.
    for l in 0..3 {
        r.handle_datagram(
            SOURCE,
            &datagram(
                up,
                layer(l),
                MediaFlags::default(),
                &rtp(u16::from(l), b"m"),
            ),
        );
    }
    let sent: Vec<_> = datagrams(&mut r)
        .into_iter()
        .map(|(link, _, l, _, _)| (link, l.index()))
        .collect();
    assert_eq!(sent, vec![(EDGE_B, 0), (EDGE_C, 1)]);
}

#[test]
fn nacks_are_answered_from_the_cache_and_misses_go_upstream() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    let up = upstream_flow(&control(&mut r));
    let flags = MediaFlags {
        keyframe: true,
        ..Default::default()
    };
    for seq in [100u16, 101, 103] {
        r.handle_datagram(
            SOURCE,
            &datagram(up, layer(0), flags, &rtp(seq, &seq.to_be_bytes())),
        );
    }
    datagrams(&mut r);
    // 100, 101 (bit 0), 102 (bit 1), 103 (bit 2): 102 never arrived.
    r.handle_control(
        EDGE_B,
        ControlMessage::Nack {
            flow: flow(7),
            layer: layer(0),
            entries: vec![NackEntry {
                pid: 100,
                blp: 0b111,
            }],
        },
        now,
    )
    .unwrap();
    let resent: Vec<_> = datagrams(&mut r)
        .into_iter()
        .map(|(link, f, _, flags, p)| (link, f, flags.retransmission, flags.keyframe, rtp_seq(&p)))
        .collect();
    assert_eq!(
        resent,
        vec![
            (EDGE_B, flow(7), true, true, Some(100)),
            (EDGE_B, flow(7), true, true, Some(101)),
            (EDGE_B, flow(7), true, true, Some(103)),
        ]
    );
    assert_eq!(
        control(&mut r),
        vec![(
            SOURCE,
            ControlMessage::Nack {
                flow: up,
                layer: layer(0),
                entries: vec![NackEntry { pid: 102, blp: 0 }]
            }
        )]
    );
    assert_eq!(r.counters.retransmitted, 3);
    assert_eq!(r.counters.nacks_up, 1);
}

#[test]
fn media_nobody_asked_for_is_dropped_and_counted() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    let up = upstream_flow(&control(&mut r));
    let p = rtp(1, b"x");
    // A downstream link sending on the upstream flow id (it is not the source).
    r.handle_datagram(EDGE_C, &datagram(up, layer(0), MediaFlags::default(), &p));
    // The source on a flow never subscribed.
    r.handle_datagram(
        SOURCE,
        &datagram(flow(999), layer(0), MediaFlags::default(), &p),
    );
    // The source on a layer not subscribed.
    r.handle_datagram(SOURCE, &datagram(up, layer(1), MediaFlags::default(), &p));
    // Garbage.
    r.handle_datagram(SOURCE, &[0x40, 0, 1, 0x00]);
    // A link nobody knows.
    r.handle_datagram(
        LinkId(77),
        &datagram(up, layer(0), MediaFlags::default(), &p),
    );
    assert!(datagrams(&mut r).is_empty());
    assert_eq!(r.counters.unsolicited, 3);
    assert_eq!(r.counters.unwanted_layer, 1);
    assert_eq!(r.counters.malformed, 1);
    assert_eq!(r.counters.datagrams_out, 0);
}

#[test]
fn protocol_violations_are_refused_with_a_reason() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    r.set_track_source(room(), TrackId(6), EDGE_C);
    let err = r
        .handle_control(
            EDGE_B,
            ControlMessage::Subscribe {
                flow: flow(7),
                room: room(),
                track: TrackId(6),
                layer: layer(0),
            },
            now,
        )
        .unwrap_err();
    assert_eq!(err, RelayError::FlowRebound { flow: flow(7) });
    assert!(err.is_fatal());
    let err = r
        .handle_control(
            EDGE_C,
            ControlMessage::Subscribe {
                flow: flow(1),
                room: room(),
                track: TrackId(6),
                layer: layer(0),
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, RelayError::SubscribeToOwnTrack { .. }));
    let err = r
        .handle_control(LinkId(42), ControlMessage::Stats(Default::default()), now)
        .unwrap_err();
    assert_eq!(err, RelayError::UnknownLink(LinkId(42)));
    assert!(!err.is_fatal());

    let mut small = Relay::new(RelayConfig {
        max_flows_per_link: 2,
        ..Default::default()
    });
    small.handle_link_up(EDGE_B);
    for f in 1..=2 {
        subscribe(&mut small, EDGE_B, f, 0, now);
    }
    let err = small
        .handle_control(
            EDGE_B,
            ControlMessage::Subscribe {
                flow: flow(3),
                room: room(),
                track: TrackId(5),
                layer: layer(0),
            },
            now,
        )
        .unwrap_err();
    assert_eq!(err, RelayError::TooManyFlows { max: 2 });
}

#[test]
fn subscription_before_the_source_is_known_waits_for_it() {
    let now = Instant::now();
    let mut r = Relay::new(RelayConfig::default());
    r.handle_link_up(SOURCE);
    r.handle_link_up(EDGE_B);
    subscribe(&mut r, EDGE_B, 7, 1, now);
    assert!(control(&mut r).is_empty());
    r.set_track_source(room(), TrackId(5), SOURCE);
    let msgs = control(&mut r);
    assert!(matches!(
        msgs.as_slice(),
        [(SOURCE, ControlMessage::Subscribe { layer: l, .. })] if *l == layer(1)
    ));
}

#[test]
fn a_downstream_link_going_down_releases_its_demand() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    subscribe(&mut r, EDGE_C, 8, 0, now);
    subscribe(&mut r, EDGE_C, 8, 2, now);
    let up = upstream_flow(&control(&mut r));
    r.handle_link_down(EDGE_C);
    assert_eq!(
        control(&mut r),
        vec![(
            SOURCE,
            ControlMessage::Unsubscribe {
                flow: up,
                layer: layer(2)
            }
        )]
    );
    r.handle_link_down(EDGE_B);
    assert_eq!(
        control(&mut r),
        vec![(
            SOURCE,
            ControlMessage::Unsubscribe {
                flow: up,
                layer: layer(0)
            }
        )]
    );
}

#[test]
fn a_source_link_that_drops_is_resubscribed_when_back() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    subscribe(&mut r, EDGE_B, 7, 1, now);
    control(&mut r);
    r.handle_link_down(SOURCE);
    assert!(control(&mut r).is_empty(), "nothing to send on a dead link");
    assert_eq!(r.upstream_layers(&room(), TrackId(5)), LayerSet(0));
    assert_eq!(r.track_source(&room(), TrackId(5)), Some(SOURCE));
    r.handle_link_up(SOURCE);
    let msgs = control(&mut r);
    let layers: Vec<_> = msgs
        .iter()
        .filter_map(|(l, m)| match m {
            ControlMessage::Subscribe { layer, .. } if *l == SOURCE => Some(layer.index()),
            _ => None,
        })
        .collect();
    assert_eq!(layers, vec![0, 1]);
    // Media on the new flow reaches B again.
    let up = upstream_flow(&msgs);
    r.handle_datagram(
        SOURCE,
        &datagram(up, layer(1), MediaFlags::default(), &rtp(9, b"x")),
    );
    assert_eq!(datagrams(&mut r).len(), 1);
}

#[test]
fn a_new_source_takes_over_the_subscription() {
    let now = Instant::now();
    let mut r = relay();
    let new_source = LinkId(4);
    r.handle_link_up(new_source);
    subscribe(&mut r, EDGE_B, 7, 0, now);
    let old = upstream_flow(&control(&mut r));
    r.set_track_source(room(), TrackId(5), new_source);
    let msgs = control(&mut r);
    assert_eq!(
        msgs[0],
        (
            SOURCE,
            ControlMessage::Unsubscribe {
                flow: old,
                layer: layer(0)
            }
        )
    );
    let ControlMessage::Subscribe { flow: new, .. } = msgs[1].1 else {
        panic!("expected a subscribe, got {:?}", msgs[1]);
    };
    assert_eq!(msgs[1].0, new_source);
    // The old source's media is now unsolicited; the new one's flows.
    let p = rtp(1, b"x");
    r.handle_datagram(SOURCE, &datagram(old, layer(0), MediaFlags::default(), &p));
    r.handle_datagram(
        new_source,
        &datagram(new, layer(0), MediaFlags::default(), &p),
    );
    assert_eq!(datagrams(&mut r).len(), 1);
    assert_eq!(r.counters.unsolicited, 1);
}

#[test]
fn removed_track_unsubscribes_upstream() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    let up = upstream_flow(&control(&mut r));
    r.remove_track(&room(), TrackId(5));
    assert_eq!(
        control(&mut r),
        vec![(
            SOURCE,
            ControlMessage::Unsubscribe {
                flow: up,
                layer: layer(0)
            }
        )]
    );
    assert_eq!(r.track_source(&room(), TrackId(5)), None);
}

#[test]
fn nack_packing_round_trips() {
    let seqs = [65530u16, 65531, 65535, 0, 3, 40];
    let packed = pack_nack(&seqs);
    let back: Vec<u16> = packed.iter().flat_map(expand_nack).collect();
    assert_eq!(back, seqs);
    assert_eq!(
        packed,
        vec![
            NackEntry {
                pid: 65530,
                blp: 0b1_0011_0001
            },
            NackEntry { pid: 40, blp: 0 }
        ]
    );
}

/// A seeded simulation: random subscribes, unsubscribes, demands, link drops and media, with
/// the invariants checked after every step:
/// - what the source was asked for (as it reads the relay's subscribes and unsubscribes) is
///   exactly the union of what the live downstream links subscribed, on one flow per track;
/// - a packet the source sends reaches each live downstream link that subscribed and demands its
///   layer exactly once, stamped with that link's flow, and no other link.
#[test]
fn random_operations_keep_the_upstream_union_and_deliver_exactly_once() {
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    const DOWN: [LinkId; 4] = [LinkId(10), LinkId(11), LinkId(12), LinkId(13)];
    const TRACKS: u64 = 3;
    for seed in 0..20u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut r = Relay::new(RelayConfig::default());
        r.handle_link_up(SOURCE);
        for l in DOWN {
            r.handle_link_up(l);
        }
        for t in 0..TRACKS {
            r.set_track_source(room(), TrackId(t), SOURCE);
        }
        // Downstream model: (link, track) -> (subscribed layers, demand).
        let mut down: BTreeMap<(LinkId, u64), (u8, Option<u8>)> = BTreeMap::new();
        let mut up_links: BTreeSet<LinkId> = DOWN.iter().copied().collect();
        // Source model: flow -> (track, layers).
        let mut source: BTreeMap<FlowId, (u64, u8)> = BTreeMap::new();
        let mut source_up = true;
        let down_flow = |t: u64| flow(100 + t as u32);
        let mut seq = 0u16;
        for step in 0..400 {
            let now = Instant::now();
            let link = DOWN[rng.gen_range(0..DOWN.len())];
            let t = rng.gen_range(0..TRACKS);
            let l = rng.gen_range(0..3u8);
            match rng.gen_range(0..100) {
                0..=34 if up_links.contains(&link) => {
                    subscribe_track(&mut r, link, down_flow(t), t, l, now);
                    let e = down.entry((link, t)).or_insert((0, None));
                    e.0 |= 1 << l;
                    if let Some(d) = e.1.as_mut() {
                        *d |= 1 << l;
                    }
                }
                35..=54 if up_links.contains(&link) => {
                    let res = r.handle_control(
                        link,
                        ControlMessage::Unsubscribe {
                            flow: down_flow(t),
                            layer: layer(l),
                        },
                        now,
                    );
                    match down.get_mut(&(link, t)) {
                        Some(e) => {
                            res.unwrap();
                            e.0 &= !(1 << l);
                            if e.0 == 0 {
                                down.remove(&(link, t));
                            }
                        }
                        None => assert!(res.is_err(), "unsubscribe of an unbound flow"),
                    }
                }
                55..=64 if up_links.contains(&link) => {
                    let bits = rng.gen_range(0..8u8);
                    let res = r.handle_control(
                        link,
                        ControlMessage::LayerDemand {
                            flow: down_flow(t),
                            layers: LayerSet(bits),
                        },
                        now,
                    );
                    if let Some(e) = down.get_mut(&(link, t)) {
                        res.unwrap();
                        e.1 = Some(bits);
                    }
                }
                65..=69 => {
                    if up_links.remove(&link) {
                        r.handle_link_down(link);
                        down.retain(|(l2, _), _| *l2 != link);
                    } else {
                        up_links.insert(link);
                        r.handle_link_up(link);
                    }
                }
                70..=72 => {
                    if source_up {
                        r.handle_link_down(SOURCE);
                        source.clear();
                    } else {
                        r.handle_link_up(SOURCE);
                    }
                    source_up = !source_up;
                }
                _ => {}
            }
            // The source reads what the relay told it.
            for (to, m) in control(&mut r) {
                assert!(
                    to == SOURCE,
                    "step {step}: only the source gets control: {m:?}"
                );
                assert!(source_up, "step {step}: nothing is sent on a dead link");
                match m {
                    ControlMessage::Subscribe {
                        flow, track, layer, ..
                    } => {
                        let e = source.entry(flow).or_insert((track.0, 0));
                        assert_eq!(e.0, track.0, "a flow names one track");
                        assert_eq!(e.1 & (1 << layer.index()), 0, "no duplicate subscribe");
                        e.1 |= 1 << layer.index();
                    }
                    ControlMessage::Unsubscribe { flow, layer } => {
                        let e = source
                            .get_mut(&flow)
                            .expect("unsubscribe of a subscribed flow");
                        assert_ne!(e.1 & (1 << layer.index()), 0);
                        e.1 &= !(1 << layer.index());
                        if e.1 == 0 {
                            source.remove(&flow);
                        }
                    }
                    ControlMessage::KeyframeRequest { .. } | ControlMessage::LayerDemand { .. } => {
                    }
                    other => panic!("step {step}: unexpected {other:?}"),
                }
            }
            // Invariant 1: the source's view is the union, one flow per track.
            let mut want: BTreeMap<u64, u8> = BTreeMap::new();
            for ((_, t), (layers, _)) in &down {
                *want.entry(*t).or_default() |= layers;
            }
            want.retain(|_, l| *l != 0);
            let mut have: BTreeMap<u64, u8> = BTreeMap::new();
            for (track, layers) in source.values() {
                assert!(have.insert(*track, *layers).is_none(), "one flow per track");
            }
            if source_up {
                assert_eq!(have, want, "step {step} (seed {seed})");
            } else {
                assert!(have.is_empty());
            }
            // Invariant 2: media from the source is delivered exactly once where wanted.
            if let Some((&f, &(track, layers))) =
                source.iter().nth(rng.gen_range(0..source.len().max(1)))
            {
                let l = (0..3u8).find(|l| layers & (1 << l) != 0).unwrap();
                seq = seq.wrapping_add(1);
                r.handle_datagram(
                    SOURCE,
                    &datagram(f, layer(l), MediaFlags::default(), &rtp(seq, b"m")),
                );
                let mut got: Vec<(LinkId, FlowId)> = datagrams(&mut r)
                    .into_iter()
                    .map(|(link, f, _, _, _)| (link, f))
                    .collect();
                got.sort();
                let expected: Vec<(LinkId, FlowId)> = down
                    .iter()
                    .filter(|((_, t), (sub, demand))| {
                        *t == track && sub & demand.unwrap_or(u8::MAX) & (1 << l) != 0
                    })
                    .map(|((link, t), _)| (*link, down_flow(*t)))
                    .collect();
                assert_eq!(got, expected, "step {step} (seed {seed})");
            }
        }
    }
}

fn subscribe_track(r: &mut Relay, link: LinkId, f: FlowId, track: u64, l: u8, now: Instant) {
    r.handle_control(
        link,
        ControlMessage::Subscribe {
            flow: f,
            room: room(),
            track: TrackId(track),
            layer: layer(l),
        },
        now,
    )
    .unwrap();
}

#[test]
fn a_reconnect_under_a_new_id_takes_over_and_the_old_link_is_forgotten() {
    let now = Instant::now();
    let mut r = relay();
    subscribe(&mut r, EDGE_B, 7, 0, now);
    control(&mut r);
    r.handle_link_down(SOURCE);
    assert!(r.links.contains_key(&SOURCE), "kept while it is a source");
    let again = LinkId(99);
    r.handle_link_up(again);
    r.set_track_source(room(), TrackId(5), again);
    let msgs = control(&mut r);
    assert!(
        matches!(msgs.first(), Some((l, ControlMessage::Subscribe { .. })) if *l == again),
        "{msgs:?}"
    );
    assert!(!r.links.contains_key(&SOURCE), "the dead link is forgotten");
}
