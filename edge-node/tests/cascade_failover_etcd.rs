//! Origin failover onto a NEW origin, with real parts: etcd, `kcs control-plane` (its
//! reassigner re-places the rooms of an origin whose registration expired), two `kcs origin`
//! processes in region eu, two `kcs edge --etcd` processes, and WebSocket participants (host on
//! edge A, guest on edge B) in one room.
//!
//! - the room is placed on one origin (read from etcd); chat is sent;
//! - that origin is SIGKILLed; its registration lease expires (~5 s), the control plane
//!   re-places the room on the other origin (epoch + 1), and both edges follow the placement
//!   watch: they route the room to the new origin and rebuild it there from their replicas;
//! - the host's session carries on: a request fails only with `origin_unavailable` meanwhile
//!   (never `not_in_room`: requests wait for the room's restore); a chat the host sends after
//!   the move reaches the guest; a new joiner sees the roster and the chat from before the kill.
//!
//! The time from the kill to the host's first successful request is printed, never asserted.

mod common;

use common::etcd::EtcdCluster;
use common::*;
use control_plane::keys::KeyLayout;
use control_plane::placement::Placer;
use control_plane::{EtcdStore, Store};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A protocol-2 WebSocket client: requests with ids, events kept until asked for.
struct Client {
    ws: Ws,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Client {
    async fn connect(http: SocketAddr) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
            .await
            .unwrap();
        let mut c = Client {
            ws,
            next_id: 1,
            events: VecDeque::new(),
        };
        c.ok(json!({"type": "hello", "version": 2})).await;
        c
    }

