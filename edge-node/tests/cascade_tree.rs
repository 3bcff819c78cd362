//! Media along a room's fan-out tree, with a real origin (`origin_server` and its relay), two
//! real edges and real QUIC links on loopback, in one process:
//!
//! ```text
//!   edge A (played by the test: publishes a 2-layer track, pumps RTP)
//!      |
//!   origin ---- edge R (a participant consuming the track)
//!      :            |   (through a UDP proxy the test can cut)
//!      :        edge C (a participant consuming the track; media parent R)
//!      :            |
//!      :        edge D (played by the test: a child of C, measures arrivals)
//! ```
//!
//! - C's track comes through R, not the origin: the origin's relay sends each datagram once
//!   (to R), and R counts packets relayed to its child;
//! - the proxy drops everything (R unreachable): C falls back to the origin and D's media
//!   resumes; the gap is printed, not asserted;
//! - the proxy lets packets through again: C goes back to R;
//! - a child subscribing to an unknown track or room gets `subscribe_refused` with a reason,
//!   and its other flow keeps flowing; a peer that is not an edge is refused by an edge.

use cascade_proto::link::{
    ControlMessage, FlowId, GoodbyeCode, Hello, Label, Layer, MediaDatagram, MediaFlags, NodeRole,
    PROTOCOL_VERSION,
};
use cascade_proto::quic::{ClusterCa, Link, LinkConfig, LinkEndpoint, NodeCredentials};
use cascade_proto::room::{EdgeToOrigin, Intent, OriginToEdge, Reply, RequestId};
use cascade_proto::wire::decode_datagram;
use cascade_proto::{Identity, Role, RoomId, TrackId, TrackSource};
use control_plane::token::{TokenSigner, TokenVerifier};
use edge_node::app::{Origins, Running};
use edge_node::config::EdgeConfig;
use edge_node::origin_server::{OriginRelay, OriginSettings};
use edge_node::tree::{MediaParent, ParentChange};
use edge_node::uplink::{OriginAddr, OriginDirectory};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

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

fn raw_endpoint(ca: &ClusterCa, node: &str, role: NodeRole) -> LinkEndpoint {
    raw_endpoint_with(&ca.issue(&label(node)).unwrap(), node, role)
}

fn raw_endpoint_with(creds: &NodeCredentials, node: &str, role: NodeRole) -> LinkEndpoint {
    LinkEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        creds,
        LinkConfig::new(hello(node, role)),
    )
    .unwrap()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real edge linked to the origin over QUIC.
async fn start_edge(
    ca: &ClusterCa,
    node: &str,
    origin: &OriginAddr,
    parents: Option<mpsc::Receiver<ParentChange>>,
) -> Running {
    let config = EdgeConfig {
        http: "127.0.0.1:0".parse().unwrap(),
        udp: "127.0.0.1:0".parse().unwrap(),
        cascade: "127.0.0.1:0".parse().unwrap(),
        workers: 1,
        ..Default::default()
    };
    let creds = ca.issue(&label(node)).unwrap();
    let endpoint = edge_node::app::edge_endpoint(&config, &creds, node, "eu").unwrap();
    let signer = TokenSigner::generate("test");
    let mut verifier = TokenVerifier::new();
    verifier.add_key(signer.kid(), &signer.public_key());
    edge_node::app::start_with(
        config,
        verifier,
        None,
        Origins::Linked {
            endpoint,
            directory: OriginDirectory::Static(origin.clone()),
            parents,
        },
    )
    .await
    .unwrap()
}

/// Joins a participant on a real edge through its hub (the room protocol to the origin).
async fn join(running: &Running, room: &RoomId, who: &str) {
    let (tx, mut rx) = mpsc::channel(1024);
    let reply = tokio::time::timeout(
        WAIT,
        running.edge.hub.request(
            room,
            Intent::Join {
                identity: Identity::new(who).unwrap(),
                role: Role::Host,
                name: who.into(),
            },
            Some(tx),
        ),
    )
    .await
    .expect("join in time")
    .expect("origin reachable");
    assert!(matches!(reply, Reply::Joined(_)), "{reply:?}");
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
}

/// A UDP forwarder between one client and `target` that the test can cut.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

