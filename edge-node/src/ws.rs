//! WebSocket signaling at `/ws` (docs/protocol.md).
//!
//! Decoding is separate from the session loop: [`decode`] turns one text frame into a typed
//! [`Request`] or a [`DecodeError`] with a code, so the parser can be fuzzed and unit-tested
//! without a socket. The loop then owns one [`Participant`] and answers each request with exactly
//! one ack or error.

use crate::edge::Edge;
use crate::hub::{RoomSignal, SESSION_EVENT_QUEUE};
use crate::session::{Participant, SessionError, SubscriberOffer};
use crate::sfu::Event as ShardEvent;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use cascade_proto::room::{Intent, RoomEvent, RoomEventBody};
use cascade_proto::{ParticipantId, RoomId, TrackId, TrackSource};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Protocol version spoken here.
pub const PROTOCOL_VERSION: u64 = 1;
/// Largest signaling frame accepted (an SDP offer with many m-lines fits well below).
pub const MAX_FRAME: usize = 64 * 1024;
/// Requests per second a client may send on average...
const RATE_PER_SEC: f64 = 50.0;
/// ...with bursts up to this many.
const RATE_BURST: f64 = 100.0;
/// Requests refused for rate in a row before the connection is closed as abusive.
const ABUSE_LIMIT: u32 = 200;
/// A client must join within this time after connecting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One client request, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Hello {
        version: u64,
    },
    Join {
        token: String,
        name: Option<String>,
        auto_subscribe: bool,
    },
    Leave,
    Produce {
        sdp: String,
        tracks: Vec<(String, TrackSource)>,
    },
    Unpublish {
        track: TrackId,
    },
    Consume {
        tracks: Vec<TrackId>,
    },
    CloseConsumers {
        tracks: Vec<TrackId>,
    },
    Pause {
        track: TrackId,
    },
    Resume {
        track: TrackId,
    },
    Layers {
        track: TrackId,
        max_spatial: u8,
    },
    Answer {
        revision: u64,
        sdp: String,
    },
}

