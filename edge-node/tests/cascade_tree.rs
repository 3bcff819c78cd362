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
//!   and its other flow keeps flowing; a peer that is not an edge is refused by an edge;
//! - a parent edge with no participants in the room refuses the child's subscription: the
//!   child takes the room's media from the origin (`a_parent_that_refuses_...`);
//! - with real `kcs` processes and `--media-parent`, a SIGKILLed parent edge is replaced by the
//!   origin and linked again when it returns (`a_killed_parent_edge_process_...`);
//! - layer demand: what crosses the link into an edge follows what is wanted there, from a
//!   child edge (`the_link_into_an_edge_carries_only_...`) and, with real edges A and B and the
//!   load tester's WebRTC clients, from a viewer's `consumer:layers`
//!   (`a_subscribers_max_layer_decides_...`).
//!
//! The same tree learnt from etcd (presence records, the control plane's keeper) is
//! `cascade_tree_etcd.rs`.

mod common;

use common::*;

use cascade_proto::link::{ControlMessage, FlowId, GoodbyeCode, Layer, NodeRole};
use cascade_proto::quic::ClusterCa;
use cascade_proto::room::{Intent, Reply};
use cascade_proto::wire::decode_datagram;
use cascade_proto::{Identity, Role, RoomId, TrackId};
use control_plane::token::{TokenSigner, TokenVerifier};
use edge_node::app::{Origins, Running};
use edge_node::config::EdgeConfig;
use edge_node::origin_server::{OriginRelay, OriginSettings, RunningOrigin};
use edge_node::tree::{MediaParent, ParentChange};
use edge_node::uplink::{OriginAddr, OriginDirectory};
use loadtest::participant::{ParticipantError, Spec};
use loadtest::scenario::Publish;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

/// The key of the participant tokens the edges of [`start_edge`] accept.
const TOKEN_SEED: [u8; 32] = [9; 32];

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
    let signer = TokenSigner::from_seed("test", &TOKEN_SEED);
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

