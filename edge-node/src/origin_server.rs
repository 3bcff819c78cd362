//! `kcs origin`: a process hosting rooms' origins for the edges that link to it over QUIC.
//!
//! One task (the *core*) owns the [`origin::Origin`] room state machine and the table of edges;
//! link tasks own the QUIC links. Per link, a reader decodes control frames and hands room
//! messages to the core and media control to the [`MediaSide`]; a writer owns the link's single
//! [`ControlSender`](cascade_proto::quic::ControlSender), fed by the core (room replies and
//! events, as `to_edge`) and by the media side.
//!
//! ## Edges, links and the grace period
//!
//! An edge is known by its node id (its certificate names it, the handshake checks) plus the
//! incarnation its [`EdgeToOrigin::Attach`] carries (random per edge process). Each known edge
//! has an [`EdgeId`] that stays the same across its links. When a link drops, the edge's
//! participants stay in their rooms for the grace period ([`DEFAULT_GRACE`], 10 s: several
//! idle timeouts and reconnect backoffs, short enough that a dead edge's participants do not
//! linger in rosters), and the events and replies for it are queued (up to
//! [`MAX_QUEUED`]). If the same incarnation attaches again within the grace period, it is
//! answered `resumed: true` and the queue is flushed, in order: nothing is lost. If the grace
//! period runs out (or the queue overflows, or another incarnation of the node attaches), the
//! edge's participants leave the rooms as if they had left themselves, and a later attach is
//! answered `resumed: false`.
//!
//! A malformed frame stops that link's control stream with a goodbye naming the error (the link
//! layer does that) and the link counts as dropped; every other link goes on.

use crate::media_hook::{is_media_control, LinkId, MediaSide};
use anyhow::Context;
use cascade_proto::link::{ControlMessage, GoodbyeCode, Hello, Label, NodeRole, PROTOCOL_VERSION};
use cascade_proto::quic::{LinkConfig, LinkEndpoint, LinkError, NodeCredentials};
use cascade_proto::room::{EdgeId, EdgeToOrigin, OriginToEdge};
use cascade_proto::{RoomId, TrackId};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a dropped edge's participants stay in their rooms (see the module docs).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Messages queued for an edge whose link is down before it is given up early.
pub const MAX_QUEUED: usize = 65_536;
/// How long a link whose control stream ended stays open for the peer to read the goodbye and
/// close it itself.
const LINGER: Duration = Duration::from_secs(2);
/// Messages queued for a link's writer before the link counts as stuck and is closed.
const LINK_QUEUE: usize = 16_384;

/// What `kcs origin` needs.
pub struct OriginSettings {
    /// QUIC listen address for cascade links.
    pub cascade: SocketAddr,
    /// HTTP listen address (`/healthz`, `/metrics`).
    pub http: SocketAddr,
    pub node: Label,
    pub region: Label,
    pub credentials: NodeCredentials,
    pub grace: Duration,
    pub rooms: origin::RoomConfig,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct OriginMetrics {
    pub links: AtomicI64,
    pub links_accepted: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub links_refused: AtomicU64,
    pub edges: AtomicI64,
    pub edges_in_grace: AtomicI64,
    pub edges_expired: AtomicU64,
    pub edges_resumed: AtomicU64,
    pub rooms: AtomicI64,
    pub participants: AtomicI64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
}

impl OriginMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut series = |name: &str, kind: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP kcs_origin_{name} {help}");
            let _ = writeln!(out, "# TYPE kcs_origin_{name} {kind}");
            let _ = writeln!(out, "kcs_origin_{name} {v}");
        };
        series("links", "gauge", "Edge links up", self.links.load(Relaxed));
        series(
            "links_accepted_total",
            "counter",
            "Edge links that completed the handshake",
            self.links_accepted.load(Relaxed) as i64,
        );
        series("handshakes_failed_total", "counter", "Connection attempts refused or failed during the handshake (bad certificate, version, hello)", self.handshakes_failed.load(Relaxed) as i64);
        series(
            "links_refused_total",
            "counter",
            "Links whose control stream was closed for a protocol error",
            self.links_refused.load(Relaxed) as i64,
        );
        series(
            "edges",
            "gauge",
            "Edges known (linked or within the grace period)",
            self.edges.load(Relaxed),
        );
        series(
            "edges_in_grace",
            "gauge",
            "Edges whose link is down, participants kept",
            self.edges_in_grace.load(Relaxed),
        );
        series("edges_expired_total", "counter", "Edges given up (grace period over, queue overflow or restart): their participants left", self.edges_expired.load(Relaxed) as i64);
        series(
            "edges_resumed_total",
            "counter",
            "Reconnects within the grace period",
            self.edges_resumed.load(Relaxed) as i64,
        );
        series(
            "rooms",
            "gauge",
            "Rooms this origin is authoritative for",
            self.rooms.load(Relaxed),
        );
        series(
            "participants",
            "gauge",
            "Participants in this origin's rooms",
            self.participants.load(Relaxed),
        );
        series(
            "room_messages_in_total",
            "counter",
            "Room messages received from edges",
            self.messages_in.load(Relaxed) as i64,
        );
        series(
            "room_messages_out_total",
            "counter",
            "Room messages sent (or queued) to edges",
            self.messages_out.load(Relaxed) as i64,
        );
        out
    }
}

