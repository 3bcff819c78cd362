//! The edge's media side of cascade links against a real edge (real shards and UDP sockets)
//! and real QUIC links on loopback. The test plays the room's origin (upstream) and a child
//! edge of the room's fan-out tree (downstream):
//!
//! - a remote track the edge needs is subscribed upstream, layer by layer, on one flow;
//! - datagrams the origin sends on that flow reach the room's shard as a relayed publication,
//!   and a gap in them comes back up as a NACK;
//! - a child that subscribes to that track gets the same RTP bytes, re-stamped with its flow;
//! - the child wants layer 0 only, so the edge sends `layer_demand` {0} up the track's flow;
//! - when the upstream link drops the track stalls, and when it is back it is subscribed again,
//!   with the same demand right behind the new flow's subscribes.
//! - the other way: the origin's subscribe for a track of this edge may come before the session
//!   that published it has registered it here; it waits, and the track's media (only the
//!   demanded layer) goes up the flow once a real WebRTC publisher's track is registered.

mod common;

use cascade_proto::link::{
    ControlMessage, FlowId, Hello, Label, Layer, MediaDatagram, MediaFlags, NodeRole,
    PROTOCOL_VERSION,
};
use cascade_proto::quic::{ClusterCa, Link, LinkConfig, LinkEndpoint};
use cascade_proto::relay::LinkId;
use cascade_proto::room::TrackInfo;
use cascade_proto::wire::decode_datagram;
use cascade_proto::{ParticipantId, RoomId, TrackId, TrackKind, TrackSource};
use control_plane::token::{TokenSigner, TokenVerifier};
use edge_node::cascade::{CascadeMedia, LinkInput};
use edge_node::config::EdgeConfig;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn label(s: &str) -> Label {
    Label::new(s).unwrap()
}

fn hello(node: &str, role: NodeRole) -> Hello {
    Hello {
        node: label(node),
        region: label("eu"),
        role,
        version: PROTOCOL_VERSION,
    }
}

fn endpoint(ca: &ClusterCa, node: &str, role: NodeRole) -> Arc<LinkEndpoint> {
    let creds = ca.issue(&label(node)).unwrap();
    Arc::new(
        LinkEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &creds,
            LinkConfig::new(hello(node, role)),
        )
        .unwrap(),
    )
}

/// What the link task does for the edge: control stream ↔ CascadeMedia.
fn attach(cascade: Arc<CascadeMedia>, id: LinkId, link: Link) -> tokio::task::JoinHandle<()> {
    let Link {
        mut sender,
        mut receiver,
        media,
        ..
    } = link;
    let (tx, mut rx) = mpsc::channel::<ControlMessage>(256);
    tokio::spawn(async move {
        cascade.link_up(id, tx, media).await;
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sender.send(&m).await.is_err() {
                    return;
                }
            }
        });
        while let Ok(m) = receiver.recv().await {
            cascade.on_control(id, m).await;
        }
        writer.abort();
        cascade.link_down(id).await;
    })
}

/// The same for a link task that cannot await: inputs posted in order.
fn attach_posted(
    cascade: Arc<CascadeMedia>,
    id: LinkId,
    link: Link,
) -> tokio::task::JoinHandle<()> {
    let Link {
        mut sender,
        mut receiver,
        media,
        ..
    } = link;
    let (tx, mut rx) = mpsc::channel::<ControlMessage>(256);
    cascade.post(LinkInput::Up {
        link: id,
        control: tx,
        media,
    });
    tokio::spawn(async move {
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sender.send(&m).await.is_err() {
                    return;
                }
            }
        });
        while let Ok(msg) = receiver.recv().await {
            cascade.post(LinkInput::Control { link: id, msg });
        }
        writer.abort();
        cascade.post(LinkInput::Down { link: id });
    })
}

/// A real edge (two shards, its own in-process room state) and the signer of the tokens it
/// accepts.
async fn start_edge() -> (edge_node::app::Running, TokenSigner) {
    let signer = TokenSigner::generate("test");
    let mut verifier = TokenVerifier::new();
    verifier.add_key(signer.kid(), &signer.public_key());
    let running = edge_node::app::start(
        EdgeConfig {
            http: "127.0.0.1:0".parse().unwrap(),
            udp: "127.0.0.1:0".parse().unwrap(),
            workers: 2,
            ..Default::default()
        },
        verifier,
        None,
    )
    .await
    .unwrap();
    (running, signer)
}

