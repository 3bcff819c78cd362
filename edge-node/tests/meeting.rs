//! The meeting protocol (docs/protocol.md, version 2) against a real edge: in-process, real
//! WebSocket connections, the real origin state machine behind it. Every request and event of
//! the catalog; every role's allowed and refused actions; the lobby; the lock; invitations;
//! reconnect with a resume token; chat order under concurrent senders.

use cascade_proto::{Identity, Role, RoomId};
use control_plane::token::{unix_now, TokenSigner, TokenVerifier};
use edge_node::config::EdgeConfig;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A publisher offer as aiortc makes it (audio and video), for `produce` without a browser.
const AIORTC_OFFER: &str = include_str!("../../fuzz/corpus/sdp_offer/aiortc_publish_offer.sdp");

const SEED: [u8; 32] = [7; 32];

struct Env {
    http: std::net::SocketAddr,
    signer: TokenSigner,
    _running: edge_node::app::Running,
}

async fn start() -> Env {
    start_with(EdgeConfig {
        http: "127.0.0.1:0".parse().unwrap(),
        udp: "127.0.0.1:0".parse().unwrap(),
        workers: 1,
        ..Default::default()
    })
    .await
}

async fn start_with(config: EdgeConfig) -> Env {
    let signer = TokenSigner::from_seed("test", &SEED);
    let mut verifier = TokenVerifier::new();
    verifier.add_key(signer.kid(), &signer.public_key());
    // The edge mints participant:add and room:create tokens with the same key (dev mode).
    let dev = TokenSigner::from_seed("test", &SEED);
    let running = edge_node::app::start(config, verifier, Some(dev))
        .await
        .unwrap();
    Env {
        http: running.http,
        signer,
        _running: running,
    }
}

impl Env {
    fn token(&self, room: &str, who: &str, role: Role) -> String {
        self.signer.mint(
            RoomId::new(room).unwrap(),
            Identity::new(who).unwrap(),
            role,
            None,
            unix_now(),
            60,
        )
    }

    async fn connect(&self) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", self.http))
            .await
            .unwrap();
        Client {
            ws,
            next_id: 1,
            events: VecDeque::new(),
            closed: false,
        }
    }

    /// A client joined to `room` (not waiting), with its ack.
    async fn join(&self, room: &str, who: &str, role: Role) -> (Client, Value) {
        let mut c = self.connect().await;
        let ack = c
            .ok(json!({"type": "room:join", "token": self.token(room, who, role)}))
            .await;
        assert!(ack["waiting"].is_null(), "{who} waits: {ack}");
        (c, ack)
    }
}

struct Client {
    ws: Ws,
    next_id: u64,
    /// Events read while waiting for something else.
    events: VecDeque<Value>,
    closed: bool,
}