/// A running origin.
pub struct RunningOrigin {
    pub cascade: SocketAddr,
    pub http: SocketAddr,
    pub metrics: Arc<OriginMetrics>,
    pub server: tokio::task::JoinHandle<()>,
}

enum CoreInput {
    LinkUp {
        link: LinkId,
        node: Label,
        out: mpsc::Sender<ControlMessage>,
    },
    Message {
        link: LinkId,
        msg: EdgeToOrigin,
    },
    LinkDown {
        link: LinkId,
    },
}

/// Binds the QUIC endpoint and HTTP, and starts serving.
pub async fn start(
    settings: OriginSettings,
    media: Arc<dyn MediaSide>,
) -> anyhow::Result<RunningOrigin> {
    let hello = Hello {
        node: settings.node.clone(),
        region: settings.region.clone(),
        role: NodeRole::Origin,
        version: PROTOCOL_VERSION,
    };
    let endpoint = Arc::new(
        LinkEndpoint::bind(
            settings.cascade,
            &settings.credentials,
            LinkConfig::new(hello),
        )
        .with_context(|| format!("binding the cascade endpoint {}", settings.cascade))?,
    );
    let cascade = endpoint.local_addr()?;
    let metrics = Arc::new(OriginMetrics::default());
    let (core_tx, core_rx) = mpsc::channel::<CoreInput>(16_384);
    tokio::spawn(run_core(
        core_rx,
        origin::Origin::new(settings.rooms),
        settings.grace,
        metrics.clone(),
        media.clone(),
    ));
    {
        let (endpoint, metrics, media) = (endpoint.clone(), metrics.clone(), media.clone());
        tokio::spawn(async move {
            while let Some(pending) = endpoint.accept().await {
                let (core_tx, metrics, media) = (core_tx.clone(), metrics.clone(), media.clone());
                tokio::spawn(async move {
                    let remote = pending.remote_address();
                    match pending.handshake().await {
                        Ok(link) => serve_link(link, core_tx, media, metrics).await,
                        Err(e) => {
                            metrics.handshakes_failed.fetch_add(1, Relaxed);
                            tracing::warn!(%remote, error = %e, "cascade handshake failed");
                        }
                    }
                });
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(settings.http)
        .await
        .with_context(|| format!("binding HTTP {}", settings.http))?;
    let http = listener.local_addr()?;
    let app = {
        use axum::routing::get;
        let (m, media) = (metrics.clone(), media.clone());
        axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/metrics",
                get(move || {
                    let body = m.render() + &media.render_metrics();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            body,
                        )
                    }
                }),
            )
    };
    let server = tokio::spawn(async move {
        let _endpoint = endpoint; // the QUIC endpoint lives as long as the server
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(node = %settings.node, %cascade, %http, "origin listening");
    Ok(RunningOrigin {
        cascade,
        http,
        metrics,
        server,
    })
}

/// The origin's media side: the cascade relay (`cascade_proto::relay`) over the QUIC links. The
/// core tells it which link each track's publisher is behind ([`MediaSide::track_source`]).
#[derive(Clone)]
pub struct OriginRelay(pub cascade_proto::quic::RelayNode);

impl OriginRelay {
    pub fn new() -> Self {
        Self(cascade_proto::quic::RelayNode::new(
            cascade_proto::relay::RelayConfig::default(),
        ))
    }
}

impl Default for OriginRelay {
    fn default() -> Self {
        Self::new()
    }
}

impl MediaSide for OriginRelay {
    fn link_up(
        &self,
        link: LinkId,
        _peer: &Hello,
        control: mpsc::Sender<ControlMessage>,
        media: cascade_proto::quic::MediaChannel,
    ) {
        self.0
            .link_up(cascade_proto::relay::LinkId(link), control, media);
    }

    fn on_control(&self, link: LinkId, msg: ControlMessage) {
        let name = msg.name();
        if let Err(e) = self.0.on_control(cascade_proto::relay::LinkId(link), msg) {
            tracing::warn!(link, message = name, error = %e, "cascade media control refused");
        }
    }

    fn link_down(&self, link: LinkId) {
        self.0.link_down(cascade_proto::relay::LinkId(link));
    }

    fn render_metrics(&self) -> String {
        let c = self.0.counters();
        let mut out = String::new();
        for (name, help, v) in [
            ("datagrams_in_total", "Media datagrams received from links", c.datagrams_in),
            ("datagrams_out_total", "Media datagram copies sent to downstream links", c.datagrams_out),
            ("malformed_total", "Datagrams that did not decode", c.malformed),
            ("unsolicited_total", "Datagrams on a flow not subscribed on that link (or from a node that is not the track's source): dropped", c.unsolicited),
            ("unwanted_layer_total", "Datagrams of a layer not subscribed upstream: dropped", c.unwanted_layer),
            ("keyframe_requests_in_total", "Keyframe requests from downstream links", c.keyframe_requests_in),
            ("keyframe_requests_up_total", "Keyframe requests sent upstream", c.keyframe_requests_up),
            ("keyframe_requests_coalesced_total", "Keyframe requests absorbed by a recent upstream one", c.keyframe_requests_coalesced),
            ("nacked_total", "Packets NACKed by downstream links", c.nacked),
            ("retransmitted_total", "NACKed packets answered from the relay's cache", c.retransmitted),
            ("nacks_up_total", "NACKed packets asked for upstream", c.nacks_up),
        ] {
            let _ = writeln!(out, "# HELP kcs_relay_{name} {help}");
            let _ = writeln!(out, "# TYPE kcs_relay_{name} counter");
            let _ = writeln!(out, "kcs_relay_{name} {v}");
        }
        // The relay's own share of a cascade hop: the same series an edge exports for what it
        // relays to child edges (an origin has no local subscribers).
        let name = "kcs_cascade_residence_seconds";
        crate::metrics::histogram_header(&mut out, name, crate::metrics::CASCADE_RESIDENCE_HELP);
        let r = self.0.residence();
        crate::metrics::histogram_series(&mut out, name, "to=\"links\"", r.buckets(), r.sum_us());
        out
    }

    fn track_source(&self, room: &RoomId, track: TrackId, source: Option<LinkId>) {
        match source {
            Some(l) => {
                self.0
                    .set_track_source(room.clone(), track, cascade_proto::relay::LinkId(l))
            }
            None => self.0.remove_track(room, track),
        }
    }
}

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// Runs one accepted link until it drops.
async fn serve_link(
    link: cascade_proto::quic::Link,
    core: mpsc::Sender<CoreInput>,
    media: Arc<dyn MediaSide>,
    metrics: Arc<OriginMetrics>,
) {
    let link_id: LinkId = NEXT_LINK.fetch_add(1, Relaxed);
    let cascade_proto::quic::Link {
        peer,
        mut sender,
        mut receiver,
        media: channel,
    } = link;
    if peer.role != NodeRole::Edge {
        let _ = sender
            .goodbye(GoodbyeCode::BadHello, "an origin links only with edges")
            .await;
        return;
    }
    metrics.links_accepted.fetch_add(1, Relaxed);
    metrics.links.fetch_add(1, Relaxed);
    tracing::info!(link = link_id, edge = %peer.node, region = %peer.region, "edge linked");
    let (out_tx, mut out_rx) = mpsc::channel::<ControlMessage>(LINK_QUEUE);
    let _ = core
        .send(CoreInput::LinkUp {
            link: link_id,
            node: peer.node.clone(),
            out: out_tx.clone(),
        })
        .await;
    media.link_up(link_id, &peer, out_tx.clone(), channel.clone());
    // The writer: the one owner of the control stream's sending half. A goodbye is the last
    // thing it sends.
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if let ControlMessage::Goodbye { code, reason } = &msg {
                let _ = sender.goodbye(*code, reason).await;
                return;
            }
            if let Err(e) = sender.send(&msg).await {
                tracing::debug!(link = link_id, error = %e, "edge link write failed");
                return;
            }
        }
    });
    let why = loop {
        match receiver.recv().await {
            Ok(ControlMessage::ToOrigin(msg)) => {
                metrics.messages_in.fetch_add(1, Relaxed);
                if core
                    .send(CoreInput::Message { link: link_id, msg })
                    .await
                    .is_err()
                {
                    break "origin shutting down".to_string();
                }
            }
            Ok(m) if is_media_control(&m) => media.on_control(link_id, m),
            Ok(ControlMessage::Goodbye { code, reason }) => {
                break format!("edge said goodbye ({code:?}): {reason}")
            }
            Ok(ControlMessage::Drain { .. }) => {}
            Ok(other) => {
                metrics.links_refused.fetch_add(1, Relaxed);
                let reason = format!("an edge does not send {}", other.name());
                let _ = out_tx
                    .send(ControlMessage::Goodbye {
                        code: GoodbyeCode::ProtocolError,
                        reason: reason.clone(),
                    })
                    .await;
                break reason;
            }
            Err(LinkError::Malformed(e)) => {
                metrics.links_refused.fetch_add(1, Relaxed);
                // What `ControlSender::refuse` says, through the writer that owns the sender.
                let _ = out_tx
                    .send(ControlMessage::Goodbye {
                        code: GoodbyeCode::ProtocolError,
                        reason: format!("control stream closed (code 0x{:x}): {e}", e.code()),
                    })
                    .await;
                break format!("malformed frame: {e}");
            }
            Err(e) => break e.to_string(),
        }
    };
    tracing::info!(link = link_id, edge = %peer.node, reason = %why, "edge link down");
    metrics.links.fetch_sub(1, Relaxed);
    media.link_down(link_id);
    let _ = core.send(CoreInput::LinkDown { link: link_id }).await;
    // Let the goodbye go out and be read, then free the connection: its only stream is gone.
    // (Closing at once would discard the goodbye unread.)
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    let _ = tokio::time::timeout(LINGER, channel.closed()).await;
    channel.close(GoodbyeCode::ProtocolError, &why);
}