async fn accept(ep: &LinkEndpoint) -> Link {
    let pending = tokio::time::timeout(WAIT, ep.accept())
        .await
        .expect("a dial in time")
        .expect("endpoint open");
    pending.handshake().await.expect("handshake")
}

async fn recv_control(link: &mut Link) -> ControlMessage {
    tokio::time::timeout(WAIT, link.receiver.recv())
        .await
        .expect("a control message in time")
        .expect("control stream open")
}

/// Reads the subscribes the edge sends until it has `layers` of them; returns the flow.
async fn subscribes(link: &mut Link, room: &RoomId, track: TrackId, layers: usize) -> FlowId {
    let mut flow = None;
    let mut seen = Vec::new();
    while seen.len() < layers {
        if let ControlMessage::Subscribe {
            flow: f,
            room: r,
            track: t,
            layer,
        } = recv_control(link).await
        {
            assert_eq!((&r, t), (room, track));
            assert!(flow.is_none_or(|x| x == f), "one flow per track");
            flow = Some(f);
            seen.push(layer.index());
        }
    }
    seen.sort();
    assert_eq!(seen, (0..layers as u8).collect::<Vec<_>>());
    flow.unwrap()
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 3000).to_be_bytes());
    p.extend_from_slice(&0x5555_0000u32.to_be_bytes());
    // A VP8 delta-frame descriptor and some payload.
    p.extend_from_slice(&[0x10, 0x01, 0xab, 0xcd]);
    p.extend_from_slice(&[seq as u8; 40]);
    p
}