/// Why a frame could not be decoded: `(id if readable, code, message)`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub id: Option<u64>,
    pub code: &'static str,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    token: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "autoSubscribe")]
    auto_subscribe: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackSpec {
    mid: String,
    source: TrackSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProduceBody {
    sdp: String,
    #[serde(default)]
    tracks: Vec<TrackSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TracksBody {
    tracks: Vec<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackBody {
    track: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayersBody {
    track: u64,
    #[serde(rename = "maxSpatial")]
    max_spatial: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    revision: u64,
    sdp: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HelloBody {
    version: u64,
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<(u64, Request), DecodeError> {
    let err = |id, code, message: String| DecodeError { id, code, message };
    if text.len() > MAX_FRAME {
        return Err(err(
            None,
            "too_large",
            format!("frame of {} bytes exceeds {MAX_FRAME}", text.len()),
        ));
    }
    let mut v: Value = serde_json::from_str(text)
        .map_err(|e| err(None, "bad_request", format!("not JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(err(
            None,
            "bad_request",
            "a message must be a JSON object".into(),
        ));
    };
    let id = match obj.remove("id") {
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
            err(
                None,
                "bad_request",
                "id must be a non-negative integer".into(),
            )
        })?,
        Some(_) => {
            return Err(err(
                None,
                "bad_request",
                "id must be a non-negative integer".into(),
            ))
        }
        None => return Err(err(None, "bad_request", "missing id".into())),
    };
    let ty = match obj.remove("type") {
        Some(Value::String(s)) => s,
        _ => {
            return Err(err(
                Some(id),
                "bad_request",
                "missing or non-string type".into(),
            ))
        }
    };
    let body = Value::Object(std::mem::take(obj));
    fn parse<T: serde::de::DeserializeOwned>(
        id: u64,
        ty: &str,
        body: Value,
    ) -> Result<T, DecodeError> {
        serde_json::from_value(body).map_err(|e| DecodeError {
            id: Some(id),
            code: "bad_request",
            message: format!("{ty}: {e}"),
        })
    }
    let req = match ty.as_str() {
        "hello" => Request::Hello {
            version: parse::<HelloBody>(id, &ty, body)?.version,
        },
        "room:join" => {
            let b: JoinBody = parse(id, &ty, body)?;
            if b.name.as_ref().is_some_and(|n| n.chars().count() > 64) {
                return Err(err(
                    Some(id),
                    "bad_request",
                    "name longer than 64 characters".into(),
                ));
            }
            Request::Join {
                token: b.token,
                name: b.name,
                auto_subscribe: b.auto_subscribe.unwrap_or(true),
            }
        }
        "room:leave" => Request::Leave,
        "produce" => {
            let b: ProduceBody = parse(id, &ty, body)?;
            Request::Produce {
                sdp: b.sdp,
                tracks: b.tracks.into_iter().map(|t| (t.mid, t.source)).collect(),
            }
        }
        "media:unpublish" => Request::Unpublish {
            track: TrackId(parse::<TrackBody>(id, &ty, body)?.track),
        },
        "consume" => Request::Consume {
            tracks: parse::<TracksBody>(id, &ty, body)?
                .tracks
                .into_iter()
                .map(TrackId)
                .collect(),
        },
        "consumer:close" => Request::CloseConsumers {
            tracks: parse::<TracksBody>(id, &ty, body)?
                .tracks
                .into_iter()
                .map(TrackId)
                .collect(),
        },
        "consumer:pause" => Request::Pause {
            track: TrackId(parse::<TrackBody>(id, &ty, body)?.track),
        },
        "consumer:resume" => Request::Resume {
            track: TrackId(parse::<TrackBody>(id, &ty, body)?.track),
        },
        "consumer:layers" => {
            let b: LayersBody = parse(id, &ty, body)?;
            if b.max_spatial > 2 {
                return Err(err(
                    Some(id),
                    "bad_request",
                    "maxSpatial must be 0, 1 or 2".into(),
                ));
            }
            Request::Layers {
                track: TrackId(b.track),
                max_spatial: b.max_spatial,
            }
        }
        "sdp:answer" => {
            let b: AnswerBody = parse(id, &ty, body)?;
            Request::Answer {
                revision: b.revision,
                sdp: b.sdp,
            }
        }
        other => {
            return Err(err(
                Some(id),
                "unknown_type",
                format!("unknown message type {other:?}"),
            ));
        }
    };
    Ok((id, req))
}

/// Token bucket for one connection.
struct RateLimit {
    tokens: f64,
    last: Instant,
    strikes: u32,
}

impl RateLimit {
    fn new(now: Instant) -> Self {
        Self {
            tokens: RATE_BURST,
            last: now,
            strikes: 0,
        }
    }
    fn allow(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * RATE_PER_SEC)
            .min(RATE_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

fn ack(id: u64, mut result: Value) -> String {
    if let Some(o) = result.as_object_mut() {
        o.insert("type".into(), "ack".into());
        o.insert("id".into(), id.into());
    }
    result.to_string()
}

fn error(id: Option<u64>, code: &str, message: &str) -> String {
    json!({"type": "error", "id": id, "code": code, "message": message}).to_string()
}

fn offer_event(o: &SubscriberOffer) -> String {
    json!({"type": "sdp:offer", "revision": o.revision, "sdp": o.sdp, "tracks": o.tracks})
        .to_string()
}

/// Translates a room event to the client's event JSON.
pub fn event_json(e: &RoomEvent) -> Option<String> {
    let v = match &e.body {
        RoomEventBody::ParticipantJoined(p) => json!({"type": "participant:joined", "seq": e.seq,
            "participant": {"id": p.id, "identity": p.identity, "name": p.name, "role": p.role}}),
        RoomEventBody::ParticipantLeft { participant } => {
            json!({"type": "participant:left", "seq": e.seq, "participant": participant})
        }
        RoomEventBody::TrackPublished(t) => {
            json!({"type": "track:published", "seq": e.seq, "track": t})
        }
        RoomEventBody::TrackUnpublished { track, participant } => {
            json!({"type": "track:unpublished", "seq": e.seq, "track": track, "participant": participant})
        }
        RoomEventBody::TrackMuted { track, muted } => {
            json!({"type": "track:muted", "seq": e.seq, "track": track, "muted": muted})
        }
        RoomEventBody::RoomClosed => json!({"type": "room:close", "seq": e.seq, "reason": "ended"}),
    };
    Some(v.to_string())
}

/// Serves one WebSocket connection until it closes.
pub async fn serve(edge: Arc<Edge>, mut socket: WebSocket) {
    use std::sync::atomic::Ordering::Relaxed;
    edge.metrics.ws_connections.fetch_add(1, Relaxed);
    let mut conn = Connection {
        edge: edge.clone(),
        participant: None,
        auto_subscribe: true,
        rate: RateLimit::new(Instant::now()),
    };
    let (room_tx, mut room_rx) = mpsc::channel::<RoomSignal>(SESSION_EVENT_QUEUE);
    let (shard_tx, mut shard_rx) = mpsc::channel::<ShardEvent>(256);
    let join_deadline = tokio::time::sleep(JOIN_TIMEOUT);
    tokio::pin!(join_deadline);
    loop {
        let out: Vec<String> = tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let (replies, close) = conn.handle_text(&t, &room_tx, &shard_tx).await;
                    for r in replies {
                        if socket.send(Message::Text(Utf8Bytes::from(r))).await.is_err() { break; }
                    }
                    if close { break; }
                    continue;
                }
                Some(Ok(Message::Binary(_))) => {
                    edge.metrics.reject("bad_request");
                    vec![error(None, "bad_request", "binary frames are not part of the protocol")]
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue, // ping/pong handled by axum
            },
            Some(sig) = room_rx.recv() => conn.handle_room(sig).await,
            Some(ev) = shard_rx.recv() => conn.handle_shard(ev).await,
            _ = &mut join_deadline, if conn.participant.is_none() => {
                let _ = socket.send(Message::Text(Utf8Bytes::from(error(None, "not_joined", "no room:join within 30 s")))).await;
                break;
            }
        };
        let mut closed = false;
        for o in out {
            if socket
                .send(Message::Text(Utf8Bytes::from(o)))
                .await
                .is_err()
            {
                closed = true;
                break;
            }
        }
        if closed {
            break;
        }
    }
    if let Some(mut p) = conn.participant.take() {
        p.leave().await;
    }
    edge.metrics.ws_connections.fetch_sub(1, Relaxed);
}

struct Connection {
    edge: Arc<Edge>,
    participant: Option<Participant>,
    auto_subscribe: bool,
    rate: RateLimit,
}

impl Connection {
    /// Returns the frames to send and whether to close.
    async fn handle_text(
        &mut self,
        text: &str,
        room_tx: &mpsc::Sender<RoomSignal>,
        shard_tx: &mpsc::Sender<ShardEvent>,
    ) -> (Vec<String>, bool) {
        if !self.rate.allow(Instant::now()) {
            self.edge.metrics.reject("rate_limited");
            let close = self.rate.strikes > ABUSE_LIMIT;
            return (
                vec![error(None, "rate_limited", "too many requests; slow down")],
                close,
            );
        }
        let (id, req) = match decode(text) {
            Ok(r) => r,
            Err(e) => {
                self.edge.metrics.reject(e.code);
                return (vec![error(e.id, e.code, &e.message)], false);
            }
        };
        let leaving = matches!(req, Request::Leave);
        let mut out = Vec::new();
        match self.handle(id, req, room_tx, shard_tx, &mut out).await {
            Ok(result) => out.insert(0, ack(id, result)),
            Err(e) => {
                self.edge.metrics.reject(e.code);
                out.insert(0, error(Some(id), e.code, &e.message));
            }
        }
        // After room:leave the connection has nothing left to do.
        let close = leaving && self.participant.is_none();
        (out, close)
    }

    async fn handle(
        &mut self,
        _id: u64,
        req: Request,
        room_tx: &mpsc::Sender<RoomSignal>,
        shard_tx: &mpsc::Sender<ShardEvent>,
        out: &mut Vec<String>,
    ) -> Result<Value, SessionError> {
        if let Request::Hello { version } = req {
            if version != PROTOCOL_VERSION {
                return Err(SessionError::new(
                    "unsupported_version",
                    format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"),
                ));
            }
            return Ok(
                json!({"version": PROTOCOL_VERSION, "server": concat!("kcs-edge/", env!("CARGO_PKG_VERSION"))}),
            );
        }
        if let Request::Join {
            token,
            name,
            auto_subscribe,
        } = req
        {
            if self.participant.is_some() {
                return Err(SessionError::new(
                    "already_joined",
                    "this connection already joined a room",
                ));
            }
            let claims = self
                .edge
                .verifier()
                .verify(&token)
                .map_err(|e| SessionError::new(e.code(), e.to_string()))?;
            let room: RoomId = claims.room.clone();
            let display = name
                .or(claims.name.clone())
                .unwrap_or_else(|| claims.identity.to_string());
            let (p, joined) = Participant::join(
                self.edge.clone(),
                room.clone(),
                Intent::Join {
                    identity: claims.identity.clone(),
                    role: claims.role,
                    name: display,
                },
                room_tx.clone(),
                shard_tx.clone(),
            )
            .await?;
            self.auto_subscribe = auto_subscribe;
            let you = json!({"id": p.me.id, "identity": p.me.identity, "name": p.me.name, "role": p.me.role});
            let participants: Vec<Value> = joined
                .participants
                .iter()
                .map(
                    |q| json!({"id": q.id, "identity": q.identity, "name": q.name, "role": q.role}),
                )
                .collect();
            self.participant = Some(p);
            if auto_subscribe {
                if let Some(o) = self.subscribe_all().await {
                    out.push(offer_event(&o));
                }
            }
            return Ok(
                json!({"room": room, "you": you, "participants": participants, "tracks": joined.tracks, "seq": joined.seq}),
            );
        }
        let Some(p) = self.participant.as_mut() else {
            return Err(SessionError::new("not_joined", "send room:join first"));
        };
        match req {
            Request::Hello { .. } | Request::Join { .. } => unreachable!("handled above"),
            Request::Leave => {
                p.leave().await;
                self.participant = None;
                Ok(json!({}))
            }
            Request::Produce { sdp, tracks } => {
                let sources: HashMap<String, TrackSource> = tracks.into_iter().collect();
                let (answer, published) = p.produce(&sdp, &sources).await?;
                let tracks: Vec<Value> = published
                    .iter()
                    .map(|(mid, t)| json!({"mid": mid, "track": t}))
                    .collect();
                Ok(json!({"sdp": answer, "tracks": tracks}))
            }
            Request::Unpublish { track } => {
                p.unpublish(track).await?;
                Ok(json!({}))
            }
            Request::Consume { tracks } => {
                if let Some(o) = p.consume(&tracks, None).await? {
                    out.push(offer_event(&o));
                }
                Ok(json!({}))
            }
            Request::CloseConsumers { tracks } => {
                if let Some(o) = p.close_consumers(&tracks).await {
                    out.push(offer_event(&o));
                }
                Ok(json!({}))
            }
            Request::Pause { track } => p.set_paused(track, true).await.map(|_| json!({})),
            Request::Resume { track } => p.set_paused(track, false).await.map(|_| json!({})),
            Request::Layers { track, max_spatial } => {
                p.set_max_layer(track, max_spatial).await.map(|_| json!({}))
            }
            Request::Answer { revision, sdp } => {
                p.handle_answer(revision, &sdp).await?;
                Ok(json!({}))
            }
        }
    }

    async fn subscribe_all(&mut self) -> Option<SubscriberOffer> {
        let p = self.participant.as_mut()?;
        let tracks = p.unsubscribed_tracks();
        if tracks.is_empty() {
            return None;
        }
        match p.consume(&tracks, None).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "auto-subscribe skipped a track");
                None
            }
        }
    }

    async fn handle_room(&mut self, sig: RoomSignal) -> Vec<String> {
        let Some(p) = self.participant.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match sig {
            RoomSignal::Event(e) => {
                if matches!(&e.body, RoomEventBody::ParticipantJoined(info) if info.id == p.me.id) {
                    return out; // our own join: the ack already carried it (and its seq)
                }
                let offer = p.handle_room_event(&e).await;
                if let Some(j) = event_json(&e) {
                    out.push(j);
                }
                if let Some(o) = offer {
                    out.push(offer_event(&o));
                }
                if matches!(e.body, RoomEventBody::TrackPublished(_)) && self.auto_subscribe {
                    if let Some(o) = self.subscribe_all().await {
                        out.push(offer_event(&o));
                    }
                }
            }
            RoomSignal::ActiveSpeaker(pid) => {
                let (track, participant): (Option<TrackId>, Option<ParticipantId>) =
                    match pid.and_then(|pid| p.track_of_publication(pid)) {
                        Some((t, q)) => (Some(t), Some(q)),
                        None => (None, None),
                    };
                out.push(
                    json!({"type": "speaker:active", "participant": participant, "track": track})
                        .to_string(),
                );
            }
        }
        out
    }

    async fn handle_shard(&mut self, ev: ShardEvent) -> Vec<String> {
        let Some(p) = self.participant.as_mut() else {
            return Vec::new();
        };
        match ev {
            ShardEvent::LayerChanged {
                subscription,
                current,
                target,
            } => match p.track_of(subscription) {
                Some(track) => vec![json!({"type": "simulcast:layers", "track": track,
                    "current": current.map(|l| l.0), "target": target.map(|l| l.0)})
                .to_string()],
                None => Vec::new(),
            },
            ShardEvent::Closed { transport, reason } => {
                tracing::info!(room = %p.room, participant = %p.me.id, transport = transport.0, reason, "transport closed");
                vec![json!({"type": "transport:closed", "publisher": p.is_publisher_transport(transport), "reason": reason}).to_string()]
            }
            ShardEvent::Connected { transport } => {
                tracing::debug!(room = %p.room, participant = %p.me.id, transport = transport.0, "transport connected");
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_request_type() {
        let cases = [
            (
                r#"{"id":1,"type":"hello","version":1}"#,
                Request::Hello { version: 1 },
            ),
            (
                r#"{"id":2,"type":"room:join","token":"t"}"#,
                Request::Join {
                    token: "t".into(),
                    name: None,
                    auto_subscribe: true,
                },
            ),
            (r#"{"id":3,"type":"room:leave"}"#, Request::Leave),
            (
                r#"{"id":4,"type":"produce","sdp":"v=0","tracks":[{"mid":"0","source":"screen-audio"}]}"#,
                Request::Produce {
                    sdp: "v=0".into(),
                    tracks: vec![("0".into(), TrackSource::ScreenAudio)],
                },
            ),
            (
                r#"{"id":5,"type":"media:unpublish","track":7}"#,
                Request::Unpublish { track: TrackId(7) },
            ),
            (
                r#"{"id":6,"type":"consume","tracks":[1,2]}"#,
                Request::Consume {
                    tracks: vec![TrackId(1), TrackId(2)],
                },
            ),
            (
                r#"{"id":7,"type":"consumer:close","tracks":[1]}"#,
                Request::CloseConsumers {
                    tracks: vec![TrackId(1)],
                },
            ),
            (
                r#"{"id":8,"type":"consumer:pause","track":1}"#,
                Request::Pause { track: TrackId(1) },
            ),
            (
                r#"{"id":9,"type":"consumer:resume","track":1}"#,
                Request::Resume { track: TrackId(1) },
            ),
            (
                r#"{"id":10,"type":"consumer:layers","track":1,"maxSpatial":0}"#,
                Request::Layers {
                    track: TrackId(1),
                    max_spatial: 0,
                },
            ),
            (
                r#"{"id":11,"type":"sdp:answer","revision":3,"sdp":"v=0"}"#,
                Request::Answer {
                    revision: 3,
                    sdp: "v=0".into(),
                },
            ),
        ];
        for (text, want) in cases {
            let (_, got) = decode(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn bad_frames_get_specific_codes() {
        let cases = [
            ("not json", None, "bad_request"),
            ("[1,2]", None, "bad_request"),
            (r#"{"type":"hello","version":1}"#, None, "bad_request"),
            (r#"{"id":-1,"type":"hello"}"#, None, "bad_request"),
            (r#"{"id":1}"#, Some(1), "bad_request"),
            (r#"{"id":1,"type":"teleport"}"#, Some(1), "unknown_type"),
            (
                r#"{"id":1,"type":"consume","tracks":"all"}"#,
                Some(1),
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"consume","tracks":[1],"extra":true}"#,
                Some(1),
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"consumer:layers","track":1,"maxSpatial":7}"#,
                Some(1),
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"produce","sdp":"v=0","tracks":[{"mid":"0","source":"hologram"}]}"#,
                Some(1),
                "bad_request",
            ),
        ];
        for (text, id, code) in cases {
            let e = decode(text).unwrap_err();
            assert_eq!((e.id, e.code), (id, code), "{text}: {}", e.message);
        }
        let huge = format!(
            r#"{{"id":1,"type":"produce","sdp":"{}"}}"#,
            "a".repeat(MAX_FRAME)
        );
        assert_eq!(decode(&huge).unwrap_err().code, "too_large");
    }

    #[test]
    fn rate_limit_allows_bursts_then_refuses_then_recovers() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(t0);
        let allowed = (0..150).filter(|_| r.allow(t0)).count();
        assert_eq!(allowed, RATE_BURST as usize);
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_secs(1)));
    }
}