/// The value of the one line of a Prometheus text page that starts with `key ` (0 if none).
fn series(page: &str, key: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
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

/// `origin-1` in eu with an [`OriginRelay`] as its media side (the relay's counters show what
/// it forwards), and its address for edges.
async fn start_origin(ca: &ClusterCa) -> (RunningOrigin, OriginRelay, OriginAddr) {
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
    let addr = OriginAddr {
        node: label("origin-1"),
        addr: origin.cascade,
    };
    (origin, relay, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_follows_the_tree_falls_back_to_the_origin_and_returns() {
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let (origin, relay, origin_addr) = start_origin(&ca).await;
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
    subscribe_layers(&mut d, flow, &room, track, 0..2).await;
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

    // Each relaying hop timed its own share: the origin (to R), R (to its child C) and C (to
    // its child D), from quinn's delivery to the copies handed to quinn. Figures are printed,
    // never asserted; that the histograms are fed, by every datagram that made copies, is.
    let origin_text = http_get(origin.http, "/metrics").await.unwrap();
    let origin_hops = series(
        &origin_text,
        "kcs_cascade_residence_seconds_count{to=\"links\"}",
    );
    let origin_sum = series(
        &origin_text,
        "kcs_cascade_residence_seconds_sum{to=\"links\"}",
    );
    let relayed = relay.0.residence();
    println!(
        "hop residence: origin {} datagrams, mean {:.0} us",
        relayed.count(),
        relayed.sum_us() as f64 / relayed.count().max(1) as f64
    );
    assert!(
        origin_hops > 50.0,
        "the origin times what it relays ({origin_hops})"
    );
    assert!(origin_sum > 0.0 && origin_sum.is_finite(), "{origin_sum}");
    for (name, running) in [("R", &r), ("C", &c)] {
        let text = http_get(running.http, "/metrics").await.unwrap();
        let hops = series(&text, "kcs_cascade_residence_seconds_count{to=\"links\"}");
        let sum = series(&text, "kcs_cascade_residence_seconds_sum{to=\"links\"}");
        println!("hop residence: {name} to its child, {hops} datagrams, {sum} s in all");
        assert!(
            hops > 50.0,
            "{name} times what it relays to its child ({hops})"
        );
        assert!(sum > 0.0 && sum.is_finite(), "{name}: {sum}");
        // No local subscriber with a transport here: nothing is timed to subscribers.
        let local = series(
            &text,
            "kcs_cascade_residence_seconds_count{to=\"subscribers\"}",
        );
        assert_eq!(local, 0.0, "{name} has no SRTP subscriber");
    }

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
    // R's local consumer here is only a hold on the relayed publication (no subscription in
    // its shard), so with C's sinks gone nobody at R wants the track: R demands no layer and
    // the origin sends to C alone.
    let into_r = || -> u64 {
        r.edge
            .metrics
            .cascade
            .relayed_datagrams_by_layer
            .iter()
            .map(|c| c.load(Relaxed))
            .sum()
    };
    // R notices C's link gone within its idle timeout, then sends its empty demand.
    let deadline = Instant::now() + WAIT;
    loop {
        let n = into_r();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if into_r() == n {
            break;
        }
        assert!(Instant::now() < deadline, "media into R never stops");
    }
    let r_before = into_r();
    let (din, dout) = ratio(1).await;
    let r_got = into_r() - r_before;
    println!("fallback: origin relay in {din}, out {dout} over 1 s; into R {r_got}");
    assert!(
        dout as f64 > 0.8 * din as f64,
        "the origin now sends to C (in {din}, out {dout})"
    );
    assert_eq!(
        r_got, 0,
        "nothing crosses into R, where nobody wants the track"
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

/// Real processes: `kcs origin`, edge R and edge C (`--media-parent` naming R). R is killed
/// (SIGKILL: no goodbye, its link just goes silent): C's media resumes through the origin.
/// R is started again: C links to it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_parent_edge_process_is_replaced_by_the_origin() {
    let dir = std::env::temp_dir().join(format!("kcs-tree-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    certs(&dir, "origin-1,edge-a,edge-r,edge-c,edge-d");
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

/// A parent edge that refuses the room's subscriptions (it has no participants there, e.g. its
/// last one left before the tree changed): the child takes the room's media from the origin
/// instead, and its own child keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_refuses_the_subscription_sends_the_room_to_the_origin() {
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let (_origin, relay, origin_addr) = start_origin(&ca).await;
    let room = RoomId::new("refused-room").unwrap();
    let track = publisher(&ca.issue(&label("edge-a")).unwrap(), &origin_addr, &room).await;
    // R has no participants in the room: it cannot serve it.
    let r = start_edge(&ca, "edge-r", &origin_addr, None).await;
    let (parents, parent_rx) = mpsc::channel(8);
    let c = start_edge(&ca, "edge-c", &origin_addr, Some(parent_rx)).await;
    join(&c, &room, "carl").await;
    let r_addr = OriginAddr::parse(r.cascade_url.as_ref().unwrap()).unwrap();
    parents
        .send(ParentChange {
            room: room.clone(),
            parent: MediaParent::Edge(r_addr),
        })
        .await
        .unwrap();
    eventually("C links to R", || {
        c.edge.metrics.cascade.parent_links.load(Relaxed) == 1
    })
    .await;
    let d_ep = raw_endpoint(&ca, "edge-d", NodeRole::Edge);
    let c_addr = OriginAddr::parse(c.cascade_url.as_ref().unwrap()).unwrap();
    let (_d, arrivals) = child_subscriber(&d_ep, c_addr.addr, "edge-c", &room, track).await;
    eventually("R refuses C's subscription", || {
        r.edge.metrics.cascade.subscribes_refused.load(Relaxed) >= 1
            && c.edge.metrics.cascade.refusals_received.load(Relaxed) >= 1
    })
    .await;
    eventually("D receives the track through the origin", || {
        arrivals.lock().unwrap().len() > 50
    })
    .await;
    // The room's media link is C's origin link, not the parent's (which stays up).
    assert_eq!(c.edge.metrics.cascade.parent_links.load(Relaxed), 1);
    assert_eq!(r.edge.metrics.media.link_packets_out.load(Relaxed), 0);
    let c_in = relay.0.counters();
    assert!(c_in.datagrams_out > 0, "the origin sends the track to C");
}

/// Layer demand across real links: a 3-layer track published behind the origin, a real edge B
/// consuming it for a child edge D (played by the test) that wants only layer 0, then every
/// layer. B sends `layer_demand` up its link, the origin's relay narrows what it forwards, and
/// B's per-layer counter of datagrams received (`kcs_cascade_relayed_datagrams_in_total`)
/// shows what crossed the link into B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_into_an_edge_carries_only_the_layers_demanded_downstream() {
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let (_origin, _relay, origin_addr) = start_origin(&ca).await;
    let room = RoomId::new("demand-room").unwrap();
    let creds = ca.issue(&label("edge-a")).unwrap();
    let track = publisher_with_layers(&creds, "edge-a", &origin_addr, &room, 3).await;
    let b = start_edge(&ca, "edge-b", &origin_addr, None).await;
    join(&b, &room, "bea").await;

    // D subscribes to the three layers on one flow and demands layer 0 only (a thumbnail).
    let d_ep = raw_endpoint(&ca, "edge-d", NodeRole::Edge);
    let b_addr = OriginAddr::parse(b.cascade_url.as_ref().unwrap()).unwrap();
    let mut d = d_ep.connect(b_addr.addr, &label("edge-b")).await.unwrap();
    let flow = FlowId::new(700).unwrap();
    subscribe_layers(&mut d, flow, &room, track, 0..3).await;
    let demand = |bits: u8| ControlMessage::LayerDemand {
        flow,
        layers: cascade_proto::link::LayerSet(bits),
    };
    d.sender.send(&demand(0b001)).await.unwrap();
    let at_d: Arc<Mutex<[u64; 3]>> = Arc::default();
    {
        let (media, at_d) = (d.media.clone(), at_d.clone());
        tokio::spawn(async move {
            while let Ok(bytes) = media.recv().await {
                if let Ok(dg) = decode_datagram(&bytes) {
                    if dg.flow == flow && dg.layer.index() < 3 {
                        at_d.lock().unwrap()[usize::from(dg.layer.index())] += 1;
                    }
                }
            }
        });
    }
    let into_b =
        |layer: usize| b.edge.metrics.cascade.relayed_datagrams_by_layer[layer].load(Relaxed);
    eventually("layer 0 crosses into B and on to D", || {
        into_b(0) > 100 && at_d.lock().unwrap()[0] > 100
    })
    .await;
    eventually("B sent its demand upstream", || {
        b.edge.metrics.cascade.layer_demands_sent.load(Relaxed) >= 1
    })
    .await;
    // Give what was in flight before the demand took effect time to land, then watch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<u64> = (0..3).map(into_b).collect();
    let d_before = *at_d.lock().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<u64> = (0..3).map(into_b).collect();
    let d_after = *at_d.lock().unwrap();
    println!(
        "into B over 1 s with demand {{0}}: layer 0 {}, layer 1 {}, layer 2 {}",
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2]
    );
    assert!(
        after[0] - before[0] > 30,
        "layer 0 keeps crossing: {before:?} -> {after:?}"
    );
    assert_eq!(
        (after[1] - before[1], after[2] - before[2]),
        (0, 0),
        "layers 1 and 2 do not cross the link into B"
    );
    assert_eq!(d_after[1..], d_before[1..], "nor reach D");
    let text = http_get(b.http, "/metrics").await.unwrap();
    assert!(
        text.contains("kcs_cascade_relayed_datagrams_in_total{layer=\"0\"}")
            && text.contains("kcs_cascade_layer_demands_sent_total "),
        "the per-layer and demand counters are on /metrics"
    );

    // D's tile grows: it demands every layer; layer 2 crosses again and reaches it.
    let sent_before = b.edge.metrics.cascade.layer_demands_sent.load(Relaxed);
    let (top_before, d_top_before) = (into_b(2), at_d.lock().unwrap()[2]);
    let grown = Instant::now();
    d.sender.send(&demand(0b111)).await.unwrap();
    eventually("layer 2 crosses into B and reaches D", || {
        into_b(2) > top_before + 50 && at_d.lock().unwrap()[2] > d_top_before + 50
    })
    .await;
    println!(
        "layer 2 flowing again {:?} after the wider demand",
        grown.elapsed()
    );
    assert!(b.edge.metrics.cascade.layer_demands_sent.load(Relaxed) > sent_before);
}

/// A load-tester participant (a real WebRTC client) in `room` on `edge` until `stop`, as a
/// host with a token the edges of [`start_edge`] accept.
fn participant(
    edge: &Running,
    room: &RoomId,
    spec: Spec,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Result<(), ParticipantError>> {
    let identity = format!("{}-{}", spec.group, spec.index);
    let token = TokenSigner::from_seed("test", &TOKEN_SEED).mint(
        room.clone(),
        Identity::new(format!("p-{identity}")).unwrap(),
        Role::Host,
        None,
        control_plane::token::unix_now(),
        600,
    );
    loadtest_participant(edge.http, room, token, spec, stop)
}

/// Layer demand end to end, with real parts only: the origin, edges A and B linked to it over
/// QUIC, and the load tester's WebRTC clients: a 3-layer simulcast camera published on A and a
/// viewer on B that asks for max layer 0 (`consumer:layers`), later 2. B's `/metrics`
/// (`kcs_cascade_relayed_datagrams_in_total{layer}`) shows what crossed the link into B. B
/// subscribes every layer of the track upstream, so without its `layer_demand` layers 1 and 2
/// would keep crossing and the first check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribers_max_layer_decides_what_crosses_the_link_into_its_edge() {
    /// How long a wider demand may take to bring layer 2 across: a correctness bound (the
    /// demand is sent at all, and acted on), generous for a loaded 2-core machine.
    const WIDENED_WITHIN: Duration = Duration::from_secs(5);
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let (_origin, _relay, origin_addr) = start_origin(&ca).await;
    let a = start_edge(&ca, "edge-a", &origin_addr, None).await;
    let b = start_edge(&ca, "edge-b", &origin_addr, None).await;
    let room = RoomId::new("demand-e2e").unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let publisher = participant(
        &a,
        &room,
        Spec {
            index: 0,
            group: "camera".into(),
            publish: Publish::Camera,
            subscribe: false,
            max_layer: None,
            max_layer_changes: None,
        },
        stop.clone(),
    );
    let (max_layer, max_layer_rx) = watch::channel(0u8);
    let viewer = participant(
        &b,
        &room,
        Spec {
            index: 1,
            group: "viewer".into(),
            publish: Publish::None,
            subscribe: true,
            max_layer: Some(0),
            max_layer_changes: Some(max_layer_rx),
        },
        stop.clone(),
    );
    let b_http = b.http;
    let into_b = |layer: u8| async move {
        let name = format!("kcs_cascade_relayed_datagrams_in_total{{layer=\"{layer}\"}}");
        let v = metric(b_http, &name).await;
        assert!(v >= 0, "{name} on B's /metrics");
        v as u64
    };
    let alive = || {
        assert!(!publisher.is_finished(), "the publisher ended early");
        assert!(!viewer.is_finished(), "the viewer ended early");
    };

    // Layer 0 carries the audio too (50 packets/s): wait until the video's layer 0 crosses as
    // well (~30 packets/s more), i.e. the viewer holds the video subscription. Its
    // `consumer:layers` goes only to video tracks it has, and audio alone would pass every
    // check below trivially.
    const AUDIO_AND_VIDEO: u64 = 65;
    let deadline = Instant::now() + WAIT;
    loop {
        alive();
        let start = into_b(0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if (into_b(0).await - start) * 2 >= AUDIO_AND_VIDEO {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the video's layer 0 never crossed into B"
        );
    }
    // The viewer's max layer 0 reaches B's shard after its subscription (which starts at the
    // top layer): wait until layers 1 and 2 stand still, then watch a whole second.
    let deadline = Instant::now() + WAIT;
    loop {
        alive();
        let upper = (into_b(1).await, into_b(2).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if (into_b(1).await, into_b(2).await) == upper {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "layers 1 and 2 never stop crossing into B, where the only viewer wants layer 0"
        );
    }
    let before = [into_b(0).await, into_b(1).await, into_b(2).await];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = [into_b(0).await, into_b(1).await, into_b(2).await];
    println!(
        "into B over 1 s, viewer at max layer 0: layer 0 {}, layer 1 {}, layer 2 {}",
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2]
    );
    assert!(
        after[0] - before[0] >= AUDIO_AND_VIDEO,
        "layer 0 (audio and video) keeps crossing: {before:?} -> {after:?}"
    );
    assert_eq!(
        (after[1] - before[1], after[2] - before[2]),
        (0, 0),
        "layers 1 and 2 do not cross the link into B"
    );
    assert!(metric(b.http, "kcs_cascade_layer_demands_sent_total").await >= 1);

    // The viewer's tile grows: max layer 2. Layers 1 and 2 cross into B again.
    let (mid, top) = (into_b(1).await, into_b(2).await);
    let widened = Instant::now();
    max_layer.send(2).unwrap();
    while !(into_b(1).await > mid + 10 && into_b(2).await > top + 10) {
        alive();
        assert!(
            widened.elapsed() < WIDENED_WITHIN,
            "layers 1 and 2 did not cross into B within {WIDENED_WITHIN:?} of max layer 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "layers 1 and 2 crossing into B {:?} after the viewer's max layer 2",
        widened.elapsed()
    );

    stop_tx.send(true).unwrap();
    for (who, p) in [("publisher", publisher), ("viewer", viewer)] {
        let r = tokio::time::timeout(WAIT, p)
            .await
            .unwrap_or_else(|_| panic!("the {who} stops"))
            .unwrap();
        assert!(r.is_ok(), "the {who}: {r:?}");
    }
}
