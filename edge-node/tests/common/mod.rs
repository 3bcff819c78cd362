//! Helpers shared by the cascade tests: raw QUIC peers the test plays (a publishing edge, a
//! child edge that records arrivals), real `kcs` processes killed on drop, `/metrics` and
//! `/healthz` over plain HTTP, WebSocket participants, and (module [`etcd`]) a real etcd
//! cluster, the control plane's own harness.

#![allow(dead_code)]

#[path = "../../../control-plane/tests/common/mod.rs"]
pub mod etcd;

use cascade_proto::link::{
    ControlMessage, FlowId, Hello, Label, Layer, MediaDatagram, MediaFlags, NodeRole,
    PROTOCOL_VERSION,
};
use cascade_proto::quic::{ClusterCa, Link, LinkConfig, LinkEndpoint, NodeCredentials};
use cascade_proto::room::{EdgeToOrigin, Intent, OriginToEdge, Reply, RequestId};
use cascade_proto::wire::decode_datagram;
use cascade_proto::{Identity, Role, RoomId, TrackId, TrackSource};
use control_plane::token::TokenSigner;
use edge_node::uplink::OriginAddr;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(15);

pub fn label(s: &str) -> Label {
    Label::new(s).unwrap()
}

pub fn hello(node: &str, role: NodeRole) -> Hello {
    Hello {
        node: label(node),
        region: label("eu"),
        role,
        version: PROTOCOL_VERSION,
    }
}

pub fn raw_endpoint(ca: &ClusterCa, node: &str, role: NodeRole) -> LinkEndpoint {
    raw_endpoint_with(&ca.issue(&label(node)).unwrap(), node, role)
}

pub fn raw_endpoint_with(creds: &NodeCredentials, node: &str, role: NodeRole) -> LinkEndpoint {
    LinkEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        creds,
        LinkConfig::new(hello(node, role)),
    )
    .unwrap()
}

pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A VP8 RTP packet of `layer` (its SSRC), sequence `seq`, 200 bytes of payload.
pub fn rtp(seq: u16, layer: u8) -> Vec<u8> {
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
pub async fn publisher(creds: &NodeCredentials, origin: &OriginAddr, room: &RoomId) -> TrackId {
    publisher_as(creds, "edge-a", origin, room).await
}

/// [`publisher`] with its own node name (the certificate's).
pub async fn publisher_as(
    creds: &NodeCredentials,
    node: &str,
    origin: &OriginAddr,
    room: &RoomId,
) -> TrackId {
    publisher_with_layers(creds, node, origin, room, 2).await
}

/// [`publisher_as`] publishing `layers` simulcast layers. Like an old edge, it ignores
/// `layer_demand` and sends every layer subscribed (the origin's relay does the narrowing).
pub async fn publisher_with_layers(
    creds: &NodeCredentials,
    node: &str,
    origin: &OriginAddr,
    room: &RoomId,
    layers: u8,
) -> TrackId {
    let ep = raw_endpoint_with(creds, node, NodeRole::Edge);
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
                    layers,
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

pub const KCS: &str = env!("CARGO_BIN_EXE_kcs");

/// A child process killed (SIGKILL) when dropped (a failing test leaves nothing behind).
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free for both UDP (cascade) and TCP (HTTP), never handed out twice in this process
/// (see [`etcd::unused_port`]).
pub fn free_port() -> u16 {
    etcd::unused_port()
}

pub fn kcs(dir: &std::path::Path, name: &str, args: &[String]) -> Proc {
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

/// `kcs certs`: a fresh cluster CA in `dir` and certificates for `nodes` (comma-separated).
pub fn certs(dir: &std::path::Path, nodes: &str) {
    let out = std::process::Command::new(KCS)
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--node", nodes])
        .output()
        .unwrap();
    assert!(out.status.success(), "kcs certs: {out:?}");
}

/// The TLS and node id arguments of `kcs origin` / `kcs edge` for `node`.
pub fn tls(dir: &std::path::Path, node: &str) -> Vec<String> {
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

pub fn creds(dir: &std::path::Path, node: &str) -> NodeCredentials {
    NodeCredentials::from_pem_files(
        &dir.join("ca.pem"),
        &dir.join(format!("{node}.pem")),
        &dir.join(format!("{node}.key")),
    )
    .unwrap()
}

pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

pub async fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while !http_get(addr, "/healthz")
        .await
        .is_some_and(|r| r.contains(" 200 "))
    {
        assert!(Instant::now() < deadline, "{addr} never healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn metric(addr: SocketAddr, name: &str) -> i64 {
    let text = http_get(addr, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

pub async fn metric_at_least(addr: SocketAddr, name: &str, min: i64) {
    let deadline = Instant::now() + WAIT;
    while metric(addr, name).await < min {
        assert!(
            Instant::now() < deadline,
            "{name} on {addr} never reached {min}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `kcs control-plane` on a free loopback port over the etcd at `endpoints`, signing with a
/// fixed test key, default region eu; `extra` is appended to its TOML config (top-level keys
/// first, then tables). Returns the process and its HTTP address, once healthy.
pub async fn control_plane(
    dir: &std::path::Path,
    endpoints: &[String],
    extra: &str,
) -> (Proc, SocketAddr) {
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let config = format!(
        "http_listen = \"{http}\"\n\
         signing_keys = [{{ kid = \"cp\", seed_hex = \"{}\" }}]\n\
         {extra}\n\
         [etcd]\nendpoints = [{}]\n\
         [api]\napi_keys = [\"test-key\"]\n\
         [routing]\ndefault_region = \"eu\"\n",
        "11".repeat(32),
        endpoints.join(", ")
    );
    let path = dir.join("control-plane.toml");
    std::fs::write(&path, config).unwrap();
    let proc = kcs(
        dir,
        "control-plane",
        &[
            "control-plane".into(),
            "--config".into(),
            path.display().to_string(),
        ],
    );
    wait_healthy(http).await;
    (proc, http)
}

/// A WebSocket participant joined to `room` on the edge at `http`, there while the returned
/// sender is held; sending on it or dropping it leaves the room.
pub async fn ws_join(
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
                        _ = rx.recv() => {
                            // Sent or dropped: leave the room (a dropped socket alone would
                            // keep the participant resumable for 30 s).
                            let leave = serde_json::json!({"type": "room:leave", "id": 9});
                            let _ = ws.send(Message::Text(leave.to_string().into())).await;
                            let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
                            return;
                        }
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
pub async fn child_subscriber(
    ep: &LinkEndpoint,
    parent: SocketAddr,
    parent_node: &str,
    room: &RoomId,
    track: TrackId,
) -> (Link, Arc<Mutex<Vec<Instant>>>) {
    let mut d = ep.connect(parent, &label(parent_node)).await.unwrap();
    let flow = FlowId::new(500).unwrap();
    subscribe_layers(&mut d, flow, room, track, 0..2).await;
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

/// A load-tester participant (a real WebRTC client: WebSocket signaling, ICE, DTLS, SRTP,
/// RTCP) in `room` on the edge serving HTTP at `http`, joining with `token`, until `stop`.
pub fn loadtest_participant(
    http: SocketAddr,
    room: &RoomId,
    token: String,
    spec: loadtest::participant::Spec,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Result<(), loadtest::participant::ParticipantError>> {
    edge_node::transport::install_crypto_provider();
    let ctx = Arc::new(loadtest::participant::Context {
        target: loadtest::signaling::Target::parse(&format!("http://{http}")).unwrap(),
        tokens: loadtest::signaling::TokenSource::Fixed(token),
        cert: edge_node::transport::dtls::DtlsCertificate::generate().unwrap(),
        collector: Arc::default(),
        ticker: loadtest::peer::Ticker::start(),
        hub: None,
        pacer: loadtest::participant::Pacer::start().unwrap(),
        media_via: None,
        local_ip: [127, 0, 0, 1].into(),
        room: room.as_str().into(),
        identity_prefix: "p".into(),
        janus_room: 0,
        mode: loadtest::scenario::Mode::Ws,
        nack: true,
        stop,
    });
    tokio::spawn(loadtest::participant::run(ctx, spec))
}

/// Sends `subscribe(flow, room, track, layer)` on `link` for each of `layers`.
pub async fn subscribe_layers(
    link: &mut Link,
    flow: FlowId,
    room: &RoomId,
    track: TrackId,
    layers: std::ops::Range<u8>,
) {
    for layer in layers {
        link.sender
            .send(&ControlMessage::Subscribe {
                flow,
                room: room.clone(),
                track,
                layer: Layer::new(layer).unwrap(),
            })
            .await
            .unwrap();
    }
}
