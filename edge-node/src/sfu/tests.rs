//! The core end to end: SRTP in from a publisher, rewritten SRTP out to subscribers, NACKs
//! answered, hostile datagrams counted and ignored.

use super::harness::{Harness, PUBLISHER_SSRC, VIDEO_PT};
use super::*;
use crate::transport::dtls::SrtpProfile;

fn decrypt_all(h: &mut Harness, out: &[Transmit]) -> Vec<(usize, Vec<u8>)> {
    let mut got = Vec::new();
    for t in out {
        if let Some(i) = h.subscribers.iter().position(|s| s.addr == t.to) {
            if let Ok(plain) = h.subscribers[i].srtp.decrypt_rtp(&t.data) {
                got.push((i, plain.to_vec()));
            }
        }
    }
    got
}

#[test]
fn forwards_to_every_subscriber_with_continuous_rewritten_sequence_across_wraparound() {
    for profile in [SrtpProfile::Aes128CmHmacSha1_80, SrtpProfile::AeadAes128Gcm] {
        let mut h = Harness::new(3, profile);
        let mut seen: Vec<Vec<u16>> = vec![Vec::new(); 3];
        // Start near the 16-bit wrap: 65530..65535, 0..20.
        for k in 0..26u16 {
            let seq = 65530u16.wrapping_add(k);
            let pkt = h.publisher_packet(seq, 3000 * k as u32, k == 0, 200);
            h.from_publisher(&pkt);
            let out = h.drain();
            for (i, plain) in decrypt_all(&mut h, &out) {
                let v = RtpView::parse(&plain).unwrap();
                assert_eq!(
                    v.ssrc, h.subscribers[i].out_ssrc,
                    "each subscriber sees its own SSRC"
                );
                assert_eq!(v.payload_type, VIDEO_PT);
                assert_eq!(v.payload().len(), 200);
                assert!(
                    v.extension(3).is_some(),
                    "transport-wide seq added for the subscriber's BWE"
                );
                seen[i].push(v.seq);
            }
        }
        for s in &seen {
            assert_eq!(
                s.len(),
                26,
                "{profile:?}: every packet reaches every subscriber"
            );
            for w in s.windows(2) {
                assert_eq!(
                    w[1],
                    w[0].wrapping_add(1),
                    "{profile:?}: contiguous output sequence"
                );
            }
        }
        assert_eq!(h.core.counters.packets_in, 26);
        assert_eq!(h.core.counters.packets_out, 26 * 3);
    }
}

#[test]
fn nack_is_answered_from_the_cache() {
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    let mut sent = Vec::new();
    for k in 0..10u16 {
        let pkt = h.publisher_packet(100 + k, 3000 * k as u32, k == 0, 100 + k as usize);
        h.from_publisher(&pkt);
        let out = h.drain();
        if k == 4 {
            continue; // lost on the way to the subscriber
        }
        for (_, plain) in decrypt_all(&mut h, &out) {
            sent.push(plain);
        }
    }
    assert_eq!(sent.len(), 9);
    let before = RtpView::parse(&sent[3]).unwrap();
    let after = RtpView::parse(&sent[4]).unwrap();
    let lost_seq = before.seq.wrapping_add(1);
    assert_eq!(
        after.seq,
        lost_seq.wrapping_add(1),
        "the loss shows as a gap"
    );
    let nack = rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack {
        sender_ssrc: 1,
        media_ssrc: h.subscribers[0].out_ssrc,
        nacks: vec![rtcp::transport_feedbacks::transport_layer_nack::NackPair {
            packet_id: lost_seq,
            lost_packets: 0,
        }],
    };
    let plain =
        rtcp::packet::marshal(&[Box::new(nack) as Box<dyn rtcp::packet::Packet + Send + Sync>])
            .unwrap();
    let enc = h.subscribers[0].srtp.encrypt_rtcp(&plain).unwrap();
    let addr = h.subscribers[0].addr;
    let now = h.now;
    h.core.handle_srtp(addr, &enc, true, now);
    let out = h.drain();
    let resent = decrypt_all(&mut h, &out);
    assert_eq!(resent.len(), 1, "one retransmission: {:?}", h.core.counters);
    let v = RtpView::parse(&resent[0].1).unwrap();
    assert_eq!(v.seq, lost_seq);
    assert_eq!(
        v.payload().len(),
        104,
        "the lost packet (payload of 104 bytes) again"
    );
    assert_eq!(h.core.counters.retransmits_out, 1);
}

