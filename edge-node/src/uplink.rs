//! The edge's links to room origins over QUIC: one link task per origin, shared by all the rooms
//! that origin holds, and a router that sends each room's requests to its origin's link.
//!
//! The hub ([`crate::hub`]) sends [`EdgeToOrigin`] requests and hears [`FromOrigin`]; this
//! module is what sits behind that channel pair in a cluster (dev mode puts an in-process origin
//! there instead). Which origin holds a room comes from an [`OriginDirectory`]: one static origin
//! for every room (`kcs edge --origin quic://NODE@HOST:PORT`) or the control plane's placement
//! (`--etcd`), looked up on the room's first request.
//!
//! A link task dials its origin, sends [`EdgeToOrigin::Attach`] with this process's incarnation
//! and waits for [`OriginToEdge::Attached`]. Then it relays: requests out (remembering which are
//! in flight), replies and events in, and media control both ways through the
//! [`MediaSide`](crate::media_hook::MediaSide) hook. When the link drops, requests in flight and
//! requests that arrive while it is down fail at once ([`FromOrigin::Failed`], which the client
//! sees as `origin_unavailable`), and the task redials with backoff ([`BACKOFF_FIRST`] doubling to
//! [`BACKOFF_MAX`]). On reconnecting, the edge re-announces exactly one thing: its incarnation.
//! An origin that kept this edge's participants through its grace period answers `resumed` and
//! sends the events queued meanwhile, so sessions continue as if nothing happened; an origin
//! that did not (it restarted, or the grace period ran out) answers `resumed: false`; the hub
//! then rebuilds each of those rooms there from its replica ([`FromOrigin::Lost`], answered with
//! [`EdgeToOrigin::Restore`]; see `cascade_proto::replica`), so sessions continue; only a room
//! the edge has nothing to restore from ends its sessions.

use crate::hub::FromOrigin;
use crate::media_hook::{is_media_control, LinkId, MediaSide};
use cascade_proto::link::{ControlMessage, GoodbyeCode, Label};
use cascade_proto::quic::{LinkEndpoint, LinkError};
use cascade_proto::room::{EdgeToOrigin, OriginToEdge, RequestId};
use cascade_proto::RoomId;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// First redial delay after a link drops.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest redial delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a room's placement lookup may take before its requests fail.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(3);

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// A fresh link id, unique in the process across origin, parent and child links.
pub(crate) fn next_link_id() -> LinkId {
    NEXT_LINK.fetch_add(1, Ordering::Relaxed)
}

/// Where an origin listens: its node id (its certificate's name) and its cascade address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OriginAddr {
    pub node: Label,
    pub addr: SocketAddr,
}

impl OriginAddr {
    /// Parses `quic://NODE@HOST:PORT` (the form origins register). HOST may be a name.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let rest = url
            .strip_prefix("quic://")
            .context("an origin URL starts with quic://")?;
        let rest = rest.trim_end_matches('/');
        let (node, hostport) = rest
            .split_once('@')
            .context("an origin URL names the origin's node id: quic://NODE@HOST:PORT")?;
        let node = Label::new(node).map_err(|e| anyhow::anyhow!("origin node id {node:?}: {e}"))?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .with_context(|| format!("resolving {hostport}"))?
            .next()
            .with_context(|| format!("{hostport} resolves to no address"))?;
        Ok(Self { node, addr })
    }

    pub fn url(&self) -> String {
        format!("quic://{}@{}", self.node, self.addr)
    }
}

/// Which origin holds a room.
#[derive(Clone)]
pub enum OriginDirectory {
    /// Every room on one origin.
    Static(OriginAddr),
    /// The control plane's placement (placing the room if it has no origin yet).
    Placement {
        placer: control_plane::placement::Placer,
        region: control_plane::nodes::Region,
    },
}

impl OriginDirectory {
    async fn lookup(&self, room: &RoomId) -> anyhow::Result<OriginAddr> {
        match self {
            OriginDirectory::Static(o) => Ok(o.clone()),
            OriginDirectory::Placement { placer, region } => {
                let p = tokio::time::timeout(PLACEMENT_TIMEOUT, placer.place(room, Some(region)))
                    .await
                    .map_err(|_| anyhow::anyhow!("placement timed out"))??;
                OriginAddr::parse(&p.url)
            }
        }
    }
}

/// Link counters for `/metrics`.
#[derive(Debug, Default)]
pub struct UplinkMetrics {
    pub links_up: std::sync::atomic::AtomicI64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub requests_failed: AtomicU64,
}

