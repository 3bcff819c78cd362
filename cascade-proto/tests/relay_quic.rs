//! A relay over real QUIC links on loopback: edge A publishes, the origin relays through a
//! [`RelayNode`], edges B and C subscribe. Checks the subscription aggregation on the wire
//! (A sees one subscribe per layer), re-stamped datagrams at B and C with the RTP bytes intact,
//! keyframe requests and NACKs travelling up, and media nobody asked for being dropped.

use cascade_proto::link::{
    ControlMessage, FlowId, Hello, Label, Layer, MediaDatagram, MediaFlags, NackEntry, NodeRole,
    PROTOCOL_VERSION,
};
use cascade_proto::quic::{ClusterCa, Link, LinkConfig, LinkEndpoint, RelayNode};
use cascade_proto::relay::{LinkId, RelayConfig};
use cascade_proto::wire::decode_datagram;
use cascade_proto::{RoomId, TrackId};
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

fn rtp(seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
    p.extend_from_slice(payload);
    p
}

/// The origin side of one link, as the link task would run it: the control stream feeds the
/// relay node, the relay's control messages go out on the stream.
fn serve_link(node: RelayNode, id: LinkId, link: Link) {
    let Link {
        mut sender,
        mut receiver,
        media,
        ..
    } = link;
    let (tx, mut rx) = mpsc::channel::<ControlMessage>(256);
    node.link_up(id, tx, media);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sender.send(&m).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(m) = receiver.recv().await {
            if let Err(e) = node.on_control(id, m) {
                assert!(!e.is_fatal(), "unexpected protocol error: {e}");
            }
        }
        node.link_down(id);
    });
}

/// Edge `name` dialled into the origin; returns its side of the link.
async fn edge(ca: &ClusterCa, name: &str, origin: std::net::SocketAddr) -> Link {
    let creds = ca.issue(&label(name)).unwrap();
    let ep = LinkEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &creds,
        LinkConfig::new(hello(name, NodeRole::Edge)),
    )
    .unwrap();
    let link = ep.connect(origin, &label("origin-1")).await.unwrap();
    // The endpoint must outlive the link: leak it for the test's duration.
    std::mem::forget(ep);
    link
}

