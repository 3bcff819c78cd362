//! HTTP surface of the edge (axum): the web page, `/ws`, WHIP (RFC 9725) and WHEP, `/metrics`,
//! `/healthz`, and in dev mode `/dev/token`.
//!
//! Handler errors are one [`ApiError`] type that renders as a status with a JSON body carrying a
//! code and a reason, and counts itself in `/metrics`.

use crate::edge::Edge;
use crate::hub::SESSION_EVENT_QUEUE;
use crate::session::{whep_subscribe, Participant, SessionError};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use cascade_proto::room::Intent;
use cascade_proto::{Identity, Role, RoomId, TrackKind, TrackSource};
use control_plane::token::{unix_now, Claims};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Largest SDP offer accepted over WHIP/WHEP.
const MAX_SDP: usize = 64 * 1024;

/// An HTTP error with a machine-readable code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let status = match e.code {
            "sdp_invalid" | "sdp_unsupported" | "bad_request" => StatusCode::BAD_REQUEST,
            "forbidden" | "room_locked" | "in_lobby" => StatusCode::FORBIDDEN,
            "no_such_track" => StatusCode::NOT_FOUND,
            "room_full" | "source_in_use" | "too_many_tracks" => StatusCode::CONFLICT,
            "origin_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "token_invalid" | "token_expired" | "token_malformed" | "token_wrong_room" => {
                StatusCode::UNAUTHORIZED
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.code, e.message)
    }
}

/// Carries the edge for counting the error, set by the handler wrapper.
struct Counted(Arc<Edge>, ApiError);

impl IntoResponse for Counted {
    fn into_response(self) -> Response {
        let Counted(edge, e) = self;
        edge.metrics.reject(e.code);
        let mut resp = (
            e.status,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"error": {"code": e.code, "message": e.message}}).to_string(),
        )
            .into_response();
        if e.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type HttpResult = Result<Response, Counted>;

/// Builds the router.
pub fn router(edge: Arc<Edge>) -> Router {
    let mut r = Router::new()
        .route("/", get(page))
        .route("/kcs-client.js", get(|| asset("kcs-client.js")))
        .route("/app.js", get(|| asset("app.js")))
        .route("/style.css", get(|| asset("style.css")))
        .route("/basic", get(|| asset("basic.html")))
        .route("/meet.js", get(|| asset("meet.js")))
        .route("/meet-layout.js", get(|| asset("meet-layout.js")))
        .route("/meet.css", get(|| asset("meet.css")))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws))
        .route("/whip/{room}", post(whip).patch(no_trickle))
        .route(
            "/whip/{room}/{session}",
            axum::routing::delete(end_session).patch(no_trickle),
        )
        .route("/whep/{room}", post(whep_latest))
        .route("/whep/{room}/{participant}", post(whep_participant))
        .route(
            "/whep/{room}/session/{session}",
            axum::routing::delete(end_session).patch(no_trickle),
        );
    if edge.dev_signer.is_some() {
        r = r.route("/dev/token", get(dev_token));
    }
    r.layer(DefaultBodyLimit::max(MAX_SDP + 1024))
        .with_state(edge)
}

async fn page() -> Response {
    asset("index.html").await
}

async fn asset(name: &str) -> Response {
    let (body, ty) = match name {
        "index.html" => (
            include_str!("../web/index.html"),
            "text/html; charset=utf-8",
        ),
        "kcs-client.js" => (include_str!("../web/kcs-client.js"), "text/javascript"),
        "app.js" => (include_str!("../web/app.js"), "text/javascript"),
        "style.css" => (include_str!("../web/style.css"), "text/css"),
        "basic.html" => (
            include_str!("../web/basic.html"),
            "text/html; charset=utf-8",
        ),
        "meet.js" => (include_str!("../web/meet.js"), "text/javascript"),
        "meet-layout.js" => (include_str!("../web/meet-layout.js"), "text/javascript"),
        "meet.css" => (include_str!("../web/meet.css"), "text/css"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(edge): State<Arc<Edge>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        edge.metrics.render(),
    )
        .into_response()
}

async fn ws(State(edge): State<Arc<Edge>>, upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .max_message_size(crate::ws::MAX_FRAME)
        .max_frame_size(crate::ws::MAX_FRAME)
        .read_buffer_size(crate::ws::READ_BUFFER)
        .on_upgrade(move |socket| crate::ws::serve(edge, socket))
}

/// RFC 9725 §4.3.1: servers that do not support trickle ICE answer PATCH with 405. Our ICE-lite
/// answer carries all candidates; clients need not trickle.
async fn no_trickle() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST, DELETE")],
        "trickle ICE is not needed: the answer carries all candidates",
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct DevTokenQuery {
    room: String,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    role: Option<String>,
}

/// Dev mode only: a token for anyone who asks, so two browser tabs can join the printed URL.
async fn dev_token(State(edge): State<Arc<Edge>>, Query(q): Query<DevTokenQuery>) -> HttpResult {
    let bad = |m: String| {
        Counted(
            edge.clone(),
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m),
        )
    };
    let room = RoomId::new(q.room).map_err(|e| bad(format!("room: {e}")))?;
    let identity = match q.identity {
        Some(i) => Identity::new(i).map_err(|e| bad(format!("identity: {e}")))?,
        None => Identity::new(format!("guest-{:06x}", rand::random::<u32>() & 0xff_ffff))
            .map_err(|e| bad(e.to_string()))?,
    };
    let role: Role = q
        .role
        .as_deref()
        .unwrap_or("presenter")
        .parse()
        .map_err(bad)?;
    let Some(signer) = edge.dev_signer.as_ref() else {
        return Err(Counted(
            edge.clone(),
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "dev mode only"),
        ));
    };
    let token = signer.mint(room, identity.clone(), role, None, unix_now(), 12 * 3600);
    Ok(axum::Json(json!({"token": token, "identity": identity, "role": role})).into_response())
}