struct LinkEntry {
    node: Label,
    out: mpsc::Sender<ControlMessage>,
    edge: Option<EdgeId>,
}

struct EdgeEntry {
    node: Label,
    incarnation: u64,
    link: Option<LinkId>,
    down_since: Option<Instant>,
    queue: VecDeque<OriginToEdge>,
}

struct Core {
    origin: origin::Origin,
    links: HashMap<LinkId, LinkEntry>,
    edges: HashMap<EdgeId, EdgeEntry>,
    by_node: HashMap<Label, EdgeId>,
    next_edge: u32,
    grace: Duration,
    metrics: Arc<OriginMetrics>,
    media: Arc<dyn MediaSide>,
    /// What the media side was last told about each track's publisher link.
    sources: HashMap<(RoomId, TrackId), LinkId>,
}

async fn run_core(
    mut rx: mpsc::Receiver<CoreInput>,
    origin: origin::Origin,
    grace: Duration,
    metrics: Arc<OriginMetrics>,
    media: Arc<dyn MediaSide>,
) {
    let mut core = Core {
        origin,
        links: HashMap::new(),
        edges: HashMap::new(),
        by_node: HashMap::new(),
        next_edge: 1,
        grace,
        metrics,
        media,
        sources: HashMap::new(),
    };
    let mut presence = tokio::time::interval(origin::PRESENCE_BATCH);
    presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            input = rx.recv() => match input {
                Some(input) => {
                    let tracks_may_move = core.handle(input);
                    if tracks_may_move { core.sync_track_sources(); }
                }
                None => return,
            },
            _ = presence.tick() => {
                let out = core.origin.tick();
                core.deliver(out);
                core.expire(Instant::now());
                core.sync_track_sources();
                core.metrics.rooms.store(core.origin.room_count() as i64, Relaxed);
                core.metrics.participants.store(core.origin.participant_count() as i64, Relaxed);
            }
        }
    }
}