#[test]
fn hostile_datagrams_are_counted_and_media_keeps_flowing() {
    let mut h = Harness::new(2, SrtpProfile::AeadAes128Gcm);
    let now = h.now;
    let pub_addr = h.publisher.addr;
    // Garbage SRTP from the publisher's address: fails authentication.
    h.core.handle_srtp(pub_addr, &[0x80; 60], false, now);
    // A replayed packet.
    let pkt = h.publisher_packet(1, 0, true, 50);
    h.from_publisher(&pkt);
    h.from_publisher(&pkt);
    // Media from an address nobody nominated.
    let stranger: SocketAddr = "203.0.113.9:4000".parse().unwrap();
    h.core.handle_srtp(stranger, &pkt, false, now);
    // STUN with the wrong password for a real ufrag.
    let bad = crate::transport::ice::binding_request(
        "srv00001:cli00001",
        "wrong-password-000000000",
        true,
    );
    h.core.handle_stun(stranger, &bad, now);
    // STUN for an unknown ufrag.
    let unknown =
        crate::transport::ice::binding_request("nobody00:cli", "whatever-password-000000", true);
    h.core.handle_stun(stranger, &unknown, now);
    let c = &h.core.counters;
    assert_eq!(c.rejected_srtp, 2, "garbage and replay");
    assert_eq!(c.rejected_unknown_source, 1);
    assert_eq!(c.rejected_stun_integrity, 1);
    assert_eq!(c.rejected_stun_unknown, 1);
    // The bad STUN did not move subscriber 1's address.
    assert_eq!(
        h.core.transport_at(h.subscribers[0].addr),
        Some(h.subscribers[0].transport)
    );
    h.drain();
    let pkt = h.publisher_packet(2, 3000, false, 50);
    h.from_publisher(&pkt);
    let out = h.drain();
    assert_eq!(
        decrypt_all(&mut h, &out).len(),
        2,
        "everyone still gets media"
    );
}

#[test]
fn unknown_ssrc_and_payload_type_are_dropped() {
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    let mut buf = vec![0u8; MAX_OUT_HEADER + 10];
    let n = rtp::write_header(
        &mut buf,
        false,
        VIDEO_PT,
        1,
        0,
        PUBLISHER_SSRC + 1,
        &Default::default(),
    );
    buf.truncate(n + 10);
    let enc = h.publisher.srtp.encrypt_rtp(&buf).unwrap();
    h.from_publisher(&enc);
    let n = rtp::write_header(
        &mut buf,
        false,
        13,
        2,
        0,
        PUBLISHER_SSRC,
        &Default::default(),
    );
    buf.truncate(n + 10);
    let enc = h.publisher.srtp.encrypt_rtp(&buf).unwrap();
    h.from_publisher(&enc);
    assert_eq!(h.core.counters.rejected_unknown_ssrc, 1);
    assert_eq!(h.core.counters.rejected_payload_type, 1);
    assert!(h.drain().is_empty());
}

#[test]
fn consent_is_swept_once_a_second_not_every_tick() {
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    let closed = |h: &mut Harness| {
        let mut n = 0;
        while let Some((_, e)) = h.core.poll_event() {
            n += usize::from(matches!(e, Event::Closed { .. }));
        }
        n
    };
    h.core.handle_timeout(h.now + Duration::from_millis(29_500));
    assert_eq!(closed(&mut h), 0, "consent still fresh");
    // Past the 30 s deadline but within a second of the last sweep: not yet looked at.
    h.core.handle_timeout(h.now + Duration::from_millis(30_200));
    assert_eq!(closed(&mut h), 0);
    h.core.handle_timeout(h.now + Duration::from_millis(30_500));
    assert_eq!(
        closed(&mut h),
        2,
        "closed at most a second after the deadline"
    );
}

#[test]
fn consent_expiry_closes_the_transport_and_its_publications() {
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    let later = h.now + Duration::from_secs(31);
    h.core.handle_timeout(later);
    let mut closed = 0;
    while let Some((_, e)) = h.core.poll_event() {
        if let Event::Closed { reason, .. } = e {
            assert_eq!(reason, "consent_expired");
            closed += 1;
        }
    }
    assert_eq!(closed, 2, "publisher and subscriber both stopped answering");
    assert_eq!(h.core.transport_count(), 0);
    assert_eq!(h.core.publication_count(), 0);
    assert_eq!(h.core.subscription_count(), 0);
}

/// RTCP the core sent to the publisher, decrypted and parsed.
fn rtcp_to_publisher(
    h: &mut Harness,
    out: &[Transmit],
) -> Vec<Box<dyn rtcp::packet::Packet + Send + Sync>> {
    let mut pkts = Vec::new();
    for t in out.iter().filter(|t| t.to == h.publisher.addr) {
        if let Ok(plain) = h.publisher.srtp.decrypt_rtcp(&t.data) {
            if let Ok(mut p) = crate::transport::parse::parse_rtcp(&plain) {
                pkts.append(&mut p);
            }
        }
    }
    pkts
}

