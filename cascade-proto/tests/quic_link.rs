//! Cascade links over real QUIC sockets on loopback: the handshake, control messages and
//! datagrams both ways, and every refusal (another CA, no client certificate, a version
//! mismatch, a malformed frame).

use cascade_proto::link::{
    ControlMessage, FlowId, GoodbyeCode, Hello, Label, Layer, MediaDatagram, MediaFlags, NodeRole,
    ALPN, PROTOCOL_VERSION,
};
use cascade_proto::quic::{
    ClusterCa, Link, LinkConfig, LinkEndpoint, LinkError, NodeCredentials, DEFAULT_INITIAL_WINDOW,
};
use cascade_proto::room::{
    Audience, EdgeToOrigin, Intent, OriginToEdge, RequestId, RoomEvent, RoomEventBody,
};
use cascade_proto::wire::decode_datagram;
use cascade_proto::{ParticipantId, RoomId, TrackId};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Every wait in these tests is bounded by this; loopback needs milliseconds.
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

fn endpoint(creds: &NodeCredentials, hello: Hello) -> LinkEndpoint {
    LinkEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        creds,
        LinkConfig::new(hello),
    )
    .unwrap()
}

struct Origin {
    endpoint: Arc<LinkEndpoint>,
    addr: std::net::SocketAddr,
}

/// An origin that completes handshakes as they come and hands out the results in order.
fn origin(ca: &ClusterCa) -> (Origin, tokio::sync::mpsc::Receiver<Result<Link, LinkError>>) {
    let creds = ca.issue(&label("origin-1")).unwrap();
    let endpoint = Arc::new(endpoint(&creds, hello("origin-1", NodeRole::Origin)));
    let addr = endpoint.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(pending) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(pending.handshake().await).await;
            });
        }
    });
    (Origin { endpoint, addr }, rx)
}

async fn next<T>(rx: &mut tokio::sync::mpsc::Receiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("channel open")
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("in time")
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
    p.extend_from_slice(b"payload");
    p
}