enum RouterInput {
    Placed {
        room: RoomId,
        origin: Option<OriginAddr>,
    },
    Attached {
        origin: OriginAddr,
        link: LinkId,
        resumed: bool,
    },
    Down {
        origin: OriginAddr,
    },
}

/// Starts the router; returns the hub's channel ends.
pub fn spawn(
    endpoint: Arc<LinkEndpoint>,
    directory: OriginDirectory,
    media: Arc<dyn MediaSide>,
    metrics: Arc<UplinkMetrics>,
) -> (mpsc::Sender<EdgeToOrigin>, mpsc::Receiver<FromOrigin>) {
    let (to_origin, mut requests) = mpsc::channel::<EdgeToOrigin>(4096);
    let (hub_tx, hub_rx) = mpsc::channel::<FromOrigin>(16384);
    let incarnation: u64 = rand::random();
    tokio::spawn(async move {
        let (router_tx, mut router_rx) = mpsc::channel::<RouterInput>(1024);
        let mut room_origin: HashMap<RoomId, OriginAddr> = HashMap::new();
        let mut placing: HashMap<RoomId, Vec<EdgeToOrigin>> = HashMap::new();
        let mut links: HashMap<OriginAddr, mpsc::Sender<EdgeToOrigin>> = HashMap::new();
        let mut ever_attached: HashSet<OriginAddr> = HashSet::new();
        // Origins whose link is up now, and its id (rooms' media comes down it).
        let mut up: HashMap<OriginAddr, LinkId> = HashMap::new();
        // A static origin is dialled at once, so the first join does not wait for it.
        if let OriginDirectory::Static(origin) = &directory {
            links.insert(
                origin.clone(),
                spawn_link(
                    endpoint.clone(),
                    origin.clone(),
                    incarnation,
                    hub_tx.clone(),
                    router_tx.clone(),
                    media.clone(),
                    metrics.clone(),
                ),
            );
        }
        loop {
            tokio::select! {
                req = requests.recv() => {
                    let Some(req) = req else { return };
                    let (EdgeToOrigin::Request { room, .. } | EdgeToOrigin::Restore { room, .. }) = &req else { continue };
                    if let Some(origin) = room_origin.get(room) {
                        let link = links.entry(origin.clone()).or_insert_with(|| {
                            spawn_link(endpoint.clone(), origin.clone(), incarnation, hub_tx.clone(), router_tx.clone(), media.clone(), metrics.clone())
                        });
                        let _ = link.send(req).await;
                    } else {
                        let room = room.clone();
                        let queue = placing.entry(room.clone()).or_default();
                        queue.push(req);
                        if queue.len() == 1 {
                            let directory = directory.clone();
                            let router_tx = router_tx.clone();
                            tokio::spawn(async move {
                                let origin = match directory.lookup(&room).await {
                                    Ok(o) => Some(o),
                                    Err(e) => {
                                        tracing::warn!(%room, error = %e, "no origin for the room");
                                        None
                                    }
                                };
                                let _ = router_tx.send(RouterInput::Placed { room, origin }).await;
                            });
                        }
                    }
                }
                Some(input) = router_rx.recv() => match input {
                    RouterInput::Placed { room, origin } => {
                        let queued = placing.remove(&room).unwrap_or_default();
                        match origin {
                            Some(origin) => {
                                tracing::info!(%room, origin = %origin.url(), "room routed to its origin");
                                if let Some(link) = up.get(&origin) {
                                    media.room_link(&room, *link);
                                }
                                room_origin.insert(room, origin.clone());
                                let link = links.entry(origin.clone()).or_insert_with(|| {
                                    spawn_link(endpoint.clone(), origin.clone(), incarnation, hub_tx.clone(), router_tx.clone(), media.clone(), metrics.clone())
                                });
                                for req in queued {
                                    let _ = link.send(req).await;
                                }
                            }
                            None => {
                                for req in queued {
                                    if let EdgeToOrigin::Request { id, .. } = req {
                                        metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                                        let _ = hub_tx.send(FromOrigin::Failed(id)).await;
                                    }
                                }
                            }
                        }
                    }
                    RouterInput::Down { origin } => {
                        up.remove(&origin);
                    }
                    RouterInput::Attached { origin, link, resumed } => {
                        up.insert(origin.clone(), link);
                        let first = ever_attached.insert(origin.clone());
                        if !resumed && !first {
                            // The origin forgot us: the rooms it held for us are lost, and with
                            // placement they may live elsewhere now, so look them up again.
                            let lost: Vec<RoomId> = room_origin
                                .iter()
                                .filter(|(_, o)| **o == origin)
                                .map(|(r, _)| r.clone())
                                .collect();
                            if matches!(directory, OriginDirectory::Placement { .. }) {
                                for r in &lost {
                                    room_origin.remove(r);
                                }
                            }
                            if !lost.is_empty() {
                                let _ = hub_tx.send(FromOrigin::Lost(lost)).await;
                            }
                        }
                        for (room, o) in &room_origin {
                            if *o == origin {
                                media.room_link(room, link);
                            }
                        }
                    }
                }
            }
        }
    });
    (to_origin, hub_rx)
}