fn send_media(link: &Link, flow: FlowId, seq: u16) {
    let p = rtp(seq);
    let _ = link.media.send(&MediaDatagram {
        flow,
        layer: Layer::new(0).unwrap(),
        flags: MediaFlags {
            keyframe: seq == 0,
            end_of_frame: true,
            retransmission: false,
        },
        rtp: &p,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_tracks_come_down_the_link_and_go_on_to_children() {
    let (running, _signer) = start_edge().await;
    let edge = running.edge.clone();
    let cascade = edge.cascade.clone();
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let origin_ep = endpoint(&ca, "origin-1", NodeRole::Origin);
    let edge_ep = endpoint(&ca, "edge-a", NodeRole::Edge);
    let child_ep = endpoint(&ca, "edge-c", NodeRole::Edge);
    let origin_addr = origin_ep.local_addr().unwrap();
    let edge_addr = edge_ep.local_addr().unwrap();

    // The edge dials the origin; the test keeps the origin's side.
    let (edge_side, mut origin) = tokio::join!(
        async {
            edge_ep
                .connect(origin_addr, &label("origin-1"))
                .await
                .unwrap()
        },
        accept(&origin_ep)
    );
    let upstream = LinkId(1);
    let up_task = attach(cascade.clone(), upstream, edge_side);
    let room = RoomId::new("cascade-room").unwrap();
    let track = TrackId(9);
    cascade.set_room_link(&room, upstream).await;
    // Give link_up a moment to register (it runs in the attach task).
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A local participant consumes a track published elsewhere: 2 layers come down.
    let info = TrackInfo {
        id: track,
        participant: ParticipantId(77),
        source: TrackSource::Camera,
        kind: TrackKind::Video,
        codec: "VP8".into(),
        layers: 2,
        muted: false,
        host_muted: false,
    };
    let publ = cascade
        .ensure_remote(&room, &info)
        .await
        .expect("the room has a link");
    assert!(CascadeMedia::is_relayed(publ.id));
    assert_eq!(
        edge.publication(&room, track).map(|p| p.id),
        Some(publ.id),
        "sessions find it like a local publication"
    );
    let flow = subscribes(&mut origin, &room, track, 2).await;
    assert_eq!(cascade.remote_is_live(&room, track), Some(true));

    // A child edge of the tree subscribes to the same track through this edge.
    let (child_side, edge_child_side) = tokio::join!(
        async { child_ep.connect(edge_addr, &label("edge-a")).await.unwrap() },
        accept(&edge_ep)
    );
    let mut child = child_side;
    let child_link = LinkId(2);
    let _child_task = attach_posted(cascade.clone(), child_link, edge_child_side);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let child_flow = FlowId::new(300).unwrap();
    child
        .sender
        .send(&ControlMessage::Subscribe {
            flow: child_flow,
            room: room.clone(),
            track,
            layer: Layer::new(0).unwrap(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The origin sends media, skipping seq 5 (lost): it reaches the shard, the child gets the
    // same bytes on its flow, and the gap is NACKed up the link.
    for seq in 0..40u16 {
        if seq != 5 {
            send_media(&origin, flow, seq);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bytes = tokio::time::timeout(WAIT, child.media.recv())
        .await
        .expect("media reaches the child in time")
        .unwrap();
    let d = decode_datagram(&bytes).unwrap();
    assert_eq!(d.flow, child_flow, "re-stamped with the child's flow");
    let seq = u16::from_be_bytes([d.rtp[2], d.rtp[3]]);
    assert_eq!(d.rtp, rtp(seq).as_slice(), "the RTP packet is untouched");
    // The child takes layer 0 only, and no local subscriber wants more: the edge demands
    // layer 0 of the track's flow upstream.
    let (mut nacked, mut demanded) = (false, false);
    while !(nacked && demanded) {
        match recv_control(&mut origin).await {
            ControlMessage::LayerDemand { flow: f, layers } => {
                assert_eq!((f, layers.0), (flow, 0b01), "layer 0 only");
                demanded = true;
            }
            ControlMessage::Nack {
                flow: f,
                layer,
                entries,
            } => {
                assert_eq!((f, layer.index()), (flow, 0));
                assert!(entries.iter().any(|e| e.pid == 5), "{entries:?}");
                nacked = true;
            }
            // Keyframe requests for the child's subscribe: fine.
            ControlMessage::KeyframeRequest { flow: f, .. } => assert_eq!(f, flow),
            other => panic!("unexpected {other:?}"),
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while edge.metrics.media.relayed_in.load(Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relayed packets counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(edge.metrics.media.link_packets_out.load(Relaxed) > 0);
    // Media on a flow the edge never subscribed is dropped and counted.
    let deadline = tokio::time::Instant::now() + WAIT;
    while edge.metrics.cascade.unsolicited.load(Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "unsolicited media counted"
        );
        send_media(&origin, FlowId::new(999).unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The upstream link drops: the track stalls...
    origin
        .media
        .close(cascade_proto::link::GoodbyeCode::Normal, "test");
    drop(origin);
    let _ = tokio::time::timeout(WAIT, up_task).await;
    assert_eq!(cascade.remote_is_live(&room, track), Some(false));
    // ...and is subscribed again when the edge is linked to the origin again.
    let (edge_side, mut origin) = tokio::join!(
        async {
            edge_ep
                .connect(origin_addr, &label("origin-1"))
                .await
                .unwrap()
        },
        accept(&origin_ep)
    );
    let _up_task = attach(cascade.clone(), upstream, edge_side);
    let flow_again = subscribes(&mut origin, &room, track, 2).await;
    assert_eq!(cascade.remote_is_live(&room, track), Some(true));
    // The demand follows the new flow's subscribes: upstream does not fall back to every layer.
    loop {
        match recv_control(&mut origin).await {
            ControlMessage::LayerDemand { flow: f, layers } => {
                assert_eq!((f, layers.0), (flow_again, 0b01));
                break;
            }
            ControlMessage::KeyframeRequest { .. } | ControlMessage::Nack { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Media on the new flow reaches the child again.
    while child.media.recv().now_or_never_ready() {}
    let pump_origin = origin.media.clone();
    let pump = tokio::spawn(async move {
        for seq in 100..400u16 {
            let p = rtp(seq);
            let _ = pump_origin.send(&MediaDatagram {
                flow: flow_again,
                layer: Layer::new(0).unwrap(),
                flags: MediaFlags::default(),
                rtp: &p,
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    loop {
        let bytes = tokio::time::timeout(WAIT, child.media.recv())
            .await
            .expect("media flows again after the link is back")
            .unwrap();
        let d = decode_datagram(&bytes).unwrap();
        if u16::from_be_bytes([d.rtp[2], d.rtp[3]]) >= 100 {
            break;
        }
    }
    pump.abort();

    // The last consumer goes: the edge unsubscribes both layers upstream.
    cascade.release_remote(&room, track).await;
    let mut gone = Vec::new();
    while gone.len() < 2 {
        if let ControlMessage::Unsubscribe { flow: f, layer } = recv_control(&mut origin).await {
            assert_eq!(f, flow_again);
            gone.push(layer.index());
        }
    }
    assert_eq!(edge.publication(&room, track).map(|p| p.id), None);
}

/// The origin learns of an edge's track from the edge's `publish` request and may relay a
/// subscribe for it before the session that published it has the origin's reply and registers
/// the track on its edge (under load this happened: the video never left its edge). Here the
/// test, as the origin, subscribes first, with a layer demand; then a real WebRTC publisher
/// (the load tester's simulcast camera) publishes the track on the edge. The waiting
/// subscribe is bound when the track is registered: its media comes up the flow, only the
/// demanded layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_subscribe_that_comes_before_its_track_is_bound_when_it_is_published() {
    let (running, signer) = start_edge().await;
    let edge = running.edge.clone();
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let origin_ep = endpoint(&ca, "origin-1", NodeRole::Origin);
    let edge_ep = endpoint(&ca, "edge-a", NodeRole::Edge);
    let (edge_side, mut origin) = tokio::join!(
        async {
            edge_ep
                .connect(origin_ep.local_addr().unwrap(), &label("origin-1"))
                .await
                .unwrap()
        },
        accept(&origin_ep)
    );
    let _up_task = attach_posted(edge.cascade.clone(), LinkId(1), edge_side);

    // The room's first track gets id 1: the camera's video (its m-line comes first).
    let room = RoomId::new("early-room").unwrap();
    let track = TrackId(1);
    let flow = FlowId::new(700).unwrap();
    common::subscribe_layers(&mut origin, flow, &room, track, 0..3).await;
    origin
        .sender
        .send(&ControlMessage::LayerDemand {
            flow,
            layers: cascade_proto::link::LayerSet(0b001),
        })
        .await
        .unwrap();
    // The subscribes are read and kept before anything is published.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(edge.publication(&room, track).map(|p| p.id), None);

    let token = signer.mint(
        room.clone(),
        cascade_proto::Identity::new("camera").unwrap(),
        cascade_proto::Role::Host,
        None,
        control_plane::token::unix_now(),
        600,
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let publisher = common::loadtest_participant(
        running.http,
        &room,
        token,
        loadtest::participant::Spec {
            index: 0,
            group: "camera".into(),
            publish: loadtest::scenario::Publish::Camera,
            subscribe: false,
            max_layer: None,
            max_layer_changes: None,
        },
        stop,
    );

    // 50 datagrams of the video on the flow, all of them layer 0 (the demand was kept too).
    let mut layers = [0u32; 3];
    while layers.iter().sum::<u32>() < 50 {
        assert!(!publisher.is_finished(), "the publisher ended early");
        let bytes = tokio::time::timeout(WAIT, origin.media.recv())
            .await
            .expect("the track's media comes up the flow subscribed before it was published")
            .unwrap();
        let d = decode_datagram(&bytes).unwrap();
        assert_eq!(d.flow, flow);
        layers[usize::from(d.layer.index())] += 1;
    }
    let video = edge
        .publication(&room, track)
        .expect("the track is registered");
    assert_eq!(
        (video.kind, video.layers),
        (edge_node::sdp::MediaKind::Video, 3)
    );
    assert_eq!(layers[1..], [0, 0], "only the demanded layer 0: {layers:?}");

    stop_tx.send(true).unwrap();
    let r = tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "the publisher: {r:?}");
}

/// Drains datagrams already queued without waiting.
trait NowOrNever {
    fn now_or_never_ready(self) -> bool;
}

impl<F: std::future::Future> NowOrNever for F {
    fn now_or_never_ready(self) -> bool {
        use futures_util::FutureExt;
        self.now_or_never().is_some()
    }
}