#[test]
fn a_gap_from_the_publisher_is_nacked() {
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    for seq in [10u16, 11, 12, 15, 16] {
        let pkt = h.publisher_packet(seq, seq as u32 * 3000, seq == 10, 100);
        h.from_publisher(&pkt);
    }
    h.drain();
    let mut nacked = Vec::new();
    for step in 1..=10u64 {
        let now = h.now + Duration::from_millis(10 * step);
        h.core.handle_timeout(now);
        let out = h.drain();
        for p in rtcp_to_publisher(&mut h, &out) {
            if let Some(n) = p
                .as_any()
                .downcast_ref::<rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack>()
            {
                assert_eq!(n.media_ssrc, PUBLISHER_SSRC);
                let pairs: Vec<(u16, u16)> = n.nacks.iter().map(|p| (p.packet_id, p.lost_packets)).collect();
                nacked.extend(kcs_media::nack::expand_nack_pairs(&pairs));
            }
        }
    }
    nacked.sort();
    nacked.dedup();
    assert_eq!(
        nacked,
        vec![13, 14],
        "exactly the missing packets are requested"
    );
}

#[test]
fn keyframe_requests_from_many_subscribers_coalesce_into_one_pli() {
    let mut h = Harness::new(5, SrtpProfile::AeadAes128Gcm);
    // Start the stream (the first keyframe satisfies the subscribe-time request).
    let pkt = h.publisher_packet(1, 0, true, 100);
    h.from_publisher(&pkt);
    h.drain();
    let now = h.now + Duration::from_secs(2);
    for i in 0..5 {
        let pli = rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: h.subscribers[i].out_ssrc,
        };
        let plain =
            rtcp::packet::marshal(&[Box::new(pli) as Box<dyn rtcp::packet::Packet + Send + Sync>])
                .unwrap();
        let enc = h.subscribers[i].srtp.encrypt_rtcp(&plain).unwrap();
        let addr = h.subscribers[i].addr;
        h.core.handle_srtp(addr, &enc, true, now);
    }
    h.core.handle_timeout(now);
    let out = h.drain();
    let plis = rtcp_to_publisher(&mut h, &out)
        .iter()
        .filter(|p| {
            p.as_any()
                .downcast_ref::<rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication>()
                .is_some()
        })
        .count();
    assert_eq!(plis, 1, "five requests, one PLI");
    assert_eq!(h.core.counters.plis_in, 5);
}