impl Core {
    /// Tells the media side which link each track's publisher is behind, where that changed.
    /// Runs on link changes, track changes and every presence tick: a scan of the rooms'
    /// tracks and participants, which is small next to the room messages themselves.
    fn sync_track_sources(&mut self) {
        let mut now: HashMap<(RoomId, TrackId), LinkId> = HashMap::new();
        for id in self.origin.room_ids() {
            let Some(room) = self.origin.room(id) else {
                continue;
            };
            let mut tracks = room.tracks().peekable();
            if tracks.peek().is_none() {
                continue;
            }
            let edge_of: HashMap<_, _> = room.participants().map(|p| (p.id, p.edge)).collect();
            for t in tracks {
                let link = edge_of
                    .get(&t.participant)
                    .and_then(|e| self.edges.get(e))
                    .and_then(|e| e.link);
                if let Some(link) = link {
                    now.insert((id.clone(), t.id), link);
                }
            }
        }
        for ((room, track), link) in &now {
            if self.sources.get(&(room.clone(), *track)) != Some(link) {
                self.media.track_source(room, *track, Some(*link));
            }
        }
        for (room, track) in self.sources.keys() {
            if !now.contains_key(&(room.clone(), *track)) {
                self.media.track_source(room, *track, None);
            }
        }
        self.sources = now;
    }

