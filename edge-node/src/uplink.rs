//! The edge's links to room origins over QUIC: one link task per origin, shared by all the rooms
//! that origin holds, and a router that sends each room's requests to its origin's link.
//!
//! The hub ([`crate::hub`]) sends [`EdgeToOrigin`] requests and hears [`FromOrigin`]; this
//! module is what sits behind that channel pair in a cluster (dev mode puts an in-process origin
//! there instead). Which origin holds a room comes from an [`OriginDirectory`]: one static origin
//! for every room (`kcs edge --origin quic://NODE@HOST:PORT`) or the control plane's placement
//! (`--etcd`), looked up on the room's first request and followed afterwards.
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
//! the edge has nothing to restore from ends its sessions. Requests for a lost room that were
//! already on their way (waiting for the redial, or queued before the hub heard of the loss)
//! would reach the origin before the room's restore and be refused with `not_in_room`, so the
//! link holds them ([`RestoreHold`]) until that room's restore has gone out, and sends them
//! right after it, in order.
//!
//! With placement, an origin can also die for good: the control plane then re-places its rooms
//! on another origin (epoch + 1), and a link redialling the dead one would fail every request
//! of those rooms for ever. So the router follows the placements ([`Placer::snapshot`], then
//! [`Placer::watch`] from the next revision; a broken watch is followed by a new snapshot after
//! [`PLACEMENT_RESYNC_BACKOFF`]). A [`PlacementFollower`] (sans-IO) decides, per change, whether
//! a room the router routes now lives on another origin, using the epoch so that an older
//! answer (a late snapshot, a lookup that raced the move) never moves a room back. A moved
//! room is routed to the new origin's link (dialled if needed), the hub hears
//! [`FromOrigin::Lost`] for it and sends its restore there, and the router holds the room's
//! requests until that restore has passed (a [`RestoreHold`] per moving room, given up after
//! [`RESTORE_HOLD`]). A link no room goes to any more is dropped, failing what it still held.
//! A released placement (the meeting was deleted) is only logged.