/// A subscriber that wants a layer above its estimate, on a simulated downlink of
/// `capacity_bps` (a FIFO at that rate plus 5 ms; the subscriber's TWCC feedback every 100 ms
/// reports when each packet got through). Returns (the subscription's target layer `secs` after
/// it subscribed, probe packets sent, probe packets seen on the RTX stream, and the most
/// and the last number of transports the probe sweep visited on a tick).
fn probe_scenario(
    capacity_bps: u64,
    secs: u64,
) -> (Option<SpatialLayer>, u64, usize, (usize, usize)) {
    use interceptor::twcc::Recorder;
    const LOW: u32 = 0x0A0A_0000;
    const HIGH: u32 = 0x0B0B_0000;
    const RTX: u32 = 0x3000_0001;
    const RTX_PT: u8 = 97;
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    let pid = PublicationId(2);
    let sid = SubscriptionId(3);
    h.publish(
        pid,
        MediaCodec::Video(VideoCodec::Vp8),
        VIDEO_PT,
        &[LOW, HIGH],
    );
    let sub = h.subscribers[0].transport;
    let vp8 = |key: bool, size: usize| {
        let mut p = vec![7u8; size];
        p[0] = 0x10;
        p[1] = if key { 0x00 } else { 0x01 };
        p
    };
    let mut rec = Recorder::new(1);
    let t0 = h.now;
    let mut link_free = t0;
    let mut seqs = [0u16; 2];
    let mut rtx_seen = 0;
    let mut most_probing = 0;
    // 1 ms steps: layer 0 ~100 kbit/s (250 B every 20 ms), layer 1 ~960 kbit/s (1200 B every
    // 10 ms), keyframes every second on both. The subscriber comes after 1 s, when the layers'
    // rates are known.
    for ms in 0..(secs + 1) * 1000 {
        h.now = t0 + Duration::from_millis(ms);
        if ms == 1000 {
            h.core.handle_command(
                Command::AddSubscription {
                    id: sid,
                    spec: SubscriptionSpec {
                        transport: sub,
                        publication: pid,
                        mid: "1".into(),
                        ssrc: 0x2100_0000,
                        rtx_ssrc: Some(RTX),
                        payload_type: VIDEO_PT,
                        rtx_payload_type: Some(RTX_PT),
                        max_layer: Some(SpatialLayer(1)),
                        paused: false,
                    },
                },
                h.now,
            );
        }
        for (layer, (ssrc, every, size)) in
            [(LOW, 20, 250), (HIGH, 10, 1200)].into_iter().enumerate()
        {
            if ms % every == 0 {
                let seq = seqs[layer];
                seqs[layer] = seq.wrapping_add(1);
                let mut buf = vec![0u8; MAX_OUT_HEADER + size];
                let n = rtp::write_header(
                    &mut buf,
                    true,
                    VIDEO_PT,
                    seq,
                    (ms * 90) as u32,
                    ssrc,
                    &rtp::OutExtensions::default(),
                );
                buf.truncate(n);
                buf.extend_from_slice(&vp8(ms % 1000 == 0, size));
                let data = h.publisher.srtp.encrypt_rtp(&buf).expect("encrypt");
                h.from_publisher(&data);
            }
        }
        if ms % 10 == 0 {
            h.core.handle_timeout(h.now);
            most_probing = most_probing.max(h.core.probing_transports());
        }
        for t in h.drain() {
            if t.to != h.subscribers[0].addr {
                continue;
            }
            let Ok(plain) = h.subscribers[0].srtp.decrypt_rtp(&t.data) else {
                continue; // SRTCP
            };
            let v = RtpView::parse(&plain).unwrap();
            if v.ssrc == RTX {
                assert_eq!(v.payload_type, RTX_PT);
                rtx_seen += 1;
            }
            // Through the bottleneck.
            let tx = Duration::from_secs_f64(t.data.len() as f64 * 8.0 / capacity_bps as f64);
            link_free = link_free.max(h.now) + tx;
            let arrival = link_free + Duration::from_millis(5);
            if let Some(ext) = v.extension(3) {
                let twcc = u16::from_be_bytes([ext[0], ext[1]]);
                rec.record(RTX, twcc, (arrival - t0).as_micros() as i64);
            }
        }
        if ms % 100 == 99 {
            for fb in rec.build_feedback_packet() {
                let raw = fb.marshal().unwrap();
                let data = h.subscribers[0]
                    .srtp
                    .encrypt_rtcp(&raw)
                    .expect("encrypt rtcp");
                let addr = h.subscribers[0].addr;
                h.core.handle_srtp(addr, &data, true, h.now);
            }
        }
    }
    let target = h
        .core
        .subscription_layers(sid)
        .and_then(|(_, target)| target);
    let probing = (most_probing, h.core.probing_transports());
    (target, h.core.counters.probe_packets_out, rtx_seen, probing)
}

#[test]
fn probe_on_a_wide_link_earns_the_upgrade() {
    // Estimate starts at 1 Mbit/s: layer 1 (~1 Mbit/s with the 15 % upgrade margin) does not
    // fit until a probe shows the 5 Mbit/s link carries it.
    let (target, probes, rtx_seen, probing) = probe_scenario(5_000_000, 4);
    assert!(probes > 0, "no probe sent");
    assert_eq!(
        probing,
        (1, 0),
        "the sweep visits the probing transport, and none once the upgrade is done"
    );
    assert_eq!(
        rtx_seen as u64, probes,
        "probe packets go out on the RTX stream"
    );
    assert_eq!(
        target,
        Some(SpatialLayer(1)),
        "upgrade after a successful probe"
    );
}

#[test]
fn probe_on_a_narrow_link_keeps_the_lower_layer() {
    // 700 kbit/s: the probe saturates, the estimate stays, the subscriber stays on layer 0,
    // and the failed probe backs off (2 s, then 4 s: three clusters at most in 8 s).
    let (target, probes, _, _) = probe_scenario(700_000, 8);
    assert!(probes > 0, "no probe sent");
    assert_eq!(target, Some(SpatialLayer(0)));
}

/// A host mute is enforced here: a muted publication reaches no subscriber, and forwarding
/// resumes (with a contiguous sequence) when the mute is lifted.
#[test]
fn a_muted_publication_is_not_forwarded_until_unmuted() {
    let mut h = Harness::new(2, SrtpProfile::Aes128CmHmacSha1_80);
    let mut seq = 1000u16;
    let mut send = |h: &mut Harness, n: usize| {
        let mut got = Vec::new();
        for _ in 0..n {
            let pkt = h.publisher_packet(seq, 3000 * seq as u32, seq == 1000, 120);
            seq = seq.wrapping_add(1);
            h.from_publisher(&pkt);
            let out = h.drain();
            got.extend(decrypt_all(h, &out));
        }
        got
    };
    assert_eq!(send(&mut h, 5).len(), 10, "forwarding before the mute");
    let now = h.now;
    let id = h.publication;
    h.core
        .handle_command(Command::SetPublicationMuted { id, muted: true }, now);
    assert!(
        send(&mut h, 5).is_empty(),
        "a muted publication reaches nobody"
    );
    h.core
        .handle_command(Command::SetPublicationMuted { id, muted: false }, now);
    let after = send(&mut h, 5);
    assert_eq!(
        after.len(),
        10,
        "forwarding resumes when the mute is lifted"
    );
}

