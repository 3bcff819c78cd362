//! The REST API through `Router::oneshot` (no server), on the dev store; and once on a real
//! etcd cluster, including etcd going away and coming back.

mod common;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use cascade_proto::RoomId;
use common::{eventually, EtcdCluster};
use control_plane::api::{self, ApiConfig, ApiState};
use control_plane::keys::KeyLayout;
use control_plane::nodes::{
    follow_nodes, NodeId, NodeInfo, NodeKind, NodeLoad, NodeRegistration, NodeTable, Region,
    RegistrationConfig,
};
use control_plane::ratelimit::RateConfig;
use control_plane::routing::{EdgeRouter, RoutingConfig};
use control_plane::store::{EtcdConfig, EtcdStore, MemStore, Store};
use control_plane::token::{Jwks, SigningKeys, TokenSigner, TokenVerifier};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tower::ServiceExt;

const KEY: &str = "test-api-key-0123456789";

struct Harness {
    app: Router,
    store: Arc<dyn Store>,
    keys: KeyLayout,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

fn routing() -> RoutingConfig {
    serde_json::from_value(json!({
        "regions": {"eu": ["192.0.2.0/24"], "us": ["198.51.100.0/24", "2001:db8::/32"]},
        "latency_ms": {"eu": {"us": 90}}
    }))
    .unwrap()
}

fn harness(store: Arc<dyn Store>, config: ApiConfig) -> Harness {
    let keys = KeyLayout::new("/kcs-api-test");
    let nodes = Arc::new(RwLock::new(NodeTable::new()));
    let follower = tokio::spawn(follow_nodes(
        store.clone(),
        keys.clone(),
        nodes.clone(),
        || {},
        std::future::pending(),
    ));
    let signing = Arc::new(RwLock::new(SigningKeys::new(TokenSigner::generate(
        "2026-11",
    ))));
    let state = ApiState::new(
        store.clone(),
        keys.clone(),
        signing,
        Arc::new(EdgeRouter::new(&routing()).unwrap()),
        nodes,
        config,
    );
    Harness {
        app: api::router(Arc::new(state)),
        store,
        keys,
        follower,
    }
}

fn config() -> ApiConfig {
    ApiConfig {
        api_keys: vec![KEY.into()],
        ..ApiConfig::default()
    }
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header("authorization", format!("Bearer {a}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, headers, value)
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

fn node(id: &str, kind: NodeKind, region: &str, addr: &str, load: u32) -> NodeInfo {
    NodeInfo {
        id: NodeId::new(id).unwrap(),
        kind,
        region: Region::new(region).unwrap(),
        addresses: vec![addr.parse().unwrap()],
        url: format!("https://{id}.kcs.example"),
        capacity: 100,
        load: NodeLoad {
            participants: load,
            ..NodeLoad::default()
        },
        draining: false,
        healthy: true,
    }
}

#[tokio::test]
async fn meetings_crud_validation_and_pagination() {
    let h = harness(MemStore::start(), config());
    let app = &h.app;
    let (s, _, m) = call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "standup", "title": "Daily", "waiting_room": true, "max_participants": 50})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    assert_eq!(m["room"], "standup");
    assert_eq!(m["waiting_room"], true);

    // Duplicate: conflict, original untouched.
    let (s, _, e) = call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "standup", "title": "Hijack"})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::CONFLICT, "meeting_exists"));

    // Bad input: 400 with a reason, nothing written.
    let bad: Vec<(Value, &str)> = vec![
        (json!({"room": "x", "max_participants": 0}), "invalid_field"),
        (
            json!({"room": "y", "scheduled_start": 1u64 << 50}),
            "invalid_field",
        ),
        (json!({"room": "has space"}), "invalid_room"),
        (json!({"room": "z", "colour": "red"}), "invalid_body"),
        (json!({"room": "w", "locked": "yes"}), "invalid_body"),
    ];
    for (body, want) in bad {
        let (s, _, e) = call(
            app,
            Method::POST,
            "/v1/meetings",
            Some(KEY),
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            (s, code(&e)),
            (StatusCode::BAD_REQUEST, want),
            "{body}: {e}"
        );
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    }
    let (_, _, list) = call(app, Method::GET, "/v1/meetings", Some(KEY), None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    // Not JSON at all.
    let req = Request::post("/v1/meetings")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::from("room=x"))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Oversized body.
    let huge = json!({"room": "big", "title": "x".repeat(100_000)});
    let (s, _, e) = call(app, Method::POST, "/v1/meetings", Some(KEY), Some(huge)).await;
    assert_eq!(
        (s, code(&e)),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );

    // Generated room name.
    let (s, _, g) = call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let generated = g["room"].as_str().unwrap().to_owned();
    assert_eq!(generated.len(), 12);

    // Read, patch (null clears), delete.
    let (s, _, m) = call(app, Method::GET, "/v1/meetings/standup", Some(KEY), None).await;
    assert_eq!((s, m["title"].as_str()), (StatusCode::OK, Some("Daily")));
    let (s, _, m) = call(
        app,
        Method::PATCH,
        "/v1/meetings/standup",
        Some(KEY),
        Some(json!({"locked": true, "title": null})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["locked"], true);
    assert!(m.get("title").is_none());
    assert_eq!(m["max_participants"], 50);
    let (s, _, e) = call(
        app,
        Method::PATCH,
        "/v1/meetings/standup",
        Some(KEY),
        Some(json!({"max_participants": 1_000_000})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::BAD_REQUEST, "invalid_field"));
    let (_, _, m) = call(app, Method::GET, "/v1/meetings/standup", Some(KEY), None).await;
    assert_eq!(m["max_participants"], 50, "failed patch changed nothing");
    let (s, _, _) = call(app, Method::DELETE, "/v1/meetings/standup", Some(KEY), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, e) = call(app, Method::GET, "/v1/meetings/standup", Some(KEY), None).await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, "meeting_not_found"));
    let (s, _, e) = call(app, Method::DELETE, "/v1/meetings/standup", Some(KEY), None).await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, "meeting_not_found"));

    // Pagination walks every meeting exactly once.
    for i in 0..6 {
        let (s, _, _) = call(
            app,
            Method::POST,
            "/v1/meetings",
            Some(KEY),
            Some(json!({"room": format!("m{i}")})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut uri = "/v1/meetings?limit=3".to_owned();
    loop {
        let (s, _, page) = call(app, Method::GET, &uri, Some(KEY), None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for m in page["items"].as_array().unwrap() {
            seen.push(m["room"].as_str().unwrap().to_owned());
        }
        match page["next_after"].as_str() {
            Some(after) => uri = format!("/v1/meetings?limit=3&after={after}"),
            None => break,
        }
    }
    let mut want: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    want.push(generated);
    want.sort();
    assert_eq!(seen, want);
    let (s, _, e) = call(app, Method::GET, "/v1/meetings?limit=0", Some(KEY), None).await;
    assert_eq!((s, code(&e)), (StatusCode::BAD_REQUEST, "invalid_query"));
    let (s, _, e) = call(app, Method::GET, "/v1/meetings?page=2", Some(KEY), None).await;
    assert_eq!((s, code(&e)), (StatusCode::BAD_REQUEST, "invalid_query"));
}

#[tokio::test]
async fn auth_is_required_and_keys_are_public() {
    let h = harness(MemStore::start(), config());
    let app = &h.app;
    for auth in [None, Some("wrong-key"), Some("test-api-key-012345678")] {
        let (s, _, e) = call(app, Method::GET, "/v1/meetings", auth, None).await;
        assert_eq!(
            (s, code(&e)),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{auth:?}"
        );
    }
    // X-Api-Key works as well as Bearer.
    let req = Request::get("/v1/meetings")
        .header("x-api-key", KEY)
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );

    let (s, headers, keys) = call(app, Method::GET, "/v1/keys", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers["cache-control"]
        .to_str()
        .unwrap()
        .contains("max-age"));
    assert_eq!(keys["keys"][0]["kid"], "2026-11");
    assert_eq!(keys["keys"][0]["crv"], "Ed25519");
    let (s, _, _) = call(app, Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = call(app, Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, e) = call(app, Method::GET, "/v2/nothing", None, None).await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn tokens_verify_with_published_keys_and_minting_is_rate_limited() {
    let cfg = ApiConfig {
        token_mint_rate: RateConfig {
            per_second: 0.5,
            burst: 3,
        },
        ..config()
    };
    let h = harness(MemStore::start(), cfg);
    let app = &h.app;
    call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "r1"})),
    )
    .await;

    let (s, _, t) = call(
        app,
        Method::POST,
        "/v1/meetings/r1/tokens",
        Some(KEY),
        Some(json!({"identity": "alice", "role": "host", "name": "Alice", "ttl_secs": 600})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["kid"], "2026-11");

    // An edge verifies with nothing but the published key set.
    let (_, _, keys) = call(app, Method::GET, "/v1/keys", None, None).await;
    let jwks: Jwks = serde_json::from_value(keys).unwrap();
    let verifier = TokenVerifier::from_jwks(&jwks).unwrap();
    let claims = verifier
        .verify_for_room(t["token"].as_str().unwrap(), &RoomId::new("r1").unwrap())
        .unwrap();
    assert_eq!(claims.identity.as_str(), "alice");
    assert_eq!(claims.exp, t["expires_at"].as_u64().unwrap());
    assert_eq!(claims.exp - claims.iat, 600);

    // Invalid requests: 4xx, and they do not use up the rate limit.
    let bad: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "r1",
            json!({"identity": "a b", "role": "host"}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "r1",
            json!({"identity": "a", "role": "emperor"}),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "r1",
            json!({"identity": "a", "role": "host", "ttl_secs": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
        (
            "r1",
            json!({"identity": "a", "role": "host", "ttl_secs": 999999}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
        ),
    ];
    for (room, body, status, want) in bad {
        let (s, _, e) = call(
            app,
            Method::POST,
            &format!("/v1/meetings/{room}/tokens"),
            Some(KEY),
            Some(body.clone()),
        )
        .await;
        assert_eq!((s, code(&e)), (status, want), "{body}");
    }
    // Unknown meeting: 404 (uses a token of the bucket: the check needs the store).
    let (s, _, e) = call(
        app,
        Method::POST,
        "/v1/meetings/nope/tokens",
        Some(KEY),
        Some(json!({"identity": "a", "role": "host"})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, "meeting_not_found"));

    // Burst of 3: one more succeeds, then 429 with Retry-After.
    let mint = || {
        call(
            app,
            Method::POST,
            "/v1/meetings/r1/tokens",
            Some(KEY),
            Some(json!({"identity": "bob", "role": "attendee"})),
        )
    };
    assert_eq!(mint().await.0, StatusCode::CREATED);
    let (s, headers, e) = mint().await;
    assert_eq!(
        (s, code(&e)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
}

#[tokio::test]
async fn meeting_creation_is_rate_limited() {
    let cfg = ApiConfig {
        meeting_create_rate: RateConfig {
            per_second: 0.1,
            burst: 2,
        },
        ..config()
    };
    let h = harness(MemStore::start(), cfg);
    for (i, want) in [
        StatusCode::CREATED,
        StatusCode::CREATED,
        StatusCode::TOO_MANY_REQUESTS,
    ]
    .into_iter()
    .enumerate()
    {
        let (s, _, _) = call(
            &h.app,
            Method::POST,
            "/v1/meetings",
            Some(KEY),
            Some(json!({"room": format!("r{i}")})),
        )
        .await;
        assert_eq!(s, want, "create {i}");
    }
}

#[tokio::test]
async fn join_info_routes_by_client_address_and_places_the_room() {
    let h = harness(MemStore::start(), config());
    let app = &h.app;
    let reg = RegistrationConfig::with_ttl(Duration::from_secs(10));
    let mut regs = Vec::new();
    for n in [
        node("eu-1", NodeKind::Edge, "eu", "192.0.2.10", 30),
        node("eu-2", NodeKind::Edge, "eu", "192.0.2.11", 10),
        node("us-1", NodeKind::Edge, "us", "198.51.100.10", 0),
        node("origin-eu", NodeKind::Origin, "eu", "192.0.2.100", 0),
        node("origin-us", NodeKind::Origin, "us", "198.51.100.100", 0),
    ] {
        regs.push(
            NodeRegistration::register(h.store.clone(), &h.keys, n, reg)
                .await
                .unwrap(),
        );
    }
    call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "r1"})),
    )
    .await;

    // The registry mirror catches up through the watch.
    let app2 = app.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let app = app2.clone();
            async move {
                let (s, _, _) = call(
                    &app,
                    Method::GET,
                    "/v1/meetings/r1/join-info?client_ip=192.0.2.77",
                    Some(KEY),
                    None,
                )
                .await;
                s == StatusCode::OK
            }
        })
        .await
    );
    let (s, _, j) = call(
        app,
        Method::GET,
        "/v1/meetings/r1/join-info?client_ip=192.0.2.77",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert_eq!(j["client_region"], "eu");
    assert_eq!(j["edge"]["id"], "eu-2");
    assert_eq!(j["edge"]["url"], "https://eu-2.kcs.example");
    assert_eq!(j["alternatives"][0]["id"], "eu-1");
    assert_eq!(j["origin"]["origin"], "origin-eu");

    // A participant holding a join token for r1 may ask without an API key; from us.
    let (_, _, t) = call(
        app,
        Method::POST,
        "/v1/meetings/r1/tokens",
        Some(KEY),
        Some(json!({"identity": "carol", "role": "attendee"})),
    )
    .await;
    let token = t["token"].as_str().unwrap();
    let (s, _, j) = call(
        app,
        Method::GET,
        "/v1/meetings/r1/join-info?client_ip=2001:db8::5",
        Some(token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{j}");
    assert_eq!(j["edge"]["id"], "us-1");
    // Same room, same origin, whoever asks.
    assert_eq!(j["origin"]["origin"], "origin-eu");

    // A meeting that names the host's region is placed there, whoever joins first.
    let (s, _, m) = call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "r3", "region": "us"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    let (_, _, j) = call(
        app,
        Method::GET,
        "/v1/meetings/r3/join-info?client_ip=192.0.2.77",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(j["edge"]["id"], "eu-2");
    assert_eq!(j["origin"]["origin"], "origin-us");
    let (s, _, e) = call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "r4", "region": "EU West"})),
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::BAD_REQUEST, "invalid_body"));

    // The token does not open another room.
    call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "r2"})),
    )
    .await;
    let (s, _, e) = call(
        app,
        Method::GET,
        "/v1/meetings/r2/join-info",
        Some(token),
        None,
    )
    .await;
    assert_eq!(
        (s, code(&e)),
        (StatusCode::UNAUTHORIZED, "token_wrong_room")
    );
    let (s, _, e) = call(
        app,
        Method::GET,
        "/v1/meetings/r1/join-info?client_ip=nope",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!((s, code(&e)), (StatusCode::BAD_REQUEST, "invalid_query"));

    // Listings for operators.
    let (s, _, nodes) = call(app, Method::GET, "/v1/nodes?kind=edge", Some(KEY), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(nodes["items"].as_array().unwrap().len(), 3);
    let (_, _, page) = call(app, Method::GET, "/v1/nodes?limit=2", Some(KEY), None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let after = page["next_after"].as_str().unwrap();
    let (_, _, rest) = call(
        app,
        Method::GET,
        &format!("/v1/nodes?after={after}"),
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 3);
    let (_, _, rooms) = call(app, Method::GET, "/v1/rooms", Some(KEY), None).await;
    assert_eq!(rooms["items"][0]["room"], "r1");
    assert_eq!(rooms["items"][1]["room"], "r3");

    // Every edge drains: 503 no_edge.
    for r in &regs[..3] {
        r.update(|n| n.draining = true);
        r.refresh().await.unwrap();
    }
    let app2 = app.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let app = app2.clone();
            async move {
                let (s, _, e) = call(
                    &app,
                    Method::GET,
                    "/v1/meetings/r1/join-info",
                    Some(KEY),
                    None,
                )
                .await;
                s == StatusCode::SERVICE_UNAVAILABLE && code(&e) == "no_edge"
            }
        })
        .await
    );
}