use crate::hub::FromOrigin;
use crate::media_hook::{is_media_control, LinkId, MediaSide};
use cascade_proto::link::{ControlMessage, GoodbyeCode, Label};
use cascade_proto::quic::{LinkEndpoint, LinkError};
use cascade_proto::room::{EdgeToOrigin, OriginToEdge, RequestId};
use cascade_proto::RoomId;
use control_plane::placement::{PlacementChange, Placer};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// First redial delay after a link drops.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest redial delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a room's placement lookup may take before its requests fail.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long requests for a lost room wait for its restore (the hub sends restores as soon as
/// it hears of the loss; a room with no replica gets none, and its requests go after this).
const RESTORE_HOLD: Duration = Duration::from_secs(5);

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
    /// The room's origin and its placement epoch (0 for a static origin).
    async fn lookup(&self, room: &RoomId) -> anyhow::Result<(OriginAddr, u64)> {
        match self {
            OriginDirectory::Static(o) => Ok((o.clone(), 0)),
            OriginDirectory::Placement { placer, region } => {
                let p = tokio::time::timeout(PLACEMENT_TIMEOUT, placer.place(room, Some(region)))
                    .await
                    .map_err(|_| anyhow::anyhow!("placement timed out"))??;
                Ok((OriginAddr::parse(&p.url)?, p.epoch))
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
    /// Rooms moved to another origin because their placement changed.
    pub rooms_moved: AtomicU64,
}

enum RouterInput {
    Placed {
        room: RoomId,
        /// The room's origin and placement epoch; `None`: the lookup failed.
        origin: Option<(OriginAddr, u64)>,
    },
    /// Placement changes from the control plane (a snapshot comes as one batch of `Placed`).
    Placements(Vec<PlacementChange>),
    Attached {
        origin: OriginAddr,
        link: LinkId,
        resumed: bool,
        /// For an attach the origin did not resume: the rooms it lost, which the link holds
        /// requests for until their restores have gone.
        lost: Option<oneshot::Sender<HashSet<RoomId>>>,
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
    let (to_origin, requests) = mpsc::channel::<EdgeToOrigin>(4096);
    let (hub_tx, hub_rx) = mpsc::channel::<FromOrigin>(16384);
    let incarnation: u64 = rand::random();
    let (router_tx, router_rx) = mpsc::channel::<RouterInput>(1024);
    if let OriginDirectory::Placement { placer, .. } = &directory {
        tokio::spawn(follow_placements(placer.clone(), router_tx.clone()));
    }
    let router = Router {
        endpoint,
        directory,
        media,
        metrics,
        incarnation,
        hub_tx,
        router_tx,
        room_origin: HashMap::new(),
        placing: HashMap::new(),
        links: HashMap::new(),
        ever_attached: HashSet::new(),
        up: HashMap::new(),
        follower: PlacementFollower::default(),
        moving: HashMap::new(),
    };
    tokio::spawn(router.run(requests, router_rx));
    (to_origin, hub_rx)
}

/// The router task's state: which origin each room goes to and the links to them. Only the
/// router task touches it.
struct Router {
    endpoint: Arc<LinkEndpoint>,
    directory: OriginDirectory,
    media: Arc<dyn MediaSide>,
    metrics: Arc<UplinkMetrics>,
    incarnation: u64,
    hub_tx: mpsc::Sender<FromOrigin>,
    router_tx: mpsc::Sender<RouterInput>,
    room_origin: HashMap<RoomId, OriginAddr>,
    /// Rooms being looked up, and their requests meanwhile.
    placing: HashMap<RoomId, Vec<EdgeToOrigin>>,
    links: HashMap<OriginAddr, mpsc::Sender<EdgeToOrigin>>,
    ever_attached: HashSet<OriginAddr>,
    /// Origins whose link is up now, and its id (rooms' media comes down it).
    up: HashMap<OriginAddr, LinkId>,
    /// Which placement changes move a room (placement mode only).
    follower: PlacementFollower,
    /// Rooms moved to a new origin whose restore has not gone yet: their requests wait here.
    moving: HashMap<RoomId, RestoreHold>,
}

impl Router {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<EdgeToOrigin>,
        mut router_rx: mpsc::Receiver<RouterInput>,
    ) {
        // A static origin is dialled at once, so the first join does not wait for it.
        if let OriginDirectory::Static(origin) = &self.directory {
            let origin = origin.clone();
            self.link(&origin);
        }
        loop {
            let hold_until = self.moving.values().map(|h| h.until).min();
            tokio::select! {
                req = requests.recv() => {
                    let Some(req) = req else { return };
                    self.handle_request(req).await;
                }
                Some(input) = router_rx.recv() => match input {
                    RouterInput::Placed { room, origin } => self.handle_placed(room, origin).await,
                    RouterInput::Placements(changes) => {
                        for change in changes {
                            self.handle_placement_change(change).await;
                        }
                    }
                    RouterInput::Down { origin } => {
                        self.up.remove(&origin);
                    }
                    RouterInput::Attached { origin, link, resumed, lost } => {
                        self.handle_attached(origin, link, resumed, lost).await;
                    }
                },
                _ = tokio::time::sleep_until(hold_until.unwrap_or_else(Instant::now)), if hold_until.is_some() => {
                    self.release_expired_holds(Instant::now()).await;
                }
            }
        }
    }

    /// The link to `origin`, dialling it if there is none.
    fn link(&mut self, origin: &OriginAddr) -> mpsc::Sender<EdgeToOrigin> {
        self.links
            .entry(origin.clone())
            .or_insert_with(|| {
                spawn_link(
                    self.endpoint.clone(),
                    origin.clone(),
                    self.incarnation,
                    self.hub_tx.clone(),
                    self.router_tx.clone(),
                    self.media.clone(),
                    self.metrics.clone(),
                )
            })
            .clone()
    }

    async fn handle_request(&mut self, req: EdgeToOrigin) {
        let (EdgeToOrigin::Request { room, .. } | EdgeToOrigin::Restore { room, .. }) = &req else {
            return;
        };
        let room = room.clone();
        if let Some(origin) = self.room_origin.get(&room).cloned() {
            let out = match self.moving.get_mut(&room) {
                Some(hold) => {
                    let out = hold.admit(req);
                    if hold.is_done() {
                        self.moving.remove(&room);
                    }
                    out
                }
                None => vec![req],
            };
            let link = self.link(&origin);
            for req in out {
                let _ = link.send(req).await;
            }
        } else {
            let queue = self.placing.entry(room.clone()).or_default();
            queue.push(req);
            if queue.len() == 1 {
                let directory = self.directory.clone();
                let router_tx = self.router_tx.clone();
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

    async fn handle_placed(&mut self, room: RoomId, origin: Option<(OriginAddr, u64)>) {
        let queued = self.placing.remove(&room).unwrap_or_default();
        match origin {
            Some((origin, epoch)) => {
                // A placement change seen while the lookup ran is newer than its answer.
                let origin = self.follower.handle_lookup(&room, epoch, origin);
                tracing::info!(%room, origin = %origin.url(), "room routed to its origin");
                if let Some(link) = self.up.get(&origin) {
                    self.media.room_link(&room, *link);
                }
                self.room_origin.insert(room, origin.clone());
                let link = self.link(&origin);
                // A room being restored: its restore goes before the requests that were
                // queued behind the lookup (see `RestoreHold`).
                let (restores, requests): (Vec<_>, Vec<_>) = queued
                    .into_iter()
                    .partition(|r| matches!(r, EdgeToOrigin::Restore { .. }));
                for req in restores.into_iter().chain(requests) {
                    let _ = link.send(req).await;
                }
            }
            None => {
                for req in queued {
                    fail(&self.hub_tx, &self.metrics, req).await;
                }
            }
        }
    }

    async fn handle_placement_change(&mut self, change: PlacementChange) {
        let p = match change {
            PlacementChange::Placed(p) => p,
            PlacementChange::Released(room) => {
                self.follower.handle_released(&room);
                if let Some(origin) = self.room_origin.get(&room) {
                    tracing::info!(%room, origin = %origin.url(), "the room's placement was released");
                }
                return;
            }
        };
        let current = self.room_origin.get(&p.room);
        if current.is_none() && !self.placing.contains_key(&p.room) {
            return; // not a room of this edge
        }
        let placed = match OriginAddr::parse(&p.url) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(room = %p.room, url = %p.url, error = %e, "a placement names an origin this edge cannot dial; ignoring it");
                return;
            }
        };
        let Follow::Move(to) = self
            .follower
            .handle_placed(&p.room, p.epoch, placed, current)
        else {
            return;
        };
        self.move_room(p.room, to, p.epoch).await;
    }

    /// Routes `room` to `to` from now on and has the hub rebuild it there; the room's
    /// requests issued before its restore wait for it (`moving`).
    async fn move_room(&mut self, room: RoomId, to: OriginAddr, epoch: u64) {
        let from = self.room_origin.insert(room.clone(), to.clone());
        self.metrics.rooms_moved.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%room, from = %from.as_ref().map(OriginAddr::url).unwrap_or_default(), to = %to.url(), epoch, "the room's placement moved: rebuilding it on its new origin");
        let until = Instant::now() + RESTORE_HOLD;
        self.moving
            .entry(room.clone())
            .or_insert_with(|| RestoreHold::new([room.clone()].into_iter().collect(), until))
            .until = until;
        self.link(&to);
        if let Some(link) = self.up.get(&to) {
            self.media.room_link(&room, *link);
        }
        // An origin no room goes to any more: drop its link (its task ends; a later room on
        // it dials afresh, and that first attach loses nothing).
        if let Some(from) = from {
            if !self.room_origin.values().any(|o| *o == from) {
                self.links.remove(&from);
                self.up.remove(&from);
                self.ever_attached.remove(&from);
            }
        }
        let _ = self.hub_tx.send(FromOrigin::Lost(vec![room])).await;
    }

    /// Moved rooms whose restore never came (the hub had no replica): send what waited.
    async fn release_expired_holds(&mut self, now: Instant) {
        let expired: Vec<RoomId> = self
            .moving
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(r, _)| r.clone())
            .collect();
        for room in expired {
            let held = self
                .moving
                .remove(&room)
                .map(RestoreHold::release_all)
                .unwrap_or_default();
            tracing::warn!(%room, requests = held.len(), "no restore came for a moved room; sending its held requests");
            match self.room_origin.get(&room).cloned() {
                Some(origin) => {
                    let link = self.link(&origin);
                    for req in held {
                        let _ = link.send(req).await;
                    }
                }
                None => {
                    for req in held {
                        fail(&self.hub_tx, &self.metrics, req).await;
                    }
                }
            }
        }
    }

    async fn handle_attached(
        &mut self,
        origin: OriginAddr,
        link: LinkId,
        resumed: bool,
        lost_to_link: Option<oneshot::Sender<HashSet<RoomId>>>,
    ) {
        self.up.insert(origin.clone(), link);
        let first = self.ever_attached.insert(origin.clone());
        let lost: Vec<RoomId> = if !resumed && !first {
            self.room_origin
                .iter()
                .filter(|(_, o)| **o == origin)
                .map(|(r, _)| r.clone())
                .collect()
        } else {
            Vec::new()
        };
        // The link learns the lost rooms before the hub does, so it holds their requests
        // before any restore can come.
        if let Some(tx) = lost_to_link {
            let _ = tx.send(lost.iter().cloned().collect());
        }
        if !lost.is_empty() {
            // The origin forgot us: the rooms it held for us are lost, and with placement they
            // may live elsewhere now, so look them up again.
            if matches!(self.directory, OriginDirectory::Placement { .. }) {
                for r in &lost {
                    self.room_origin.remove(r);
                }
            }
            let _ = self.hub_tx.send(FromOrigin::Lost(lost)).await;
        }
        for (room, o) in &self.room_origin {
            if *o == origin {
                self.media.room_link(room, link);
            }
        }
    }
}

/// Pause before re-reading the placements after the watch broke.
const PLACEMENT_RESYNC_BACKOFF: Duration = Duration::from_millis(500);

/// Feeds the router every placement change: a snapshot, then the watch from the snapshot's
/// revision on; a broken watch is followed by a new snapshot after a short pause. Ends with
/// the router.
async fn follow_placements(placer: Placer, router: mpsc::Sender<RouterInput>) {
    loop {
        match follow_placements_once(&placer, &router).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "placement watch broken; reading the placements again")
            }
        }
        tokio::time::sleep(PLACEMENT_RESYNC_BACKOFF).await;
    }
}