fn spawn_link(
    endpoint: Arc<LinkEndpoint>,
    origin: OriginAddr,
    incarnation: u64,
    hub: mpsc::Sender<FromOrigin>,
    router: mpsc::Sender<RouterInput>,
    media: Arc<dyn MediaSide>,
    metrics: Arc<UplinkMetrics>,
) -> mpsc::Sender<EdgeToOrigin> {
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(run_link(
        endpoint,
        origin,
        incarnation,
        rx,
        hub,
        router,
        media,
        metrics,
    ));
    tx
}

/// Fails a request the link cannot carry.
async fn fail(hub: &mpsc::Sender<FromOrigin>, metrics: &UplinkMetrics, req: EdgeToOrigin) {
    if let EdgeToOrigin::Request { id, .. } = req {
        metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
        let _ = hub.send(FromOrigin::Failed(id)).await;
    }
}

/// One origin's link: dial, attach, relay, and redial with backoff when it drops.
#[allow(clippy::too_many_arguments)]
async fn run_link(
    endpoint: Arc<LinkEndpoint>,
    origin: OriginAddr,
    incarnation: u64,
    mut requests: mpsc::Receiver<EdgeToOrigin>,
    hub: mpsc::Sender<FromOrigin>,
    router: mpsc::Sender<RouterInput>,
    media: Arc<dyn MediaSide>,
    metrics: Arc<UplinkMetrics>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        // Dial. Requests arriving meanwhile wait for this attempt (bounded by the handshake
        // timeout); while backing off after a failed one they fail at once.
        let mut waiting = Vec::new();
        let link = {
            let attempt = connect_and_attach(&endpoint, &origin, incarnation);
            tokio::pin!(attempt);
            loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    req = requests.recv() => match req {
                        Some(req) => waiting.push(req),
                        None => return,
                    },
                }
            }
        };
        let (mut link, resumed) = match link {
            Ok(l) => l,
            Err(e) => {
                for req in waiting {
                    fail(&hub, &metrics, req).await;
                }
                metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(origin = %origin.url(), error = %e, retry_in = ?backoff, "cannot reach the origin");
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        req = requests.recv() => match req {
                            Some(req) => fail(&hub, &metrics, req).await,
                            None => return,
                        },
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_FIRST;
        let mut in_flight: HashSet<RequestId> = HashSet::new();
        metrics.connects.fetch_add(1, Ordering::Relaxed);
        metrics.links_up.fetch_add(1, Ordering::Relaxed);
        let link_id: LinkId = next_link_id();
        tracing::info!(origin = %origin.url(), link = link_id, resumed, "linked to the origin");
        let _ = router
            .send(RouterInput::Attached {
                origin: origin.clone(),
                link: link_id,
                resumed,
            })
            .await;
        let mut unsent = None;
        for req in waiting {
            if unsent.is_some() {
                fail(&hub, &metrics, req).await;
            } else if let Err(e) = link
                .sender
                .send(&ControlMessage::ToOrigin(req.clone()))
                .await
            {
                fail(&hub, &metrics, req).await;
                unsent = Some(e);
            } else if let EdgeToOrigin::Request { id, .. } = req {
                in_flight.insert(id);
            }
        }
        let reason = relay(
            link,
            in_flight,
            link_id,
            &mut requests,
            &hub,
            media.as_ref(),
            &metrics,
        )
        .await;
        metrics.links_up.fetch_sub(1, Ordering::Relaxed);
        media.link_down(link_id);
        let _ = router
            .send(RouterInput::Down {
                origin: origin.clone(),
            })
            .await;
        match reason {
            None => return, // the hub is gone: the process is ending
            Some(e) => {
                tracing::warn!(origin = %origin.url(), link = link_id, error = %e, "origin link dropped; reconnecting")
            }
        }
    }
}

