//! Signaling clients: the edge's WebSocket protocol (docs/protocol.md), WHIP/WHEP over HTTP,
//! and dev-mode tokens.
//!
//! HTTP here is a handful of plain HTTP/1.1 requests on loopback (`Connection: close`), written
//! by hand: a POST with a body and a GET are all we send, which does not earn an HTTP client
//! crate. Every network step has a timeout, so an unreachable or stalled server ends a
//! participant with a clear error rather than a hang.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long any one signaling step may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why signaling failed; the text is what the operator reads.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SignalingError {
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("the server refused {what}: {code}: {message}")]
    Refused {
        what: String,
        code: String,
        message: String,
    },
    #[error("HTTP {status} from {url}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("the signaling connection closed ({0})")]
    Closed(String),
    #[error("malformed reply from the server: {0}")]
    Malformed(String),
}

impl SignalingError {
    /// Errors that will not go away by trying again (bad token, forbidden, unreachable).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            SignalingError::Unreachable { .. }
                | SignalingError::Refused { .. }
                | SignalingError::Http {
                    status: 400..=499,
                    ..
                }
        )
    }
}

/// Where the edge is: `http://host:port`.
#[derive(Debug, Clone)]
pub struct Target {
    pub base: String,
    pub addr: SocketAddr,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("target {url:?}: only http://host:port is supported"))?;
        let hostport = rest.trim_end_matches('/');
        let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .map_err(|e| format!("target {url:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("target {url:?}: no address"))?;
        Ok(Self {
            base: format!("http://{hostport}"),
            addr,
        })
    }
}

/// A minimal HTTP/1.1 exchange. Returns (status, headers lowercased, body).
pub async fn http(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, HashMap<String, String>, String), SignalingError> {
    let url = format!("{}{path}", target.base);
    let work = async {
        let mut s =
            TcpStream::connect(target.addr)
                .await
                .map_err(|e| SignalingError::Unreachable {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            target.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        let closed = |e: std::io::Error| SignalingError::Closed(e.to_string());
        s.write_all(req.as_bytes()).await.map_err(closed)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(closed)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| SignalingError::Malformed(format!("{url}: no HTTP header end")))?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| SignalingError::Malformed(format!("{url}: no status line")))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Ok((status, headers, body))
    };
    tokio::time::timeout(STEP_TIMEOUT, work)
        .await
        .map_err(|_| SignalingError::Timeout {
            what: format!("{method} {url}"),
            timeout: STEP_TIMEOUT,
        })?
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Where tokens come from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// `kcs dev`'s `/dev/token` endpoint: one token per identity.
    Dev,
    /// The same token for everyone (for a token you minted; also how refusal is tested).
    Fixed(String),
    /// A control plane's REST API (`POST /v1/meetings/{room}/tokens` with an API key): one
    /// token per identity, for clusters of `kcs edge` nodes. The meeting is created first if
    /// it does not exist.
    ControlPlane { api: Target, api_key: String },
}

impl TokenSource {
    pub async fn token(
        &self,
        target: &Target,
        room: &str,
        identity: &str,
        role: &str,
    ) -> Result<String, SignalingError> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::ControlPlane { api, api_key } => {
                control_plane_token(api, api_key, room, identity, role).await
            }
            TokenSource::Dev => {
                let path = format!("/dev/token?room={room}&identity={identity}&role={role}");
                let (status, _, body) = http(target, "GET", &path, &[], "").await?;
                if status != 200 {
                    return Err(SignalingError::Http {
                        url: format!("{}{path}", target.base),
                        status,
                        body: body.chars().take(200).collect(),
                    });
                }
                let v: Value = serde_json::from_str(&body)
                    .map_err(|e| SignalingError::Malformed(format!("dev token: {e}")))?;
                v["token"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| SignalingError::Malformed("dev token: no token".into()))
            }
        }
    }
}

