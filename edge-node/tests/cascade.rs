//! The cascade's control path with real processes: `kcs certs` makes the cluster's
//! certificates, one `kcs origin` hosts the room, two `kcs edge --origin ...` link to it over
//! QUIC with mutual TLS, and real WebSocket clients (protocol 2) on different edges meet in one
//! room. Then the faults: a peer from another CA is refused, a peer sending garbage loses only
//! its own stream, and an origin that dies and comes back is reconnected to by both edges.

mod common;

use common::{certs, free_port, metric, metric_at_least, tls, wait_healthy, Proc, KCS};

use cascade_proto::link::{ControlMessage, GoodbyeCode, Hello, Label, NodeRole, PROTOCOL_VERSION};
use cascade_proto::quic::{LinkConfig, LinkEndpoint, NodeCredentials};
use cascade_proto::{Identity, Role, RoomId};
use control_plane::token::{unix_now, TokenSigner};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const SEED: [u8; 32] = [9; 32];
/// Long enough for a dead link to be noticed (idle timeout 3 s) and redialled (backoff ≤ 2 s).
const WAIT: Duration = Duration::from_secs(10);

fn spawn(args: &[String], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(KCS)
            .args(args)
            .env("KCS_LOG", "info,edge_node=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

struct Cluster {
    dir: PathBuf,
    signer: TokenSigner,
    origin_cascade: u16,
    origin_http: SocketAddr,
    origin: Option<Proc>,
    edges: Vec<(SocketAddr, Proc)>,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("kcs-cascade-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        certs(&dir, "origin-1,edge-a,edge-b,prober");
        let signer = TokenSigner::from_seed("test", &SEED);
        let key: String = signer
            .public_key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut c = Cluster {
            signer,
            origin_cascade: free_port(),
            origin_http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            origin: None,
            edges: Vec::new(),
            dir,
        };
        c.start_origin().await;
        for node in ["edge-a", "edge-b"] {
            let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut args: Vec<String> = vec![
                "edge".into(),
                "--http".into(),
                http.to_string(),
                "--udp".into(),
                "127.0.0.1:0".into(),
                "--workers".into(),
                "1".into(),
                "--token-public-key".into(),
                format!("test:{key}"),
                "--origin".into(),
                format!("quic://origin-1@127.0.0.1:{}", c.origin_cascade),
                "--data-dir".into(),
                c.dir.join(node).display().to_string(),
            ];
            args.extend(tls(&c.dir, node));
            let p = spawn(&args, &c.dir.join(format!("{node}.log")));
            c.edges.push((http, p));
        }
        for (http, _) in &c.edges {
            wait_healthy(*http).await;
        }
        c
    }

    async fn start_origin(&mut self) {
        let mut args: Vec<String> = vec![
            "origin".into(),
            "--cascade".into(),
            format!("127.0.0.1:{}", self.origin_cascade),
            "--http".into(),
            self.origin_http.to_string(),
        ];
        args.extend(tls(&self.dir, "origin-1"));
        self.origin = Some(spawn(&args, &self.dir.join("origin.log")));
        wait_healthy(self.origin_http).await;
    }

    fn token(&self, room: &str, who: &str, role: Role) -> String {
        self.signer.mint(
            RoomId::new(room).unwrap(),
            Identity::new(who).unwrap(),
            role,
            None,
            unix_now(),
            600,
        )
    }

    async fn connect(&self, edge: usize) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", self.edges[edge].0))
            .await
            .unwrap();
        let mut c = Client {
            ws,
            next_id: 1,
            events: VecDeque::new(),
            closed: false,
        };
        c.ok(json!({"type": "hello", "version": 2})).await;
        c
    }

    /// A client on edge `edge` joined to `room`, with its ack.
    async fn join(&self, edge: usize, room: &str, who: &str, role: Role) -> (Client, Value) {
        let mut c = self.connect(edge).await;
        let ack = c
            .ok(json!({"type": "room:join", "token": self.token(room, who, role)}))
            .await;
        (c, ack)
    }

    /// A join that may fail while links reconnect: retried until it works.
    async fn join_eventually(&self, edge: usize, room: &str, who: &str) -> (Client, Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut c = self.connect(edge).await;
            let r = c
                .request(
                    json!({"type": "room:join", "token": self.token(room, who, Role::Attendee)}),
                )
                .await;
            if r["type"] == "ack" {
                return (c, r);
            }
            assert_eq!(r["code"], "origin_unavailable", "{r}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "edge {edge} never reconnected"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.edges.clear();
        self.origin = None;
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("logs kept in {}", self.dir.display());
        }
    }
}

struct Client {
    ws: Ws,
    next_id: u64,
    events: VecDeque<Value>,
    closed: bool,
}

impl Client {
    async fn read(&mut self, within: Duration) -> Option<Value> {
        loop {
            let msg = match tokio::time::timeout(within, self.ws.next()).await {
                Err(_) => return None,
                Ok(m) => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    self.closed = true;
                    return None;
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    async fn request(&mut self, mut v: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = self
                .read(WAIT)
                .await
                .unwrap_or_else(|| panic!("no reply to {v}"));
            if m["id"] == json!(id) && (m["type"] == "ack" || m["type"] == "error") {
                return m;
            }
            self.events.push_back(m);
        }
    }

    async fn ok(&mut self, v: Value) -> Value {
        let r = self.request(v.clone()).await;
        assert_eq!(r["type"], "ack", "{v} -> {r}");
        r
    }

    async fn event_where(&mut self, ty: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["type"] == ty && pred(e)) {
            return self.events.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self
                .read(left)
                .await
                .unwrap_or_else(|| panic!("no {ty} event; kept: {:?}", self.events));
            if m["type"] == ty && pred(&m) {
                return m;
            }
            self.events.push_back(m);
        }
    }

    async fn closed_by_server(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.closed {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "connection still open");
            if let Some(m) = self.read(left).await {
                self.events.push_back(m);
            }
        }
    }
}

fn pid(ack: &Value) -> u64 {
    ack["you"]["id"].as_u64().unwrap()
}

/// Participant ids of a list of participants (or of ids, as `participant:left` sends).
fn ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().or_else(|| p["id"].as_u64()).unwrap())
        .collect()
}