const WAIT: Duration = Duration::from_secs(5);

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

    /// Sends a request (its id assigned here) and returns the reply, keeping events for later.
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

    async fn refused(&mut self, v: Value, code: &str) -> Value {
        let r = self.request(v.clone()).await;
        assert_eq!(
            (r["type"].as_str(), r["code"].as_str()),
            (Some("error"), Some(code)),
            "{v} -> {r}"
        );
        assert!(!r["message"].as_str().unwrap().is_empty());
        r
    }

    /// The next event of type `ty` matching `pred` (others are kept).
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

    async fn event(&mut self, ty: &str) -> Value {
        self.event_where(ty, |_| true).await
    }

    /// Asserts no event of type `ty` arrives within `within`.
    async fn no_event(&mut self, ty: &str, within: Duration) {
        assert!(
            !self.events.iter().any(|e| e["type"] == ty),
            "unexpected {ty}: {:?}",
            self.events
        );
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.read(left).await {
                Some(m) => {
                    assert_ne!(m["type"], ty, "unexpected {m}");
                    self.events.push_back(m);
                }
                None => return,
            }
        }
    }

    /// Answers a subscriber `sdp:offer` as a browser would: the same m-lines, receive-only,
    /// DTLS client, a full ICE agent (the ICE and DTLS details are not exercised here).
    async fn answer(&mut self, offer: &Value) {
        let sdp: String = offer["sdp"]
            .as_str()
            .unwrap()
            .lines()
            .filter(|l| *l != "a=ice-lite" && !l.starts_with("a=candidate"))
            .map(|l| match l {
                "a=setup:actpass" => "a=setup:active\r\n".to_owned(),
                "a=sendonly" => "a=recvonly\r\n".to_owned(),
                l => format!("{l}\r\n"),
            })
            .collect();
        self.ok(json!({"type": "sdp:answer", "revision": offer["revision"], "sdp": sdp}))
            .await;
    }

    /// Waits for the server to close the connection.
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

    /// Every room event's seq seen so far is consecutive (the seq-gap check clients do).
    fn room_seqs(&self) -> Vec<u64> {
        self.events
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    }
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn pid(ack: &Value) -> u64 {
    ack["you"]["id"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_negotiates_versions() {
    let env = start().await;
    let mut c = env.connect().await;
    for v in [1, 2] {
        let r = c.ok(json!({"type": "hello", "version": v})).await;
        assert_eq!(r["version"], v);
    }
    for v in [0, 3] {
        let r = c
            .refused(
                json!({"type": "hello", "version": v}),
                "unsupported_version",
            )
            .await;
        assert!(r["message"].as_str().unwrap().contains("1 to 2"), "{r}");
    }
    c.refused(json!({"type": "chat:send", "text": "hi"}), "not_joined")
        .await;
    // room:create (dev mode) gives a host token that joins the new room.
    let created = c.ok(json!({"type": "room:create", "name": "Ann"})).await;
    let token = created["token"].as_str().unwrap();
    assert!(created["link"].as_str().unwrap().contains(token));
    let ack = c.ok(json!({"type": "room:join", "token": token})).await;
    assert_eq!(ack["room"], created["room"]);
    assert_eq!(ack["you"]["role"], "host");
    assert_eq!(ack["you"]["name"], "Ann");
    assert!(ack["resumeToken"].as_str().unwrap().len() >= 32);
    c.refused(
        json!({"type": "room:join", "token": token}),
        "already_joined",
    )
    .await;
}

/// What each role may do: every request of the matrix, allowed or refused with `forbidden`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_is_allowed_and_refused_what_the_matrix_says() {
    let env = start().await;
    let roles = [
        ("h", Role::Host),
        ("c", Role::CoHost),
        ("p", Role::Presenter),
        ("a", Role::Attendee),
        ("v", Role::Viewer),
    ];
    let mut clients = Vec::new();
    for (who, role) in roles {
        let (c, ack) = env.join("m1", who, role).await;
        clients.push((c, pid(&ack), role));
    }
    // A target every role could aim at: another attendee.
    let (mut t, tack) = env.join("m1", "target", Role::Attendee).await;
    let target = pid(&tack);
    // (request, roles allowed: host, co-host, presenter, attendee, viewer, code when allowed)
    let cases: Vec<(Value, [bool; 5], &str)> = vec![
        (
            json!({"type": "mute:remote", "participant": target}),
            [true, true, false, false, false],
            "",
        ),
        (
            json!({"type": "mute:remote", "participant": target, "muted": false}),
            [true, true, false, false, false],
            "",
        ),
        (
            json!({"type": "role:update", "participant": target, "role": "attendee"}),
            [true, false, false, false, false],
            "",
        ),
        (
            json!({"type": "lobby:admit", "participant": 999}),
            [true, true, false, false, false],
            "no_such_participant",
        ),
        (
            json!({"type": "lobby:deny", "participant": 999}),
            [true, true, false, false, false],
            "no_such_participant",
        ),
        (
            json!({"type": "room:lock", "locked": false}),
            [true, true, false, false, false],
            "",
        ),
        (
            json!({"type": "room:lobby", "enabled": false}),
            [true, true, false, false, false],
            "",
        ),
        (
            json!({"type": "layout:update", "layout": "grid"}),
            [true, true, false, false, false],
            "",
        ),
        (
            json!({"type": "hand:lower", "participant": target}),
            [true, true, false, false, false],
            "",
        ),
        (
            json!({"type": "participant:add", "identity": "friend"}),
            [true, true, false, false, false],
            "",
        ),
        (
            json!({"type": "stream:start"}),
            [true, true, false, false, false],
            "not_available",
        ),
        (
            json!({"type": "stream:stop"}),
            [true, true, false, false, false],
            "not_available",
        ),
        (
            json!({"type": "screenshare:start"}),
            [true, true, true, false, false],
            "",
        ),
        (
            json!({"type": "screen:publish"}),
            [true, true, true, false, false],
            "",
        ),
        (
            json!({"type": "webcam:publish"}),
            [true, true, true, true, false],
            "",
        ),
        (
            json!({"type": "webcam:publish", "source": "microphone"}),
            [true, true, true, true, false],
            "",
        ),
        (
            json!({"type": "participant:remove", "participant": 999}),
            [true, true, false, false, false],
            "no_such_participant",
        ),
        (
            json!({"type": "room:close"}),
            [true, false, false, false, false],
            "",
        ),
    ];
    for (req, allowed, code) in &cases {
        for (i, (c, _, role)) in clients.iter_mut().enumerate() {
            // room:close is allowed for the host, tested last.
            if i == 0 && req["type"] == "room:close" {
                continue;
            }
            if allowed[i] {
                if code.is_empty() {
                    c.ok(req.clone()).await;
                } else {
                    c.refused(req.clone(), code).await;
                }
            } else {
                let r = c.refused(req.clone(), "forbidden").await;
                assert!(
                    r["message"].as_str().unwrap().contains(role.as_str()),
                    "{r}"
                );
            }
        }
    }
    // Everyone may chat, react and raise a hand.
    for (c, _, _) in clients.iter_mut() {
        c.ok(json!({"type": "chat:send", "text": "hi"})).await;
        c.ok(json!({"type": "reaction:send", "emoji": "👏"})).await;
        c.ok(json!({"type": "hand:raise"})).await;
    }
    // Nobody may target themselves with a moderator action.
    let (h, hid, _) = &mut clients[0];
    let hid = *hid;
    h.refused(
        json!({"type": "mute:remote", "participant": hid}),
        "bad_request",
    )
    .await;
    h.refused(
        json!({"type": "participant:remove", "participant": hid}),
        "bad_request",
    )
    .await;
    // A co-host may not mute or remove the host.
    let (c, _, _) = &mut clients[1];
    c.refused(
        json!({"type": "mute:remote", "participant": hid}),
        "forbidden",
    )
    .await;
    c.refused(
        json!({"type": "participant:remove", "participant": hid}),
        "forbidden",
    )
    .await;
    // An attendee may not mute the host (the example).
    let (a, _, _) = &mut clients[3];
    a.refused(
        json!({"type": "mute:remote", "participant": hid}),
        "forbidden",
    )
    .await;
    // The removal works for the host, and the target is told and disconnected.
    let (h, _, _) = &mut clients[0];
    h.ok(json!({"type": "participant:remove", "participant": target}))
        .await;
    let removed = t.event("participant:remove").await;
    assert_eq!(removed["by"], hid);
    t.closed_by_server().await;
    let (v, _, _) = &mut clients[4];
    v.event_where("participant:left", |e| {
        e["participants"]
            .as_array()
            .unwrap()
            .contains(&json!(target))
    })
    .await;
    // Ending the meeting: only the host; everyone hears room:close and is disconnected.
    let (h, _, _) = &mut clients[0];
    h.ok(json!({"type": "room:close"})).await;
    for (c, _, _) in clients.iter_mut() {
        c.event("room:close").await;
        c.closed_by_server().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lobby_admits_and_denies_and_the_lock_holds_except_for_the_invited() {
    let env = start().await;
    let (mut h, hack) = env.join("m2", "host", Role::Host).await;
    let hid = pid(&hack);
    h.ok(json!({"type": "room:lobby", "enabled": true})).await;
    let upd = h.event("room:update").await;
    assert_eq!(upd["settings"]["lobby"], true);

    let mut g = env.connect().await;
    let w = g
        .ok(json!({"type": "room:join", "token": env.token("m2", "guest", Role::Attendee)}))
        .await;
    assert_eq!(w["waiting"], true, "{w}");
    let gid = pid(&w);
    let lobby = h
        .event_where("lobby:update", |e| {
            !e["waiting"].as_array().unwrap().is_empty()
        })
        .await;
    assert_eq!(lobby["waiting"][0]["identity"], "guest");
    assert!(lobby.get("seq").is_none(), "personal events carry no seq");
    // Waiting: nothing but leaving.
    g.refused(
        json!({"type": "chat:send", "text": "let me in"}),
        "in_lobby",
    )
    .await;
    g.refused(json!({"type": "hand:raise"}), "in_lobby").await;
    // The host chats meanwhile; the waiting guest does not hear it...
    h.ok(json!({"type": "chat:send", "text": "before you came"}))
        .await;
    h.ok(json!({"type": "lobby:admit", "participant": gid}))
        .await;
    let joined = g.event("room:joined").await;
    assert_eq!(pid(&joined), gid);
    assert!(joined["resumeToken"].is_string());
    assert!(joined["participants"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == gid));
    // ...but gets it as history.
    assert_eq!(joined["chat"][0]["text"], "before you came");
    assert!(g.events.iter().all(|e| e["type"] != "chat:receive"));
    h.event_where("participant:joined", |e| {
        e["participants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == gid)
    })
    .await;
    g.ok(json!({"type": "chat:send", "text": "thanks"})).await;

    // Denied: told, and closed.
    let mut d = env.connect().await;
    let w = d
        .ok(json!({"type": "room:join", "token": env.token("m2", "denied", Role::Attendee)}))
        .await;
    let did = pid(&w);
    h.ok(json!({"type": "lobby:deny", "participant": did}))
        .await;
    d.event("lobby:denied").await;
    d.closed_by_server().await;
    h.refused(
        json!({"type": "lobby:admit", "participant": did}),
        "no_such_participant",
    )
    .await;
    // Attendees see no lobby events.
    g.no_event("lobby:update", Duration::from_millis(300)).await;

    // A co-host token skips the lobby.
    let (_c, _) = env.join("m2", "cohost", Role::CoHost).await;

    // Lock: guests are refused...
    h.ok(json!({"type": "room:lock", "locked": true})).await;
    let mut x = env.connect().await;
    x.refused(
        json!({"type": "room:join", "token": env.token("m2", "late", Role::Attendee)}),
        "room_locked",
    )
    .await;
    // ...unless added: the invited identity, connected in another room on this edge, is told
    // and its new token goes through the lock and past the lobby.
    let (mut elsewhere, _) = env.join("other-room", "late", Role::Attendee).await;
    let added = h
        .ok(json!({"type": "participant:add", "identity": "late", "role": "presenter"}))
        .await;
    let token = added["token"].as_str().unwrap().to_string();
    assert_eq!(added["role"], "presenter");
    let notice = elsewhere.event("participant:add").await;
    assert_eq!(notice["token"], token.as_str());
    assert_eq!(notice["room"], "m2");
    assert_eq!(notice["by"], "host");
    let ack = x.ok(json!({"type": "room:join", "token": token})).await;
    assert!(ack["waiting"].is_null(), "{ack}");
    assert_eq!(ack["you"]["role"], "presenter");
    assert_eq!(ack["settings"]["locked"], true);
    // A guest who was waiting is let in by being added.
    h.ok(json!({"type": "room:lock", "locked": false})).await;
    let mut y = env.connect().await;
    let w = y
        .ok(json!({"type": "room:join", "token": env.token("m2", "waiter", Role::Attendee)}))
        .await;
    assert_eq!(w["waiting"], true);
    h.ok(json!({"type": "participant:add", "identity": "waiter"}))
        .await;
    y.event("room:joined").await;
    let _ = hid;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_has_one_order_under_concurrent_senders() {
    let env = start().await;
    let mut clients = Vec::new();
    for i in 0..4 {
        let (c, ack) = env
            .join(
                "m3",
                &format!("u{i}"),
                if i == 0 { Role::Host } else { Role::Attendee },
            )
            .await;
        clients.push((c, pid(&ack)));
    }
    const EACH: usize = 8; // within the chat burst of 10
    let mut tasks = Vec::new();
    for (i, (mut c, _)) in clients.drain(..).enumerate() {
        tasks.push(tokio::spawn(async move {
            // Fire without waiting for acks, then collect.
            let mut ids = Vec::new();
            for n in 0..EACH {
                let id = c.next_id;
                c.next_id += 1;
                ids.push(id);
                let v = json!({"id": id, "type": "chat:send", "text": format!("u{i}-{n}")});
                c.ws.send(Message::Text(v.to_string().into()))
                    .await
                    .unwrap();
            }
            let mut received = Vec::new();
            let mut acks = 0;
            while received.len() < 4 * EACH || acks < EACH {
                let m = c.read(WAIT).await.expect("chat traffic");
                match m["type"].as_str().unwrap() {
                    "ack" => acks += 1,
                    "error" => panic!("refused: {m}"),
                    "chat:receive" => received.push((
                        m["seq"].as_u64().unwrap(),
                        m["message"]["id"].as_u64().unwrap(),
                        m["message"]["ts"].as_u64().unwrap(),
                        m["message"]["text"].as_str().unwrap().to_string(),
                    )),
                    _ => {}
                }
            }
            (c, received)
        }));
    }
    let mut orders = Vec::new();
    for t in tasks {
        let (c, received) = t.await.unwrap();
        clients.push((c, 0));
        orders.push(received);
    }
    for o in &orders {
        assert_eq!(o, &orders[0], "every participant sees the same order");
    }
    let first = &orders[0];
    assert_eq!(first.len(), 4 * EACH);
    for w in first.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "consecutive room seqs: {w:?}");
        assert!(w[1].1 > w[0].1, "increasing message ids");
        assert!(w[1].2 >= w[0].2, "timestamps never go back");
    }
    // Each sender's own messages keep their order.
    for i in 0..4 {
        let mine: Vec<&String> = first
            .iter()
            .map(|m| &m.3)
            .filter(|t| t.starts_with(&format!("u{i}-")))
            .collect();
        let want: Vec<String> = (0..EACH).map(|n| format!("u{i}-{n}")).collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>());
    }
    // The rate limit holds: a flood gets rate_limited, and the connection stays up.
    let (c, _) = &mut clients[1];
    let mut limited = 0;
    for n in 0..15 {
        let r = c
            .request(json!({"type": "chat:send", "text": format!("flood {n}")}))
            .await;
        if r["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited > 0, "15 messages at once exceed a burst of 10");
    c.ok(json!({"type": "hand:raise"})).await;
    // Direct messages reach only their recipient, outside the room sequence.
    let to = {
        let (c3, _) = &mut clients[3];
        let info = c3.ok(json!({"type": "room:members"})).await;
        info["participants"][3]["id"].as_u64().unwrap()
    };
    let (c0, _) = &mut clients[0];
    let dm = c0
        .ok(json!({"type": "chat:send", "text": "psst", "to": to}))
        .await;
    assert_eq!(dm["message"]["to"], to);
    let (c3, _) = &mut clients[3];
    let got = c3
        .event_where("chat:receive", |e| e["message"]["text"] == "psst")
        .await;
    assert!(got.get("seq").is_none());
    let (c2, _) = &mut clients[2];
    c2.no_event("nothing-else", Duration::from_millis(300))
        .await;
    assert!(
        !c2.events.iter().any(|e| e["message"]["text"] == "psst"),
        "a direct message reached a third party"
    );
    // Size limit.
    let (c1, _) = &mut clients[2];
    c1.refused(
        json!({"type": "chat:send", "text": "x".repeat(2001)}),
        "too_large",
    )
    .await;
    // History on join: the latest messages, without others' direct messages.
    let (_late, ack) = env.join("m3", "late", Role::Attendee).await;
    let texts: Vec<&str> = ack["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert!(!texts.contains(&"psst"));
    assert!(texts.contains(&"u3-7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resumes_identity_role_hand_and_replays_what_was_missed() {
    let env = start().await;
    let (mut a, aack) = env.join("m4", "alice", Role::Presenter).await;
    let (mut b, _) = env.join("m4", "bob", Role::Host).await;
    let aid = pid(&aack);
    a.ok(json!({"type": "hand:raise"})).await;
    b.event("hand:raise").await;
    // What alice saw last before her connection dropped.
    let last_seq = a.event("hand:raise").await["seq"].as_u64().unwrap();
    let token = aack["resumeToken"].as_str().unwrap().to_string();
    drop(a); // the socket goes away without room:leave
    let info = b.event("participant:info").await;
    assert_eq!(
        (info["participant"].as_u64(), info["status"].as_str()),
        (Some(aid), Some("reconnecting"))
    );
    assert!(metrics(env.http).await.contains("kcs_ws_resumable 1"));
    // Meanwhile: a chat message and a role change alice must not miss.
    b.ok(json!({"type": "chat:send", "text": "while you were away"}))
        .await;
    b.ok(json!({"type": "role:update", "participant": aid, "role": "co-host"}))
        .await;

    let mut a2 = env.connect().await;
    a2.refused(
        json!({"type": "reconnect:attempt", "resumeToken": "nope"}),
        "resume_invalid",
    )
    .await;
    let ack = a2
        .ok(json!({"type": "reconnect:attempt", "resumeToken": token, "lastSeq": last_seq}))
        .await;
    assert_eq!(pid(&ack), aid, "same participant");
    assert_eq!(ack["resumed"], true);
    assert!(metrics(env.http).await.contains("kcs_ws_resumable 0"));
    let new_token = ack["resumeToken"].as_str().unwrap();
    assert_ne!(new_token, token);
    let missed = a2
        .event_where("chat:receive", |e| {
            e["message"]["text"] == "while you were away"
        })
        .await;
    let role = a2.event("role:update").await;
    assert_eq!(role["role"], "co-host");
    assert!(role["seq"].as_u64() > missed["seq"].as_u64());
    assert_eq!(
        missed["seq"].as_u64().unwrap(),
        last_seq + 2,
        "status event, then the chat"
    );
    let back = b
        .event_where("participant:info", |e| e["status"] == "connected")
        .await;
    assert_eq!(back["participant"], aid);
    // The hand is still up and the new role works.
    b.ok(json!({"type": "hand:raise"})).await;
    let hands = b
        .event_where("hand:raise", |e| e["hands"].as_array().unwrap().len() == 2)
        .await;
    assert_eq!(hands["hands"][0], aid);
    a2.ok(json!({"type": "room:lock", "locked": true})).await;
    // A token resumes once.
    let mut a3 = env.connect().await;
    a3.refused(
        json!({"type": "reconnect:attempt", "resumeToken": token}),
        "resume_invalid",
    )
    .await;
    // A resumed connection can not resume again, and leaving is for good.
    a2.refused(
        json!({"type": "reconnect:attempt", "resumeToken": new_token}),
        "already_joined",
    )
    .await;
    a2.ok(json!({"type": "room:leave"})).await;
    b.event_where("participant:left", |e| {
        e["participants"].as_array().unwrap().contains(&json!(aid))
    })
    .await;
    let mut a4 = env.connect().await;
    a4.refused(
        json!({"type": "reconnect:attempt", "resumeToken": new_token}),
        "resume_invalid",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_controls_host_mute_screen_share_and_the_rest_of_the_catalog() {
    let env = start().await;
    let (mut h, hack) = env.join("m5", "host", Role::Host).await;
    let (mut g, gack) = env.join("m5", "guest", Role::Presenter).await;
    let (hid, gid) = (pid(&hack), pid(&gack));
    // The guest publishes microphone and camera (an aiortc offer; no media needs to flow).
    let produced = g
        .ok(json!({"type": "produce", "sdp": AIORTC_OFFER,
            "tracks": [{"mid": "0", "source": "microphone"}, {"mid": "1", "source": "camera"}]}))
        .await;
    let tracks = produced["tracks"].as_array().unwrap();
    assert_eq!(tracks.len(), 2, "{produced}");
    let mic = tracks[0]["track"].as_u64().unwrap();
    let published = h
        .event_where("track:published", |e| e["track"]["id"] == mic)
        .await;
    assert_eq!(published["track"]["hostMuted"], false);

    // Host mute: everyone sees the track muted by the host, the guest is asked to mute, and
    // may not unmute.
    h.ok(json!({"type": "mute:remote", "participant": gid}))
        .await;
    let muted = h.event_where("track:muted", |e| e["track"] == mic).await;
    assert_eq!(
        (&muted["muted"], &muted["hostMuted"], &muted["by"]),
        (&json!(true), &json!(true), &json!(hid))
    );
    let ask = g.event("mute:remote").await;
    assert_eq!(
        (&ask["kind"], &ask["muted"]),
        (&json!("audio"), &json!(true))
    );
    assert!(ask.get("seq").is_none());
    g.refused(
        json!({"type": "mute:self", "track": mic, "muted": false}),
        "muted_by_host",
    )
    .await;
    // The guest may not mute the host either.
    g.refused(
        json!({"type": "mute:remote", "participant": hid}),
        "forbidden",
    )
    .await;
    // Lifted: allowed, not unmuted; then the guest unmutes.
    h.ok(json!({"type": "mute:remote", "participant": gid, "muted": false}))
        .await;
    let lifted = g
        .event_where("track:muted", |e| e["hostMuted"] == false)
        .await;
    assert_eq!(lifted["muted"], true);
    g.event_where("mute:remote", |e| e["muted"] == false).await;
    g.ok(json!({"type": "mute:self", "track": mic, "muted": false}))
        .await;
    h.event_where("track:muted", |e| e["muted"] == false && e["track"] == mic)
        .await;
    g.refused(
        json!({"type": "mute:self", "track": 9999, "muted": true}),
        "no_such_track",
    )
    .await;

    // Screen share: a presenter's screen track is announced to everyone; screenshare:stop
    // withdraws it; a demotion to attendee takes a share away.
    let (mut sh, shack) = env.join("m5", "sharer", Role::Presenter).await;
    let sid = pid(&shack);
    sh.ok(json!({"type": "screenshare:start"})).await;
    let shared = sh
        .ok(json!({"type": "produce", "sdp": AIORTC_OFFER,
            "tracks": [{"mid": "0", "source": "microphone"}, {"mid": "1", "source": "screen"}]}))
        .await;
    let screen = shared["tracks"][1]["track"].as_u64().unwrap();
    let on = h
        .event_where("screenshare:notify", |e| e["active"] == true)
        .await;
    assert_eq!(
        (&on["participant"], &on["track"]),
        (&json!(sid), &json!(screen))
    );
    h.ok(json!({"type": "role:update", "participant": sid, "role": "attendee"}))
        .await;
    let role = sh.event("role:update").await;
    assert_eq!(
        (&role["participant"], &role["role"]),
        (&json!(sid), &json!("attendee"))
    );
    let off = g
        .event_where("screenshare:notify", |e| e["active"] == false)
        .await;
    assert_eq!(off["track"], screen);
    g.event_where("track:unpublished", |e| e["track"] == screen)
        .await;
    sh.refused(json!({"type": "screenshare:start"}), "forbidden")
        .await;
    sh.refused(json!({"type": "screen:publish"}), "forbidden")
        .await;
    // A presenter with no share stops nothing, successfully.
    g.ok(json!({"type": "screenshare:stop"})).await;
    sh.ok(json!({"type": "room:leave"})).await;

    // Hands, reactions, layout, lock: events to everyone with the room's sequence.
    g.ok(json!({"type": "hand:raise"})).await;
    let raised = h.event("hand:raise").await;
    assert_eq!(
        (&raised["participant"], &raised["hands"]),
        (&json!(gid), &json!([gid]))
    );
    h.ok(json!({"type": "hand:lower", "participant": gid}))
        .await;
    let lowered = g.event("hand:lower").await;
    assert_eq!(
        (&lowered["by"], &lowered["hands"]),
        (&json!(hid), &json!([]))
    );
    g.ok(json!({"type": "reaction:send", "emoji": "🎉"})).await;
    g.ok(json!({"type": "reaction:send", "emoji": "🎉"})).await;
    let r = h
        .event_where("reaction:update", |e| e["counts"]["🎉"] == 2)
        .await;
    assert_eq!(r["participant"], gid);
    h.ok(json!({"type": "layout:update", "layout": "speaker", "spotlight": gid}))
        .await;
    let l = g.event("layout:update").await;
    assert_eq!(
        (&l["layout"], &l["spotlight"]),
        (&json!("speaker"), &json!(gid))
    );
    h.refused(
        json!({"type": "layout:update", "spotlight": 999}),
        "no_such_participant",
    )
    .await;
    h.ok(json!({"type": "room:lock", "locked": true})).await;
    let u = g.event("room:update").await;
    assert_eq!(u["settings"]["locked"], true);

    // Pinning is personal; members page; stats give a quality; ICE and transports.
    g.ok(json!({"type": "pin:user", "participant": hid})).await;
    g.refused(
        json!({"type": "pin:user", "participant": 999}),
        "no_such_participant",
    )
    .await;
    let page = g.ok(json!({"type": "room:members", "limit": 1})).await;
    assert_eq!(page["participantCount"], 2);
    assert_eq!(page["participants"].as_array().unwrap().len(), 1);
    let next = page["next"].as_u64().unwrap();
    let page2 = g
        .ok(json!({"type": "room:members", "after": next, "limit": 1}))
        .await;
    assert_eq!(page2["participants"][0]["id"], gid);
    assert!(page2["next"].is_null());
    g.ok(json!({"type": "stats:report", "rtt": 30, "loss": 0.0, "jitter": 2, "bitrate": 1500000}))
        .await;
    let s = g.event("stats:update").await;
    assert_eq!(
        (&s["quality"], &s["audioOnly"]),
        (&json!("good"), &json!(false))
    );
    g.ok(json!({"type": "stats:report", "rtt": 900, "loss": 0.3, "jitter": 80, "bitrate": 60000}))
        .await;
    let s = g.event("stats:update").await;
    assert_eq!(
        (&s["quality"], &s["audioOnly"]),
        (&json!("poor"), &json!(true))
    );
    let ice = g
        .ok(json!({"type": "ice:candidate", "candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host", "sdpMid": "0"}))
        .await;
    assert_eq!(ice["ignored"], true);
    let tc = g
        .ok(json!({"type": "transport:connect", "publisher": true}))
        .await;
    assert_eq!(tc["connected"], false, "no ICE happened");
    g.refused(json!({"type": "sdp:offer", "sdp": "v=0"}), "bad_request")
        .await;
    h.refused(
        json!({"type": "stream:start", "url": "rtmp://cdn/x"}),
        "not_available",
    )
    .await;

    // Every room event either side saw came in sequence.
    for c in [&h, &g] {
        let seqs = c.room_seqs();
        for w in seqs.windows(2) {
            assert!(w[1] > w[0], "seq order {seqs:?}");
        }
    }
}

/// The track ids an `sdp:offer` event says the subscriber receives.
fn offered(e: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = e["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["track"].as_u64())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_subscribe_takes_new_tracks_and_leaves_a_closed_one_closed_until_asked_again() {
    let env = start().await;
    let (mut v, _) = env.join("m7", "viewer", Role::Attendee).await;
    let (mut g, _) = env.join("m7", "guest", Role::Presenter).await;
    let produced = g
        .ok(json!({"type": "produce", "sdp": AIORTC_OFFER,
            "tracks": [{"mid": "0", "source": "microphone"}, {"mid": "1", "source": "camera"}]}))
        .await;
    let mut both: Vec<u64> = produced["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["track"].as_u64().unwrap())
        .collect();
    both.sort();
    let mic = produced["tracks"][0]["track"].as_u64().unwrap();
    // Auto-subscribe (the default) offers the viewer both new tracks (a track added while an
    // offer is unanswered comes in the next one).
    loop {
        let offer = v.event("sdp:offer").await;
        v.answer(&offer).await;
        if offered(&offer) == both {
            break;
        }
    }

    // Closed by the client: renegotiated without it, and auto-subscribe does not take it
    // back (it retries only tracks it wants and does not receive yet).
    v.ok(json!({"type": "consumer:close", "tracks": [mic]}))
        .await;
    let without = v.event("sdp:offer").await;
    assert!(!offered(&without).contains(&mic), "{without}");
    v.answer(&without).await;
    v.no_event("sdp:offer", Duration::from_millis(1500)).await;

    // Asked for again: received again.
    v.ok(json!({"type": "consume", "tracks": [mic]})).await;
    let again = v.event("sdp:offer").await;
    assert!(offered(&again).contains(&mic), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_reach_others_batched_with_consecutive_seqs() {
    let env = start().await;
    let (mut h, hack) = env.join("m6", "host", Role::Host).await;
    let start_seq = hack["seq"].as_u64().unwrap();
    // Twenty joins at once arrive as a handful of batched events, not twenty.
    let mut guests = Vec::new();
    for i in 0..20 {
        guests.push(env.join("m6", &format!("g{i}"), Role::Attendee).await.0);
    }
    let mut seen = std::collections::HashSet::new();
    let mut events = 0;
    let mut seqs = Vec::new();
    while seen.len() < 21 {
        let e = h.event("participant:joined").await;
        events += 1;
        seqs.push(e["seq"].as_u64().unwrap());
        for p in e["participants"].as_array().unwrap() {
            seen.insert(p["id"].as_u64().unwrap());
        }
    }
    assert!(events < 21, "{events} events for 21 joins");
    assert_eq!(seqs[0], start_seq + 1);
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1);
    }
    // Leaves are batched the same way.
    for mut g in guests.drain(..) {
        g.ok(json!({"type": "room:leave"})).await;
    }
    let mut left = 0;
    while left < 20 {
        let e = h.event("participant:left").await;
        left += e["participants"].as_array().unwrap().len();
    }
}

/// Participant ids of a `participant:joined` (entries) or `participant:left` (ids) event.
fn listed_ids(e: &Value) -> Vec<u64> {
    e["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().or_else(|| p["id"].as_u64()).unwrap())
        .collect()
}

/// A room past the presence threshold (set in the edge's config file, as an operator would):
/// the switch is told by `participant:count`, attendees are counted and not listed, a raised
/// hand announces its owner first, announced leaves are listed, and `room:members` still
/// pages through everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_room_counts_attendees_and_announces_the_interesting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "http = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\nworkers = 1\nfull_presence_up_to = 3\n",
    )
    .unwrap();
    let config = edge_node::config::EdgeArgs {
        config: Some(file),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(config.full_presence_up_to, 3);
    let env = start_with(config).await;

    let (mut h, hack) = env.join("big", "host", Role::Host).await;
    assert_eq!(hack["presence"], "full");
    let hid = pid(&hack);
    // Two attendees while the room is small: listed, as always.
    let (_a1, a1ack) = env.join("big", "a1", Role::Attendee).await;
    let (_a2, a2ack) = env.join("big", "a2", Role::Attendee).await;
    let small = [pid(&a1ack), pid(&a2ack)];
    let mut seen = std::collections::HashSet::new();
    while !small.iter().all(|p| seen.contains(p)) {
        seen.extend(listed_ids(&h.event("participant:joined").await));
    }

    // The fourth participant makes the room large: its ack says so, the others hear a count.
    let (mut a3, a3ack) = env.join("big", "a3", Role::Attendee).await;
    let a3id = pid(&a3ack);
    assert_eq!(a3ack["presence"], "interesting");
    assert_eq!(a3ack["participantCount"], 4);
    let mut named: Vec<u64> = a3ack["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    named.sort();
    assert_eq!(
        named,
        vec![hid, small[0], small[1]],
        "the announced, not a3"
    );
    let count = h.event("participant:count").await;
    assert_eq!(
        (&count["participantCount"], &count["presence"]),
        (&json!(4), &json!("interesting"))
    );
    let (mut a4, a4ack) = env.join("big", "a4", Role::Attendee).await;
    let (_a5, _) = env.join("big", "a5", Role::Attendee).await;
    let a4id = pid(&a4ack);
    h.event_where("participant:count", |e| e["participantCount"] == 6)
        .await;
    assert!(
        !h.events.iter().any(|e| e["type"] == "participant:joined"
            && listed_ids(e).iter().any(|p| *p == a3id || *p == a4id)),
        "attendees of a large room are not listed: {:?}",
        h.events
    );

    // A raised hand: its owner's entry comes first, then the hand.
    a3.ok(json!({"type": "hand:raise"})).await;
    let entry = h
        .event_where("participant:joined", |e| listed_ids(e) == vec![a3id])
        .await;
    assert_eq!(entry["participants"][0]["name"], "a3");
    let hand = h.event("hand:raise").await;
    assert_eq!(hand["participant"], a3id);
    assert_eq!(
        hand["seq"].as_u64().unwrap(),
        entry["seq"].as_u64().unwrap() + 1
    );

    // Everyone is still one page away.
    let page = h.ok(json!({"type": "room:members", "limit": 500})).await;
    assert_eq!(page["participantCount"], 6);
    assert_eq!(page["participants"].as_array().unwrap().len(), 6);

    // Leaves: a3 was announced and is listed; a4 never was and is only counted.
    a3.ok(json!({"type": "room:leave"})).await;
    a4.ok(json!({"type": "room:leave"})).await;
    let left = h.event("participant:left").await;
    assert_eq!(listed_ids(&left), vec![a3id]);
    h.event_where("participant:count", |e| e["participantCount"] == 4)
        .await;
    assert!(
        !h.events
            .iter()
            .any(|e| e["type"] == "participant:left" && listed_ids(e).contains(&a4id)),
        "{:?}",
        h.events
    );
    let seqs = h.room_seqs();
    for w in seqs.windows(2) {
        assert!(w[1] > w[0], "seq order {seqs:?}");
    }
}