/// `Ok` when the router is gone; `Err` when the watch broke.
async fn follow_placements_once(
    placer: &Placer,
    router: &mpsc::Sender<RouterInput>,
) -> Result<(), control_plane::store::StoreError> {
    use futures_util::StreamExt;
    let (placements, revision) = placer.snapshot().await?;
    let snapshot = placements
        .into_iter()
        .map(PlacementChange::Placed)
        .collect();
    if router
        .send(RouterInput::Placements(snapshot))
        .await
        .is_err()
    {
        return Ok(());
    }
    let watch = placer
        .watch(control_plane::store::Revision(revision.0 + 1))
        .await?;
    let mut watch = std::pin::pin!(watch);
    while let Some(batch) = watch.next().await {
        if router.send(RouterInput::Placements(batch?)).await.is_err() {
            return Ok(());
        }
    }
    Err(control_plane::store::StoreError::WatchLost {
        reason: "placement watch ended".into(),
    })
}

/// What a placement change means for a room this edge routes.
#[derive(Debug, PartialEq, Eq)]
enum Follow {
    /// Nothing to do: the room stays where it is (or the change is older than what we know).
    Stay,
    /// The room lives on this other origin now.
    Move(OriginAddr),
}

/// Decides which placement changes move a room (sans-IO). Placements come from two sources
/// that race, the router's own lookups and the watch; the epoch orders them, so an older
/// answer never moves a room back. A released placement starts over (its next epoch is 0).
#[derive(Debug, Default)]
struct PlacementFollower {
    /// The newest placement seen per room this edge routes or is looking up.
    newest: HashMap<RoomId, (u64, OriginAddr)>,
}