/// A raw cascade peer (not an edge process) with the given credentials.
fn prober(dir: &Path, node: &str) -> LinkEndpoint {
    let creds = NodeCredentials::from_pem_files(
        &dir.join("ca.pem"),
        &dir.join(format!("{node}.pem")),
        &dir.join(format!("{node}.key")),
    )
    .unwrap();
    let hello = Hello {
        node: Label::new(node).unwrap(),
        region: Label::new("local").unwrap(),
        role: NodeRole::Edge,
        version: PROTOCOL_VERSION,
    };
    LinkEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &creds,
        LinkConfig::new(hello),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_one_origin_meet_survive_bad_peers_and_an_origin_restart() {
    // (An origin restart is rebuilt from the edges: see cascade_proto::replica.)
    let mut cluster = Cluster::start().await;
    let origin_addr: SocketAddr = ([127, 0, 0, 1], cluster.origin_cascade).into();

    // Host on edge A, guest on edge B: one room, one roster.
    let (mut host, hack) = cluster.join(0, "c1", "host", Role::Host).await;
    let hid = pid(&hack);
    let (mut guest, gack) = cluster.join(1, "c1", "guest", Role::Attendee).await;
    let gid = pid(&gack);
    assert!(ids(&gack["participants"]).contains(&hid), "{gack}");
    assert!(ids(&gack["participants"]).contains(&gid), "{gack}");
    host.event_where("participant:joined", |e| {
        ids(&e["participants"]).contains(&gid)
    })
    .await;
    assert_eq!(metric(cluster.origin_http, "kcs_origin_links").await, 2);
    assert_eq!(
        metric(cluster.origin_http, "kcs_origin_participants").await,
        2
    );

    // Chat from A arrives on B in order.
    for n in 0..5 {
        host.ok(json!({"type": "chat:send", "text": format!("m{n}")}))
            .await;
    }
    let mut texts = Vec::new();
    for _ in 0..5 {
        let e = guest.event_where("chat:receive", |_| true).await;
        texts.push(e["message"]["text"].as_str().unwrap().to_string());
    }
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);

    // A peer whose certificate comes from another CA never gets a link.
    let other = cluster.dir.join("other-ca");
    certs(&other, "edge-x");
    let stranger = prober(&other, "edge-x");
    let refused = stranger
        .connect(origin_addr, &Label::new("origin-1").unwrap())
        .await;
    assert!(refused.is_err(), "a certificate from another CA is refused");
    // The stranger refuses the origin's certificate too and may give up before the origin has
    // counted its side of the failure.
    metric_at_least(cluster.origin_http, "kcs_origin_handshakes_failed_total", 1).await;

    // A peer that breaks the wire format loses its own stream, with a reason; the room goes on.
    let probe = prober(&cluster.dir, "prober");
    let mut link = probe
        .connect(origin_addr, &Label::new("origin-1").unwrap())
        .await
        .expect("a cluster certificate links");
    link.sender.send_raw(&[9, 0x10, 0, 0, 1, 0]).await.unwrap();
    let goodbye = tokio::time::timeout(WAIT, link.receiver.recv())
        .await
        .expect("answered");
    match goodbye {
        Ok(ControlMessage::Goodbye { code, reason }) => {
            assert_eq!(code, GoodbyeCode::ProtocolError);
            assert!(reason.contains("0x101"), "{reason}");
        }
        other => panic!("expected a goodbye, got {other:?}"),
    }
    metric_at_least(cluster.origin_http, "kcs_origin_links_refused_total", 1).await;
    host.ok(json!({"type": "chat:send", "text": "still here"}))
        .await;
    guest
        .event_where("chat:receive", |e| e["message"]["text"] == "still here")
        .await;

    // A second guest on B stays to the end and raises a hand.
    let (mut stayer, sack) = cluster.join(1, "c1", "stayer", Role::Attendee).await;
    let sid = pid(&sack);
    stayer.ok(json!({"type": "hand:raise"})).await;
    host.event_where("hand:raise", |e| e["participant"] == sid)
        .await;

    // The host on A mutes, then removes, the guest on B.
    host.ok(json!({"type": "mute:remote", "participant": gid}))
        .await;
    let ask = guest.event_where("mute:remote", |_| true).await;
    assert_eq!(ask["by"], hid);
    host.ok(json!({"type": "participant:remove", "participant": gid}))
        .await;
    let removed = guest.event_where("participant:remove", |_| true).await;
    assert_eq!(removed["by"], hid);
    guest.closed_by_server().await;
    host.event_where("participant:left", |e| {
        ids(&e["participants"]).contains(&gid)
    })
    .await;

    // The origin dies: joins fail with a clear code meanwhile.
    drop(cluster.origin.take());
    let mut c = cluster.connect(0).await;
    let r = c
        .request(
            json!({"type": "room:join", "token": cluster.token("c2", "early", Role::Attendee)}),
        )
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!("origin_unavailable")),
        "{r}"
    );
    cluster.start_origin().await;

    // The new origin process rebuilds room c1 from the two edges' replicas: the sessions on
    // both edges carry on, and nothing they were told is lost.
    let mut restored = false;
    for _ in 0..100 {
        let r = host
            .request(json!({"type": "chat:send", "text": "after the restart"}))
            .await;
        if r["type"] != "error" {
            restored = true;
            break;
        }
        // While the link redials: origin_unavailable. A request that waited for the dial can
        // reach the new origin just before the edge's restore of the room: not_in_room.
        assert!(
            r["code"] == "origin_unavailable" || r["code"] == "not_in_room",
            "{r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(restored, "the host's session survived the origin restart");
    stayer
        .event_where("chat:receive", |e| {
            e["message"]["text"] == "after the restart"
        })
        .await;
    let (_late, lack) = cluster.join(0, "c1", "late", Role::Attendee).await;
    let roster = ids(&lack["participants"]);
    assert!(roster.contains(&hid) && roster.contains(&sid), "{lack}");
    assert!(
        !roster.contains(&gid),
        "the removed guest stays gone: {lack}"
    );
    assert_eq!(lack["hands"], json!([sid]), "{lack}");
    let history: Vec<&str> = lack["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        [
            "m0",
            "m1",
            "m2",
            "m3",
            "m4",
            "still here",
            "after the restart"
        ],
        "{lack}"
    );
    assert!(pid(&lack) > sid, "participant ids are not reused");

    // Both edges redial; new joins work and meet across the edges again.
    let (mut a, aack) = cluster.join_eventually(0, "c3", "alice").await;
    let (_b, back) = cluster.join_eventually(1, "c3", "bob").await;
    assert!(ids(&back["participants"]).contains(&pid(&aack)), "{back}");
    a.event_where("participant:joined", |e| {
        ids(&e["participants"]).contains(&pid(&back))
    })
    .await;
    for (http, _) in &cluster.edges {
        assert!(
            metric(*http, "kcs_origin_link_connects_total").await >= 2,
            "edge redialled"
        );
        assert_eq!(metric(*http, "kcs_origin_links").await, 1);
    }
}

