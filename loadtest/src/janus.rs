//! Janus as a target: its WebSocket API (`janus-protocol`) to the VideoRoom plugin, so the
//! same scenarios that drive the edge drive Janus (`--target janus+ws://host:port`).
//!
//! One participant is what a Janus VideoRoom web client is: one WebSocket, one Janus session
//! (kept alive every [`KEEPALIVE`]), a publisher handle that joins the room (and, when the
//! participant publishes, `publish`es our offer; everyone gets the room's publisher list and
//! its updates there), and one subscriber handle for all the feeds it watches (`join` as
//! subscriber with the feeds, Janus offers, we answer with `start`; new feeds later with
//! `subscribe`, Janus re-offers with `updated`). Simulcast layer choice is `configure` with
//! `substream` per video mid.
//!
//! What differs from the edge, and why the peer connection adapts ([`crate::peer`]):
//! Janus is a full ICE agent (libnice), so it checks our candidate and we answer
//! ([`crate::ice_responder`]); as publisher we offer and are ICE-controlling, as subscriber
//! Janus offers and we are controlled and wait for its nomination. We are the DTLS client on
//! both: our publisher offer says `a=setup:active`, our subscriber answer too. No trickle:
//! our SDP carries our candidate and the JSEP says `trickle: false`; Janus's SDP carries its
//! candidates (half-trickle, it gathers before answering). Our simulcast rids are low to high
//! (`q;h;f`), which the JSEP says with `rid_order: "lmh"`.
//!
//! Rooms are numeric in Janus: the scenario's room name maps to a stable id
//! ([`room_id`]); the run creates it (preflight) if it does not exist. `--token`, when given,
//! is sent as Janus's `apisecret`. Every Janus error (`janus: error`, or a plugin reply with
//! `error_code`) becomes [`SignalingError::Refused`] naming the request and Janus's reason.

use crate::signaling::{SignalingError, Target, STEP_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Janus drops a session after `session_timeout` (60 s by default) without traffic.
pub const KEEPALIVE: Duration = Duration::from_secs(25);
pub const VIDEOROOM: &str = "janus.plugin.videoroom";

/// The Janus room id for a scenario's room name: FNV-1a, kept within 2^53 so it survives
/// JSON number handling anywhere, never 0.
pub fn room_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h & ((1 << 53) - 1)).max(1)
}

struct Waiter {
    /// Skip the `ack` and wait for the event (asynchronous plugin requests).
    wants_event: bool,
    tx: oneshot::Sender<Value>,
}

type Pending = Arc<Mutex<HashMap<String, Waiter>>>;

