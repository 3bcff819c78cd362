//! The REST API (axum): meetings, join tokens, join-info, published keys, operator listings.
//!
//! Every handler error is one [`ApiError`], rendered as
//! `{"error": {"code": "...", "message": "..."}}` with a fitting status; the codes are stable
//! and listed in docs/control-plane.md and the OpenAPI document (`GET /openapi.json`).
//! Invalid requests get a 4xx naming the problem and change nothing. When the store (etcd)
//! cannot be reached the API answers 503 `store_unavailable` and recovers by itself when the
//! store returns (the etcd client reconnects lazily; nothing here caches a broken state).
//!
//! Authentication: server-side callers send an API key (`Authorization: Bearer <key>` or
//! `X-Api-Key: <key>`). The key set (`/v1/keys`), health and the OpenAPI document are public;
//! join-info also accepts the participant's own join token for that room, so a browser can ask
//! where to connect without holding an API key. Meeting creation and token minting are rate
//! limited per API key ([`crate::ratelimit`]).

use crate::keys::KeyLayout;
use crate::meetings::{Meeting, MeetingError, MeetingOptions, MeetingPatch, Meetings};
use crate::nodes::{read_table, NodeInfo, NodeKind, NodeTable};
use crate::placement::{Placement, PlacementError, Placer};
use crate::ratelimit::{RateConfig, RateLimited, RateLimiter};
use crate::routing::EdgeRouter;
use crate::store::{Store, StoreError};
use crate::token::{Jwks, SigningKeys};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cascade_proto::{Identity, Role, RoomId};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The OpenAPI 3.1 description of this API, hand-written next to the code it describes.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Page size when the caller gives none, and the most we return in one page.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

/// Largest request body: every request body we accept is a few hundred bytes of JSON.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest join token lifetime we mint: a day (a token only admits; sessions outlive it).
const MAX_TOKEN_TTL_SECS: u64 = 24 * 3600;

/// API settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Accepted API keys (secrets; long random strings). Empty: every authenticated call is
    /// refused, except in dev mode where the binary fills in a printed dev key.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Join token lifetime when the request gives none (default 1 hour).
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// Meeting creations per API key (default 5/s, bursts of 20).
    #[serde(default = "default_create_rate")]
    pub meeting_create_rate: RateConfig,
    /// Token mints per API key (default 50/s, bursts of 200: a class joining at once).
    #[serde(default = "default_mint_rate")]
    pub token_mint_rate: RateConfig,
    /// Edges returned by join-info: the chosen one plus alternatives (default 3).
    #[serde(default = "default_edges")]
    pub join_edges: usize,
}

fn default_token_ttl() -> u64 {
    3600
}
fn default_create_rate() -> RateConfig {
    RateConfig {
        per_second: 5.0,
        burst: 20,
    }
}
fn default_mint_rate() -> RateConfig {
    RateConfig {
        per_second: 50.0,
        burst: 200,
    }
}
fn default_edges() -> usize {
    3
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            token_ttl_secs: default_token_ttl(),
            meeting_create_rate: default_create_rate(),
            token_mint_rate: default_mint_rate(),
            join_edges: default_edges(),
        }
    }
}

/// Everything the handlers share.
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub keys: KeyLayout,
    pub meetings: Meetings,
    pub placer: Placer,
    pub signing: Arc<RwLock<SigningKeys>>,
    pub router: Arc<EdgeRouter>,
    /// The registry mirror kept by [`crate::nodes::follow_nodes`].
    pub nodes: Arc<RwLock<NodeTable>>,
    pub config: ApiConfig,
    create_limit: Mutex<RateLimiter>,
    mint_limit: Mutex<RateLimiter>,
    /// Seconds since the Unix epoch (replaceable in tests).
    pub clock: fn() -> u64,
}

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
        keys: KeyLayout,
        signing: Arc<RwLock<SigningKeys>>,
        router: Arc<EdgeRouter>,
        nodes: Arc<RwLock<NodeTable>>,
        config: ApiConfig,
    ) -> Self {
        Self {
            meetings: Meetings::new(store.clone(), keys.clone()),
            placer: Placer::new(store.clone(), keys.clone()),
            store,
            keys,
            signing,
            router,
            nodes,
            create_limit: Mutex::new(RateLimiter::new(config.meeting_create_rate)),
            mint_limit: Mutex::new(RateLimiter::new(config.token_mint_rate)),
            config,
            clock: crate::token::unix_now,
        }
    }
}