/// A raw edge on a link: sends room messages, reads what the origin sends.
struct RawEdge {
    link: cascade_proto::quic::Link,
    _endpoint: LinkEndpoint,
}

impl RawEdge {
    async fn attach(
        ca: &cascade_proto::quic::ClusterCa,
        origin: SocketAddr,
        node: &str,
        incarnation: u64,
    ) -> (RawEdge, bool) {
        let creds = ca.issue(&Label::new(node).unwrap()).unwrap();
        let hello = Hello {
            node: Label::new(node).unwrap(),
            region: Label::new("local").unwrap(),
            role: NodeRole::Edge,
            version: PROTOCOL_VERSION,
        };
        let endpoint = LinkEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &creds,
            LinkConfig::new(hello),
        )
        .unwrap();
        let mut link = endpoint
            .connect(origin, &Label::new("origin-1").unwrap())
            .await
            .unwrap();
        link.sender
            .send(&ControlMessage::ToOrigin(EdgeToOrigin::Attach {
                incarnation,
            }))
            .await
            .unwrap();
        let mut e = RawEdge {
            link,
            _endpoint: endpoint,
        };
        match e.next().await {
            OriginToEdge::Attached { resumed } => (e, resumed),
            other => panic!("expected attached, got {other:?}"),
        }
    }

    async fn next(&mut self) -> OriginToEdge {
        match tokio::time::timeout(WAIT, self.link.receiver.recv()).await {
            Ok(Ok(ControlMessage::ToEdge(m))) => m,
            other => panic!("expected a room message, got {other:?}"),
        }
    }

    async fn send(&mut self, id: u64, intent: Intent) {
        self.link
            .sender
            .send(&ControlMessage::ToOrigin(EdgeToOrigin::Request {
                id: RequestId(id),
                room: RoomId::new("g").unwrap(),
                intent,
            }))
            .await
            .unwrap();
    }

    async fn join(&mut self, id: u64, who: &str) -> u64 {
        self.send(
            id,
            Intent::Join {
                identity: Identity::new(who).unwrap(),
                role: Role::Host,
                name: who.into(),
            },
        )
        .await;
        loop {
            if let OriginToEdge::Reply {
                reply: Reply::Joined(s),
                ..
            } = self.next().await
            {
                return s.you.id.0;
            }
        }
    }

    /// The next event with this body, skipping others.
    async fn event(&mut self, pred: impl Fn(&RoomEventBody) -> bool) -> RoomEventBody {
        loop {
            if let OriginToEdge::Event(e) = self.next().await {
                if pred(&e.body) {
                    return e.body;
                }
            }
        }
    }
}