async fn proxy(target: SocketAddr) -> Proxy {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(target).await.unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    {
        let (front, back, cut, client) = (front.clone(), back.clone(), cut.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if !cut.load(Relaxed) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
    }
    {
        let (front, cut) = (front.clone(), cut.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let (false, Some(to)) = (cut.load(Relaxed), to) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    Proxy {
        addr: front.local_addr().unwrap(),
        cut,
    }
}

fn rtp(seq: u16, layer: u8) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 3000).to_be_bytes());
    p.extend_from_slice(&(0x5555_0000u32 + u32::from(layer)).to_be_bytes());
    p.extend_from_slice(&[0x10, 0x01, 0xab, 0xcd]);
    p.extend_from_slice(&[seq as u8; 200]);
    p
}

/// Edge A, played by the test: attaches to the origin, joins, publishes a 2-layer VP8 track
/// and sends RTP on whatever flows the origin subscribes (every 10 ms per layer).
async fn publisher(creds: &NodeCredentials, origin: &OriginAddr, room: &RoomId) -> TrackId {
    let ep = raw_endpoint_with(creds, "edge-a", NodeRole::Edge);
    let mut link = ep.connect(origin.addr, &origin.node).await.unwrap();
    let send = |id: u64, intent: Intent| {
        ControlMessage::ToOrigin(EdgeToOrigin::Request {
            id: RequestId(id),
            room: room.clone(),
            intent,
        })
    };
    link.sender
        .send(&ControlMessage::ToOrigin(EdgeToOrigin::Attach {
            incarnation: 7,
        }))
        .await
        .unwrap();
    let join = Intent::Join {
        identity: Identity::new("alice").unwrap(),
        role: Role::Host,
        name: "alice".into(),
    };
    link.sender.send(&send(1, join)).await.unwrap();
    let mut me = None;
    let mut track = None;
    while track.is_none() {
        let msg = tokio::time::timeout(WAIT, link.receiver.recv())
            .await
            .expect("origin answers")
            .unwrap();
        match msg {
            ControlMessage::ToEdge(OriginToEdge::Reply {
                reply: Reply::Joined(s),
                ..
            }) => {
                me = Some(s.you.id);
                let publish = Intent::Publish {
                    participant: s.you.id,
                    source: TrackSource::Camera,
                    codec: "VP8".into(),
                    layers: 2,
                };
                link.sender.send(&send(2, publish)).await.unwrap();
            }
            ControlMessage::ToEdge(OriginToEdge::Reply {
                reply: Reply::Published { track: t },
                ..
            }) => track = Some(t.id),
            _ => {}
        }
    }
    assert!(me.is_some());
    let flows: Arc<Mutex<HashMap<u8, FlowId>>> = Arc::default();
    let Link {
        mut receiver,
        media,
        sender,
        ..
    } = link;
    {
        let flows = flows.clone();
        tokio::spawn(async move {
            let _keep = (ep, sender);
            while let Ok(msg) = receiver.recv().await {
                match msg {
                    ControlMessage::Subscribe { flow, layer, .. } => {
                        flows.lock().unwrap().insert(layer.index(), flow);
                    }
                    ControlMessage::Unsubscribe { flow, layer } => {
                        let mut f = flows.lock().unwrap();
                        if f.get(&layer.index()) == Some(&flow) {
                            f.remove(&layer.index());
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut seq = 0u16;
        loop {
            let now: Vec<(u8, FlowId)> = flows
                .lock()
                .unwrap()
                .iter()
                .map(|(l, f)| (*l, *f))
                .collect();
            for (layer, flow) in now {
                let p = rtp(seq, layer);
                let _ = media.send(&MediaDatagram {
                    flow,
                    layer: Layer::new(layer).unwrap(),
                    flags: MediaFlags {
                        keyframe: seq.is_multiple_of(50),
                        end_of_frame: true,
                        retransmission: false,
                    },
                    rtp: &p,
                });
            }
            seq = seq.wrapping_add(1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    track.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_follows_the_tree_falls_back_to_the_origin_and_returns() {
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let relay = OriginRelay::new();
    let origin = edge_node::origin_server::start(
        OriginSettings {
            cascade: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            node: label("origin-1"),
            region: label("eu"),
            credentials: ca.issue(&label("origin-1")).unwrap(),
            grace: edge_node::origin_server::DEFAULT_GRACE,
            rooms: origin::RoomConfig::default(),
        },
        Arc::new(relay.clone()),
    )
    .await
    .unwrap();
    let origin_addr = OriginAddr {
        node: label("origin-1"),
        addr: origin.cascade,
    };
    let room = RoomId::new("tree-room").unwrap();
    let track = publisher(&ca.issue(&label("edge-a")).unwrap(), &origin_addr, &room).await;

    let r = start_edge(&ca, "edge-r", &origin_addr, None).await;
    let (parents, parent_rx) = mpsc::channel(8);
    let c = start_edge(&ca, "edge-c", &origin_addr, Some(parent_rx)).await;
    let r_url = r
        .cascade_url
        .clone()
        .expect("a linked edge has a cascade URL");
    assert!(r_url.starts_with("quic://edge-r@127.0.0.1:"), "{r_url}");
    let r_addr = OriginAddr::parse(&r_url).unwrap();

    // A peer that is not an edge cannot link to an edge.
    {
        let ep = raw_endpoint(&ca, "origin-x", NodeRole::Origin);
        let mut l = ep.connect(r_addr.addr, &label("edge-r")).await.unwrap();
        match tokio::time::timeout(WAIT, l.receiver.recv()).await.unwrap() {
            Ok(ControlMessage::Goodbye { code, reason }) => {
                assert_eq!(code, GoodbyeCode::BadHello);
                assert!(reason.contains("child edges"), "{reason}");
            }
            other => panic!("expected a goodbye, got {other:?}"),
        }
    }

    join(&r, &room, "rita").await;
    join(&c, &room, "carl").await;
    // C's media parent for the room is R, reached through the proxy.
    let cut = proxy(r_addr.addr).await;
    parents
        .send(ParentChange {
            room: room.clone(),
            parent: MediaParent::Edge(OriginAddr {
                node: label("edge-r"),
                addr: cut.addr,
            }),
        })
        .await
        .unwrap();
    eventually("C links to its parent edge", || {
        c.edge.metrics.cascade.parent_links.load(Relaxed) == 1
    })
    .await;
    let via_r = c.edge.cascade.room_media_link(&room).unwrap();

    // Local consumers on R and C.
    let info = r.edge.hub.track_info(&room, track).unwrap().unwrap();
    r.edge.cascade.ensure_remote(&room, &info).await.unwrap();
    let info = c.edge.hub.track_info(&room, track).unwrap().unwrap();
    c.edge.cascade.ensure_remote(&room, &info).await.unwrap();
    assert_eq!(c.edge.cascade.remote_is_live(&room, track), Some(true));

    // D, a child of C, subscribes to both layers and records when datagrams arrive.
    let d_ep = raw_endpoint(&ca, "edge-d", NodeRole::Edge);
    let c_addr = OriginAddr::parse(c.cascade_url.as_ref().unwrap()).unwrap();
    let mut d = d_ep.connect(c_addr.addr, &label("edge-c")).await.unwrap();
    let flow = FlowId::new(500).unwrap();
    for layer in 0..2 {
        d.sender
            .send(&ControlMessage::Subscribe {
                flow,
                room: room.clone(),
                track,
                layer: Layer::new(layer).unwrap(),
            })
            .await
            .unwrap();
    }
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    {
        let (media, arrivals) = (d.media.clone(), arrivals.clone());
        tokio::spawn(async move {
            while let Ok(bytes) = media.recv().await {
                if decode_datagram(&bytes).is_ok_and(|dg| dg.flow == flow) {
                    arrivals.lock().unwrap().push(Instant::now());
                }
            }
        });
    }
    let count = |a: &Arc<Mutex<Vec<Instant>>>| a.lock().unwrap().len();
    eventually("media reaches D through R and C", || count(&arrivals) > 100).await;
    eventually("R counts packets relayed to its child", || {
        r.edge.metrics.media.link_packets_out.load(Relaxed) > 0
            && r.edge.metrics.cascade.child_links.load(Relaxed) == 1
    })
    .await;

    // The origin sends each datagram once: to R (C's copy fans out at R).
    let ratio = |secs: u64| {
        let relay = relay.clone();
        async move {
            let before = relay.0.counters();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let after = relay.0.counters();
            let din = after.datagrams_in - before.datagrams_in;
            let dout = after.datagrams_out - before.datagrams_out;
            (din, dout)
        }
    };
    let (din, dout) = ratio(1).await;
    println!("tree: origin relay in {din}, out {dout} over 1 s");
    assert!(din > 50, "the publisher's media reaches the origin ({din})");
    assert!(
        (dout as f64) < 1.5 * din as f64,
        "the origin sends to R only (in {din}, out {dout})"
    );

    // Bad input from a child: an unknown track and an unknown room are refused with a
    // reason; D's other flow goes on.
    for (f, r_id, t) in [
        (600, room.clone(), TrackId(999)),
        (601, RoomId::new("nowhere").unwrap(), track),
    ] {
        d.sender
            .send(&ControlMessage::Subscribe {
                flow: FlowId::new(f).unwrap(),
                room: r_id,
                track: t,
                layer: Layer::new(0).unwrap(),
            })
            .await
            .unwrap();
    }
    let mut refused = HashMap::new();
    while refused.len() < 2 {
        match tokio::time::timeout(WAIT, d.receiver.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ControlMessage::SubscribeRefused { flow, reason } => {
                refused.insert(flow.get(), reason);
            }
            ControlMessage::KeyframeRequest { .. } | ControlMessage::Nack { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    println!("refusals: {refused:?}");
    assert!(refused[&600].contains("no track"), "{refused:?}");
    assert!(refused[&601].contains("no participants"), "{refused:?}");
    assert!(c.edge.metrics.cascade.subscribes_refused.load(Relaxed) >= 2);
    let n = count(&arrivals);
    eventually("D's good flow goes on", || count(&arrivals) > n + 50).await;

    // R becomes unreachable: C falls back to the origin; D's media resumes.
    let before_cut = count(&arrivals);
    cut.cut.store(true, Relaxed);
    let cut_at = Instant::now();
    eventually("C falls back to the origin", || {
        c.edge.metrics.cascade.parent_fallbacks.load(Relaxed) >= 1
    })
    .await;
    let detected = cut_at.elapsed();
    eventually("media resumes through the origin", || {
        arrivals
            .lock()
            .unwrap()
            .iter()
            .any(|t| *t > cut_at + detected)
    })
    .await;
    let gap = {
        let a = arrivals.lock().unwrap();
        let last_before = a[..before_cut.min(a.len())]
            .last()
            .copied()
            .unwrap_or(cut_at);
        let first_after = a.iter().find(|t| **t > cut_at + detected).copied().unwrap();
        first_after.duration_since(last_before)
    };
    println!(
        "parent edge cut: loss noticed after {:?}, media gap at D {:?}",
        detected, gap
    );
    let via_origin = c.edge.cascade.room_media_link(&room);
    assert_ne!(via_origin, Some(via_r));
    let (din, dout) = ratio(1).await;
    println!("fallback: origin relay in {din}, out {dout} over 1 s");
    assert!(
        (dout as f64) > 1.5 * din as f64,
        "the origin now sends to R and C (in {din}, out {dout})"
    );

    // R is reachable again: C goes back to it.
    cut.cut.store(false, Relaxed);
    eventually("C links to R again and moves the room there", || {
        c.edge.metrics.cascade.parent_links.load(Relaxed) == 1
            && c.edge.cascade.room_media_link(&room) != via_origin
    })
    .await;
    eventually("the room's media comes from R again", || {
        r.edge.metrics.cascade.child_links.load(Relaxed) == 1
    })
    .await;
    let n = count(&arrivals);
    eventually("media flows through R again", || count(&arrivals) > n + 50).await;
    let (din, dout) = ratio(1).await;
    println!("tree again: origin relay in {din}, out {dout} over 1 s");
    assert!(
        (dout as f64) < 1.5 * din as f64,
        "the origin sends to R only again (in {din}, out {dout})"
    );
}

const KCS: &str = env!("CARGO_BIN_EXE_kcs");

/// A child process killed when dropped (a failing test leaves nothing behind).
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    // Free for both UDP (cascade) and TCP (HTTP) right now.
    loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn kcs(dir: &std::path::Path, name: &str, args: &[String]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Proc(
        std::process::Command::new(KCS)
            .args(args)
            .env("KCS_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn tls(dir: &std::path::Path, node: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).display().to_string();
    vec![
        "--ca".into(),
        p("ca.pem".into()),
        "--cert".into(),
        p(format!("{node}.pem")),
        "--key".into(),
        p(format!("{node}.key")),
        "--node-id".into(),
        node.into(),
    ]
}

fn creds(dir: &std::path::Path, node: &str) -> NodeCredentials {
    NodeCredentials::from_pem_files(
        &dir.join("ca.pem"),
        &dir.join(format!("{node}.pem")),
        &dir.join(format!("{node}.key")),
    )
    .unwrap()
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while !http_get(addr, "/healthz")
        .await
        .is_some_and(|r| r.contains(" 200 "))
    {
        assert!(Instant::now() < deadline, "{addr} never healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metric(addr: SocketAddr, name: &str) -> i64 {
    let text = http_get(addr, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

async fn metric_at_least(addr: SocketAddr, name: &str, min: i64) {
    let deadline = Instant::now() + WAIT;
    while metric(addr, name).await < min {
        assert!(
            Instant::now() < deadline,
            "{name} on {addr} never reached {min}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket participant joined to `room` on the edge at `http` (kept open while held).
async fn ws_join(
    http: SocketAddr,
    signer: &TokenSigner,
    room: &RoomId,
    who: &str,
) -> mpsc::Sender<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let token = signer.mint(
        room.clone(),
        Identity::new(who).unwrap(),
        Role::Host,
        None,
        control_plane::token::unix_now(),
        600,
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
            .await
            .unwrap();
        let mut acked = 0;
        for (id, msg) in [
            (
                1,
                serde_json::json!({"type": "hello", "version": 2, "id": 1}),
            ),
            (
                2,
                serde_json::json!({"type": "room:join", "token": token, "id": 2}),
            ),
        ] {
            ws.send(Message::Text(msg.to_string().into()))
                .await
                .unwrap();
            while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, ws.next()).await {
                let Message::Text(t) = m else { continue };
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["id"] == id {
                    if v["type"] == "ack" {
                        acked += 1;
                    }
                    break;
                }
            }
        }
        if acked == 2 {
            let (tx, mut rx) = mpsc::channel::<()>(1);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = rx.recv() => return,
                        m = ws.next() => if m.is_none() { return },
                    }
                }
            });
            return tx;
        }
        assert!(Instant::now() < deadline, "{who} never joined on {http}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A raw child edge subscribed to both layers of `track` on the edge at `parent`; returns the
/// link (for control) and the arrival times of its datagrams.
async fn child_subscriber(
    ep: &LinkEndpoint,
    parent: SocketAddr,
    parent_node: &str,
    room: &RoomId,
    track: TrackId,
) -> (Link, Arc<Mutex<Vec<Instant>>>) {
    let d = ep.connect(parent, &label(parent_node)).await.unwrap();
    let flow = FlowId::new(500).unwrap();
    let mut d = d;
    for layer in 0..2 {
        d.sender
            .send(&ControlMessage::Subscribe {
                flow,
                room: room.clone(),
                track,
                layer: Layer::new(layer).unwrap(),
            })
            .await
            .unwrap();
    }
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (media, a) = (d.media.clone(), arrivals.clone());
    tokio::spawn(async move {
        while let Ok(bytes) = media.recv().await {
            if decode_datagram(&bytes).is_ok_and(|dg| dg.flow == flow) {
                a.lock().unwrap().push(Instant::now());
            }
        }
    });
    (d, arrivals)
}

/// Real processes: `kcs origin`, edge R and edge C (`--media-parent` naming R). R is killed
/// (SIGKILL: no goodbye, its link just goes silent): C's media resumes through the origin.
/// R is started again: C links to it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "written at the deadline and never run yet: run with --ignored and fix before enabling"]
async fn a_killed_parent_edge_process_is_replaced_by_the_origin() {
    let dir = std::env::temp_dir().join(format!("kcs-tree-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(KCS)
        .args(["certs", "--out"])
        .arg(&dir)
        .args(["--node", "origin-1,edge-a,edge-r,edge-c,edge-d"])
        .output()
        .unwrap();
    assert!(out.status.success(), "kcs certs: {out:?}");
    let signer = TokenSigner::from_seed("test", &[7; 32]);
    let key: String = signer
        .public_key()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let room = RoomId::new("tree-proc").unwrap();
    let (origin_port, origin_http) = (free_port(), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let mut args: Vec<String> = vec![
        "origin".into(),
        "--cascade".into(),
        format!("127.0.0.1:{origin_port}"),
        "--http".into(),
        origin_http.to_string(),
    ];
    args.extend(tls(&dir, "origin-1"));
    let _origin = kcs(&dir, "origin", &args);
    wait_healthy(origin_http).await;
    let edge_args = |node: &str, http: SocketAddr, cascade: u16, parent: Option<u16>| {
        let mut a: Vec<String> = vec![
            "edge".into(),
            "--http".into(),
            http.to_string(),
            "--udp".into(),
            "127.0.0.1:0".into(),
            "--workers".into(),
            "1".into(),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--cascade".into(),
            format!("127.0.0.1:{cascade}"),
            "--token-public-key".into(),
            format!("test:{key}"),
            "--origin".into(),
            format!("quic://origin-1@127.0.0.1:{origin_port}"),
            "--data-dir".into(),
            dir.join(node).display().to_string(),
        ];
        if let Some(p) = parent {
            a.push("--media-parent".into());
            a.push(format!("{room}=quic://edge-r@127.0.0.1:{p}"));
        }
        a.extend(tls(&dir, node));
        a
    };
    let (r_http, r_cascade) = (SocketAddr::from(([127, 0, 0, 1], free_port())), free_port());
    let (c_http, c_cascade) = (SocketAddr::from(([127, 0, 0, 1], free_port())), free_port());
    let r = kcs(
        &dir,
        "edge-r",
        &edge_args("edge-r", r_http, r_cascade, None),
    );
    let _c = kcs(
        &dir,
        "edge-c",
        &edge_args("edge-c", c_http, c_cascade, Some(r_cascade)),
    );
    wait_healthy(r_http).await;
    wait_healthy(c_http).await;

    let origin_addr = OriginAddr {
        node: label("origin-1"),
        addr: SocketAddr::from(([127, 0, 0, 1], origin_port)),
    };
    let track = publisher(&creds(&dir, "edge-a"), &origin_addr, &room).await;
    let _rita = ws_join(r_http, &signer, &room, "rita").await;
    let _carl = ws_join(c_http, &signer, &room, "carl").await;
    metric_at_least(c_http, "kcs_cascade_parent_links", 1).await;

    let d_ep = raw_endpoint_with(&creds(&dir, "edge-d"), "edge-d", NodeRole::Edge);
    let (_d, arrivals) = child_subscriber(
        &d_ep,
        SocketAddr::from(([127, 0, 0, 1], c_cascade)),
        "edge-c",
        &room,
        track,
    )
    .await;
    let count = |a: &Arc<Mutex<Vec<Instant>>>| a.lock().unwrap().len();
    eventually("media reaches C's child through R", || {
        count(&arrivals) > 100
    })
    .await;
    assert_eq!(metric(r_http, "kcs_cascade_child_links").await, 1);
    assert!(metric(r_http, "kcs_cascade_link_packets_out_total").await > 0);

    // SIGKILL R.
    let before = count(&arrivals);
    let killed_at = Instant::now();
    drop(r);
    metric_at_least(c_http, "kcs_cascade_parent_fallbacks_total", 1).await;
    let detected = killed_at.elapsed();
    eventually("media resumes through the origin", || {
        arrivals
            .lock()
            .unwrap()
            .iter()
            .any(|t| *t > killed_at + detected)
    })
    .await;
    let gap = {
        let a = arrivals.lock().unwrap();
        let last = a[..before].last().copied().unwrap();
        a.iter()
            .find(|t| **t > killed_at + detected)
            .copied()
            .unwrap()
            - last
    };
    println!("parent edge killed: loss noticed after {detected:?}, media gap at C's child {gap:?}");

    // R again, at the same address: C links to it again; media keeps flowing.
    let _r = kcs(
        &dir,
        "edge-r-again",
        &edge_args("edge-r", r_http, r_cascade, None),
    );
    wait_healthy(r_http).await;
    metric_at_least(c_http, "kcs_cascade_parent_link_connects_total", 2).await;
    let n = count(&arrivals);
    eventually("media still flows", || count(&arrivals) > n + 50).await;
    let _ = std::fs::remove_dir_all(&dir);
}