    /// Handles one input; returns whether tracks' publisher links may have changed.
    fn handle(&mut self, input: CoreInput) -> bool {
        match input {
            CoreInput::LinkUp { link, node, out } => {
                self.links.insert(
                    link,
                    LinkEntry {
                        node,
                        out,
                        edge: None,
                    },
                );
                false
            }
            CoreInput::LinkDown { link } => {
                let Some(entry) = self.links.remove(&link) else {
                    return false;
                };
                if let Some(e) = entry.edge.and_then(|id| self.edges.get_mut(&id)) {
                    if e.link == Some(link) {
                        e.link = None;
                        e.down_since = Some(Instant::now());
                        self.metrics.edges_in_grace.fetch_add(1, Relaxed);
                        tracing::info!(edge = %e.node, grace = ?self.grace, "edge link down; keeping its participants for the grace period");
                    }
                }
                true
            }
            CoreInput::Message { link, msg } => {
                let Some(entry) = self.links.get(&link) else {
                    return false;
                };
                match (msg, entry.edge) {
                    (EdgeToOrigin::Attach { incarnation }, None) => {
                        self.attach(link, incarnation);
                        true
                    }
                    (EdgeToOrigin::Attach { .. }, Some(_)) => {
                        self.refuse(link, "a second attach on one link");
                        false
                    }
                    (EdgeToOrigin::Request { .. } | EdgeToOrigin::Restore { .. }, None) => {
                        self.refuse(link, "a request before attach");
                        false
                    }
                    (msg @ EdgeToOrigin::Restore { .. }, Some(edge)) => {
                        // An edge rebuilding its rooms here (this origin is new to them): its
                        // participants and their tracks come back, so the relay's track map
                        // changes.
                        let out = self.origin.handle(edge, msg);
                        self.deliver(out);
                        true
                    }
                    (msg @ EdgeToOrigin::Request { .. }, Some(edge)) => {
                        let tracks = matches!(
                            &msg,
                            EdgeToOrigin::Request {
                                intent: cascade_proto::room::Intent::Publish { .. }
                                    | cascade_proto::room::Intent::Unpublish { .. }
                                    | cascade_proto::room::Intent::Leave { .. }
                                    | cascade_proto::room::Intent::Remove { .. }
                                    | cascade_proto::room::Intent::Close { .. },
                                ..
                            }
                        );
                        let out = self.origin.handle(edge, msg);
                        self.deliver(out);
                        tracks
                    }
                }
            }
        }
    }

    fn refuse(&mut self, link: LinkId, reason: &str) {
        self.metrics.links_refused.fetch_add(1, Relaxed);
        if let Some(entry) = self.links.get(&link) {
            tracing::warn!(link, edge = %entry.node, reason, "refusing an edge link");
            let _ = entry.out.try_send(ControlMessage::Goodbye {
                code: GoodbyeCode::ProtocolError,
                reason: reason.to_string(),
            });
        }
    }