use cascade_proto::room::{EdgeToOrigin, Intent, OriginToEdge, Reply, RequestId, RoomEventBody};

/// The origin's grace period, over real QUIC links to an in-process `kcs origin`: an edge that
/// comes back with the same incarnation gets the events it missed, in order; one that stays
/// away past the grace period has its participants leave; a restarted edge (new incarnation)
/// has its old participants leave at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_keeps_a_dropped_edge_for_its_grace_period() {
    let ca = cascade_proto::quic::ClusterCa::generate("test-ca").unwrap();
    let origin = edge_node::origin_server::start(
        edge_node::origin_server::OriginSettings {
            cascade: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            node: Label::new("origin-1").unwrap(),
            region: Label::new("local").unwrap(),
            credentials: ca.issue(&Label::new("origin-1").unwrap()).unwrap(),
            grace: Duration::from_millis(1500),
            rooms: origin::RoomConfig::default(),
        },
        std::sync::Arc::new(edge_node::media_hook::LoggingMediaSide),
    )
    .await
    .unwrap();
    let (mut a, resumed) = RawEdge::attach(&ca, origin.cascade, "edge-a", 1).await;
    assert!(!resumed, "a new edge resumes nothing");
    let (mut b, _) = RawEdge::attach(&ca, origin.cascade, "edge-b", 7).await;
    let ann = a.join(1, "ann").await;
    let bob = b.join(1, "bob").await;
    a.event(
        |e| matches!(e, RoomEventBody::ParticipantsJoined(p) if p.iter().any(|p| p.id.0 == bob)),
    )
    .await;

    // A's link drops; B chats meanwhile; A comes back with the same incarnation.
    a.link.media.close(GoodbyeCode::Normal, "test drop");
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, text) in ["one", "two"].iter().enumerate() {
        b.send(
            10 + i as u64,
            Intent::Chat {
                participant: cascade_proto::ParticipantId(bob),
                text: text.to_string(),
                to: None,
            },
        )
        .await;
    }
    let (mut a, resumed) = RawEdge::attach(&ca, origin.cascade, "edge-a", 1).await;
    assert!(resumed, "same incarnation within the grace period");
    let mut got = Vec::new();
    while got.len() < 2 {
        if let RoomEventBody::Chat(m) = a.event(|e| matches!(e, RoomEventBody::Chat(_))).await {
            got.push(m.text);
        }
    }
    assert_eq!(got, ["one", "two"], "queued events arrive in order");
    assert_eq!(
        metric(origin.http, "kcs_origin_edges_resumed_total").await,
        1
    );

    // A stays away past the grace period: B sees ann leave.
    a.link.media.close(GoodbyeCode::Normal, "test drop");
    drop(a);
    let left = b
        .event(|e| matches!(e, RoomEventBody::ParticipantsLeft(p) if p.iter().any(|p| p.0 == ann)))
        .await;
    assert!(matches!(left, RoomEventBody::ParticipantsLeft(_)));
    let (_a, resumed) = RawEdge::attach(&ca, origin.cascade, "edge-a", 1).await;
    assert!(!resumed, "the grace period is over");

    // B restarts (a new incarnation): bob leaves at once.
    let (mut b2, resumed) = RawEdge::attach(&ca, origin.cascade, "edge-b", 8).await;
    assert!(!resumed);
    assert_eq!(
        metric(origin.http, "kcs_origin_edges_expired_total").await,
        2
    );
    let carl = b2.join(2, "carl").await;
    assert_ne!(carl, bob);
    tokio::time::sleep(Duration::from_millis(500)).await; // the gauge follows the presence tick
    assert_eq!(metric(origin.http, "kcs_origin_participants").await, 1);
}