/// The API's one error type: a status, a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown API key (send Authorization: Bearer <key> or X-Api-Key)",
        )
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        });
        let mut resp = (self.status, body).into_response();
        if let Some(after) = self.retry_after {
            // Retry-After is whole seconds (RFC 9110 §10.2.3); round up so a client never
            // retries early.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the control plane's store (etcd) is unreachable; retry shortly ({e})"),
            );
            err.retry_after = Some(Duration::from_secs(1));
            err
        } else {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    }
}

impl From<MeetingError> for ApiError {
    fn from(e: MeetingError) -> Self {
        let msg = e.to_string();
        match e {
            MeetingError::Invalid { .. } => ApiError::bad_request("invalid_field", msg),
            MeetingError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "meeting_exists", msg),
            MeetingError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "meeting_not_found", msg)
            }
            MeetingError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "concurrent_update", msg)
            }
            MeetingError::Store(s) => s.into(),
        }
    }
}

impl From<PlacementError> for ApiError {
    fn from(e: PlacementError) -> Self {
        let msg = e.to_string();
        match e {
            PlacementError::NoOrigin => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_origin", msg)
            }
            PlacementError::Contended(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "placement_contended", msg)
            }
            PlacementError::Store(s) => s.into(),
        }
    }
}

/// Body problems: 415 for a wrong content type, 413 for an oversized body, else 400 (axum says
/// 422 for well-formed JSON of the wrong shape; one status for "fix your body" is simpler).
fn body_error(r: JsonRejection) -> ApiError {
    match r.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            r.body_text(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            r.body_text(),
        ),
        _ => ApiError::bad_request("invalid_body", r.body_text()),
    }
}

fn query_error(r: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", r.body_text())
}

fn parse_room(s: &str) -> Result<RoomId, ApiError> {
    RoomId::new(s).map_err(|e| ApiError::bad_request("invalid_room", format!("room {s:?}: {e}")))
}

/// Constant-time comparison, so response timing does not reveal how much of a key matched.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn presented_credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The API key the caller presented, if it is one of ours.
fn api_key<'s>(state: &'s ApiState, headers: &HeaderMap) -> Option<&'s str> {
    let given = presented_credential(headers)?;
    state
        .config
        .api_keys
        .iter()
        .find(|k| same_secret(k, given))
        .map(String::as_str)
}

fn require_api_key<'s>(state: &'s ApiState, headers: &HeaderMap) -> Result<&'s str, ApiError> {
    api_key(state, headers).ok_or_else(ApiError::unauthorized)
}

fn limited(e: RateLimited, what: &str) -> ApiError {
    let mut err = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "too many {what}; retry in {} ms",
            e.retry_after.as_millis().max(1)
        ),
    );
    err.retry_after = Some(e.retry_after);
    err
}

fn check_rate(limiter: &Mutex<RateLimiter>, caller: &str, what: &str) -> Result<(), ApiError> {
    limiter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .handle_request(caller, Instant::now())
        .map_err(|e| limited(e, what))
}

/// The TCP peer address, when the server was started with connect info.
pub struct PeerAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// Builds the API router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/v1/keys", get(jwks))
        .route("/v1/meetings", get(list_meetings).post(create_meeting))
        .route(
            "/v1/meetings/{room}",
            get(get_meeting).patch(patch_meeting).delete(delete_meeting),
        )
        .route("/v1/meetings/{room}/tokens", post(mint_token))
        .route("/v1/meetings/{room}/join-info", get(join_info))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/rooms", get(list_rooms))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the store answers.
async fn readyz(State(s): State<Arc<ApiState>>) -> Result<Json<serde_json::Value>, ApiError> {
    s.store.range(s.keys.root(), None, Some(1)).await?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

async fn jwks(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    let keys: Jwks = s.signing.read().unwrap_or_else(|p| p.into_inner()).jwks();
    (
        // Edges refetch about once a minute; rotation keeps old keys published far longer.
        [(header::CACHE_CONTROL, "max-age=60")],
        Json(keys),
    )
}

/// Paging parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    pub limit: Option<usize>,
    pub after: Option<String>,
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(l) if (1..=MAX_PAGE).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_PAGE}"),
        )),
    }
}