#[tokio::test]
async fn openapi_document_covers_every_route() {
    let h = harness(MemStore::start(), config());
    let (s, _, doc) = call(&h.app, Method::GET, "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/v1/keys",
        "/v1/meetings",
        "/v1/meetings/{room}",
        "/v1/meetings/{room}/tokens",
        "/v1/meetings/{room}/join-info",
        "/v1/nodes",
        "/v1/rooms",
    ] {
        assert!(paths.contains_key(p), "{p} missing from openapi.json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_gives_503_and_the_api_recovers_when_it_returns() {
    let mut cluster = EtcdCluster::start(3);
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&EtcdConfig::new(cluster.endpoints()))
            .await
            .unwrap(),
    );
    let h = harness(store, config());
    let app = &h.app;
    let (s, _, m) = call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "before"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");

    for i in 0..3 {
        cluster.kill(i);
    }
    let started = std::time::Instant::now();
    let (s, headers, e) = call(
        app,
        Method::POST,
        "/v1/meetings",
        Some(KEY),
        Some(json!({"room": "during"})),
    )
    .await;
    assert_eq!(
        (s, code(&e)),
        (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        "{e}"
    );
    assert!(e["error"]["message"].as_str().unwrap().contains("etcd"));
    assert!(headers.contains_key("retry-after"));
    // Bounded by the store timeout, not hanging.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let (s, _, _) = call(app, Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);

    for i in 0..3 {
        cluster.restart(i);
    }
    let app2 = app.clone();
    assert!(
        eventually(Duration::from_secs(30), || {
            let app = app2.clone();
            async move {
                call(
                    &app,
                    Method::POST,
                    "/v1/meetings",
                    Some(KEY),
                    Some(json!({"room": "after"})),
                )
                .await
                .0 == StatusCode::CREATED
            }
        })
        .await,
        "API did not recover when etcd came back"
    );
    let (s, _, m) = call(app, Method::GET, "/v1/meetings/before", Some(KEY), None).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    // The failed create wrote nothing.
    let (s, _, _) = call(app, Method::GET, "/v1/meetings/during", Some(KEY), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