/// Audio has no layers to switch: its subscriptions never make the edge ask the publisher for
/// a keyframe (a PLI on an audio SSRC), however long they run.
#[test]
fn an_audio_subscription_never_asks_its_publisher_for_a_keyframe() {
    const AUDIO_SSRC: u32 = 0x0A0D_1000;
    const OPUS_PT: u8 = 111;
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    let (pid, sid) = (PublicationId(7), SubscriptionId(8));
    h.publish(pid, MediaCodec::Audio, OPUS_PT, &[AUDIO_SSRC]);
    h.core.handle_command(
        Command::AddSubscription {
            id: sid,
            spec: SubscriptionSpec {
                transport: h.subscribers[0].transport,
                publication: pid,
                mid: "1".into(),
                ssrc: 0x3000_0000,
                rtx_ssrc: None,
                payload_type: OPUS_PT,
                rtx_payload_type: None,
                max_layer: Some(SpatialLayer(0)),
                paused: false,
            },
        },
        h.now,
    );
    let t0 = h.now;
    let (mut forwarded, mut audio_plis) = (0, 0);
    for i in 0..300u16 {
        h.now = t0 + Duration::from_millis(20 * u64::from(i));
        let mut buf = vec![0u8; MAX_OUT_HEADER + 80];
        let n = rtp::write_header(
            &mut buf,
            true,
            OPUS_PT,
            i,
            u32::from(i) * 960,
            AUDIO_SSRC,
            &rtp::OutExtensions::default(),
        );
        buf.truncate(n);
        buf.extend_from_slice(&[0x42; 80]);
        let data = h.publisher.srtp.encrypt_rtp(&buf).expect("encrypt");
        h.from_publisher(&data);
        h.core.handle_timeout(h.now);
        for t in h.drain() {
            if t.to == h.subscribers[0].addr {
                forwarded += usize::from(h.subscribers[0].srtp.decrypt_rtp(&t.data).is_ok());
                continue;
            }
            let Ok(plain) = h.publisher.srtp.decrypt_rtcp(&t.data) else {
                continue;
            };
            let mut raw = &plain[..];
            for p in rtcp::packet::unmarshal(&mut raw).expect("rtcp") {
                if let Some(pli) = p
                    .as_any()
                    .downcast_ref::<rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication>()
                {
                    audio_plis += usize::from(pli.media_ssrc == AUDIO_SSRC);
                }
            }
        }
    }
    assert!(
        forwarded >= 290,
        "audio reached the subscriber: {forwarded}"
    );
    assert_eq!(audio_plis, 0, "keyframe requests on the audio SSRC");
    assert_eq!(h.core.watched_subscriptions(), 0);
}

/// A video subscription's layer changes reach its session once each, and a subscription at
/// rest costs the per-tick sweeps nothing (it leaves the watch list once reported).
#[test]
fn layer_changes_are_reported_once_and_a_settled_subscription_leaves_the_watch_list() {
    let mut h = Harness::new(1, SrtpProfile::Aes128CmHmacSha1_80);
    let sid = h.subscribers[0].subscription.expect("subscribed");
    let t0 = h.now;
    let mut changes = Vec::new();
    let poll = |h: &mut Harness, changes: &mut Vec<_>| {
        h.core.handle_timeout(h.now);
        h.core.poll_transmits(&mut Vec::new());
        while let Some((_, e)) = h.core.poll_event() {
            if let Event::LayerChanged {
                subscription,
                current,
                target,
            } = e
            {
                assert_eq!(subscription, sid);
                changes.push((current, target));
            }
        }
    };
    // Two seconds of 30 fps video, a keyframe first.
    for i in 0..60u16 {
        h.now = t0 + Duration::from_millis(33 * u64::from(i));
        let data = h.publisher_packet(i, u32::from(i) * 3000, i == 0, 600);
        h.from_publisher(&data);
        poll(&mut h, &mut changes);
    }
    assert_eq!(
        changes.last(),
        Some(&(Some(SpatialLayer(0)), Some(SpatialLayer(0)))),
        "{changes:?}"
    );
    let settled = changes.len();
    assert_eq!(h.core.watched_subscriptions(), 0, "settled, not watched");
    // Capped to nothing (as a pause does): one more notice, then quiet again.
    h.core
        .handle_command(Command::SetMaxLayer { id: sid, max: None }, h.now);
    for i in 60..90u16 {
        h.now = t0 + Duration::from_millis(33 * u64::from(i));
        let data = h.publisher_packet(i, u32::from(i) * 3000, false, 600);
        h.from_publisher(&data);
        poll(&mut h, &mut changes);
    }
    assert!(changes.len() > settled, "the cap was reported: {changes:?}");
    assert_eq!(changes.last().map(|c| c.1), Some(None), "{changes:?}");
    assert_eq!(h.core.watched_subscriptions(), 0);
}