/// Checks `Authorization: Bearer` and `Content-Type: application/sdp`.
fn authorize(edge: &Arc<Edge>, headers: &HeaderMap, room: &RoomId) -> Result<Claims, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_missing",
                "Authorization: Bearer <token> required",
            )
        })?;
    let claims = edge
        .verifier()
        .verify_for_room(token.trim(), room)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?;
    if !ct.trim().eq_ignore_ascii_case("application/sdp") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_content_type",
            "Content-Type must be application/sdp",
        ));
    }
    Ok(claims)
}

fn parse_room(raw: &str) -> Result<RoomId, ApiError> {
    RoomId::new(raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("room: {e}")))
}

fn offer_text(body: &Bytes) -> Result<&str, ApiError> {
    if body.len() > MAX_SDP {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "SDP offer over 64 KiB",
        ));
    }
    std::str::from_utf8(body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "sdp_invalid", "SDP is not UTF-8"))
}

/// Runs a WHIP/WHEP session until DELETE, transport loss or the room closing.
fn keep_session(
    edge: Arc<Edge>,
    id: String,
    mut p: Participant,
    mut shard_rx: mpsc::Receiver<crate::sfu::Event>,
    mut room_rx: mpsc::Receiver<crate::hub::RoomSignal>,
) {
    let (stop_tx, mut stop_rx) = oneshot::channel();
    edge.http_sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), stop_tx);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                ev = shard_rx.recv() => match ev {
                    Some(crate::sfu::Event::Closed { reason, .. }) => {
                        tracing::info!(session = %id, reason, "WHIP/WHEP transport closed");
                        break;
                    }
                    Some(_) => {}
                    None => break,
                },
                sig = room_rx.recv() => match sig {
                    Some(crate::hub::RoomSignal::Event(e)) => { let _ = p.handle_room_event(&e).await; }
                    Some(_) => {}
                    None => break,
                },
            }
        }
        p.leave().await;
        edge.http_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    });
}

/// Joins a WHIP/WHEP session's participant with the token's identity and the given role,
/// returning it with the channels its session task listens on.
async fn join(
    edge: &Arc<Edge>,
    room: &RoomId,
    claims: Claims,
    role: Role,
) -> Result<
    (
        Participant,
        crate::session::Joined,
        mpsc::Receiver<crate::hub::RoomSignal>,
        mpsc::Receiver<crate::sfu::Event>,
    ),
    SessionError,
> {
    let (room_tx, room_rx) = mpsc::channel(SESSION_EVENT_QUEUE);
    let (shard_tx, shard_rx) = mpsc::channel(64);
    let name = claims.name.unwrap_or_else(|| claims.identity.to_string());
    let intent = Intent::Join {
        identity: claims.identity,
        role,
        name,
    };
    let (p, joined) =
        Participant::join(edge.clone(), room.clone(), intent, room_tx, shard_tx).await?;
    Ok((p, joined, room_rx, shard_rx))
}

/// The participant named `name` (its identity or id), searching the roster page by page (a join
/// snapshot carries only the first page).
async fn find_named(
    p: &Participant,
    joined: &crate::session::Joined,
    name: &str,
) -> Option<cascade_proto::ParticipantId> {
    let named = |q: &&cascade_proto::room::ParticipantInfo| {
        q.identity.as_str() == name || q.id.to_string() == name || q.id.0.to_string() == name
    };
    if let Some(q) = joined.participants.iter().find(named) {
        return Some(q.id);
    }
    let mut after = joined.participants.last()?.id;
    loop {
        let Ok(cascade_proto::room::Reply::Members {
            participants, next, ..
        }) = p
            .ask(Intent::Members {
                participant: p.me.id,
                after,
                limit: origin::MAX_ROSTER_PAGE,
            })
            .await
        else {
            return None;
        };
        if let Some(q) = participants.iter().find(named) {
            return Some(q.id);
        }
        after = next?;
    }
}