    async fn read(&mut self, within: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(within, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return None
                }
                Ok(Some(Ok(_))) => continue,
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

    async fn chat_received(&mut self, text: &str) {
        if self
            .events
            .iter()
            .any(|e| e["type"] == "chat:receive" && e["message"]["text"] == text)
        {
            return;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .read(left)
                .await
                .unwrap_or_else(|| panic!("chat {text:?} never came; kept: {:?}", self.events));
            if m["type"] == "chat:receive" && m["message"]["text"] == text {
                return;
            }
            self.events.push_back(m);
        }
    }

    /// Sends `text` until the edge accepts it; while the room is moving only
    /// `origin_unavailable` is an acceptable refusal.
    async fn chat_until_accepted(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let r = self
                .request(json!({"type": "chat:send", "text": text}))
                .await;
            if r["type"] == "ack" {
                return;
            }
            assert_eq!(r["code"], "origin_unavailable", "{r}");
            assert!(Instant::now() < deadline, "{text:?} never accepted: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_follow_a_room_moved_onto_a_new_origin_and_the_meeting_carries_on() {
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints().join(",");
    let dir = std::env::temp_dir().join(format!("kcs-move-etcd-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    certs(&dir, "origin-1,origin-2,edge-a,edge-b");
    let signer = control_plane::token::TokenSigner::from_seed("test", &[9; 32]);
    let key: String = signer
        .public_key()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let room = cascade_proto::RoomId::new("moving").unwrap();
    let token = |who: &str, role: cascade_proto::Role| {
        signer.mint(
            room.clone(),
            cascade_proto::Identity::new(who).unwrap(),
            role,
            None,
            control_plane::token::unix_now(),
            600,
        )
    };

    // The control plane: its reassigner moves the rooms of a dead origin.
    let (_cp, _) = control_plane(&dir, &etcd.endpoints(), "").await;

    // Two origins in one region, both registered (placement picks one for the room).
    let mut origins: Vec<(&str, SocketAddr, Option<Proc>)> = Vec::new();
    for node in ["origin-1", "origin-2"] {
        let (port, http) = (free_port(), local(free_port()));
        let mut args: Vec<String> = vec![
            "origin".into(),
            "--cascade".into(),
            format!("127.0.0.1:{port}"),
            "--http".into(),
            http.to_string(),
            "--region".into(),
            "eu".into(),
            "--etcd".into(),
            endpoints.clone(),
        ];
        args.extend(tls(&dir, node));
        origins.push((node, http, Some(kcs(&dir, node, &args))));
    }
    for (_, http, _) in &origins {
        wait_healthy(*http).await;
    }

    let mut edges: Vec<(SocketAddr, Proc)> = Vec::new();
    for node in ["edge-a", "edge-b"] {
        let http = local(free_port());
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
            format!("127.0.0.1:{}", free_port()),
            "--token-public-key".into(),
            format!("test:{key}"),
            "--etcd".into(),
            endpoints.clone(),
            "--region".into(),
            "eu".into(),
            "--data-dir".into(),
            dir.join(node).display().to_string(),
        ];
        a.extend(tls(&dir, node));
        edges.push((http, kcs(&dir, node, &a)));
    }
    for (http, _) in &edges {
        wait_healthy(*http).await;
    }
    let (edge_a, edge_b) = (edges[0].0, edges[1].0);

    // Host on A, guest on B; chat before the kill.
    let mut host = Client::connect(edge_a).await;
    let hack = host
        .ok(json!({"type": "room:join", "token": token("hana", cascade_proto::Role::Host)}))
        .await;
    let mut guest = Client::connect(edge_b).await;
    let gack = guest
        .ok(json!({"type": "room:join", "token": token("gus", cascade_proto::Role::Attendee)}))
        .await;
    let (hid, gid) = (
        hack["you"]["id"].as_u64().unwrap(),
        gack["you"]["id"].as_u64().unwrap(),
    );
    for text in ["before 1", "before 2"] {
        host.ok(json!({"type": "chat:send", "text": text})).await;
        guest.chat_received(text).await;
    }

    // Which origin holds the room, as etcd says.
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(
            &serde_json::from_value(json!({ "endpoints": etcd.endpoints() })).unwrap(),
        )
        .await
        .unwrap(),
    );
    let placer = Placer::new(store, KeyLayout::default());
    let before = placer
        .lookup(&room)
        .await
        .unwrap()
        .expect("the room is placed");
    let dead = origins
        .iter()
        .position(|(node, _, _)| *node == before.origin.as_str())
        .expect("placed on one of the two origins");
    let survivor = origins[1 - dead].0;

    // SIGKILL it.
    let killed_at = Instant::now();
    origins[dead].2 = None;

    // The host's session carries on once the edge follows the move.
    host.chat_until_accepted("host back", Duration::from_secs(25))
        .await;
    let first_success = killed_at.elapsed();
    println!("kill -> first successful request on the host's edge: {first_success:?}");
    let after = placer.lookup(&room).await.unwrap().expect("still placed");
    assert_eq!(after.origin.as_str(), survivor, "{after:?}");
    assert!(after.epoch > before.epoch, "{before:?} -> {after:?}");

    // Once the guest's edge has restored the room too (the guest's own request passes), the
    // host's chat reaches the guest.
    guest
        .chat_until_accepted("guest back", Duration::from_secs(15))
        .await;
    host.ok(json!({"type": "chat:send", "text": "after the move"}))
        .await;
    guest.chat_received("after the move").await;

    // A new joiner on the survivor sees who is there and what was said before the kill.
    let mut late = Client::connect(edge_b).await;
    let lack = late
        .ok(json!({"type": "room:join", "token": token("lea", cascade_proto::Role::Attendee)}))
        .await;
    let roster: Vec<u64> = lack["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().or_else(|| p["id"].as_u64()).unwrap())
        .collect();
    assert!(roster.contains(&hid) && roster.contains(&gid), "{lack}");
    let history: Vec<&str> = lack["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        [
            "before 1",
            "before 2",
            "host back",
            "guest back",
            "after the move"
        ],
        "{lack}"
    );

    for (http, _) in &edges {
        assert!(
            metric(*http, "kcs_uplink_rooms_moved_total").await >= 1,
            "edge {http} counted the move"
        );
    }
    drop(edges);
    drop(origins);
    let _ = std::fs::remove_dir_all(&dir);
}