#[test]
fn a_burst_fanned_out_at_once_goes_subscriber_after_subscriber_with_what_each_got_one_by_one() {
    // What a subscriber sees of a packet: rewritten sequence, timestamp, marker, payload.
    type Seen = (u16, u32, bool, Vec<u8>);
    let seen = |h: &mut Harness, out: &[Transmit]| {
        let mut by_subscriber: Vec<Vec<Seen>> = vec![Vec::new(); h.subscribers.len()];
        for (i, plain) in decrypt_all(h, out) {
            let v = RtpView::parse(&plain).unwrap();
            by_subscriber[i].push((v.seq, v.timestamp, v.marker, v.payload().to_vec()));
        }
        by_subscriber
    };
    // A keyframe, then delta frames of four packets each.
    let plan: Vec<(u16, u32, bool)> = (0..12u16)
        .map(|k| (100 + k, u32::from(k / 4) * 3000, k == 0))
        .collect();
    let profile = SrtpProfile::AeadAes128Gcm;

    // Each packet's copies made as it arrives: the reference.
    let mut one_by_one = Harness::new(3, profile);
    let mut expected: Vec<Vec<Seen>> = vec![Vec::new(); 3];
    for &(seq, ts, key) in &plan {
        let p = one_by_one.publisher_packet(seq, ts, key, 300 + usize::from(seq));
        one_by_one.from_publisher(&p);
        let out = one_by_one.drain();
        for (i, got) in seen(&mut one_by_one, &out).into_iter().enumerate() {
            expected[i].extend(got);
        }
    }
    assert!(
        expected.iter().all(|e| e.len() == 12),
        "every packet to everyone"
    );

    // The same packets taken in as one burst, then fanned out when the shell asks.
    let mut burst = Harness::new(3, profile);
    for &(seq, ts, key) in &plan {
        let p = burst.publisher_packet(seq, ts, key, 300 + usize::from(seq));
        burst.from_publisher(&p);
    }
    assert_eq!(
        burst.core.queued_transmits(),
        36,
        "the copies to come count as queued before they are made"
    );
    let out = burst.drain();
    let order: Vec<SocketAddr> = out.iter().map(|t| t.to).collect();
    let want: Vec<SocketAddr> = burst
        .subscribers
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.addr, 12))
        .collect();
    assert_eq!(order, want, "subscriber after subscriber");
    assert_eq!(seen(&mut burst, &out), expected);
    assert_eq!(burst.core.queued_transmits(), 0);
}

#[test]
fn a_command_applies_after_the_copies_of_what_came_before_it() {
    let mut h = Harness::new(2, SrtpProfile::AeadAes128Gcm);
    let key = h.publisher_packet(1, 0, true, 200);
    h.from_publisher(&key);
    // The subscriber leaves after the keyframe came: it still gets its copy, as when copies
    // were made on arrival.
    let leaving = h.subscribers[1].subscription.unwrap();
    let now = h.now;
    h.core
        .handle_command(Command::RemoveSubscription { id: leaving }, now);
    let delta = h.publisher_packet(2, 3000, false, 200);
    h.from_publisher(&delta);
    let out = h.drain();
    let got: Vec<usize> = decrypt_all(&mut h, &out)
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        got,
        vec![0, 1, 0],
        "the keyframe to both, the delta to who stayed"
    );
}