    fn attach(&mut self, link: LinkId, incarnation: u64) {
        let node = self.links[&link].node.clone();
        let existing = self.by_node.get(&node).copied();
        let resumed = match existing {
            Some(id) if self.edges[&id].incarnation == incarnation => true,
            Some(id) => {
                tracing::info!(edge = %node, "edge restarted; its previous participants leave");
                self.give_up(id);
                false
            }
            None => false,
        };
        let id = if resumed {
            existing.expect("resumed implies known")
        } else {
            let id = EdgeId(self.next_edge);
            self.next_edge += 1;
            self.edges.insert(
                id,
                EdgeEntry {
                    node: node.clone(),
                    incarnation,
                    link: None,
                    down_since: None,
                    queue: VecDeque::new(),
                },
            );
            self.by_node.insert(node.clone(), id);
            self.metrics.edges.fetch_add(1, Relaxed);
            id
        };
        let entry = self.edges.get_mut(&id).expect("just ensured");
        if let Some(old) = entry.link.replace(link) {
            // The edge redialled before we noticed its old link was dead.
            if let Some(l) = self.links.get_mut(&old) {
                l.edge = None;
            }
        }
        if entry.down_since.take().is_some() {
            self.metrics.edges_in_grace.fetch_sub(1, Relaxed);
        }
        if resumed {
            self.metrics.edges_resumed.fetch_add(1, Relaxed);
        }
        let queued: Vec<OriginToEdge> = entry.queue.drain(..).collect();
        self.links.get_mut(&link).expect("checked by caller").edge = Some(id);
        tracing::info!(edge = %node, edge_id = id.0, resumed, queued = queued.len(), "edge attached");
        self.send(id, OriginToEdge::Attached { resumed });
        for m in queued {
            self.send(id, m);
        }
    }

    fn deliver(&mut self, out: Vec<origin::Outgoing>) {
        for o in out {
            self.send(o.edge, o.message);
        }
    }

    fn send(&mut self, edge: EdgeId, msg: OriginToEdge) {
        let Some(entry) = self.edges.get_mut(&edge) else {
            return; // given up: its participants are already gone
        };
        self.metrics.messages_out.fetch_add(1, Relaxed);
        if let Some(link) = entry.link {
            let out = &self.links[&link].out;
            match out.try_send(ControlMessage::ToEdge(msg)) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(edge = %entry.node, "edge link too slow; closing it");
                    let _ = out.try_send(ControlMessage::Goodbye {
                        code: GoodbyeCode::ProtocolError,
                        reason: "too slow to read room events".into(),
                    });
                    // From here the edge misses messages: it must start over.
                    self.give_up(edge);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(ControlMessage::ToEdge(msg))) => {
                    // The link is going down; its LinkDown is on the way. Queue meanwhile.
                    entry.link = None;
                    entry.down_since = Some(Instant::now());
                    self.metrics.edges_in_grace.fetch_add(1, Relaxed);
                    entry.queue.push_back(msg);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => unreachable!("we sent a ToEdge"),
            }
        } else {
            entry.queue.push_back(msg);
        }
        if entry.queue.len() > MAX_QUEUED {
            tracing::warn!(edge = %entry.node, "too many events queued for a disconnected edge");
            self.give_up(edge);
        }
    }

    /// Gives up edges whose grace period is over.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<EdgeId> = self
            .edges
            .iter()
            .filter(|(_, e)| {
                e.down_since
                    .is_some_and(|t| now.duration_since(t) >= self.grace)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            tracing::info!(edge = %self.edges[&id].node, "edge did not come back within the grace period; its participants leave");
            self.give_up(id);
        }
    }

    /// Forgets an edge: its participants leave their rooms.
    fn give_up(&mut self, id: EdgeId) {
        let Some(entry) = self.edges.remove(&id) else {
            return;
        };
        if self.by_node.get(&entry.node) == Some(&id) {
            self.by_node.remove(&entry.node);
        }
        if let Some(l) = entry.link.and_then(|l| self.links.get_mut(&l)) {
            l.edge = None;
        }
        if entry.down_since.is_some() {
            self.metrics.edges_in_grace.fetch_sub(1, Relaxed);
        }
        self.metrics.edges.fetch_sub(1, Relaxed);
        self.metrics.edges_expired.fetch_add(1, Relaxed);
        let out = self.origin.drop_edge(id, origin::unix_millis());
        self.deliver(out);
    }
}