/// One page of a listing.
#[derive(Debug, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Body of `POST /v1/meetings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMeeting {
    /// Room name; generated when absent.
    pub room: Option<String>,
    pub title: Option<String>,
    #[serde(default)]
    pub waiting_room: bool,
    #[serde(default)]
    pub locked: bool,
    pub max_participants: Option<u32>,
    #[serde(default)]
    pub recording: bool,
    pub scheduled_start: Option<u64>,
    pub region: Option<crate::nodes::Region>,
}

/// A generated room name: 12 characters from a 32-letter alphabet without look-alikes
/// (60 bits: collisions are negligible, and a collision is a 409, not an overwrite).
fn generated_room() -> RoomId {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut rng = rand::thread_rng();
    let s: String = (0..12)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    // The alphabet is inside RoomId's allowed set.
    RoomId::new(s).expect("generated room name is valid")
}

async fn create_meeting(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<CreateMeeting>, JsonRejection>,
) -> Result<(StatusCode, Json<Meeting>), ApiError> {
    let caller = require_api_key(&s, &headers)?;
    let Json(req) = body.map_err(body_error)?;
    let room = match &req.room {
        Some(r) => parse_room(r)?,
        None => generated_room(),
    };
    let options = MeetingOptions {
        title: req.title,
        waiting_room: req.waiting_room,
        locked: req.locked,
        max_participants: req.max_participants,
        recording: req.recording,
        scheduled_start: req.scheduled_start,
        region: req.region,
    };
    // Validate before spending a rate-limit token on a request that cannot succeed.
    options.validate((s.clock)())?;
    check_rate(&s.create_limit, caller, "meeting creations")?;
    let meeting = s.meetings.create(room, options, (s.clock)()).await?;
    Ok((StatusCode::CREATED, Json(meeting)))
}

async fn list_meetings(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Page<Meeting>>, ApiError> {
    require_api_key(&s, &headers)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = page_limit(q.limit)?;
    let after = q.after.as_deref().map(parse_room).transpose()?;
    let (items, more) = s.meetings.list(after.as_ref(), limit).await?;
    let next_after = more
        .then(|| items.last().map(|m| m.room.to_string()))
        .flatten();
    Ok(Json(Page { items, next_after }))
}

async fn get_meeting(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Result<Json<Meeting>, ApiError> {
    require_api_key(&s, &headers)?;
    let room = parse_room(&room)?;
    Ok(Json(s.meetings.get(&room).await?))
}

async fn patch_meeting(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Result<Json<MeetingPatch>, JsonRejection>,
) -> Result<Json<Meeting>, ApiError> {
    require_api_key(&s, &headers)?;
    let room = parse_room(&room)?;
    let Json(patch) = body.map_err(body_error)?;
    Ok(Json(s.meetings.update(&room, &patch, (s.clock)()).await?))
}

async fn delete_meeting(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_api_key(&s, &headers)?;
    let room = parse_room(&room)?;
    s.meetings.delete(&room).await?;
    // The room's origin may stop hosting it; edges watching the placement learn it is gone.
    s.placer.release(&room).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/meetings/{room}/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    pub identity: String,
    pub role: Role,
    pub name: Option<String>,
    pub ttl_secs: Option<u64>,
}

/// A minted join token.
#[derive(Debug, Serialize, Deserialize)]
pub struct MintedToken {
    pub token: String,
    pub kid: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Longest display name carried in a token.
const MAX_DISPLAY_NAME_CHARS: usize = 100;

async fn mint_token(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Result<Json<MintRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<MintedToken>), ApiError> {
    let caller = require_api_key(&s, &headers)?;
    let room = parse_room(&room)?;
    let Json(req) = body.map_err(body_error)?;
    let identity = Identity::new(&req.identity).map_err(|e| {
        ApiError::bad_request("invalid_field", format!("invalid field identity: {e}"))
    })?;
    if let Some(n) = &req.name {
        if n.chars().count() > MAX_DISPLAY_NAME_CHARS || n.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!(
                    "invalid field name: at most {MAX_DISPLAY_NAME_CHARS} printable characters"
                ),
            ));
        }
    }
    let ttl = req.ttl_secs.unwrap_or(s.config.token_ttl_secs);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("invalid field ttl_secs: must be 1 to {MAX_TOKEN_TTL_SECS}"),
        ));
    }
    check_rate(&s.mint_limit, caller, "token mints")?;
    // Tokens only for meetings that exist: a typo in the room name fails here, not at join.
    s.meetings.get(&room).await?;
    let now = (s.clock)();
    let signing = s.signing.read().unwrap_or_else(|p| p.into_inner());
    let token = signing
        .signer()
        .mint(room, identity, req.role, req.name, now, ttl);
    Ok((
        StatusCode::CREATED,
        Json(MintedToken {
            token,
            kid: signing.signer().kid().to_owned(),
            expires_at: now + ttl,
        }),
    ))
}