fn created(location: String, answer: String) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_string()),
            (header::LOCATION, location),
        ],
        answer,
    )
        .into_response()
}

async fn whip(
    State(edge): State<Arc<Edge>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResult {
    let c = |e: ApiError| Counted(edge.clone(), e);
    let room = parse_room(&room).map_err(c)?;
    let claims = authorize(&edge, &headers, &room).map_err(c)?;
    if claims.role == Role::Viewer {
        return Err(c(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "role viewer may not publish",
        )));
    }
    let offer = offer_text(&body).map_err(c)?;
    let role = claims.role;
    let (mut p, _, room_rx, shard_rx) = join(&edge, &room, claims, role)
        .await
        .map_err(|e| c(e.into()))?;
    let answer = match p.produce(offer, &HashMap::new()).await {
        Ok((answer, published)) if !published.is_empty() => answer,
        Ok(_) => {
            p.leave().await;
            return Err(c(ApiError::new(
                StatusCode::BAD_REQUEST,
                "sdp_unsupported",
                "the offer sends no media we can receive",
            )));
        }
        Err(e) => {
            p.leave().await;
            return Err(c(e.into()));
        }
    };
    let id = format!("{:016x}", rand::random::<u64>());
    let location = format!("/whip/{room}/{id}");
    tracing::info!(room = %room, participant = %p.me.id, session = %id, "WHIP session");
    keep_session(edge.clone(), id, p, shard_rx, room_rx);
    Ok(created(location, answer))
}

async fn whep_latest(
    State(edge): State<Arc<Edge>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResult {
    whep(edge, room, None, headers, body).await
}

async fn whep_participant(
    State(edge): State<Arc<Edge>>,
    Path((room, participant)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResult {
    whep(edge, room, Some(participant), headers, body).await
}

async fn whep(
    edge: Arc<Edge>,
    room: String,
    who: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResult {
    let c = |e: ApiError| Counted(edge.clone(), e);
    let room = parse_room(&room).map_err(c)?;
    let claims = authorize(&edge, &headers, &room).map_err(c)?;
    let offer = offer_text(&body).map_err(c)?;
    // WHEP is subscribe-only whatever the token allows.
    let (mut p, joined, room_rx, shard_rx) = join(&edge, &room, claims, Role::Viewer)
        .await
        .map_err(|e| c(e.into()))?;
    // The publisher: the named one, or the one whose latest track is newest.
    let publisher = match &who {
        Some(w) => find_named(&p, &joined, w).await,
        None => joined
            .tracks
            .iter()
            .filter(|t| t.participant != p.me.id)
            .max_by_key(|t| t.id)
            .map(|t| t.participant),
    };
    let Some(publisher) = publisher else {
        p.leave().await;
        return Err(c(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_publisher",
            match who {
                Some(w) => format!("no participant {w:?} in room {room}"),
                None => format!("nobody publishes in room {room}"),
            },
        )));
    };
    // Its microphone and camera (screen and screen audio when that is all it has).
    let mut tracks = Vec::new();
    for kind in [TrackKind::Audio, TrackKind::Video] {
        let mut candidates: Vec<_> = joined
            .tracks
            .iter()
            .filter(|t| t.participant == publisher && t.kind == kind)
            .collect();
        candidates
            .sort_by_key(|t| matches!(t.source, TrackSource::Screen | TrackSource::ScreenAudio));
        if let Some(t) = candidates.first() {
            tracks.push(t.id);
        }
    }
    if tracks.is_empty() {
        p.leave().await;
        return Err(c(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_publisher",
            "that participant publishes nothing",
        )));
    }
    let answer = match whep_subscribe(&mut p, offer, &tracks).await {
        Ok(a) => a,
        Err(e) => {
            p.leave().await;
            return Err(c(e.into()));
        }
    };
    let id = format!("{:016x}", rand::random::<u64>());
    let location = format!("/whep/{room}/session/{id}");
    tracing::info!(room = %room, participant = %p.me.id, session = %id, publisher = %publisher, "WHEP session");
    keep_session(edge.clone(), id, p, shard_rx, room_rx);
    Ok(created(location, answer))
}

async fn end_session(
    State(edge): State<Arc<Edge>>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> HttpResult {
    let c = |e: ApiError| Counted(edge.clone(), e);
    let room = parse_room(params.get("room").map(String::as_str).unwrap_or("")).map_err(c)?;
    // The session id is the capability; the token, when given, must still be valid for the room.
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        edge.verifier()
            .verify_for_room(token.trim(), &room)
            .map_err(|e| {
                c(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    e.code(),
                    e.to_string(),
                ))
            })?;
    }
    let id = params.get("session").cloned().unwrap_or_default();
    let stop = edge
        .http_sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    match stop {
        Some(tx) => {
            let _ = tx.send(());
            Ok(StatusCode::OK.into_response())
        }
        None => Err(c(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_session",
            format!("no session {id}"),
        ))),
    }
}