#[test]
fn a_fan_out_taken_a_few_subscribers_at_a_time_stops_between_subscribers_and_resumes_there() {
    // What a subscriber sees of a packet: rewritten sequence, timestamp, marker, payload.
    type Seen = (usize, u16, u32, bool, Vec<u8>);
    let seen = |h: &mut Harness, out: &[Transmit]| -> Vec<Seen> {
        decrypt_all(h, out)
            .into_iter()
            .map(|(i, plain)| {
                let v = RtpView::parse(&plain).unwrap();
                (i, v.seq, v.timestamp, v.marker, v.payload().to_vec())
            })
            .collect()
    };
    // A four-packet keyframe, then a delta frame of two, to five subscribers.
    let plan: Vec<(u16, u32, bool)> = (0..6u16)
        .map(|k| (500 + k, if k < 4 { 0 } else { 3000 }, k == 0))
        .collect();
    let profile = SrtpProfile::AeadAes128Gcm;
    let feed = |h: &mut Harness| {
        for &(seq, ts, key) in &plan {
            let p = h.publisher_packet(seq, ts, key, 200 + usize::from(seq));
            h.from_publisher(&p);
        }
    };

    // The reference: the whole fan-out at once.
    let mut whole = Harness::new(5, profile);
    feed(&mut whole);
    let all = whole.drain();
    let expected = seen(&mut whole, &all);
    assert_eq!(expected.len(), 30, "every packet to everyone");

    let mut steps = Harness::new(5, profile);
    feed(&mut steps);
    let mut parts = Vec::new();
    loop {
        let mut out = Vec::new();
        let more = steps.core.poll_transmits_upto(&mut out, 2);
        parts.push(out);
        if !more {
            break;
        }
        assert_eq!(
            steps.core.queued_transmits(),
            30 - 12 * parts.len(),
            "the copies still to make count as queued"
        );
    }
    let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![12, 12, 6], "two subscribers' six copies a step");
    // Each copy decrypts once (the subscriber's replay window), so each part is read once.
    let mut joined = Vec::new();
    for (k, part) in parts.iter().enumerate() {
        let got = seen(&mut steps, part);
        let who: Vec<usize> = got.iter().map(|s| s.0).collect();
        let want: Vec<usize> = (2 * k..(2 * k + 2).min(5))
            .flat_map(|i| std::iter::repeat_n(i, 6))
            .collect();
        assert_eq!(who, want, "step {k}: whole subscribers, in their order");
        joined.extend(got);
    }
    assert!(joined == expected, "the same copies as at once");
    assert_eq!(steps.core.queued_transmits(), 0);
    let mut out = Vec::new();
    assert!(!steps.core.poll_transmits_upto(&mut out, 2));
    assert!(out.is_empty(), "nothing is made twice");
}

#[test]
fn a_fan_out_left_part_way_is_finished_before_the_next_input() {
    let mut h = Harness::new(3, SrtpProfile::AeadAes128Gcm);
    let key = h.publisher_packet(1, 0, true, 200);
    h.from_publisher(&key);
    let mut out = Vec::new();
    assert!(h.core.poll_transmits_upto(&mut out, 1), "copies left");
    // A packet comes before the shell asks for the rest: the keyframe's copies to the other
    // two are made first, then the delta's to all three.
    let delta = h.publisher_packet(2, 3000, false, 200);
    h.from_publisher(&delta);
    // A subscriber leaves before the delta's copies are asked for: it still gets the
    // keyframe and the delta, both taken in before it left.
    assert!(h.core.poll_transmits_upto(&mut out, 1), "copies left");
    let leaving = h.subscribers[2].subscription.unwrap();
    let now = h.now;
    h.core
        .handle_command(Command::RemoveSubscription { id: leaving }, now);
    out.extend(h.drain());
    let got: Vec<(usize, u16)> = decrypt_all(&mut h, &out)
        .into_iter()
        .map(|(i, plain)| (i, RtpView::parse(&plain).unwrap().seq))
        .collect();
    let first: Vec<(usize, u16)> = got.iter().take(3).copied().collect();
    assert_eq!(
        got.iter().map(|&(i, _)| i).collect::<Vec<_>>(),
        vec![0, 1, 2, 0, 1, 2],
        "the keyframe to everyone, then the delta to everyone"
    );
    // Each subscriber's sequence continues from its keyframe copy.
    for (i, seq) in first {
        assert!(
            got.contains(&(i, seq.wrapping_add(1))),
            "subscriber {i} got the delta right after the keyframe"
        );
    }
}

/// What a spread fan-out handed to its `send`: each call's copies, and whether a helper made
/// them.
fn spread_and_collect(h: &mut Harness, helpers: usize, step: usize) -> Vec<(bool, Vec<Transmit>)> {
    let helpers = crate::spread::Helpers::start(helpers, "test-fan-out").unwrap();
    let sent = std::sync::Mutex::new(Vec::new());
    let send = |t: &mut Vec<Transmit>| {
        let on_helper = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("test-fan-out"));
        sent.lock().unwrap().push((on_helper, t.clone()));
    };
    h.core.fan_out_spread(&helpers, step, &send);
    sent.into_inner().unwrap()
}

/// What a subscriber sees of a copy: rewritten sequence, timestamp, marker, payload.
type SeenCopy = (u16, u32, bool, Vec<u8>);

/// Each subscriber's copies, in the order that subscriber got them.
fn per_subscriber(h: &mut Harness, out: &[Transmit]) -> Vec<Vec<SeenCopy>> {
    let mut each = vec![Vec::new(); h.subscribers.len()];
    for (i, plain) in decrypt_all(h, out) {
        let v = RtpView::parse(&plain).unwrap();
        each[i].push((v.seq, v.timestamp, v.marker, v.payload().to_vec()));
    }
    each
}