/// Query of join-info.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinInfoParams {
    /// The participant's address, when a server asks on its behalf; else the caller's address.
    pub client_ip: Option<IpAddr>,
}

/// An edge as join-info shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeRef {
    pub id: String,
    pub region: String,
    pub url: String,
}

/// Where to connect.
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinInfo {
    pub room: RoomId,
    /// The region the client was located in, if any.
    pub client_region: Option<String>,
    /// The edge to connect to.
    pub edge: EdgeRef,
    /// Further edges to try, best first.
    pub alternatives: Vec<EdgeRef>,
    /// The room's origin (the edge connects to it; clients do not).
    pub origin: Placement,
}

fn edge_ref(n: &NodeInfo) -> EdgeRef {
    EdgeRef {
        id: n.id.to_string(),
        region: n.region.to_string(),
        url: n.url.clone(),
    }
}

async fn join_info(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    PeerAddr(peer): PeerAddr,
    Path(room): Path<String>,
    query: Result<Query<JoinInfoParams>, QueryRejection>,
) -> Result<Json<JoinInfo>, ApiError> {
    let room = parse_room(&room)?;
    if api_key(&s, &headers).is_none() {
        // Not a server: accept the participant's own join token for this room.
        let token = presented_credential(&headers).ok_or_else(ApiError::unauthorized)?;
        let verifier = s
            .signing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verifier();
        verifier
            .verify_for_room(token, &room)
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?;
    }
    let Query(q) = query.map_err(query_error)?;
    let client = q.client_ip.or(peer.map(|p| p.ip()));
    let meeting = s.meetings.get(&room).await?;
    let located = client.and_then(|ip| s.router.locate(ip));
    let region = located.as_ref().map(|l| l.region.clone());
    let edges: Vec<EdgeRef> = {
        let table = read_table(&s.nodes);
        s.router
            .route(
                region.as_ref(),
                table.of_kind(NodeKind::Edge),
                s.config.join_edges.max(1),
            )
            .into_iter()
            .map(edge_ref)
            .collect()
    };
    let mut edges = edges.into_iter();
    let edge = edges.next().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_edge",
            "no edge accepts participants right now",
        )
    })?;
    // Place the room in the host's region when the meeting names one, else near the first
    // joiner's edge (placement is sticky: later joiners get the same origin).
    let preferred = meeting
        .options
        .region
        .or_else(|| crate::nodes::Region::new(edge.region.clone()).ok());
    let origin = s.placer.place(&room, preferred.as_ref()).await?;
    Ok(Json(JoinInfo {
        room,
        client_region: region.map(|r| r.to_string()),
        edge,
        alternatives: edges.collect(),
        origin,
    }))
}

/// Query of the nodes listing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesParams {
    pub kind: Option<NodeKind>,
    pub limit: Option<usize>,
    pub after: Option<String>,
}

async fn list_nodes(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: Result<Query<NodesParams>, QueryRejection>,
) -> Result<Json<Page<NodeInfo>>, ApiError> {
    require_api_key(&s, &headers)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = page_limit(q.limit)?;
    let prefix = match q.kind {
        Some(k) => s.keys.nodes_of_kind(k),
        None => s.keys.nodes_prefix(),
    };
    // The cursor is the key suffix (`edge/edge-1`), so it works with and without a kind.
    let after = q.after.map(|a| format!("{}{a}", s.keys.nodes_prefix()));
    let page = s
        .store
        .range(&prefix, after.as_deref(), Some(limit))
        .await?;
    let items: Vec<NodeInfo> = page
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    let next_after = if page.more {
        page.kvs
            .last()
            .and_then(|kv| kv.key.strip_prefix(&s.keys.nodes_prefix()))
            .map(str::to_owned)
    } else {
        None
    };
    Ok(Json(Page { items, next_after }))
}

async fn list_rooms(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Page<Placement>>, ApiError> {
    require_api_key(&s, &headers)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = page_limit(q.limit)?;
    let after = q.after.as_deref().map(parse_room).transpose()?;
    let (items, more) = s.placer.list(after.as_ref(), limit).await?;
    let next_after = more
        .then(|| items.last().map(|p| p.room.to_string()))
        .flatten();
    Ok(Json(Page { items, next_after }))
}