impl PlacementFollower {
    /// A lookup answered `origin` at `epoch`: the origin to route to (a newer placement seen
    /// while the lookup ran wins).
    fn handle_lookup(&mut self, room: &RoomId, epoch: u64, origin: OriginAddr) -> OriginAddr {
        match self.newest.get(room) {
            Some((known, newer)) if *known > epoch => newer.clone(),
            _ => {
                self.newest.insert(room.clone(), (epoch, origin.clone()));
                origin
            }
        }
    }

    /// The watch says the room is on `placed` at `epoch`; `current` is where the router sends
    /// it now (`None`: still being looked up).
    fn handle_placed(
        &mut self,
        room: &RoomId,
        epoch: u64,
        placed: OriginAddr,
        current: Option<&OriginAddr>,
    ) -> Follow {
        if self
            .newest
            .get(room)
            .is_some_and(|(known, _)| *known > epoch)
        {
            return Follow::Stay;
        }
        self.newest.insert(room.clone(), (epoch, placed.clone()));
        match current {
            Some(current) if *current != placed => Follow::Move(placed),
            _ => Follow::Stay,
        }
    }

    fn handle_released(&mut self, room: &RoomId) {
        self.newest.remove(room);
    }
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
                        None => {
                            // The router dropped this link (its rooms moved away).
                            for req in waiting {
                                fail(&hub, &metrics, req).await;
                            }
                            return;
                        }
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
        let (lost_tx, lost_rx) = if resumed {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let _ = router
            .send(RouterInput::Attached {
                origin: origin.clone(),
                link: link_id,
                resumed,
                lost: lost_tx,
            })
            .await;
        let mut hold = None;
        if let Some(mut rx) = lost_rx {
            // Keep taking requests while the router answers (it may be sending us some).
            let lost = loop {
                tokio::select! {
                    lost = &mut rx => break lost.unwrap_or_default(),
                    req = requests.recv() => match req {
                        Some(req) => waiting.push(req),
                        None => {
                            for req in waiting {
                                fail(&hub, &metrics, req).await;
                            }
                            metrics.links_up.fetch_sub(1, Ordering::Relaxed);
                            return;
                        }
                    },
                }
            };
            if !lost.is_empty() {
                tracing::info!(origin = %origin.url(), link = link_id, rooms = lost.len(), "the origin lost this edge's rooms: holding their requests until each is restored");
                hold = Some(RestoreHold::new(lost, Instant::now() + RESTORE_HOLD));
            }
        }
        let waiting: Vec<EdgeToOrigin> = match hold.as_mut() {
            Some(h) => waiting.into_iter().flat_map(|r| h.admit(r)).collect(),
            None => waiting,
        };
        if let Err((_, rest)) =
            send_requests(&mut link.sender, waiting, &mut in_flight, &hub, &metrics).await
        {
            // The link is already failing (relay sees it next): nothing more goes on it.
            let held = hold
                .take()
                .map(RestoreHold::release_all)
                .unwrap_or_default();
            for req in rest.into_iter().chain(held) {
                fail(&hub, &metrics, req).await;
            }
        }
        let reason = relay(
            link,
            in_flight,
            hold,
            link_id,
            &mut requests,
            &hub,
            media.as_ref(),
            &metrics,
        )
        .await;
        metrics.links_up.fetch_sub(1, Ordering::Relaxed);
        media.link_down(link_id);
        match reason {
            // The router dropped this link (it already forgot the origin), or the process is
            // ending.
            None => return,
            Some(e) => {
                let _ = router
                    .send(RouterInput::Down {
                        origin: origin.clone(),
                    })
                    .await;
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

/// Relays until the link drops (`Some(why)`) or the router or hub is gone (`None`).
#[allow(clippy::too_many_arguments)]
async fn relay(
    link: cascade_proto::quic::Link,
    mut in_flight: HashSet<RequestId>,
    mut hold: Option<RestoreHold>,
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
    let mut unsent: Vec<EdgeToOrigin> = Vec::new();
    let mut router_gone = false;
    let why = 'relay: loop {
        let held_until = hold.as_ref().map(|h| h.until);
        let to_send: Vec<EdgeToOrigin> = tokio::select! {
            req = requests.recv() => {
                // The router dropped this link (its rooms moved away, or the hub is gone):
                // what is in flight here gets no answer any more.
                let Some(req) = req else { router_gone = true; break 'relay String::new() };
                let out = match hold.as_mut() {
                    Some(h) => h.admit(req),
                    None => vec![req],
                };
                if hold.as_ref().is_some_and(RestoreHold::is_done) {
                    hold = None;
                }
                out
            }
            _ = tokio::time::sleep_until(held_until.unwrap_or_else(Instant::now)), if held_until.is_some() => {
                // No restore came for some lost rooms (the hub had no replica of them): send
                // what waited, as the origin would have seen it without the hold.
                let released = hold.take().map(RestoreHold::release_all).unwrap_or_default();
                tracing::warn!(link = link_id, requests = released.len(), "no restore came for a lost room; sending its held requests");
                released
            }
            Some(msg) = media_rx.recv() => {
                if let Err(e) = sender.send(&msg).await { break e.to_string(); }
                Vec::new()
            }
            msg = receiver.recv() => match msg {
                Ok(ControlMessage::ToEdge(m)) => {
                    if let OriginToEdge::Reply { id, .. } = &m { in_flight.remove(id); }
                    if hub.send(FromOrigin::Message(m)).await.is_err() { return None; }
                    Vec::new()
                }
                Ok(m) if is_media_control(&m) => {
                    media.on_control(link_id, m);
                    Vec::new()
                }
                Ok(ControlMessage::Goodbye { code, reason }) => break format!("origin said goodbye ({code:?}): {reason}"),
                Ok(ControlMessage::Drain { deadline_ms }) => {
                    tracing::info!(link = link_id, deadline_ms, "origin draining");
                    Vec::new()
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
        };
        if let Err((why, rest)) =
            send_requests(&mut sender, to_send, &mut in_flight, hub, metrics).await
        {
            unsent.extend(rest);
            break why;
        }
    };
    channel.close(GoodbyeCode::ProtocolError, "control stream ended");
    for id in in_flight {
        metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
        let _ = hub.send(FromOrigin::Failed(id)).await;
    }
    let held = hold.map(RestoreHold::release_all).unwrap_or_default();
    for req in unsent.into_iter().chain(held) {
        fail(hub, metrics, req).await;
    }
    (!router_gone).then_some(why)
}

/// Sends `reqs` in order, remembering the requests in flight. On a link error the failed
/// request is reported to the hub, and the error and the requests not sent are returned.
async fn send_requests(
    sender: &mut cascade_proto::quic::ControlSender,
    reqs: Vec<EdgeToOrigin>,
    in_flight: &mut HashSet<RequestId>,
    hub: &mpsc::Sender<FromOrigin>,
    metrics: &UplinkMetrics,
) -> Result<(), (String, Vec<EdgeToOrigin>)> {
    let mut reqs = reqs.into_iter();
    while let Some(req) = reqs.next() {
        let id = match &req {
            EdgeToOrigin::Request { id, .. } => Some(*id),
            _ => None,
        };
        if let Err(e) = sender.send(&ControlMessage::ToOrigin(req)).await {
            if let Some(id) = id {
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = hub.send(FromOrigin::Failed(id)).await;
            }
            return Err((e.to_string(), reqs.collect()));
        }
        if let Some(id) = id {
            in_flight.insert(id);
        }
    }
    Ok(())
}

/// Requests for the rooms an origin lost, held until each room's restore has gone (sans-IO:
/// the link feeds it what the hub sends and sends what it returns, in order).
///
/// The origin answers a request for a room it does not hold with `not_in_room`. After it lost
/// this edge's rooms, requests issued before the hub heard of the loss are ahead of the rooms'
/// restores; this puts them right behind.
#[derive(Debug)]
struct RestoreHold {
    /// Lost rooms whose restore has not gone yet.
    lost: HashSet<RoomId>,
    /// Their requests, in arrival order.
    held: Vec<EdgeToOrigin>,
    /// When the hold gives up on restores that never come.
    until: Instant,
}

impl RestoreHold {
    fn new(lost: HashSet<RoomId>, until: Instant) -> Self {
        Self {
            lost,
            held: Vec::new(),
            until,
        }
    }

    /// What to send now, in order, for `req` from the hub.
    fn admit(&mut self, req: EdgeToOrigin) -> Vec<EdgeToOrigin> {
        match &req {
            EdgeToOrigin::Restore { room, .. } if self.lost.remove(room) => {
                let room = room.clone();
                let (theirs, others): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut self.held).into_iter().partition(
                        |r| matches!(r, EdgeToOrigin::Request { room: r, .. } if *r == room),
                    );
                self.held = others;
                std::iter::once(req).chain(theirs).collect()
            }
            EdgeToOrigin::Request { room, .. } if self.lost.contains(room) => {
                self.held.push(req);
                Vec::new()
            }
            _ => vec![req],
        }
    }

    /// Every lost room is restored and nothing waits.
    fn is_done(&self) -> bool {
        self.lost.is_empty() && self.held.is_empty()
    }

    /// Gives up holding: everything held, in arrival order.
    fn release_all(self) -> Vec<EdgeToOrigin> {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::room::{Intent, RoomReplica};

    fn room(name: &str) -> RoomId {
        RoomId::new(name).unwrap()
    }

    fn chat(id: u64, r: &str) -> EdgeToOrigin {
        EdgeToOrigin::Request {
            id: RequestId(id),
            room: room(r),
            intent: Intent::Chat {
                participant: cascade_proto::ParticipantId(1),
                text: format!("message {id}"),
                to: None,
            },
        }
    }

    fn restore(id: u64, r: &str) -> EdgeToOrigin {
        EdgeToOrigin::Restore {
            id: RequestId(id),
            room: room(r),
            replica: Box::<RoomReplica>::default(),
        }
    }

    fn ids(out: &[EdgeToOrigin]) -> Vec<u64> {
        out.iter()
            .map(|r| match r {
                EdgeToOrigin::Request { id, .. } | EdgeToOrigin::Restore { id, .. } => id.0,
                EdgeToOrigin::Attach { .. } => 0,
            })
            .collect()
    }

    #[test]
    fn a_lost_rooms_requests_wait_for_its_restore_and_follow_it_in_order() {
        let lost = [room("a"), room("b")].into_iter().collect();
        let mut hold = RestoreHold::new(lost, Instant::now());
        assert!(hold.admit(chat(1, "a")).is_empty(), "lost room a: held");
        assert_eq!(
            ids(&hold.admit(chat(2, "c"))),
            vec![2],
            "room c was not lost"
        );
        assert!(hold.admit(chat(3, "b")).is_empty());
        assert!(hold.admit(chat(4, "a")).is_empty());
        assert_eq!(
            ids(&hold.admit(restore(10, "a"))),
            vec![10, 1, 4],
            "a's restore, then a's requests in the order they came"
        );
        assert_eq!(ids(&hold.admit(chat(5, "a"))), vec![5], "a is restored");
        assert!(!hold.is_done(), "b is still lost");
        assert_eq!(ids(&hold.admit(restore(11, "b"))), vec![11, 3]);
        assert!(hold.is_done());
        assert_eq!(
            ids(&hold.admit(restore(12, "b"))),
            vec![12],
            "a second restore passes"
        );
    }

    #[test]
    fn a_lost_room_with_no_restore_gives_its_requests_back_in_order() {
        let lost = [room("a"), room("b")].into_iter().collect();
        let mut hold = RestoreHold::new(lost, Instant::now());
        for (id, r) in [(1, "a"), (2, "b"), (3, "a")] {
            assert!(hold.admit(chat(id, r)).is_empty());
        }
        assert_eq!(ids(&hold.admit(restore(10, "b"))), vec![10, 2]);
        assert_eq!(ids(&hold.release_all()), vec![1, 3]);
    }

    fn origin(node: &str, port: u16) -> OriginAddr {
        OriginAddr::parse(&format!("quic://{node}@127.0.0.1:{port}")).unwrap()
    }

    #[test]
    fn a_newer_placement_on_another_origin_moves_the_room() {
        let (a, b, c) = (
            origin("origin-1", 1),
            origin("origin-2", 2),
            origin("origin-3", 3),
        );
        let mut f = PlacementFollower::default();
        let r = room("r");
        assert_eq!(f.handle_lookup(&r, 0, a.clone()), a);
        // (epoch, placed on, routed to, expected)
        let table = [
            (0, &a, &a, Follow::Stay),            // the snapshot repeats the lookup
            (1, &b, &a, Follow::Move(b.clone())), // the origin died: re-placed
            (0, &a, &b, Follow::Stay),            // an old snapshot arriving late
            (1, &b, &b, Follow::Stay),            // the same move seen twice
            (2, &c, &b, Follow::Move(c.clone())), // and again
        ];
        for (epoch, placed, routed, want) in table {
            assert_eq!(
                f.handle_placed(&r, epoch, placed.clone(), Some(routed)),
                want,
                "epoch {epoch} on {} while routed to {}",
                placed.url(),
                routed.url()
            );
        }
        // Released, then placed afresh (epoch 0 again): followed.
        f.handle_released(&r);
        assert_eq!(
            f.handle_placed(&r, 0, a.clone(), Some(&c)),
            Follow::Move(a.clone())
        );
    }

    #[test]
    fn a_move_seen_during_the_lookup_wins_over_its_older_answer() {
        let (a, b) = (origin("origin-1", 1), origin("origin-2", 2));
        let mut f = PlacementFollower::default();
        let r = room("r");
        assert_eq!(
            f.handle_placed(&r, 3, b.clone(), None),
            Follow::Stay,
            "not routed yet: nothing to move"
        );
        assert_eq!(f.handle_lookup(&r, 2, a.clone()), b, "epoch 3 beats 2");
        assert_eq!(f.handle_lookup(&room("s"), 0, a.clone()), a);
        assert_eq!(f.handle_lookup(&r, 4, a.clone()), a, "a newer lookup wins");
    }

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