async fn recv_control(link: &mut Link) -> ControlMessage {
    tokio::time::timeout(WAIT, link.receiver.recv())
        .await
        .expect("a control message in time")
        .expect("control stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_relays_through_the_origin_over_quic() {
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let origin_creds = ca.issue(&label("origin-1")).unwrap();
    let origin_ep = Arc::new(
        LinkEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &origin_creds,
            LinkConfig::new(hello("origin-1", NodeRole::Origin)),
        )
        .unwrap(),
    );
    let origin_addr = origin_ep.local_addr().unwrap();
    let node = RelayNode::new(RelayConfig::default());
    let room = RoomId::new("r1").unwrap();
    let track = TrackId(5);
    // Links are numbered in accept order: A first (the source), then B, then C.
    {
        let node = node.clone();
        let ep = origin_ep.clone();
        tokio::spawn(async move {
            let mut n = 1;
            while let Some(p) = ep.accept().await {
                let link = p.handshake().await.expect("handshake");
                serve_link(node.clone(), LinkId(n), link);
                n += 1;
            }
        });
    }
    let mut a = edge(&ca, "edge-a", origin_addr).await;
    let mut b = edge(&ca, "edge-b", origin_addr).await;
    let mut c = edge(&ca, "edge-c", origin_addr).await;
    node.set_track_source(room.clone(), track, LinkId(1));

    // B wants layers 0 and 1, C layer 1: A must see exactly one subscribe per layer.
    let sub = |flow: u32, layer: u8| ControlMessage::Subscribe {
        flow: FlowId::new(flow).unwrap(),
        room: room.clone(),
        track,
        layer: Layer::new(layer).unwrap(),
    };
    b.sender.send(&sub(10, 0)).await.unwrap();
    b.sender.send(&sub(10, 1)).await.unwrap();
    c.sender.send(&sub(20, 1)).await.unwrap();
    let mut up_flow = None;
    let mut subscribed = Vec::new();
    while subscribed.len() < 2 {
        match recv_control(&mut a).await {
            ControlMessage::Subscribe {
                flow,
                room: r,
                track: t,
                layer,
            } => {
                assert_eq!((r.as_str(), t), ("r1", track));
                assert!(up_flow.is_none_or(|f| f == flow), "one flow per track");
                up_flow = Some(flow);
                subscribed.push(layer.index());
            }
            ControlMessage::KeyframeRequest { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    subscribed.sort();
    assert_eq!(subscribed, vec![0, 1], "one subscribe per layer");
    let up_flow = up_flow.unwrap();

    // A sends layer-1 packets (datagrams are unreliable: keep sending until both arrive).
    let sender = a.media.clone();
    let pump = tokio::spawn(async move {
        for seq in 0..500u16 {
            let p = rtp(seq, b"relayed payload");
            let d = MediaDatagram {
                flow: up_flow,
                layer: Layer::new(1).unwrap(),
                flags: MediaFlags {
                    keyframe: seq == 0,
                    end_of_frame: true,
                    retransmission: false,
                },
                rtp: &p,
            };
            if sender.send(&d).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for (link, flow) in [(&b, 10), (&c, 20)] {
        let bytes = tokio::time::timeout(WAIT, link.media.recv())
            .await
            .expect("a relayed datagram in time")
            .unwrap();
        let d = decode_datagram(&bytes).unwrap();
        assert_eq!(d.flow.get(), flow, "re-stamped with the subscriber's flow");
        assert_eq!(d.layer.index(), 1);
        assert!(d.flags.end_of_frame);
        let seq = u16::from_be_bytes([d.rtp[2], d.rtp[3]]);
        assert_eq!(
            d.rtp,
            rtp(seq, b"relayed payload").as_slice(),
            "RTP untouched"
        );
    }

    // A keyframe request from B and one from C within the interval: one reaches A.
    let kf = |flow: u32| ControlMessage::KeyframeRequest {
        flow: FlowId::new(flow).unwrap(),
        layer: Layer::new(1).unwrap(),
    };
    // Past the subscribe-time requests, which A reads and sets aside first.
    tokio::time::sleep(Duration::from_millis(350)).await;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(100), a.receiver.recv()).await {
        assert!(
            matches!(m, Ok(ControlMessage::KeyframeRequest { .. })),
            "only subscribe-time keyframe requests are pending, got {m:?}"
        );
    }
    b.sender.send(&kf(10)).await.unwrap();
    c.sender.send(&kf(20)).await.unwrap();
    // A NACK for a sequence number the relay never saw goes up to A.
    b.sender
        .send(&ControlMessage::Nack {
            flow: FlowId::new(10).unwrap(),
            layer: Layer::new(1).unwrap(),
            entries: vec![NackEntry {
                pid: 60_000,
                blp: 0,
            }],
        })
        .await
        .unwrap();
    let mut keyframe_requests = 0;
    loop {
        match recv_control(&mut a).await {
            ControlMessage::KeyframeRequest { flow, layer } => {
                assert_eq!((flow, layer.index()), (up_flow, 1));
                keyframe_requests += 1;
            }
            ControlMessage::Nack {
                flow,
                layer,
                entries,
            } => {
                assert_eq!((flow, layer.index()), (up_flow, 1));
                assert_eq!(
                    entries,
                    vec![NackEntry {
                        pid: 60_000,
                        blp: 0
                    }]
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(keyframe_requests, 1, "coalesced into one upstream request");
    pump.abort();

    // C sends media on A's flow id: it is not the source, so it is dropped and counted.
    let p = rtp(1, b"spoofed");
    let spoof = MediaDatagram {
        flow: up_flow,
        layer: Layer::new(1).unwrap(),
        flags: MediaFlags::default(),
        rtp: &p,
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.counters().unsolicited == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "spoofed media counted"
        );
        c.media.send(&spoof).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // B and C leave: A is told to stop both layers.
    b.sender
        .send(&ControlMessage::Unsubscribe {
            flow: FlowId::new(10).unwrap(),
            layer: Layer::new(0).unwrap(),
        })
        .await
        .unwrap();
    drop(b);
    let mut unsubscribed = Vec::new();
    drop(c);
    while unsubscribed.len() < 2 {
        if let ControlMessage::Unsubscribe { flow, layer } = recv_control(&mut a).await {
            assert_eq!(flow, up_flow);
            unsubscribed.push(layer.index());
        }
    }
    unsubscribed.sort();
    assert_eq!(unsubscribed, vec![0, 1]);
}
