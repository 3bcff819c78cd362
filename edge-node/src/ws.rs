//! WebSocket signaling at `/ws` (docs/protocol.md): the meeting protocol, version 2.
//!
//! Decoding is separate from the session loop: [`decode`] turns one text frame into a typed
//! [`Request`] or a [`DecodeError`] with a code, so the parser can be fuzzed and unit-tested
//! without a socket. The loop then owns one [`Connection`] and answers each request with exactly
//! one ack or error. Room state is never decided here: each room request becomes an
//! [`Intent`] the origin accepts or refuses; this module only translates, rate-limits, and
//! keeps what is one connection's own (its resume token, its recent events for replay, the
//! edge's view of its video subscriptions for `stats:update`).
//!
//! A connection that drops while joined is *parked* for [`RESUME_WINDOW`] with everything it
//! owns (the participant and its peer connections, its event queues), so `reconnect:attempt`
//! on a new socket picks it up where it was.

use crate::edge::Edge;
use crate::hub::{RoomSignal, SESSION_EVENT_QUEUE};
use crate::session::{leave_waiting, Entry, Participant, SessionError, SubscriberOffer};
use crate::sfu::Event as ShardEvent;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use cascade_proto::room::{
    Action, Audience, ChatMessage, Intent, Layout, ParticipantInfo, PresenceMode, PresenceStatus,
    Reply, RoomEvent, RoomEventBody, RoomSnapshot,
};
use cascade_proto::{Identity, ParticipantId, Role, RoomId, TrackId, TrackKind, TrackSource};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Protocol version spoken here.
pub const PROTOCOL_VERSION: u64 = 2;
/// Oldest version still served (version 2 only adds to it).
pub const OLDEST_VERSION: u64 = 1;
/// Largest signaling frame accepted (an SDP offer with many m-lines fits well below).
pub const MAX_FRAME: usize = 64 * 1024;
/// Read buffer of a signaling connection. tungstenite zero-fills `read_buffer_size` bytes on
/// every read attempt, so its 128 KiB default cost a 128 KiB memset per wake-up of every
/// connection: 12% of a loaded edge core in a 500-viewer profile. Signaling messages are small
/// (an SDP is a few KiB); larger frames are still read, over several reads.
pub const READ_BUFFER: usize = 8 * 1024;
/// How long a dropped connection's participant waits for `reconnect:attempt`.
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);
/// Requests per second a client may send on average...
const RATE_PER_SEC: f64 = 50.0;
/// ...with bursts up to this many.
const RATE_BURST: f64 = 100.0;
/// Chat messages and reactions per second, each, with bursts of twice that.
const CHAT_PER_SEC: f64 = 5.0;
/// `stats:report`s per second, with bursts of twice that.
const STATS_PER_SEC: f64 = 2.0;
/// Requests refused for rate in a row before the connection is closed as abusive.
const ABUSE_LIMIT: u32 = 200;
/// How often auto-subscribe looks again for tracks it could not subscribe to yet.
const RESUBSCRIBE_INTERVAL: Duration = Duration::from_millis(250);
/// A client must join within this time after connecting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Events kept per connection for replay after a resume.
const REPLAY_BUFFER: usize = 512;
/// Lifetime of tokens minted by `room:create` and `participant:add`.
const CREATED_TOKEN_TTL: u64 = 3600;
const INVITE_TOKEN_TTL: u64 = 24 * 3600;
/// Longest display name.
const MAX_DISPLAY_NAME: usize = 64;
/// Longest trickled ICE candidate accepted (and ignored).
const MAX_CANDIDATE: usize = 1024;
/// Longest chat message, in characters (the origin holds the same limit).
const MAX_CHAT_CHARS: usize = origin::MAX_CHAT_CHARS;

/// Every request type the decoder knows (docs/protocol.md), for tests and the fuzz target.
pub const TYPES: &[&str] = &[
    "hello",
    "room:create",
    "room:join",
    "reconnect:attempt",
    "room:leave",
    "room:left",
    "room:members",
    "room:close",
    "room:lock",
    "room:lobby",
    "lobby:admit",
    "lobby:deny",
    "webcam:publish",
    "screen:publish",
    "screenshare:start",
    "screenshare:stop",
    "produce",
    "media:unpublish",
    "sdp:offer",
    "sdp:answer",
    "ice:candidate",
    "transport:connect",
    "consume",
    "consumer:close",
    "consumer:pause",
    "consumer:resume",
    "consumer:layers",
    "simulcast:layers",
    "mute:self",
    "mute:remote",
    "pin:user",
    "layout:update",
    "hand:raise",
    "hand:lower",
    "role:update",
    "participant:remove",
    "participant:add",
    "chat:send",
    "reaction:send",
    "stats:report",
    "stream:start",
    "stream:stop",
];

/// What a client reports about its connection (`stats:report`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsReport {
    /// Round-trip time, ms.
    pub rtt: f64,
    /// Fraction of packets lost, 0..=1.
    pub loss: f64,
    /// Jitter, ms.
    pub jitter: f64,
    /// Bitrate received, bit/s.
    pub bitrate: f64,
}

