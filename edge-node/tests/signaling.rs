//! The signaling protocol and bad input against a real edge (in-process, real sockets): a Rust
//! WebSocket client joins, is refused with specific codes, and the edge keeps serving; HTTP
//! errors for WHIP; `/metrics` counts every rejection.

use cascade_proto::{Identity, Role, RoomId};
use control_plane::token::{unix_now, TokenSigner, TokenVerifier};
use edge_node::config::EdgeConfig;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Env {
    http: std::net::SocketAddr,
    signer: TokenSigner,
    _running: edge_node::app::Running,
}

async fn start() -> Env {
    let signer = TokenSigner::generate("test");
    let mut verifier = TokenVerifier::new();
    verifier.add_key(signer.kid(), &signer.public_key());
    let config = EdgeConfig {
        http: "127.0.0.1:0".parse().unwrap(),
        udp: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        ..Default::default()
    };
    let running = edge_node::app::start(config, verifier, None).await.unwrap();
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

    async fn ws(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", self.http))
            .await
            .unwrap();
        ws
    }

    async fn metrics(&self) -> String {
        http_get(self.http, "/metrics").await
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next message that is a reply to `id` (skipping events).
async fn reply(ws: &mut Ws, id: u64) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("reply in time");
        let Some(Ok(Message::Text(t))) = msg else {
            panic!("connection ended: {msg:?}")
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["id"] == json!(id) {
            return v;
        }
    }
}

/// The next message that is not a reply (an event).
async fn event(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("event in time");
        let Some(Ok(Message::Text(t))) = msg else {
            panic!("connection ended: {msg:?}")
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == ty {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_is_acked_and_others_see_it_with_sequence_numbers() {
    let env = start().await;
    let mut a = env.ws().await;
    send(&mut a, json!({"id": 1, "type": "hello", "version": 1})).await;
    assert_eq!(reply(&mut a, 1).await["type"], "ack");
    send(
        &mut a,
        json!({"id": 2, "type": "room:join", "token": env.token("r1", "alice", Role::Host)}),
    )
    .await;
    let joined = reply(&mut a, 2).await;
    assert_eq!(joined["type"], "ack", "{joined}");
    assert_eq!(joined["you"]["identity"], "alice");
    assert_eq!(joined["you"]["role"], "host");
    let seq_a = joined["seq"].as_u64().unwrap();

    let mut b = env.ws().await;
    send(&mut b, json!({"id": 1, "type": "room:join", "token": env.token("r1", "bob", Role::Attendee), "name": "Bob"})).await;
    let jb = reply(&mut b, 1).await;
    assert_eq!(jb["participants"].as_array().unwrap().len(), 2);
    // Joins are batched: alice's own join and bob's may come in one event or two, numbered
    // on from the seq her ack carried.
    let mut expected = seq_a + 1;
    loop {
        let ev = event(&mut a, "participant:joined").await;
        assert_eq!(
            ev["seq"].as_u64().unwrap(),
            expected,
            "consecutive room sequence"
        );
        expected += 1;
        let list = ev["participants"].as_array().unwrap();
        if let Some(bob) = list.iter().find(|p| p["name"] == "Bob") {
            assert_eq!(bob["identity"], "bob");
            if list.len() == 1 {
                assert_eq!(ev["participant"]["name"], "Bob", "version-1 field");
            }
            break;
        }
    }

    send(&mut b, json!({"id": 2, "type": "room:leave"})).await;
    assert_eq!(reply(&mut b, 2).await["type"], "ack");
    let left = event(&mut a, "participant:left").await;
    assert_eq!(left["seq"].as_u64().unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_specific_codes_and_the_connection_survives() {
    let env = start().await;
    let mut ws = env.ws().await;
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"id": 1, "type": "hello", "version": 99}),
            "unsupported_version",
        ),
        (
            json!({"id": 2, "type": "consume", "tracks": [1]}),
            "not_joined",
        ),
        (
            json!({"id": 3, "type": "room:join", "token": "garbage"}),
            "token_malformed",
        ),
        (json!({"id": 4, "type": "teleport"}), "unknown_type"),
        (json!({"id": 5, "type": "room:join"}), "bad_request"),
    ];
    for (msg, code) in cases {
        let id = msg["id"].as_u64().unwrap();
        send(&mut ws, msg).await;
        let r = reply(&mut ws, id).await;
        assert_eq!(
            (r["type"].as_str(), r["code"].as_str()),
            (Some("error"), Some(code)),
            "{r}"
        );
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Not JSON at all: an error without id.
    ws.send(Message::Text("{{{".into())).await.unwrap();
    let msg = ws.next().await.unwrap().unwrap();
    let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(v["code"], "bad_request");
    // Expired and forged tokens.
    let expired = env.signer.mint(
        RoomId::new("r").unwrap(),
        Identity::new("x").unwrap(),
        Role::Host,
        None,
        1000,
        60,
    );
    send(
        &mut ws,
        json!({"id": 6, "type": "room:join", "token": expired}),
    )
    .await;
    assert_eq!(reply(&mut ws, 6).await["code"], "token_expired");
    let forged = TokenSigner::generate("test").mint(
        RoomId::new("r").unwrap(),
        Identity::new("x").unwrap(),
        Role::Host,
        None,
        unix_now(),
        60,
    );
    send(
        &mut ws,
        json!({"id": 7, "type": "room:join", "token": forged}),
    )
    .await;
    assert_eq!(reply(&mut ws, 7).await["code"], "token_invalid");
    // Still usable: a valid join works on the same connection.
    send(
        &mut ws,
        json!({"id": 8, "type": "room:join", "token": env.token("r2", "carol", Role::Attendee)}),
    )
    .await;
    assert_eq!(reply(&mut ws, 8).await["type"], "ack");
    // Hostile SDP: garbage, and 1,000 m-lines (a 10,000-m-line offer is over the frame limit and
    // closes the connection, as the oversized-frame test shows).
    let mlines = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n".repeat(1_000);
    for (id, sdp) in [
        (9u64, "v=0\r\n".to_string()),
        (10, format!("v=0\r\n{mlines}")),
    ] {
        send(
            &mut ws,
            json!({"id": id, "type": "produce", "sdp": sdp, "tracks": []}),
        )
        .await;
        let r = reply(&mut ws, id).await;
        assert_eq!(r["type"], "error", "{r}");
        assert!(
            ["sdp_invalid", "too_large", "sdp_unsupported"].contains(&r["code"].as_str().unwrap()),
            "{r}"
        );
    }
    // A viewer-only role may not publish: the origin refuses (checked with a minimal offer is
    // covered by the SDP tests; here the role check on the publish intent).
    let text = env.metrics().await;
    for code in [
        "unsupported_version",
        "not_joined",
        "token_malformed",
        "unknown_type",
        "bad_request",
        "token_expired",
        "token_invalid",
    ] {
        assert!(
            text.contains(&format!("kcs_signaling_rejected_total{{code=\"{code}\"}}")),
            "{code} counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused_and_others_keep_working() {
    let env = start().await;
    let mut other = env.ws().await;
    send(
        &mut other,
        json!({"id": 1, "type": "room:join", "token": env.token("r", "steady", Role::Host)}),
    )
    .await;
    assert_eq!(reply(&mut other, 1).await["type"], "ack");
    let mut abuser = env.ws().await;
    let huge = "x".repeat(200 * 1024);
    let _ = abuser
        .send(Message::Text(
            json!({"id": 1, "type": "produce", "sdp": huge})
                .to_string()
                .into(),
        ))
        .await;
    // The edge closes a connection that sends a frame over its limit.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match abuser.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "oversized frame closes that connection");
    send(&mut other, json!({"id": 2, "type": "hello", "version": 1})).await;
    assert_eq!(
        reply(&mut other, 2).await["type"],
        "ack",
        "others are unaffected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_udp_is_counted_and_health_stays_ok() {
    let env = start().await;
    let udp = env._running.udp[0];
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50u8 {
        sock.send_to(&[i.wrapping_mul(37); 40], udp).unwrap();
    }
    // STUN for nobody.
    let stun =
        edge_node::transport::ice::binding_request("nobody00:x", "password-password-000000", true);
    sock.send_to(&stun, udp).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = env.metrics().await;
    let value = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let dropped = value("kcs_rejected_garbage_total ")
        + value("kcs_rejected_unknown_source_total ")
        + value("kcs_rejected_dtls_total ");
    assert!(dropped >= 40, "garbage counted: {dropped}\n{text}");
    // Our STUN request, plus the garbage datagrams whose first byte falls in STUN's range 0..=3.
    assert!(value("kcs_rejected_stun_unknown_total ") >= 1);
    assert!(http_get(env.http, "/healthz").await.ends_with("ok\n"));
}