#[test]
fn a_large_fan_out_spread_over_threads_gives_every_subscriber_the_copies_one_thread_would() {
    // Keyframes of 9 packets to 40 subscribers (360 copies: spread), each followed by a
    // 2-packet delta frame (80 copies: made by the caller alone), fanned out as the shell does,
    // a burst at a time. Which parts the helper makes depends on when it wakes, so bursts go
    // on until it has made some (the first, almost always).
    let burst = |k: u16, key: bool| -> Vec<(u16, u32, bool)> {
        let (first, n) = (k * 11 + if key { 0 } else { 9 }, if key { 9 } else { 2 });
        (0..n)
            .map(|i| {
                (
                    first + i,
                    u32::from(k) * 6000 + if key { 0 } else { 3000 },
                    key && i == 0,
                )
            })
            .collect()
    };
    let feed = |h: &mut Harness, burst: &[(u16, u32, bool)]| {
        for &(seq, ts, key) in burst {
            let p = h.publisher_packet(seq, ts, key, 300 + usize::from(seq % 100));
            h.from_publisher(&p);
        }
    };
    let profile = SrtpProfile::AeadAes128Gcm;
    let mut whole = Harness::new(40, profile);
    let mut spread = Harness::new(40, profile);
    let mut helped = 0;
    let mut k = 0;
    while k < 3 || (helped == 0 && k < 50) {
        let key = burst(k, true);
        let delta = burst(k, false);
        feed(&mut whole, &key);
        let mut all = whole.drain();
        feed(&mut whole, &delta);
        all.extend(whole.drain());
        let expected = per_subscriber(&mut whole, &all);
        assert!(
            expected.iter().all(|s| s.len() == 11),
            "every packet to everyone"
        );

        feed(&mut spread, &key);
        let key_sends = spread_and_collect(&mut spread, 1, 4);
        helped += key_sends.iter().filter(|(by_helper, _)| *by_helper).count();
        for (_, t) in &key_sends {
            assert!(
                t.len() <= 4 * 9 && t.len() % 9 == 0,
                "a send is at most 4 whole subscribers, got {} copies",
                t.len()
            );
        }
        feed(&mut spread, &delta);
        let delta_sends = spread_and_collect(&mut spread, 1, 4);
        assert!(
            delta_sends.iter().all(|(by_helper, _)| !by_helper),
            "a small fan-out is made by the caller"
        );
        let joined: Vec<Transmit> = key_sends
            .into_iter()
            .chain(delta_sends)
            .flat_map(|(_, t)| t)
            .collect();
        assert_eq!(joined.len(), 440);
        let got = per_subscriber(&mut spread, &joined);
        assert!(
            got == expected,
            "burst {k}: each subscriber got the same copies in order"
        );
        k += 1;
    }
    assert!(
        helped > 0,
        "the helper made parts of some keyframe in {k} bursts"
    );
    assert_eq!(
        spread.core.counters.packets_out,
        whole.core.counters.packets_out
    );
    assert_eq!(
        spread.core.counters.bytes_out,
        whole.core.counters.bytes_out
    );
    assert_eq!(spread.core.queued_transmits(), 0, "nothing left to make");
    assert!(
        spread_and_collect(&mut spread, 1, 4).is_empty(),
        "nothing is made twice"
    );
}

#[test]
fn subscribers_sharing_a_transport_are_served_by_one_thread() {
    let mut h = Harness::new(40, SrtpProfile::AeadAes128Gcm);
    // A second subscription to the same publication on subscriber 0's transport.
    let now = h.now;
    h.core.handle_command(
        Command::AddSubscription {
            id: SubscriptionId(3000),
            spec: SubscriptionSpec {
                transport: h.subscribers[0].transport,
                publication: h.publication,
                mid: "1".into(),
                ssrc: 0x3000_0000,
                rtx_ssrc: None,
                payload_type: VIDEO_PT,
                rtx_payload_type: None,
                max_layer: Some(SpatialLayer(0)),
                paused: false,
            },
        },
        now,
    );
    h.drain();
    for k in 0..9u16 {
        let p = h.publisher_packet(100 + k, 0, k == 0, 300);
        h.from_publisher(&p);
    }
    let sends = spread_and_collect(&mut h, 1, 4);
    assert!(sends.iter().all(|(by_helper, _)| !by_helper), "not spread");
    let joined: Vec<Transmit> = sends.into_iter().flat_map(|(_, t)| t).collect();
    let got = per_subscriber(&mut h, &joined);
    assert_eq!(
        got[0].len(),
        18,
        "both subscriptions of the shared transport"
    );
    assert!(
        got[1..].iter().all(|s| s.len() == 9),
        "the keyframe to everyone else"
    );
}