/// One client request, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Hello {
        version: u64,
    },
    Create {
        name: Option<String>,
    },
    Join {
        token: String,
        name: Option<String>,
        auto_subscribe: bool,
    },
    Resume {
        token: String,
        last_seq: Option<u64>,
    },
    Leave,
    Members {
        after: u64,
        limit: u32,
    },
    Close,
    Lock {
        locked: bool,
    },
    Lobby {
        enabled: bool,
    },
    Admit {
        participant: ParticipantId,
    },
    Deny {
        participant: ParticipantId,
    },
    /// `webcam:publish`, `screen:publish`, `screenshare:start`: may I?
    MayPublish {
        source: TrackSource,
    },
    Produce {
        sdp: String,
        tracks: Vec<(String, TrackSource)>,
    },
    Unpublish {
        track: TrackId,
    },
    ScreenshareStop,
    IceCandidate,
    TransportConnect {
        publisher: bool,
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
    ConsumerResume {
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
    MuteSelf {
        track: TrackId,
        muted: bool,
    },
    MuteRemote {
        participant: ParticipantId,
        kind: TrackKind,
        muted: bool,
    },
    Pin {
        participant: Option<ParticipantId>,
    },
    Layout {
        layout: Option<Layout>,
        spotlight: Option<Option<ParticipantId>>,
    },
    HandRaise,
    HandLower {
        participant: Option<ParticipantId>,
    },
    RoleUpdate {
        participant: ParticipantId,
        role: Role,
    },
    Remove {
        participant: ParticipantId,
    },
    Add {
        identity: Identity,
        role: Role,
        name: Option<String>,
    },
    Chat {
        text: String,
        to: Option<ParticipantId>,
    },
    React {
        emoji: String,
    },
    Stats(StatsReport),
    StreamStart,
    StreamStop,
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
struct CreateBody {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    #[serde(rename = "resumeToken")]
    resume_token: String,
    #[serde(default, rename = "lastSeq")]
    last_seq: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersBody {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBody {
    locked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LobbyBody {
    enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParticipantBody {
    participant: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebcamBody {
    #[serde(default)]
    source: Option<TrackSource>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidateBody {
    candidate: String,
    #[serde(default, rename = "sdpMid")]
    _sdp_mid: Option<String>,
    #[serde(default, rename = "sdpMLineIndex")]
    _sdp_mline_index: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportBody {
    publisher: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteSelfBody {
    track: u64,
    muted: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteRemoteBody {
    participant: u64,
    #[serde(default)]
    kind: Option<TrackKind>,
    #[serde(default)]
    muted: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    participant: Option<u64>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayoutBody {
    #[serde(default)]
    layout: Option<Layout>,
    #[serde(default, deserialize_with = "present")]
    spotlight: Option<Option<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandLowerBody {
    #[serde(default)]
    participant: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    participant: u64,
    role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    identity: String,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    text: String,
    #[serde(default)]
    to: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReactionBody {
    emoji: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamBody {
    #[serde(default, rename = "url")]
    _url: Option<String>,
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
    let bad = |message: String| err(Some(id), "bad_request", message);
    let name_ok = |name: &Option<String>| -> Result<(), DecodeError> {
        match name {
            Some(n) if n.chars().count() > MAX_DISPLAY_NAME => Err(bad(format!(
                "name longer than {MAX_DISPLAY_NAME} characters"
            ))),
            Some(n) if n.trim().is_empty() => Err(bad("empty name".into())),
            _ => Ok(()),
        }
    };
    let pid = ParticipantId;
    let req = match ty.as_str() {
        "hello" => Request::Hello {
            version: parse::<HelloBody>(id, &ty, body)?.version,
        },
        "room:create" => {
            let b: CreateBody = parse(id, &ty, body)?;
            name_ok(&b.name)?;
            Request::Create { name: b.name }
        }
        "room:join" => {
            let b: JoinBody = parse(id, &ty, body)?;
            name_ok(&b.name)?;
            Request::Join {
                token: b.token,
                name: b.name,
                auto_subscribe: b.auto_subscribe.unwrap_or(true),
            }
        }
        "reconnect:attempt" => {
            let b: ResumeBody = parse(id, &ty, body)?;
            Request::Resume {
                token: b.resume_token,
                last_seq: b.last_seq,
            }
        }
        "room:leave" | "room:left" => {
            parse::<EmptyBody>(id, &ty, body)?;
            Request::Leave
        }
        "room:members" => {
            let b: MembersBody = parse(id, &ty, body)?;
            let limit = b.limit.unwrap_or(100);
            if !(1..=origin::MAX_ROSTER_PAGE).contains(&limit) {
                return Err(bad(format!(
                    "limit must be 1..={}",
                    origin::MAX_ROSTER_PAGE
                )));
            }
            Request::Members {
                after: b.after,
                limit,
            }
        }
        "room:close" => {
            parse::<EmptyBody>(id, &ty, body)?;
            Request::Close
        }
        "room:lock" => Request::Lock {
            locked: parse::<LockBody>(id, &ty, body)?.locked,
        },
        "room:lobby" => Request::Lobby {
            enabled: parse::<LobbyBody>(id, &ty, body)?.enabled,
        },
        "lobby:admit" => Request::Admit {
            participant: pid(parse::<ParticipantBody>(id, &ty, body)?.participant),
        },
        "lobby:deny" => Request::Deny {
            participant: pid(parse::<ParticipantBody>(id, &ty, body)?.participant),
        },
        "webcam:publish" => {
            let source = parse::<WebcamBody>(id, &ty, body)?
                .source
                .unwrap_or(TrackSource::Camera);
            if !matches!(source, TrackSource::Camera | TrackSource::Microphone) {
                return Err(bad("webcam:publish source is camera or microphone".into()));
            }
            Request::MayPublish { source }
        }
        "screen:publish" | "screenshare:start" => {
            parse::<EmptyBody>(id, &ty, body)?;
            Request::MayPublish {
                source: TrackSource::Screen,
            }
        }
        "screenshare:stop" => {
            parse::<EmptyBody>(id, &ty, body)?;
            Request::ScreenshareStop
        }
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
        "sdp:offer" => {
            return Err(bad(
                "the edge makes the subscriber PC's offers; send publisher offers with produce"
                    .into(),
            ))
        }
        "ice:candidate" => {
            let b: CandidateBody = parse(id, &ty, body)?;
            if b.candidate.len() > MAX_CANDIDATE {
                return Err(bad(format!("candidate longer than {MAX_CANDIDATE} bytes")));
            }
            Request::IceCandidate
        }
        "transport:connect" => Request::TransportConnect {
            publisher: parse::<TransportBody>(id, &ty, body)?.publisher,
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
        "consumer:resume" => Request::ConsumerResume {
            track: TrackId(parse::<TrackBody>(id, &ty, body)?.track),
        },
        "consumer:layers" | "simulcast:layers" => {
            let b: LayersBody = parse(id, &ty, body)?;
            if b.max_spatial > 2 {
                return Err(bad("maxSpatial must be 0, 1 or 2".into()));
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
        "mute:self" => {
            let b: MuteSelfBody = parse(id, &ty, body)?;
            Request::MuteSelf {
                track: TrackId(b.track),
                muted: b.muted,
            }
        }
        "mute:remote" => {
            let b: MuteRemoteBody = parse(id, &ty, body)?;
            Request::MuteRemote {
                participant: pid(b.participant),
                kind: b.kind.unwrap_or(TrackKind::Audio),
                muted: b.muted.unwrap_or(true),
            }
        }
        "pin:user" => Request::Pin {
            participant: parse::<PinBody>(id, &ty, body)?.participant.map(pid),
        },
        "layout:update" => {
            let b: LayoutBody = parse(id, &ty, body)?;
            if b.layout.is_none() && b.spotlight.is_none() {
                return Err(bad("layout:update needs layout or spotlight".into()));
            }
            Request::Layout {
                layout: b.layout,
                spotlight: b.spotlight.map(|s| s.map(pid)),
            }
        }
        "hand:raise" => {
            parse::<EmptyBody>(id, &ty, body)?;
            Request::HandRaise
        }
        "hand:lower" => Request::HandLower {
            participant: parse::<HandLowerBody>(id, &ty, body)?.participant.map(pid),
        },
        "role:update" => {
            let b: RoleBody = parse(id, &ty, body)?;
            Request::RoleUpdate {
                participant: pid(b.participant),
                role: b.role,
            }
        }
        "participant:remove" => Request::Remove {
            participant: pid(parse::<ParticipantBody>(id, &ty, body)?.participant),
        },
        "participant:add" => {
            let b: AddBody = parse(id, &ty, body)?;
            name_ok(&b.name)?;
            let identity = Identity::new(b.identity).map_err(|e| bad(format!("identity: {e}")))?;
            let role = b.role.unwrap_or(Role::Attendee);
            if role == Role::Host {
                return Err(bad("participant:add can not make a host".into()));
            }
            Request::Add {
                identity,
                role,
                name: b.name,
            }
        }
        "chat:send" => {
            let b: ChatBody = parse(id, &ty, body)?;
            let chars = b.text.chars().count();
            if chars > MAX_CHAT_CHARS {
                return Err(err(
                    Some(id),
                    "too_large",
                    format!("chat text of {chars} characters exceeds {MAX_CHAT_CHARS}"),
                ));
            }
            if b.text.trim().is_empty() {
                return Err(bad("empty chat text".into()));
            }
            Request::Chat {
                text: b.text,
                to: b.to.map(pid),
            }
        }
        "reaction:send" => {
            let emoji = parse::<ReactionBody>(id, &ty, body)?.emoji;
            if !origin::REACTIONS.contains(&emoji.as_str()) {
                return Err(bad(format!(
                    "emoji must be one of {}",
                    origin::REACTIONS.join(" ")
                )));
            }
            Request::React { emoji }
        }
        "stats:report" => {
            let r: StatsReport = parse(id, &ty, body)?;
            let fields = [r.rtt, r.loss, r.jitter, r.bitrate];
            if fields.iter().any(|v| !v.is_finite() || *v < 0.0) || r.loss > 1.0 {
                return Err(bad(
                    "stats must be finite, non-negative numbers and loss at most 1".into(),
                ));
            }
            Request::Stats(r)
        }
        "stream:start" => {
            parse::<StreamBody>(id, &ty, body)?;
            Request::StreamStart
        }
        "stream:stop" => {
            parse::<EmptyBody>(id, &ty, body)?;
            Request::StreamStop
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

/// Token bucket.
struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    strikes: u32,
}

impl RateLimit {
    fn new(now: Instant, per_sec: f64, burst: f64) -> Self {
        Self {
            per_sec,
            burst,
            tokens: burst,
            last: now,
            strikes: 0,
        }
    }
    fn allow(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec)
            .min(self.burst);
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

/// Call quality from a client's report and the edge's own view of its video subscriptions:
/// `(quality, audio_only_recommended)` (thresholds in docs/protocol.md).
pub fn quality(
    r: &StatsReport,
    video_shed: usize,
    video_subscriptions: usize,
) -> (&'static str, bool) {
    let all_video_shed = video_subscriptions > 0 && video_shed == video_subscriptions;
    let q = if r.loss > 0.10 || r.rtt > 500.0 || all_video_shed {
        "poor"
    } else if r.loss > 0.03 || r.rtt > 250.0 || r.jitter > 50.0 {
        "fair"
    } else {
        "good"
    };
    let audio_only = q == "poor" && (r.bitrate < 150_000.0 || all_video_shed);
    (q, audio_only)
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

/// A participant as clients see it (the edge it is on is not their business).
pub fn participant_json(p: &ParticipantInfo) -> Value {
    json!({"id": p.id, "identity": p.identity, "name": p.name, "role": p.role})
}

/// The `room:join` ack's (and `room:joined` event's) fields.
pub fn snapshot_json(room: &RoomId, s: &RoomSnapshot) -> Value {
    json!({
        "room": room,
        "you": participant_json(&s.you),
        "participants": s.participants.iter().map(participant_json).collect::<Vec<_>>(),
        "participantCount": s.participant_count,
        "presence": s.presence,
        "tracks": s.tracks,
        "chat": s.chat,
        "hands": s.hands,
        "settings": s.settings,
        "lobby": s.lobby.iter().map(participant_json).collect::<Vec<_>>(),
        "seq": s.seq,
    })
}

fn chat_json(m: &ChatMessage) -> Value {
    serde_json::to_value(m).unwrap_or(Value::Null)
}

/// Translates a room event to the client's event JSON (`None` for events a connection handles
/// itself: a lobby admission).
pub fn event_json(e: &RoomEvent) -> Option<Value> {
    let mut v = match &e.body {
        RoomEventBody::ParticipantsJoined(ps) => {
            let list: Vec<Value> = ps.iter().map(participant_json).collect();
            let mut v = json!({"type": "participant:joined", "participants": list});
            if let [one] = ps.as_slice() {
                v["participant"] = participant_json(one);
            }
            v
        }
        RoomEventBody::ParticipantsLeft(ps) => {
            let mut v = json!({"type": "participant:left", "participants": ps});
            if let [one] = ps.as_slice() {
                v["participant"] = json!(one);
            }
            v
        }
        // Only rooms in the interesting presence mode send it (its first one is how a client
        // learns the mode changed).
        RoomEventBody::ParticipantCount { count } => json!({"type": "participant:count",
            "participantCount": count, "presence": PresenceMode::Interesting}),
        RoomEventBody::ParticipantStatus {
            participant,
            status,
        } => json!({"type": "participant:info", "participant": participant, "status": status}),
        RoomEventBody::RoleChanged {
            participant,
            role,
            by,
        } => json!({"type": "role:update", "participant": participant, "role": role, "by": by}),
        RoomEventBody::TrackPublished(t) => json!({"type": "track:published", "track": t}),
        RoomEventBody::TrackUnpublished { track, participant } => {
            json!({"type": "track:unpublished", "track": track, "participant": participant})
        }
        RoomEventBody::TrackMuted {
            track,
            muted,
            host_muted,
            by,
        } => json!({"type": "track:muted", "track": track, "muted": muted,
            "hostMuted": host_muted, "by": by}),
        RoomEventBody::ScreenShare {
            participant,
            track,
            active,
        } => json!({"type": "screenshare:notify", "participant": participant, "track": track,
            "active": active}),
        RoomEventBody::Hand {
            participant,
            by,
            raised,
            hands,
        } => json!({"type": if *raised { "hand:raise" } else { "hand:lower" },
            "participant": participant, "by": by, "hands": hands}),
        RoomEventBody::Chat(m) => json!({"type": "chat:receive", "message": chat_json(m)}),
        RoomEventBody::Reaction {
            participant,
            emoji,
            counts,
        } => json!({"type": "reaction:update", "participant": participant, "emoji": emoji,
            "counts": counts}),
        RoomEventBody::Layout {
            layout,
            spotlight,
            by,
        } => json!({"type": "layout:update", "layout": layout, "spotlight": spotlight, "by": by}),
        RoomEventBody::Settings { settings, by } => {
            json!({"type": "room:update", "settings": settings, "by": by})
        }
        RoomEventBody::Restored { settings, hands } => {
            json!({"type": "room:restored", "settings": settings, "hands": hands})
        }
        RoomEventBody::RoomClosed { .. } => json!({"type": "room:close", "reason": "ended"}),
        RoomEventBody::Admitted(_) => return None,
        RoomEventBody::Denied => json!({"type": "lobby:denied"}),
        RoomEventBody::Lobby(waiting) => json!({"type": "lobby:update",
            "waiting": waiting.iter().map(participant_json).collect::<Vec<_>>()}),
        RoomEventBody::MuteRequest { kind, muted, by } => {
            json!({"type": "mute:remote", "kind": kind, "muted": muted, "by": by})
        }
        RoomEventBody::Removed { by } => json!({"type": "participant:remove", "by": by}),
    };
    if e.audience == Audience::All {
        v["seq"] = json!(e.seq);
    }
    Some(v)
}

/// The name of a request that acts on others or on the room, for the log.
fn moderator_action(req: &Request) -> Option<&'static str> {
    Some(match req {
        Request::Close => "room:close",
        Request::Lock { .. } => "room:lock",
        Request::Lobby { .. } => "room:lobby",
        Request::Admit { .. } => "lobby:admit",
        Request::Deny { .. } => "lobby:deny",
        Request::MuteRemote { .. } => "mute:remote",
        Request::RoleUpdate { .. } => "role:update",
        Request::Remove { .. } => "participant:remove",
        Request::Add { .. } => "participant:add",
        Request::Layout { .. } => "layout:update",
        Request::StreamStart => "stream:start",
        Request::StreamStop => "stream:stop",
        _ => return None,
    })
}

fn new_secret() -> String {
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

fn not_available(what: &str) -> SessionError {
    SessionError::new(
        "not_available",
        format!("{what} is not available on this edge"),
    )
}

/// The channels one connection's participant hears on; parked and resumed with it.
pub struct Links {
    /// Until a join hands it to the hub (then only the hub holds senders, so a hub that drops
    /// this participant closes the channel).
    room_tx: Option<mpsc::Sender<RoomSignal>>,
    room_rx: mpsc::Receiver<RoomSignal>,
    shard_tx: mpsc::Sender<ShardEvent>,
    shard_rx: mpsc::Receiver<ShardEvent>,
    notice_tx: mpsc::Sender<String>,
    notice_rx: mpsc::Receiver<String>,
}

impl Links {
    fn new() -> Self {
        let (room_tx, room_rx) = mpsc::channel(SESSION_EVENT_QUEUE);
        let (shard_tx, shard_rx) = mpsc::channel(256);
        let (notice_tx, notice_rx) = mpsc::channel(16);
        Self {
            room_tx: Some(room_tx),
            room_rx,
            shard_tx,
            shard_rx,
            notice_tx,
            notice_rx,
        }
    }
}

/// A joined participant whose socket dropped, kept for [`RESUME_WINDOW`].
pub struct Parked {
    conn: Connection,
    links: Links,
}

enum State {
    Fresh,
    Waiting { room: RoomId, you: ParticipantInfo },
    Joined(Box<Participant>),
}

/// What a text frame asks of the loop.
enum Handled {
    /// Frames to send, and whether to close afterwards.
    Reply(Vec<String>, bool),
    /// Take over a parked participant.
    Resume {
        id: u64,
        token: String,
        last_seq: Option<u64>,
    },
}

/// Serves one WebSocket connection until it closes.
pub async fn serve(edge: Arc<Edge>, mut socket: WebSocket) {
    use std::sync::atomic::Ordering::Relaxed;
    edge.metrics.ws_connections.fetch_add(1, Relaxed);
    let mut conn = Connection::new(edge.clone());
    let mut links = Links::new();
    let join_deadline = tokio::time::sleep(JOIN_TIMEOUT);
    tokio::pin!(join_deadline);
    let mut resubscribe = tokio::time::interval(RESUBSCRIBE_INTERVAL);
    resubscribe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dropped = false;
    loop {
        let mut ticked = false;
        let (out, close): (Vec<String>, bool) = tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => match conn.handle_text(&t, &mut links).await {
                    Handled::Reply(out, close) => (out, close),
                    Handled::Resume { id, token, last_seq } => {
                        resume(&edge, &mut conn, &mut links, id, &token, last_seq).await
                    }
                },
                Some(Ok(Message::Binary(_))) => {
                    edge.metrics.reject("bad_request");
                    (vec![error(None, "bad_request", "binary frames are not part of the protocol")], false)
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    dropped = true;
                    break;
                }
                Some(Ok(_)) => continue, // ping/pong handled by axum
            },
            sig = links.room_rx.recv(), if conn.entered() => match sig {
                Some(sig) => conn.handle_room(sig, &links).await,
                None => {
                    // The hub gave up on us (we fell too far behind): our view is stale.
                    conn.forget().await;
                    (vec![error(None, "internal", "lost the room's events; join again")], true)
                }
            },
            _ = resubscribe.tick(), if conn.resubscribe_due && conn.auto_subscribe && conn.joined() => {
                // A track announced by the origin can reach us before its publisher's session
                // has registered it on this edge; auto-subscribe picks it up on the next tick.
                // Runs only while something may be left to subscribe: a thousand idle viewers'
                // timers cost the edge 4,000 wake-ups a second otherwise.
                ticked = true;
                let offer = conn.subscribe_all().await;
                (offer.map(|o| vec![offer_event(&o)]).unwrap_or_default(), false)
            }
            Some(ev) = links.shard_rx.recv() => (conn.handle_shard(ev).await, false),
            Some(n) = links.notice_rx.recv() => (vec![n], false),
            _ = &mut join_deadline, if !conn.entered() => {
                let _ = socket.send(Message::Text(Utf8Bytes::from(error(None, "not_joined", "no room:join within 30 s")))).await;
                break;
            }
        };
        if !conn.resubscribe_due && !ticked {
            // Whatever was handled may have left a track unsubscribed (a consumer closed, a
            // track announced before its media arrived): look again one interval from now.
            conn.resubscribe_due = true;
            resubscribe.reset();
        }
        let mut failed = false;
        for o in out {
            if socket
                .send(Message::Text(Utf8Bytes::from(o)))
                .await
                .is_err()
            {
                failed = true;
                break;
            }
        }
        if failed {
            dropped = true;
            break;
        }
        if close {
            let _ = socket.send(Message::Close(None)).await;
            break;
        }
    }
    if dropped && conn.joined() && conn.resume_token.is_some() {
        park(edge.clone(), conn, links).await;
    } else {
        conn.forget().await;
    }
    edge.metrics.ws_connections.fetch_sub(1, Relaxed);
}

/// Keeps a dropped connection's participant for [`RESUME_WINDOW`], then lets it leave.
async fn park(edge: Arc<Edge>, conn: Connection, links: Links) {
    let Some(token) = conn.resume_token.clone() else {
        return;
    };
    let State::Joined(p) = &conn.state else {
        return;
    };
    let (room, participant) = (p.room.clone(), p.me.id);
    tracing::info!(room = %room, participant = %participant, "connection dropped; resumable for 30 s");
    // Parked before anyone hears of it, so a client told "reconnecting" can resume at once.
    edge.park(token.clone(), Parked { conn, links });
    let _ = edge
        .hub
        .request(
            &room,
            Intent::SetStatus {
                participant,
                status: PresenceStatus::Reconnecting,
            },
            None,
        )
        .await;
    tokio::spawn(async move {
        tokio::time::sleep(RESUME_WINDOW).await;
        if let Some(mut parked) = edge.unpark(&token) {
            tracing::info!(room = %room, participant = %participant, "resume window over; leaving");
            parked.conn.forget().await;
        }
    });
}

/// `reconnect:attempt`: swaps this fresh connection for the parked one and replays what the
/// client may have missed.
async fn resume(
    edge: &Arc<Edge>,
    conn: &mut Connection,
    links: &mut Links,
    id: u64,
    token: &str,
    last_seq: Option<u64>,
) -> (Vec<String>, bool) {
    if conn.entered() {
        edge.metrics.reject("already_joined");
        return (
            vec![error(
                Some(id),
                "already_joined",
                "this connection already joined a room",
            )],
            false,
        );
    }
    let Some(parked) = edge.unpark(token) else {
        edge.metrics.reject("resume_invalid");
        return (
            vec![error(
                Some(id),
                "resume_invalid",
                "no participant to resume with this token (expired after 30 s, or already resumed)",
            )],
            false,
        );
    };
    *conn = parked.conn;
    *links = parked.links;
    let new_token = new_secret();
    conn.resume_token = Some(new_token.clone());
    let State::Joined(p) = &conn.state else {
        return (
            vec![error(Some(id), "internal", "parked without a participant")],
            true,
        );
    };
    let _ = p
        .ask(Intent::SetStatus {
            participant: p.me.id,
            status: PresenceStatus::Connected,
        })
        .await;
    tracing::info!(room = %p.room, participant = %p.me.id, "resumed");
    let mut out = vec![ack(
        id,
        json!({"room": p.room, "you": participant_json(&p.me), "seq": conn.last_seq,
            "resumeToken": new_token, "resumed": true}),
    )];
    if let Some(last) = last_seq {
        out.extend(
            conn.sent
                .iter()
                .filter(|(seq, room_event, _)| {
                    if *room_event {
                        *seq > last
                    } else {
                        *seq >= last
                    }
                })
                .map(|(_, _, j)| j.to_string()),
        );
    }
    (out, false)
}

struct Connection {
    edge: Arc<Edge>,
    state: State,
    auto_subscribe: bool,
    rate: RateLimit,
    chat_rate: RateLimit,
    reaction_rate: RateLimit,
    stats_rate: RateLimit,
    resume_token: Option<String>,
    /// Recent events sent: (room seq at the time, whether a room event, frame).
    sent: VecDeque<(u64, bool, Arc<str>)>,
    /// Seq of the last room event sent.
    last_seq: u64,
    /// Our video subscriptions and whether the edge's bandwidth allocation sheds each.
    video_shed: HashMap<TrackId, bool>,
    /// DTLS-SRTP up on [publisher, subscriber].
    connected: [bool; 2],
    pinned: Option<ParticipantId>,
    /// Auto-subscribe should look again on its next tick: something happened since it last
    /// found every track it wants subscribed.
    resubscribe_due: bool,
    /// Tracks the client closed (`consumer:close`): auto-subscribe leaves them alone until the
    /// client asks for them again (`consume`).
    declined: HashSet<TrackId>,
}

impl Connection {
    fn new(edge: Arc<Edge>) -> Self {
        let now = Instant::now();
        Self {
            edge,
            state: State::Fresh,
            auto_subscribe: true,
            rate: RateLimit::new(now, RATE_PER_SEC, RATE_BURST),
            chat_rate: RateLimit::new(now, CHAT_PER_SEC, 2.0 * CHAT_PER_SEC),
            reaction_rate: RateLimit::new(now, CHAT_PER_SEC, 2.0 * CHAT_PER_SEC),
            stats_rate: RateLimit::new(now, STATS_PER_SEC, 2.0 * STATS_PER_SEC),
            resume_token: None,
            sent: VecDeque::new(),
            last_seq: 0,
            video_shed: HashMap::new(),
            connected: [false; 2],
            pinned: None,
            resubscribe_due: false,
            declined: HashSet::new(),
        }
    }

    fn entered(&self) -> bool {
        !matches!(self.state, State::Fresh)
    }

    fn joined(&self) -> bool {
        matches!(self.state, State::Joined(_))
    }

    /// Leaves the room (or its lobby) for good.
    async fn forget(&mut self) {
        match std::mem::replace(&mut self.state, State::Fresh) {
            State::Joined(mut p) => p.leave().await,
            State::Waiting { room, you } => leave_waiting(&self.edge, &room, you.id).await,
            State::Fresh => {}
        }
        self.resume_token = None;
    }

    /// Returns the frames to send and whether to close.
    async fn handle_text(&mut self, text: &str, links: &mut Links) -> Handled {
        if !self.rate.allow(Instant::now()) {
            self.edge.metrics.reject("rate_limited");
            let close = self.rate.strikes > ABUSE_LIMIT;
            let id = decode(text).ok().map(|(id, _)| id);
            return Handled::Reply(
                vec![error(id, "rate_limited", "too many requests; slow down")],
                close,
            );
        }
        let (id, req) = match decode(text) {
            Ok(r) => r,
            Err(e) => {
                self.edge.metrics.reject(e.code);
                return Handled::Reply(vec![error(e.id, e.code, &e.message)], false);
            }
        };
        if let Request::Resume { token, last_seq } = req {
            return Handled::Resume {
                id,
                token,
                last_seq,
            };
        }
        let leaving = matches!(req, Request::Leave);
        let mut out = Vec::new();
        match self.handle(req, links, &mut out).await {
            Ok(result) => out.insert(0, ack(id, result)),
            Err(e) => {
                self.edge.metrics.reject(e.code);
                out.insert(0, error(Some(id), e.code, &e.message));
            }
        }
        // After room:leave the connection has nothing left to do.
        let close = leaving && !self.entered();
        Handled::Reply(out, close)
    }

    async fn handle(
        &mut self,
        req: Request,
        links: &mut Links,
        out: &mut Vec<String>,
    ) -> Result<Value, SessionError> {
        match req {
            Request::Hello { version } => {
                if !(OLDEST_VERSION..=PROTOCOL_VERSION).contains(&version) {
                    return Err(SessionError::new(
                        "unsupported_version",
                        format!("protocol version {version} is not supported; this server speaks {OLDEST_VERSION} to {PROTOCOL_VERSION}"),
                    ));
                }
                return Ok(
                    json!({"version": version, "server": concat!("kcs-edge/", env!("CARGO_PKG_VERSION"))}),
                );
            }
            Request::Create { name } => return self.create(name),
            Request::Join {
                token,
                name,
                auto_subscribe,
            } => return self.join(token, name, auto_subscribe, links, out).await,
            Request::Resume { .. } => unreachable!("handled by the loop"),
            _ => {}
        }
        if let State::Waiting { .. } = self.state {
            if matches!(req, Request::Leave) {
                self.forget().await;
                return Ok(json!({}));
            }
            return Err(SessionError::new(
                "in_lobby",
                "waiting in the lobby for a moderator to admit you",
            ));
        }
        let State::Joined(p) = &mut self.state else {
            return Err(SessionError::new("not_joined", "send room:join first"));
        };
        let me = p.me.id;
        if let Some(action) = moderator_action(&req) {
            tracing::info!(room = %p.room, participant = %me, role = %p.me.role, action, "moderator request");
        }
        let done = |r: Result<Reply, SessionError>| r.map(|_| json!({}));
        match req {
            Request::Hello { .. }
            | Request::Create { .. }
            | Request::Join { .. }
            | Request::Resume { .. } => unreachable!("handled above"),
            Request::Leave => {
                self.forget().await;
                Ok(json!({}))
            }
            Request::Members { after, limit } => {
                let reply = p
                    .ask(Intent::Members {
                        participant: me,
                        after: ParticipantId(after),
                        limit,
                    })
                    .await?;
                let Reply::Members {
                    participants,
                    next,
                    count,
                } = reply
                else {
                    return Err(SessionError::new("internal", "unexpected reply"));
                };
                Ok(json!({
                    "participants": participants.iter().map(participant_json).collect::<Vec<_>>(),
                    "next": next,
                    "participantCount": count,
                }))
            }
            Request::Close => done(p.ask(Intent::Close { participant: me }).await),
            Request::Lock { locked } => done(
                p.ask(Intent::SetLocked {
                    participant: me,
                    locked,
                })
                .await,
            ),
            Request::Lobby { enabled } => done(
                p.ask(Intent::SetLobby {
                    participant: me,
                    enabled,
                })
                .await,
            ),
            Request::Admit { participant } => done(
                p.ask(Intent::Admit {
                    participant: me,
                    waiting: participant,
                })
                .await,
            ),
            Request::Deny { participant } => done(
                p.ask(Intent::Deny {
                    participant: me,
                    waiting: participant,
                })
                .await,
            ),
            Request::MayPublish { source } => done(
                p.ask(Intent::Authorize {
                    participant: me,
                    action: Action::Publish(source),
                })
                .await,
            ),
            Request::StreamStart | Request::StreamStop => {
                // The origin checks the role first (forbidden), then answers not_available
                // until the live-stream egress exists.
                p.ask(Intent::Authorize {
                    participant: me,
                    action: Action::LiveStream,
                })
                .await?;
                Err(not_available("live streaming"))
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
            Request::ScreenshareStop => {
                let mine: Vec<TrackId> = p
                    .tracks
                    .values()
                    .filter(|t| {
                        t.participant == me
                            && matches!(t.source, TrackSource::Screen | TrackSource::ScreenAudio)
                    })
                    .map(|t| t.id)
                    .collect();
                for t in mine {
                    p.unpublish(t).await?;
                }
                Ok(json!({}))
            }
            Request::IceCandidate => Ok(json!({"ignored": true})),
            Request::TransportConnect { publisher } => {
                Ok(json!({"connected": self.connected[usize::from(!publisher)]}))
            }
            Request::Consume { tracks } => {
                for t in &tracks {
                    self.declined.remove(t);
                }
                if let Some(o) = p.consume(&tracks, None).await? {
                    out.push(offer_event(&o));
                }
                Ok(json!({}))
            }
            Request::CloseConsumers { tracks } => {
                self.declined.extend(tracks.iter().copied());
                if let Some(o) = p.close_consumers(&tracks).await {
                    out.push(offer_event(&o));
                }
                Ok(json!({}))
            }
            Request::Pause { track } => p.set_paused(track, true).await.map(|_| json!({})),
            Request::ConsumerResume { track } => {
                p.set_paused(track, false).await.map(|_| json!({}))
            }
            Request::Layers { track, max_spatial } => {
                p.set_max_layer(track, max_spatial).await.map(|_| json!({}))
            }
            Request::Answer { revision, sdp } => {
                if let Some(o) = p.handle_answer(revision, &sdp).await? {
                    out.push(offer_event(&o));
                }
                Ok(json!({}))
            }
            Request::MuteSelf { track, muted } => done(
                p.ask(Intent::SetMuted {
                    participant: me,
                    track,
                    muted,
                })
                .await,
            ),
            Request::MuteRemote {
                participant,
                kind,
                muted,
            } => done(
                p.ask(Intent::MuteRemote {
                    participant: me,
                    target: participant,
                    kind,
                    muted,
                })
                .await,
            ),
            Request::Pin { participant } => {
                if let Some(who) = participant {
                    let reply = p
                        .ask(Intent::Members {
                            participant: me,
                            after: ParticipantId(who.0.saturating_sub(1)),
                            limit: 1,
                        })
                        .await?;
                    let exists = matches!(&reply, Reply::Members { participants, .. }
                        if participants.first().is_some_and(|q| q.id == who));
                    if !exists {
                        return Err(SessionError::new(
                            "no_such_participant",
                            format!("no participant {who} in the room"),
                        ));
                    }
                }
                self.pinned = participant;
                Ok(json!({"pinned": participant}))
            }
            Request::Layout { layout, spotlight } => done(
                p.ask(Intent::SetLayout {
                    participant: me,
                    layout,
                    spotlight,
                })
                .await,
            ),
            Request::HandRaise => done(p.ask(Intent::RaiseHand { participant: me }).await),
            Request::HandLower { participant } => done(
                p.ask(Intent::LowerHand {
                    participant: me,
                    target: participant.unwrap_or(me),
                })
                .await,
            ),
            Request::RoleUpdate { participant, role } => done(
                p.ask(Intent::SetRole {
                    participant: me,
                    target: participant,
                    role,
                })
                .await,
            ),
            Request::Remove { participant } => done(
                p.ask(Intent::Remove {
                    participant: me,
                    target: participant,
                })
                .await,
            ),
            Request::Add {
                identity,
                role,
                name,
            } => {
                let Some(signer) = self.edge.dev_signer.as_ref() else {
                    return Err(not_available(
                        "participant:add (no signing key: the control plane invites in production)",
                    ));
                };
                p.ask(Intent::Invite {
                    participant: me,
                    identity: identity.clone(),
                    role,
                })
                .await?;
                let token = signer.mint(
                    p.room.clone(),
                    identity.clone(),
                    role,
                    name,
                    control_plane::token::unix_now(),
                    INVITE_TOKEN_TTL,
                );
                let link = format!("/?room={}&token={token}", p.room);
                let notice = json!({"type": "participant:add", "room": p.room, "token": token,
                    "link": link, "by": p.me.identity, "role": role});
                self.edge.notify(&identity, notice.to_string());
                tracing::info!(room = %p.room, participant = %me, invited = %identity, role = %role, "participant added");
                Ok(json!({"identity": identity, "role": role, "token": token, "link": link}))
            }
            Request::Chat { text, to } => {
                if !self.chat_rate.allow(Instant::now()) {
                    return Err(SessionError::new(
                        "rate_limited",
                        "chat: at most 5 messages a second",
                    ));
                }
                match p
                    .ask(Intent::Chat {
                        participant: me,
                        text,
                        to,
                    })
                    .await?
                {
                    Reply::Chat { message } => Ok(json!({"message": chat_json(&message)})),
                    _ => Err(SessionError::new("internal", "unexpected reply")),
                }
            }
            Request::React { emoji } => {
                if !self.reaction_rate.allow(Instant::now()) {
                    return Err(SessionError::new(
                        "rate_limited",
                        "reactions: at most 5 a second",
                    ));
                }
                done(
                    p.ask(Intent::React {
                        participant: me,
                        emoji,
                    })
                    .await,
                )
            }
            Request::Stats(report) => {
                if !self.stats_rate.allow(Instant::now()) {
                    return Err(SessionError::new(
                        "rate_limited",
                        "stats:report: at most 2 a second",
                    ));
                }
                let shed = self.video_shed.values().filter(|s| **s).count();
                let (q, audio_only) = quality(&report, shed, self.video_shed.len());
                out.push(
                    json!({"type": "stats:update", "quality": q, "audioOnly": audio_only,
                        "rtt": report.rtt, "loss": report.loss, "serverVideoShed": shed})
                    .to_string(),
                );
                Ok(json!({}))
            }
        }
    }

    fn create(&self, name: Option<String>) -> Result<Value, SessionError> {
        let Some(signer) = self.edge.dev_signer.as_ref() else {
            return Err(not_available(
                "room:create (rooms are created on the control plane)",
            ));
        };
        let suffix = new_secret()[..12].to_ascii_lowercase();
        let room = RoomId::new(format!("m-{suffix}"))
            .map_err(|e| SessionError::new("internal", e.to_string()))?;
        let identity = Identity::new(format!("host-{}", &suffix[..6]))
            .map_err(|e| SessionError::new("internal", e.to_string()))?;
        let token = signer.mint(
            room.clone(),
            identity,
            Role::Host,
            name,
            control_plane::token::unix_now(),
            CREATED_TOKEN_TTL,
        );
        let link = format!("/?room={room}&token={token}");
        Ok(json!({"room": room, "token": token, "link": link}))
    }

    async fn join(
        &mut self,
        token: String,
        name: Option<String>,
        auto_subscribe: bool,
        links: &mut Links,
        out: &mut Vec<String>,
    ) -> Result<Value, SessionError> {
        if self.entered() {
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
        let Some(listener) = links.room_tx.clone() else {
            return Err(SessionError::new("internal", "listener already used"));
        };
        let entry = Participant::enter(
            self.edge.clone(),
            room.clone(),
            Intent::Join {
                identity: claims.identity.clone(),
                role: claims.role,
                name: display,
            },
            listener,
            links.shard_tx.clone(),
        )
        .await?;
        // From now on only the hub sends room signals to us.
        links.room_tx = None;
        self.auto_subscribe = auto_subscribe;
        self.edge
            .register_notices(&claims.identity, links.notice_tx.clone());
        match entry {
            Entry::Joined(p, snapshot) => {
                let mut v = snapshot_json(&room, &snapshot);
                self.last_seq = snapshot.seq;
                v["resumeToken"] = json!(self.start_resumable());
                self.state = State::Joined(p);
                if auto_subscribe {
                    if let Some(o) = self.subscribe_all().await {
                        out.push(offer_event(&o));
                    }
                }
                Ok(v)
            }
            Entry::Waiting(you) => {
                let v = json!({"waiting": true, "room": room, "you": participant_json(&you)});
                self.state = State::Waiting { room, you };
                Ok(v)
            }
        }
    }

    fn start_resumable(&mut self) -> String {
        let t = new_secret();
        self.resume_token = Some(t.clone());
        t
    }

    async fn subscribe_all(&mut self) -> Option<SubscriberOffer> {
        let State::Joined(p) = &mut self.state else {
            return None;
        };
        let declined = &self.declined;
        let wanted = |p: &Participant| -> Vec<TrackId> {
            let mut v = p.unsubscribed_tracks();
            v.retain(|t| !declined.contains(t));
            v
        };
        let tracks = wanted(p);
        if tracks.is_empty() {
            self.resubscribe_due = false;
            return None;
        }
        let offer = match p.consume(&tracks, None).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "auto-subscribe skipped a track");
                None
            }
        };
        self.resubscribe_due = !wanted(p).is_empty();
        offer
    }

    /// Keeps a sent event for replay after a resume (the frame is shared with every session
    /// of the edge that got the same event).
    fn record(&mut self, e: &RoomEvent, frame: Arc<str>) {
        let room_event = e.audience == Audience::All;
        if room_event {
            self.last_seq = e.seq;
        }
        self.sent.push_back((e.seq, room_event, frame));
        while self.sent.len() > REPLAY_BUFFER {
            self.sent.pop_front();
        }
    }

    async fn handle_room(&mut self, sig: RoomSignal, links: &Links) -> (Vec<String>, bool) {
        let mut out = Vec::new();
        match &mut self.state {
            State::Fresh => (out, false),
            State::Waiting { room, you } => {
                let RoomSignal::Event(e) = sig else {
                    return (out, false);
                };
                // In the lobby only our own fate matters (room events are not for us yet).
                match (&e.audience, &e.body) {
                    (Audience::Participant(p), RoomEventBody::Admitted(snapshot))
                        if *p == you.id =>
                    {
                        let room = room.clone();
                        let p = Participant::admitted(
                            self.edge.clone(),
                            room.clone(),
                            snapshot,
                            links.shard_tx.clone(),
                        )
                        .await;
                        let mut v = snapshot_json(&room, snapshot);
                        v["type"] = json!("room:joined");
                        v["resumeToken"] = json!(self.start_resumable());
                        self.last_seq = snapshot.seq;
                        self.state = State::Joined(Box::new(p));
                        out.push(v.to_string());
                        if self.auto_subscribe {
                            if let Some(o) = self.subscribe_all().await {
                                out.push(offer_event(&o));
                            }
                        }
                        (out, false)
                    }
                    (Audience::Participant(p), RoomEventBody::Denied) if *p == you.id => {
                        let (room, id) = (room.clone(), you.id);
                        self.edge.hub.detach(&room, id).await;
                        self.state = State::Fresh;
                        out.push(json!({"type": "lobby:denied"}).to_string());
                        (out, true)
                    }
                    (_, RoomEventBody::RoomClosed { .. }) => {
                        self.state = State::Fresh;
                        out.push(json!({"type": "room:close", "reason": "ended"}).to_string());
                        (out, true)
                    }
                    _ => (out, false),
                }
            }
            State::Joined(p) => match sig {
                RoomSignal::Event(e) => {
                    if e.audience == Audience::Moderators && !origin::is_moderator(p.me.role) {
                        return (out, false);
                    }
                    let offer = p.handle_room_event(&e).await;
                    if let RoomEventBody::TrackUnpublished { track, .. } = &e.body {
                        self.video_shed.remove(track);
                    }
                    let ends = matches!(
                        e.body,
                        RoomEventBody::RoomClosed { .. } | RoomEventBody::Removed { .. }
                    );
                    if let Some(frame) = e.frame(|e| event_json(e).map(|j| j.to_string())) {
                        out.push(frame.to_string());
                        self.record(&e, frame);
                    }
                    if ends {
                        // The room forgot us already; release the media and close.
                        if let State::Joined(mut p) =
                            std::mem::replace(&mut self.state, State::Fresh)
                        {
                            tracing::info!(room = %p.room, participant = %p.me.id, "removed or meeting ended");
                            p.release_after_room_ended().await;
                        }
                        self.resume_token = None;
                        return (out, true);
                    }
                    if let Some(o) = offer {
                        out.push(offer_event(&o));
                    }
                    if matches!(e.body, RoomEventBody::TrackPublished(_)) && self.auto_subscribe {
                        if let Some(o) = self.subscribe_all().await {
                            out.push(offer_event(&o));
                        }
                    }
                    (out, false)
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
                    (out, false)
                }
            },
        }
    }

    async fn handle_shard(&mut self, ev: ShardEvent) -> Vec<String> {
        let State::Joined(p) = &mut self.state else {
            return Vec::new();
        };
        match ev {
            ShardEvent::LayerChanged {
                subscription,
                current,
                target,
            } => match p.track_of(subscription) {
                Some(track) => {
                    self.video_shed.insert(track, target.is_none());
                    vec![json!({"type": "simulcast:layers", "track": track,
                        "current": current.map(|l| l.0), "target": target.map(|l| l.0)})
                    .to_string()]
                }
                None => Vec::new(),
            },
            ShardEvent::Closed { transport, reason } => {
                tracing::info!(room = %p.room, participant = %p.me.id, transport = transport.0, reason, "transport closed");
                let publisher = p.is_publisher_transport(transport);
                self.connected[usize::from(!publisher)] = false;
                vec![
                    json!({"type": "transport:closed", "publisher": publisher, "reason": reason})
                        .to_string(),
                ]
            }
            ShardEvent::Connected { transport } => {
                tracing::debug!(room = %p.room, participant = %p.me.id, transport = transport.0, "transport connected");
                let publisher = p.is_publisher_transport(transport);
                self.connected[usize::from(!publisher)] = true;
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
            (r#"{"id":3,"type":"room:left"}"#, Request::Leave),
            (
                r#"{"id":3,"type":"reconnect:attempt","resumeToken":"abc","lastSeq":7}"#,
                Request::Resume {
                    token: "abc".into(),
                    last_seq: Some(7),
                },
            ),
            (
                r#"{"id":3,"type":"room:members"}"#,
                Request::Members {
                    after: 0,
                    limit: 100,
                },
            ),
            (
                r#"{"id":3,"type":"mute:remote","participant":4}"#,
                Request::MuteRemote {
                    participant: ParticipantId(4),
                    kind: TrackKind::Audio,
                    muted: true,
                },
            ),
            (
                r#"{"id":3,"type":"layout:update","spotlight":null}"#,
                Request::Layout {
                    layout: None,
                    spotlight: Some(None),
                },
            ),
            (
                r#"{"id":3,"type":"layout:update","layout":"speaker"}"#,
                Request::Layout {
                    layout: Some(Layout::Speaker),
                    spotlight: None,
                },
            ),
            (
                r#"{"id":3,"type":"participant:add","identity":"bob"}"#,
                Request::Add {
                    identity: Identity::new("bob").unwrap(),
                    role: Role::Attendee,
                    name: None,
                },
            ),
            (
                r#"{"id":3,"type":"chat:send","text":"hi","to":2}"#,
                Request::Chat {
                    text: "hi".into(),
                    to: Some(ParticipantId(2)),
                },
            ),
            (
                r#"{"id":3,"type":"webcam:publish"}"#,
                Request::MayPublish {
                    source: TrackSource::Camera,
                },
            ),
            (
                r#"{"id":3,"type":"screenshare:start"}"#,
                Request::MayPublish {
                    source: TrackSource::Screen,
                },
            ),
            (
                r#"{"id":3,"type":"stream:start","url":"rtmp://x"}"#,
                Request::StreamStart,
            ),
            (
                r#"{"id":3,"type":"hand:lower"}"#,
                Request::HandLower { participant: None },
            ),
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
                Request::ConsumerResume { track: TrackId(1) },
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
        let more = [
            (r#"{"id":1,"type":"hello","version":"2"}"#, "bad_request"),
            (r#"{"id":1,"type":"room:leave","now":true}"#, "bad_request"),
            (r#"{"id":1,"type":"room:members","limit":0}"#, "bad_request"),
            (
                r#"{"id":1,"type":"room:members","limit":501}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"lobby:admit","participant":-1}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"mute:remote","participant":1,"kind":"smell"}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"role:update","participant":1,"role":"king"}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"participant:add","identity":"a b"}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"participant:add","identity":"a","role":"host"}"#,
                "bad_request",
            ),
            (r#"{"id":1,"type":"chat:send","text":"   "}"#, "bad_request"),
            (r#"{"id":1,"type":"chat:send","text":5}"#, "bad_request"),
            (
                r#"{"id":1,"type":"reaction:send","emoji":"x"}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"stats:report","rtt":1,"loss":2,"jitter":0,"bitrate":0}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"stats:report","rtt":-1,"loss":0,"jitter":0,"bitrate":0}"#,
                "bad_request",
            ),
            (r#"{"id":1,"type":"layout:update"}"#, "bad_request"),
            (
                r#"{"id":1,"type":"layout:update","layout":"mosaic"}"#,
                "bad_request",
            ),
            (
                r#"{"id":1,"type":"webcam:publish","source":"screen"}"#,
                "bad_request",
            ),
            (r#"{"id":1,"type":"sdp:offer","sdp":"v=0"}"#, "bad_request"),
            (
                r#"{"id":1,"type":"room:join","token":"t","name":"  "}"#,
                "bad_request",
            ),
        ];
        for (text, code) in more {
            let e = decode(text).unwrap_err();
            assert_eq!((e.id, e.code), (Some(1), code), "{text}: {}", e.message);
        }
        let long_chat = format!(
            r#"{{"id":1,"type":"chat:send","text":"{}"}}"#,
            "é".repeat(MAX_CHAT_CHARS + 1)
        );
        assert_eq!(decode(&long_chat).unwrap_err().code, "too_large");
        let huge = format!(
            r#"{{"id":1,"type":"produce","sdp":"{}"}}"#,
            "a".repeat(MAX_FRAME)
        );
        assert_eq!(decode(&huge).unwrap_err().code, "too_large");
    }

    #[test]
    fn a_restored_room_reaches_clients_as_room_restored() {
        use cascade_proto::room::RoomSettings;
        let e = RoomEvent {
            room: RoomId::new("r").unwrap(),
            seq: 1_048_607,
            audience: Audience::All,
            body: RoomEventBody::Restored {
                settings: RoomSettings {
                    locked: true,
                    ..RoomSettings::default()
                },
                hands: vec![ParticipantId(3), ParticipantId(1)],
            },
        };
        let v = event_json(&e).unwrap();
        assert_eq!(v["type"], "room:restored");
        assert_eq!(v["seq"], 1_048_607);
        assert_eq!(v["hands"], json!([3, 1]));
        assert_eq!(v["settings"]["locked"], true);
        assert_eq!(v["settings"]["layout"], "grid");
        assert!(v.get("by").is_none(), "a merge names no actor: {v}");
    }

    #[test]
    fn every_listed_type_is_known() {
        for ty in TYPES {
            let e = decode(&format!(r#"{{"id":1,"type":"{ty}","zz":0}}"#));
            // Unknown fields are refused, so every type answers bad_request, never unknown_type.
            assert_eq!(e.unwrap_err().code, "bad_request", "{ty}");
        }
    }

    #[test]
    fn quality_combines_client_report_and_edge_view() {
        let good = StatsReport {
            rtt: 40.0,
            loss: 0.0,
            jitter: 5.0,
            bitrate: 2_000_000.0,
        };
        assert_eq!(quality(&good, 0, 2), ("good", false));
        let fair = StatsReport { loss: 0.05, ..good };
        assert_eq!(quality(&fair, 0, 2), ("fair", false));
        let lossy = StatsReport { loss: 0.2, ..good };
        assert_eq!(
            quality(&lossy, 0, 2),
            ("poor", false),
            "enough bitrate for video"
        );
        let starved = StatsReport {
            bitrate: 80_000.0,
            ..lossy
        };
        assert_eq!(quality(&starved, 0, 2), ("poor", true));
        // A clean report, but the edge sheds every video subscription: poor, audio only.
        assert_eq!(quality(&good, 2, 2), ("poor", true));
        assert_eq!(quality(&good, 1, 2), ("good", false));
    }

    #[test]
    fn rate_limit_allows_bursts_then_refuses_then_recovers() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(t0, RATE_PER_SEC, RATE_BURST);
        let allowed = (0..150).filter(|_| r.allow(t0)).count();
        assert_eq!(allowed, RATE_BURST as usize);
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_secs(1)));
    }
}