async fn connect_and_attach(
    endpoint: &LinkEndpoint,
    origin: &OriginAddr,
    incarnation: u64,
) -> Result<(cascade_proto::quic::Link, bool), LinkError> {
    let mut link = endpoint.connect(origin.addr, &origin.node).await?;
    link.sender
        .send(&ControlMessage::ToOrigin(EdgeToOrigin::Attach {
            incarnation,
        }))
        .await?;
    let answer = tokio::time::timeout(Duration::from_secs(5), link.receiver.recv())
        .await
        .map_err(|_| LinkError::HandshakeTimeout(Duration::from_secs(5)))??;
    match answer {
        ControlMessage::ToEdge(OriginToEdge::Attached { resumed }) => Ok((link, resumed)),
        ControlMessage::Goodbye { code, reason } => Err(LinkError::Refused { code, reason }),
        other => {
            let reason = format!("expected attached, got {}", other.name());
            let _ = link
                .sender
                .goodbye(GoodbyeCode::ProtocolError, &reason)
                .await;
            Err(LinkError::Refused {
                code: GoodbyeCode::ProtocolError,
                reason,
            })
        }
    }
}

/// Relays until the link drops (`Some(why)`) or the hub is gone (`None`).
async fn relay(
    link: cascade_proto::quic::Link,
    mut in_flight: HashSet<RequestId>,
    link_id: LinkId,
    requests: &mut mpsc::Receiver<EdgeToOrigin>,
    hub: &mpsc::Sender<FromOrigin>,
    media: &dyn MediaSide,
    metrics: &UplinkMetrics,
) -> Option<String> {
    let cascade_proto::quic::Link {
        peer,
        mut sender,
        mut receiver,
        media: channel,
    } = link;
    let (media_tx, mut media_rx) = mpsc::channel::<ControlMessage>(1024);
    media.link_up(link_id, &peer, media_tx, channel.clone());
    let why = loop {
        tokio::select! {
            req = requests.recv() => {
                let req = req?;
                let id = match &req { EdgeToOrigin::Request { id, .. } => Some(*id), _ => None };
                if let Err(e) = sender.send(&ControlMessage::ToOrigin(req)).await {
                    if let Some(id) = id {
                        metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                        let _ = hub.send(FromOrigin::Failed(id)).await;
                    }
                    break e.to_string();
                }
                if let Some(id) = id { in_flight.insert(id); }
            }
            Some(msg) = media_rx.recv() => {
                if let Err(e) = sender.send(&msg).await { break e.to_string(); }
            }
            msg = receiver.recv() => match msg {
                Ok(ControlMessage::ToEdge(m)) => {
                    if let OriginToEdge::Reply { id, .. } = &m { in_flight.remove(id); }
                    if hub.send(FromOrigin::Message(m)).await.is_err() { return None; }
                }
                Ok(m) if is_media_control(&m) => media.on_control(link_id, m),
                Ok(ControlMessage::Goodbye { code, reason }) => break format!("origin said goodbye ({code:?}): {reason}"),
                Ok(ControlMessage::Drain { deadline_ms }) => {
                    tracing::info!(link = link_id, deadline_ms, "origin draining");
                }
                Ok(other) => {
                    let reason = format!("an origin does not send {}", other.name());
                    let _ = sender.goodbye(GoodbyeCode::ProtocolError, &reason).await;
                    break reason;
                }
                Err(LinkError::Malformed(e)) => {
                    let _ = sender.refuse(&e).await;
                    break format!("malformed frame from the origin: {e}");
                }
                Err(e) => break e.to_string(),
            },
        }
    };
    channel.close(GoodbyeCode::ProtocolError, "control stream ended");
    for id in in_flight {
        metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
        let _ = hub.send(FromOrigin::Failed(id)).await;
    }
    Some(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_urls() {
        let o = OriginAddr::parse("quic://origin-1@127.0.0.1:7400").unwrap();
        assert_eq!(o.node.as_str(), "origin-1");
        assert_eq!(o.addr.port(), 7400);
        assert_eq!(OriginAddr::parse(&o.url()).unwrap(), o);
        for bad in [
            "http://origin-1@127.0.0.1:7400",
            "quic://127.0.0.1:7400",
            "quic://Origin@127.0.0.1:7400",
            "quic://o@127.0.0.1",
        ] {
            assert!(OriginAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