/// Sends datagrams until one arrives (datagrams are unreliable, even on loopback) and returns
/// what arrived.
async fn datagram_through(from: &Link, to: &Link, flow: u32) -> (u32, u8, bool, Vec<u8>) {
    let sender = from.media.clone();
    let pump: JoinHandle<()> = tokio::spawn(async move {
        let packet = rtp(7);
        let datagram = MediaDatagram {
            flow: FlowId::new(flow).unwrap(),
            layer: Layer::new(2).unwrap(),
            flags: MediaFlags {
                keyframe: true,
                ..MediaFlags::default()
            },
            rtp: &packet,
        };
        for _ in 0..200 {
            if sender.send(&datagram).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let bytes = within(to.media.recv()).await.expect("a datagram");
    pump.abort();
    let d = decode_datagram(&bytes).expect("decodes");
    (
        d.flow.get(),
        d.layer.index(),
        d.flags.keyframe,
        d.rtp.to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_control_messages_and_datagrams() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let (origin, mut accepted) = origin(&ca);
    let edge = endpoint(
        &ca.issue(&label("edge-a")).unwrap(),
        hello("edge-a", NodeRole::Edge),
    );

    let mut edge_link = within(edge.connect(origin.addr, &label("origin-1")))
        .await
        .expect("edge links to the origin");
    let mut origin_link = next(&mut accepted).await.expect("origin accepts the edge");
    assert_eq!(edge_link.peer, hello("origin-1", NodeRole::Origin));
    assert_eq!(origin_link.peer, hello("edge-a", NodeRole::Edge));

    let room = RoomId::new("standup").unwrap();
    let to_origin = [
        ControlMessage::ToOrigin(EdgeToOrigin::Request {
            id: RequestId(1),
            room: room.clone(),
            intent: Intent::Leave {
                participant: ParticipantId(3),
            },
        }),
        ControlMessage::Subscribe {
            flow: FlowId::new(300).unwrap(),
            room: room.clone(),
            track: TrackId(5),
            layer: Layer::new(2).unwrap(),
        },
    ];
    for m in &to_origin {
        edge_link.sender.send(m).await.unwrap();
    }
    for m in &to_origin {
        assert_eq!(&within(origin_link.receiver.recv()).await.unwrap(), m);
    }
    let event = ControlMessage::ToEdge(OriginToEdge::Event(RoomEvent {
        room,
        seq: 1,
        audience: Audience::All,
        body: RoomEventBody::RoomClosed { by: None },
    }));
    origin_link.sender.send(&event).await.unwrap();
    assert_eq!(within(edge_link.receiver.recv()).await.unwrap(), event);

    // Media both ways, the header intact.
    assert_eq!(
        datagram_through(&origin_link, &edge_link, 300).await,
        (300, 2, true, rtp(7))
    );
    assert_eq!(
        datagram_through(&edge_link, &origin_link, 9).await,
        (9, 2, true, rtp(7))
    );
    assert!(edge_link.media.max_size().is_some_and(|m| m >= 1200));
    // Both ends start with the cascade's window, not QUIC's usual ~14 KB, so a keyframe burst
    // is not paced out over an inter-region round trip (LinkConfig::initial_window).
    for link in [&edge_link, &origin_link] {
        assert!(
            link.media.congestion_window() >= DEFAULT_INITIAL_WINDOW,
            "window {} bytes",
            link.media.congestion_window()
        );
    }
    origin.endpoint.close(GoodbyeCode::Normal, "test over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let rogue_ca = ClusterCa::generate("rogue").unwrap();
    let (origin, mut accepted) = origin(&ca);
    // The rogue trusts the real CA (so it accepts the origin) but holds a certificate of its own.
    let (cert, key) = rogue_ca.issue_pem(&label("edge-x")).unwrap();
    let rogue_creds =
        NodeCredentials::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes())
            .unwrap();
    let rogue = endpoint(&rogue_creds, hello("edge-x", NodeRole::Edge));

    let dialled = within(rogue.connect(origin.addr, &label("origin-1"))).await;
    assert!(dialled.is_err(), "the rogue must not get a link");
    let refused = next(&mut accepted).await;
    let Err(LinkError::Connection(e)) = refused else {
        panic!(
            "origin side: expected a TLS failure, got {:?}",
            refused.map(|l| l.peer)
        );
    };
    let text = e.to_string();
    assert!(
        text.contains("certificate") || text.contains("Certificate"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_client_certificate_is_refused() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let (origin, mut accepted) = origin(&ca);

    // A plain QUIC client that trusts the CA and speaks our ALPN but presents no certificate.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));

    let conn = within(async { client.connect(origin.addr, "origin-1").unwrap().await }).await;
    // TLS 1.3 may let the client finish before the server checks; then the server closes it.
    if let Ok(conn) = conn {
        let stream = within(async {
            conn.open_bi()
                .await?
                .1
                .read_chunk(16, true)
                .await
                .map(|_| ())
                .map_err(quinn::ConnectionError::from_read)
        })
        .await;
        assert!(stream.is_err(), "no control stream without a certificate");
    }
    let refused = next(&mut accepted).await;
    let Err(LinkError::Connection(e)) = refused else {
        panic!(
            "origin side: expected a TLS failure, got {:?}",
            refused.map(|l| l.peer)
        );
    };
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

/// quinn's read errors carry the connection error when the connection is what failed.
trait FromRead {
    fn from_read(e: quinn::ReadError) -> Self;
}
impl FromRead for quinn::ConnectionError {
    fn from_read(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => c,
            _ => quinn::ConnectionError::LocallyClosed,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_mismatch_is_refused_with_a_reason() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let (origin, mut accepted) = origin(&ca);
    let mut future = hello("edge-new", NodeRole::Edge);
    future.version = PROTOCOL_VERSION + 1;
    let edge = endpoint(&ca.issue(&label("edge-new")).unwrap(), future);

    let dialled = within(edge.connect(origin.addr, &label("origin-1"))).await;
    let Err(LinkError::Refused { code, reason }) = dialled else {
        panic!("expected a refusal, got {:?}", dialled.map(|l| l.peer));
    };
    assert_eq!(code, GoodbyeCode::VersionMismatch);
    assert!(
        reason.contains(&format!(
            "edge edge-new speaks version {}",
            PROTOCOL_VERSION + 1
        )) && reason.contains(&format!(
            "origin origin-1 speaks version {PROTOCOL_VERSION}"
        )),
        "{reason}"
    );
    let Err(LinkError::Refused { code, .. }) = next(&mut accepted).await else {
        panic!("the origin refuses too");
    };
    assert_eq!(code, GoodbyeCode::VersionMismatch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_another_node_than_the_certificate_is_refused() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let (origin, mut accepted) = origin(&ca);
    // Certificate for edge-a, hello claiming edge-b.
    let liar = endpoint(
        &ca.issue(&label("edge-a")).unwrap(),
        hello("edge-b", NodeRole::Edge),
    );
    let dialled = within(liar.connect(origin.addr, &label("origin-1"))).await;
    let Err(LinkError::Refused { code, reason }) = dialled else {
        panic!("expected a refusal");
    };
    assert_eq!(code, GoodbyeCode::BadHello);
    assert!(reason.contains("edge-b"), "{reason}");
    assert!(next(&mut accepted).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_closes_only_the_offending_stream() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let (origin, mut accepted) = origin(&ca);
    let bad = endpoint(
        &ca.issue(&label("edge-bad")).unwrap(),
        hello("edge-bad", NodeRole::Edge),
    );
    let good = endpoint(
        &ca.issue(&label("edge-good")).unwrap(),
        hello("edge-good", NodeRole::Edge),
    );

    let mut bad_link = within(bad.connect(origin.addr, &label("origin-1")))
        .await
        .unwrap();
    let mut origin_bad = next(&mut accepted).await.unwrap();
    let mut good_link = within(good.connect(origin.addr, &label("origin-1")))
        .await
        .unwrap();
    let mut origin_good = next(&mut accepted).await.unwrap();

    // A valid frame, then one of an unknown type.
    let keyframe = ControlMessage::KeyframeRequest {
        flow: FlowId::new(1).unwrap(),
        layer: Layer::LOWEST,
    };
    bad_link.sender.send(&keyframe).await.unwrap();
    bad_link.sender.send_raw(&[1, 0x7f, 0, 0, 0]).await.unwrap();
    assert_eq!(within(origin_bad.receiver.recv()).await.unwrap(), keyframe);
    let err = within(origin_bad.receiver.recv()).await.unwrap_err();
    let LinkError::Malformed(wire_error) = &err else {
        panic!("expected Malformed, got {err}");
    };
    origin_bad.sender.refuse(wire_error).await.unwrap();

    // The offender reads why, and its further writes are stopped.
    match within(bad_link.receiver.recv()).await.unwrap() {
        ControlMessage::Goodbye { code, reason } => {
            assert_eq!(code, GoodbyeCode::ProtocolError);
            assert!(reason.contains("unknown frame type 0x7f"), "{reason}");
        }
        other => panic!("expected a goodbye, got {other:?}"),
    }
    within(async {
        loop {
            if bad_link.sender.send(&keyframe).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // The offender's connection is still up (media flows), and so is the other edge's link.
    assert_eq!(datagram_through(&bad_link, &origin_bad, 4).await.0, 4);
    good_link.sender.send(&keyframe).await.unwrap();
    assert_eq!(within(origin_good.receiver.recv()).await.unwrap(), keyframe);
    origin_good
        .sender
        .send(&ControlMessage::Drain { deadline_ms: 100 })
        .await
        .unwrap();
    assert_eq!(
        within(good_link.receiver.recv()).await.unwrap(),
        ControlMessage::Drain { deadline_ms: 100 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_round_trip_through_pem_files() {
    let ca = ClusterCa::generate("test cluster").unwrap();
    let dir = std::env::temp_dir().join(format!("kcs-cascade-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = ca.issue_pem(&label("edge-f")).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("node.pem"), cert).unwrap();
    std::fs::write(dir.join("node.key"), key).unwrap();
    let creds = NodeCredentials::from_pem_files(
        &dir.join("ca.pem"),
        &dir.join("node.pem"),
        &dir.join("node.key"),
    );
    let missing = NodeCredentials::from_pem_files(
        &dir.join("nope.pem"),
        &dir.join("node.pem"),
        &dir.join("node.key"),
    );
    let garbage = NodeCredentials::from_pem(b"not pem", b"", b"");
    std::fs::remove_dir_all(&dir).unwrap();

    let (origin, mut accepted) = origin(&ca);
    let edge = endpoint(&creds.unwrap(), hello("edge-f", NodeRole::Edge));
    within(edge.connect(origin.addr, &label("origin-1")))
        .await
        .unwrap();
    next(&mut accepted).await.unwrap();
    assert!(missing.unwrap_err().to_string().contains("nope.pem"));
    assert!(garbage.unwrap_err().to_string().contains("CA certificate"));
}