/// Mints a token with the control plane's REST API, creating the meeting on a 404.
async fn control_plane_token(
    api: &Target,
    api_key: &str,
    room: &str,
    identity: &str,
    role: &str,
) -> Result<String, SignalingError> {
    let auth = format!("Bearer {api_key}");
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let path = format!("/v1/meetings/{room}/tokens");
    let body = serde_json::json!({"identity": identity, "role": role}).to_string();
    let mut created = false;
    loop {
        let (status, _, reply) = http(api, "POST", &path, &headers, &body).await?;
        match status {
            200 | 201 => {
                let v: Value = serde_json::from_str(&reply)
                    .map_err(|e| SignalingError::Malformed(format!("minted token: {e}")))?;
                return v["token"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| SignalingError::Malformed("minted token: no token".into()));
            }
            404 if !created => {
                // No such meeting yet: create it (409 means another participant just did).
                let create = serde_json::json!({"room": room}).to_string();
                let (status, _, reply) =
                    http(api, "POST", "/v1/meetings", &headers, &create).await?;
                if status != 201 && status != 409 {
                    return Err(SignalingError::Http {
                        url: format!("{}/v1/meetings", api.base),
                        status,
                        body: reply.chars().take(200).collect(),
                    });
                }
                created = true;
            }
            _ => {
                return Err(SignalingError::Http {
                    url: format!("{}{path}", api.base),
                    status,
                    body: reply.chars().take(200).collect(),
                })
            }
        }
    }
}

/// WHIP (`/whip/{room}`) or WHEP (`/whep/{room}[/{participant}]`): POST the offer, get the answer.
pub async fn whip_whep(
    target: &Target,
    path: &str,
    token: &str,
    offer: &str,
) -> Result<String, SignalingError> {
    let auth = format!("Bearer {token}");
    let (status, _, body) = http(
        target,
        "POST",
        path,
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &auth),
        ],
        offer,
    )
    .await?;
    if status != 201 {
        return Err(SignalingError::Http {
            url: format!("{}{path}", target.base),
            status,
            body: body.chars().take(300).collect(),
        });
    }
    Ok(body)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A WebSocket signaling session: requests with ids and their replies, and server events.
pub struct WsClient {
    out: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WsClient {
    /// Connects to `/ws`; events arrive on the returned channel, which ends (after a
    /// `{"type":"closed","reason":..}` event) when the connection does.
    pub async fn connect(target: &Target) -> Result<(Self, mpsc::Receiver<Value>), SignalingError> {
        let url = format!("ws://{}/ws", target.addr);
        let (ws, _) = tokio::time::timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(&url))
            .await
            .map_err(|_| SignalingError::Timeout {
                what: format!("connecting to {url}"),
                timeout: STEP_TIMEOUT,
            })?
            .map_err(|e| SignalingError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
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
                        let is_reply =
                            matches!(v["type"].as_str(), Some("ack" | "error")) && v["id"].is_u64();
                        if is_reply {
                            let id = v["id"].as_u64().unwrap_or_default();
                            if let Some(tx) = p.lock().expect("pending lock").remove(&id) {
                                let _ = tx.send(v);
                            }
                        } else if ev_tx.send(v).await.is_err() {
                            break "client gone".to_owned();
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        break f.map_or("closed by server".to_owned(), |f| {
                            format!("closed by server: {} {}", f.code, f.reason)
                        })
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e.to_string(),
                    None => break "connection ended".to_owned(),
                }
            };
            // Requests in flight get no reply: dropping their senders wakes them.
            p.lock().expect("pending lock").clear();
            let _ = ev_tx
                .send(json!({"type": "closed", "reason": reason}))
                .await;
        });
        Ok((
            Self {
                out: out_tx,
                pending,
                next_id: AtomicU64::new(1),
                tasks: vec![writer, reader],
            },
            ev_rx,
        ))
    }

    /// Sends a request and waits for its ack; an `error` reply becomes [`SignalingError::Refused`].
    pub async fn request(&self, ty: &str, mut fields: Value) -> Result<Value, SignalingError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        fields["id"] = json!(id);
        fields["type"] = json!(ty);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        self.out
            .send(Message::Text(fields.to_string().into()))
            .await
            .map_err(|_| SignalingError::Closed("writer gone".into()))?;
        let reply = tokio::time::timeout(STEP_TIMEOUT, rx)
            .await
            .map_err(|_| SignalingError::Timeout {
                what: ty.to_owned(),
                timeout: STEP_TIMEOUT,
            })?
            .map_err(|_| SignalingError::Closed(format!("while waiting for the reply to {ty}")))?;
        if reply["type"] == "error" {
            return Err(SignalingError::Refused {
                what: ty.to_owned(),
                code: reply["code"].as_str().unwrap_or("?").to_owned(),
                message: reply["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(reply)
    }

    pub async fn close(&self) {
        let _ = self.out.send(Message::Close(None)).await;
    }
}

impl Drop for WsClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