/// One WebSocket to Janus with one session on it.
pub struct JanusClient {
    out: mpsc::Sender<Message>,
    pending: Pending,
    next: AtomicU64,
    secret: Option<String>,
    session: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl JanusClient {
    /// Connects and creates a session. Events that answer no request (new publishers,
    /// `updated` offers, `webrtcup`, `hangup`, ...) arrive on the returned channel, which
    /// ends after a `{"janus":"closed","reason":..}` event when the connection does.
    pub async fn connect(
        target: &Target,
        secret: Option<String>,
    ) -> Result<(Self, mpsc::Receiver<Value>), SignalingError> {
        let url = target.base.clone();
        let mut req =
            url.as_str()
                .into_client_request()
                .map_err(|e| SignalingError::Unreachable {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "janus-protocol".parse().expect("static header value"),
        );
        let (ws, _) = tokio::time::timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| SignalingError::Timeout {
                what: format!("connecting to Janus at {url}"),
                timeout: STEP_TIMEOUT,
            })?
            .map_err(|e| SignalingError::Unreachable {
                url: url.clone(),
                reason: format!("Janus WebSocket API: {e}"),
            })?;
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
        let (ev_tx, ev_rx) = mpsc::channel::<Value>(256);
        let pending: Pending = Arc::default();
        let writer = tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let p = pending.clone();
        let reader = tokio::spawn(async move {
            let reason = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(v) = serde_json::from_str::<Value>(&t) else {
                            continue;
                        };
                        let tid = v["transaction"].as_str().unwrap_or_default().to_owned();
                        let is_ack = v["janus"] == "ack";
                        let waiter = {
                            let mut pending = p.lock().expect("pending lock");
                            match pending.remove(&tid) {
                                Some(w) if is_ack && w.wants_event => {
                                    pending.insert(tid, w);
                                    continue;
                                }
                                w => w,
                            }
                        };
                        match waiter {
                            Some(w) => {
                                let _ = w.tx.send(v);
                            }
                            None => {
                                if !is_ack && ev_tx.send(v).await.is_err() {
                                    break "client gone".to_owned();
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        break f.map_or("closed by Janus".to_owned(), |f| {
                            format!("closed by Janus: {} {}", f.code, f.reason)
                        })
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e.to_string(),
                    None => break "connection ended".to_owned(),
                }
            };
            p.lock().expect("pending lock").clear();
            let _ = ev_tx
                .send(json!({"janus": "closed", "reason": reason}))
                .await;
        });
        let mut client = Self {
            out: out_tx,
            pending,
            next: AtomicU64::new(1),
            secret,
            session: 0,
            tasks: vec![writer, reader],
        };
        let created = client
            .send("create session", json!({"janus": "create"}), false)
            .await?;
        client.session = created["data"]["id"]
            .as_u64()
            .ok_or_else(|| SignalingError::Malformed(format!("Janus create: {created}")))?;
        let out = client.out.clone();
        let (session, secret) = (client.session, client.secret.clone());
        client.tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEPALIVE);
            tick.tick().await;
            loop {
                tick.tick().await;
                let mut m = json!({"janus": "keepalive", "session_id": session,
                    "transaction": format!("ka-{}", rand::random::<u32>())});
                if let Some(s) = &secret {
                    m["apisecret"] = json!(s);
                }
                if out.send(Message::Text(m.to_string().into())).await.is_err() {
                    break;
                }
            }
        }));
        Ok((client, ev_rx))
    }

    /// Sends one request and returns Janus's reply (or, with `wants_event`, the event that
    /// follows its `ack`). `janus: error` replies and plugin errors become `Refused`.
    async fn send(
        &self,
        what: &str,
        mut msg: Value,
        wants_event: bool,
    ) -> Result<Value, SignalingError> {
        let tid = format!("t{}", self.next.fetch_add(1, Ordering::Relaxed));
        msg["transaction"] = json!(tid);
        if self.session != 0 {
            msg["session_id"] = json!(self.session);
        }
        if let Some(s) = &self.secret {
            msg["apisecret"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending lock")
            .insert(tid, Waiter { wants_event, tx });
        self.out
            .send(Message::Text(msg.to_string().into()))
            .await
            .map_err(|_| SignalingError::Closed("Janus writer gone".into()))?;
        let reply = tokio::time::timeout(STEP_TIMEOUT, rx)
            .await
            .map_err(|_| SignalingError::Timeout {
                what: format!("Janus {what}"),
                timeout: STEP_TIMEOUT,
            })?
            .map_err(|_| {
                SignalingError::Closed(format!("while waiting for Janus's reply to {what}"))
            })?;
        if reply["janus"] == "error" {
            return Err(SignalingError::Refused {
                what: format!("Janus {what}"),
                code: reply["error"]["code"].to_string(),
                message: reply["error"]["reason"].as_str().unwrap_or("").to_owned(),
            });
        }
        let data = &reply["plugindata"]["data"];
        if data["error_code"].is_number() || data["error"].is_string() {
            return Err(SignalingError::Refused {
                what: format!("Janus {what}"),
                code: data["error_code"].to_string(),
                message: data["error"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(reply)
    }

    /// Attaches a VideoRoom handle.
    pub async fn attach(&self) -> Result<u64, SignalingError> {
        let r = self
            .send(
                "attach",
                json!({"janus": "attach", "plugin": VIDEOROOM}),
                false,
            )
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| SignalingError::Malformed(format!("Janus attach: {r}")))
    }

    /// A VideoRoom request on `handle`; `wants_event` for the asynchronous ones (join,
    /// publish, configure, start, subscribe). Returns the reply: `plugindata.data` and `jsep`.
    pub async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
        wants_event: bool,
    ) -> Result<Value, SignalingError> {
        let what = body["request"].as_str().unwrap_or("message").to_owned();
        let mut m = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        self.send(&what, m, wants_event).await
    }

    /// Tells Janus no more candidates come (we put ours in the SDP).
    pub async fn trickle_done(&self, handle: u64) -> Result<(), SignalingError> {
        self.send(
            "trickle",
            json!({"janus": "trickle", "handle_id": handle, "candidate": {"completed": true}}),
            false,
        )
        .await
        .map(|_| ())
    }

    /// Destroys the session (Janus hangs up its peer connections) and closes the socket.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.send("destroy", json!({"janus": "destroy"}), false),
        )
        .await;
        let _ = self.out.send(Message::Close(None)).await;
    }
}

impl Drop for JanusClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Before a run: is Janus there, does it accept us, and does the room exist (created if not,
/// for up to `max_publishers` publishers: every participant joins as a publisher, see the
/// module docs). Returns the room id.
pub async fn prepare_room(
    target: &Target,
    secret: Option<String>,
    room: &str,
    max_publishers: u32,
) -> Result<u64, SignalingError> {
    let (client, _events) = JanusClient::connect(target, secret).await?;
    let handle = client.attach().await?;
    let id = room_id(room);
    let exists = client
        .message(
            handle,
            json!({"request": "exists", "room": id}),
            None,
            false,
        )
        .await?;
    if exists["plugindata"]["data"]["exists"] != true {
        client
            .message(
                handle,
                json!({
                    "request": "create", "room": id, "description": room,
                    "publishers": max_publishers.max(1), "videocodec": "vp8", "audiocodec": "opus",
                    "notify_joining": false, "transport_wide_cc_ext": true,
                }),
                None,
                false,
            )
            .await?;
    }
    client.close().await;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_are_stable_nonzero_and_json_safe() {
        assert_eq!(room_id("loadtest"), room_id("loadtest"));
        assert_ne!(room_id("a"), room_id("b"));
        for n in ["", "x", "loadtest", "a much longer room name"] {
            let id = room_id(n);
            assert!(id > 0 && id < (1 << 53));
        }
    }
}
