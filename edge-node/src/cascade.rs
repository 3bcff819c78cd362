//! The edge's media side of cascade links: which of this edge's publications go up which link,
//! and which remote tracks come down as relayed publications.
//!
//! The link task (one per QUIC connection, owned by the control side) calls
//! [`CascadeMedia::link_up`] with the link's control sender and [`MediaChannel`],
//! [`CascadeMedia::on_control`] for every media control message it reads (subscribe,
//! unsubscribe, keyframe_request, layer_demand, nack, stats), and [`CascadeMedia::link_down`].
//! Sessions call [`CascadeMedia::ensure_remote`] when a participant consumes a track that is
//! not published on this edge, and [`CascadeMedia::release_remote`] when it stops.
//!
//! Two directions, one shard each way (a room lives on one shard, so all of this is per room):
//!
//! - **Up (link sinks).** A peer's `subscribe(flow, room, track, layer)` for a publication on
//!   this edge becomes [`Command::AddLinkSink`] on the room's shard: the shard queues a copy of
//!   every packet of that layer, as plaintext RTP in a datagram stamped with the peer's flow,
//!   and its shell sends the batch on the link ([`LinkChannels::send`]). `layer_demand` narrows
//!   which subscribed layers have sinks; `keyframe_request` becomes a PLI at the publisher (rate
//!   limited by the shard); `nack` is answered from the shard's packet cache. A subscribe for a
//!   track the session has not registered here yet waits for it ([`Early`]): the origin may
//!   relay one before this edge's session has the origin's answer to its `publish`.
//! - **Down (relayed publications).** A remote track a local participant consumes becomes
//!   [`Command::AddRelayedPublication`] on the room's shard plus a `subscribe` per layer on the
//!   room's upstream link, with a flow id this edge picks. A reader task per link decodes the
//!   datagrams, maps `(link, flow)` to `(shard, publication)` and hands them to the shard in
//!   batches ([`ShardInput::Relayed`]); the shard forwards them like any publication (selector,
//!   rewrite, SRTP per subscriber). Its NACKs and keyframe requests come back as
//!   [`CascadeRequest`]s and go up the link as `nack` / `keyframe_request`.
//! - **Layer demand.** The shard also says which layers of a relayed publication anyone here
//!   wants ([`CascadeRequest::LayerDemand`], the rule is on `ShardCore::layer_demand`: layers
//!   up to the highest max layer of its unpaused subscribers, plus what child edges take, layer
//!   0 whenever anyone consumes it, nothing when everyone paused) and this module sends it up
//!   the flow as `layer_demand`, so the link carries only those layers. We keep subscribing
//!   every layer and narrow with `layer_demand` rather than subscribing only the wanted layers:
//!   the flow stays bound while demand moves (an empty demand would otherwise be the last
//!   `unsubscribe`, which ends the flow and, at a parent edge, the relayed publication it
//!   holds), a change is one message whatever the number of layers it moves, and upstream
//!   already honours it (the origin's relay, a parent edge's
//!   sinks). The demand is kept per relayed publication and sent again after the `subscribe`s
//!   of every new flow (a link back up, a move to another parent or origin: upstream then
//!   starts from "all layers" for a moment, not for good). It goes out only once those
//!   subscribes are queued, and with `try_send` under the state lock, so upstream never sees
//!   it for an unknown flow and the last one it sees is the current one.
//!
//! Along a room's fan-out tree ([`crate::tree`]) the same two directions serve more peers:
//!
//! - **Child edges** ([`CascadeMedia::child_link_up`]) subscribe like the origin does, and may
//!   also name a track this edge does not receive yet: if the edge follows the room (the
//!   [`TrackLookup`] knows the track) it creates the relayed publication as for a local
//!   consumer and adds the child's sink to it. A child's sink holds the relayed publication
//!   like a local consumer (one count), so each (track, layer) crosses each link once and fans
//!   out here. Anything else is answered `subscribe_refused` with the reason.
//! - **Media parents**: a room's remote tracks come down its parent edge's link while that is up
//!   ([`CascadeMedia::set_room_parent`], [`CascadeMedia::parent_link_up`]), else its origin's
//!   ([`CascadeMedia::set_room_link`]). When the parent's link drops, the room's tracks are
//!   subscribed on the origin link at once; when it is back they move back.
//!
//! When a link goes down, its sinks are removed and the relayed publications it fed stall (the
//! subscribers keep their transports and subscriptions); when a link with the same id comes back
//! up, or [`CascadeMedia::set_room_link`] names another link for the room, they are subscribed
//! again, and the first packets through ask for a keyframe.
//!
//! State lives behind one short `std::sync::Mutex` (never held across an `.await`): commands
//! for shards and messages for links are collected under the lock and sent after it.

use crate::edge::LocalPublication;
use crate::metrics::Metrics;
use crate::sdp::{Codec, MediaKind};
use crate::sfu::{
    CascadeRequest, Command, LinkId, MediaCodec, PublicationId, RelayedPublicationSpec,
};
use crate::udp::{RelayedPacket, ShardInput, Shards};
use crate::uplink::OriginAddr;
use bytes::Bytes;
use cascade_proto::link::{ControlMessage, FlowId, Layer, LayerSet, NackEntry, MAX_NACK_ENTRIES};
use cascade_proto::quic::MediaChannel;
use cascade_proto::room::TrackInfo;
use cascade_proto::{RoomId, TrackId, TrackKind};
use futures_util::FutureExt;
use kcs_media::codec::VideoCodec;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

/// Datagrams a link reader takes in one go before handing them to shards: enough to amortise
/// the shard inbox send over a burst (a keyframe is tens of packets), small enough to keep
/// latency at one scheduling pass.
const READ_BATCH: usize = 64;
/// Cascade requests (NACKs, keyframe requests of relayed publications) queued from shards.
const REQUEST_QUEUE: usize = 1024;
/// How long a subscription a parent edge refused waits before it is tried again (the parent
/// may not have heard of a just-published track yet).
const REFUSED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// Publication ids of relayed publications live in their own range, apart from the edge's
/// counter, so the two never collide.
const RELAYED_ID_BASE: u64 = 1 << 62;
/// Subscribes waiting for a track this edge has not registered yet ([`Early`]), over all
/// links: far more than a room's publishers announce at once, small enough that a peer naming
/// tracks that never come cannot grow the edge's memory.
const MAX_EARLY_SUBSCRIBES: usize = 4096;

/// A subscribe from upstream (the origin, or any peer that is not a child edge) for a track
/// this edge has not registered yet. The origin learns of a local track from this edge's
/// `publish` request and may relay a subscribe for it before the session here has the origin's
/// reply and registers the publication: under load that window is tens of milliseconds, and a
/// subscribe dropped in it left the track dark upstream for good (the origin subscribes once).
/// Kept per flow until the track is registered ([`CascadeMedia::local_published`]), the peer
/// unsubscribes, or the link ends.
struct Early {
    room: RoomId,
    track: TrackId,
    layers: LayerSet,
    demand: Option<LayerSet>,
}

/// Media channels of the links that are up, shared with the shard shells (which send queued
/// datagrams) and the link readers (which map flows to relayed publications).
pub struct LinkChannels {
    channels: RwLock<HashMap<LinkId, MediaChannel>>,
    /// `(link, our flow)` → (shard, relayed publication).
    flows: RwLock<HashMap<(LinkId, FlowId), (usize, PublicationId)>>,
    requests: mpsc::Sender<CascadeRequest>,
    requests_rx: Mutex<Option<mpsc::Receiver<CascadeRequest>>>,
    metrics: Arc<Metrics>,
}

impl LinkChannels {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        Self {
            channels: RwLock::new(HashMap::new()),
            flows: RwLock::new(HashMap::new()),
            requests: tx,
            requests_rx: Mutex::new(Some(rx)),
            metrics,
        }
    }

    /// Sends one encoded datagram on `link` (called by shard shells for each queued copy).
    pub fn send(&self, link: LinkId, datagram: &[u8]) {
        let sent = read(&self.channels)
            .get(&link)
            .map(|c| c.send_encoded(datagram).is_ok());
        if sent != Some(true) {
            self.metrics.cascade.send_failures.fetch_add(1, Relaxed);
        }
    }

    /// Queues a relayed publication's request for the cascade (from a shard shell). Dropped
    /// when the queue is full (or the cascade is gone) and handed back: NACKs and keyframe
    /// requests are retried by the shard; a layer demand is not (the shard emits one only when
    /// the demand changes, so upstream keeps the previous one until the next change) and is
    /// counted in `layer_demand_failures`, for the shell to log with its room.
    pub fn request(&self, r: CascadeRequest) -> Result<(), CascadeRequest> {
        self.requests.try_send(r).map_err(|e| {
            let r = e.into_inner();
            if matches!(r, CascadeRequest::LayerDemand { .. }) {
                self.metrics
                    .cascade
                    .layer_demand_failures
                    .fetch_add(1, Relaxed);
            }
            r
        })
    }
}

/// A peer's subscription to a publication on this edge (local or relayed).
#[derive(Debug, Clone)]
struct Sink {
    shard: usize,
    publication: PublicationId,
    subscribed: LayerSet,
    demand: Option<LayerSet>,
    /// Layers with a sink in the shard now.
    active: LayerSet,
}

impl Sink {
    fn wanted(&self) -> LayerSet {
        LayerSet(self.subscribed.0 & self.demand.map_or(u8::MAX, |d| d.0))
    }
}

/// A remote track received through a link.
#[derive(Debug, Clone)]
struct Relayed {
    shard: usize,
    publication: PublicationId,
    /// The link it comes through and our flow there; `None` while stalled.
    via: Option<(LinkId, FlowId)>,
    layers: u8,
    /// Local consumers ([`CascadeMedia::ensure_remote`] minus `release_remote`).
    users: usize,
    /// The layers wanted on this edge, as the shard last said
    /// ([`CascadeRequest::LayerDemand`]); `None` until it says.
    demand: Option<LayerSet>,
    /// The demand sent upstream on the current flow (`None`: none yet, so upstream sends all
    /// subscribed layers).
    demand_sent: Option<LayerSet>,
    /// The current flow's `subscribe`s are in the link's control queue, so a `layer_demand`
    /// sent now reaches upstream after them (before, it would name an unknown flow there).
    announced: bool,
}

struct LinkEntry {
    control: mpsc::Sender<ControlMessage>,
    reader: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    links: HashMap<LinkId, LinkEntry>,
    sinks: HashMap<(LinkId, FlowId), Sink>,
    relayed: HashMap<(RoomId, TrackId), Relayed>,
    relayed_by_publication: HashMap<PublicationId, (RoomId, TrackId)>,
    /// The link each room's media comes down now: its media parent's link while that is up,
    /// else its origin's ([`media_link`]).
    room_links: HashMap<RoomId, LinkId>,
    /// The link to each room's origin (room state; media when no edge parent is up).
    origin_links: HashMap<RoomId, LinkId>,
    /// Rooms whose media parent is another edge of the fan-out tree: that edge.
    parents: HashMap<RoomId, OriginAddr>,
    /// The link up now to each parent edge.
    parent_links: HashMap<OriginAddr, LinkId>,
    /// Rooms whose parent edge refused a subscription (it does not follow the room, or not yet
    /// the track): their media comes from the origin until the parent's link comes up again or
    /// the room gets a parent anew.
    parent_refused: HashSet<RoomId>,
    /// Links from child edges: their subscribes may pull tracks from upstream.
    children: HashSet<LinkId>,
    /// Child sinks that hold a relayed publication (each counts once in its `users`).
    holds: HashMap<(LinkId, FlowId), (RoomId, TrackId)>,
    /// Upstream subscribes that came before their track was registered here.
    early: HashMap<(LinkId, FlowId), Early>,
    next_flow: u32,
    next_publication: u64,
}

/// What to do after the lock is released.
#[derive(Default)]
struct Effects {
    commands: Vec<(usize, Command)>,
    control: Vec<(mpsc::Sender<ControlMessage>, ControlMessage)>,
    /// Relayed publications subscribed on a new flow here: once the subscribes are queued,
    /// their demand follows ([`CascadeMedia::apply`]).
    announce: Vec<((RoomId, TrackId), (LinkId, FlowId))>,
}

/// What a link task posts from code that cannot await ([`CascadeMedia::post`]).
pub enum LinkInput {
    Up {
        link: LinkId,
        control: mpsc::Sender<ControlMessage>,
        media: MediaChannel,
    },
    Control {
        link: LinkId,
        msg: ControlMessage,
    },
    Down {
        link: LinkId,
    },
}

/// What the edge knows of a room's track: `None` when it has no participants in the room (so
/// it does not follow the room's state), `Some(None)` when the room has no such track.
pub type TrackLookup = Arc<dyn Fn(&RoomId, TrackId) -> Option<Option<TrackInfo>> + Send + Sync>;

/// The edge's media side of its cascade links. See the module docs.
pub struct CascadeMedia {
    shards: Shards,
    tracks: TrackLookup,
    publications: Arc<Mutex<HashMap<(RoomId, TrackId), LocalPublication>>>,
    state: Mutex<State>,
    /// Ordered inputs posted by synchronous callers, applied by one task (started on first use).
    posted: Mutex<Option<mpsc::UnboundedSender<LinkInput>>>,
}

impl CascadeMedia {
    /// `publications` is the edge's registry of publications (shared with [`crate::edge::Edge`]):
    /// a peer's subscribe finds local tracks there, and relayed ones are added to it so sessions
    /// consume them like local ones.
    /// `tracks` tells what a child edge may subscribe to that is not here yet.
    pub fn new(
        shards: Shards,
        publications: Arc<Mutex<HashMap<(RoomId, TrackId), LocalPublication>>>,
        tracks: TrackLookup,
    ) -> Self {
        Self {
            shards,
            tracks,
            publications,
            state: Mutex::new(State {
                next_flow: 1,
                next_publication: RELAYED_ID_BASE,
                ..Default::default()
            }),
            posted: Mutex::new(None),
        }
    }

    /// [`link_up`](Self::link_up), [`on_control`](Self::on_control) and
    /// [`link_down`](Self::link_down) for callers that cannot await (a link task's synchronous
    /// callbacks): applied in the order posted, by one task. Needs a tokio runtime. The queue is
    /// unbounded because it carries control messages only, which the link's QUIC stream flow
    /// control already bounds; media never passes here.
    pub fn post(self: &Arc<Self>, input: LinkInput) {
        let mut posted = lock(&self.posted);
        let tx = posted.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<LinkInput>();
            let this = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(input) = rx.recv().await {
                    let Some(this) = this.upgrade() else { return };
                    match input {
                        LinkInput::Up {
                            link,
                            control,
                            media,
                        } => this.link_up(link, control, media).await,
                        LinkInput::Control { link, msg } => this.on_control(link, msg).await,
                        LinkInput::Down { link } => this.link_down(link).await,
                    }
                }
            });
            tx
        });
        if tx.send(input).is_err() {
            tracing::error!("cascade media task is gone");
        }
    }

    /// Whether a publication id is one of the relayed publications this module creates.
    pub fn is_relayed(id: PublicationId) -> bool {
        id.0 >= RELAYED_ID_BASE
    }

    fn links(&self) -> &Arc<LinkChannels> {
        &self.shards.links
    }

    /// A link is up: its datagrams are read, its peer may subscribe, and relayed publications
    /// that came through a link of this id before (a reconnect) are subscribed again.
    pub async fn link_up(
        self: &Arc<Self>,
        link: LinkId,
        control_out: mpsc::Sender<ControlMessage>,
        media: MediaChannel,
    ) {
        self.start_request_pump();
        write(&self.links().channels).insert(link, media.clone());
        let reader = tokio::spawn(read_link(
            link,
            media,
            self.links().clone(),
            self.shards.clone(),
        ));
        let mut fx = Effects::default();
        {
            let mut st = lock(&self.state);
            if let Some(old) = st.links.insert(
                link,
                LinkEntry {
                    control: control_out,
                    reader,
                },
            ) {
                old.reader.abort();
            }
            // Rooms whose media link this is (again), or whose parent edge this link reaches.
            for room in known_rooms(&st) {
                self.refresh_room(&mut st, &room, &mut fx);
            }
        }
        tracing::info!(%link, "cascade link media up");
        self.apply(fx).await;
    }

    /// A child edge's link is up: served like any link, and its subscribes may also pull
    /// tracks this edge does not receive yet from its own media parent (see the module docs).
    pub async fn child_link_up(
        self: &Arc<Self>,
        link: LinkId,
        control_out: mpsc::Sender<ControlMessage>,
        media: MediaChannel,
    ) {
        lock(&self.state).children.insert(link);
        self.link_up(link, control_out, media).await;
    }

    /// The link to the parent edge `parent` is up: the rooms whose media parent it is move
    /// their remote tracks to it.
    pub async fn parent_link_up(
        self: &Arc<Self>,
        parent: &OriginAddr,
        link: LinkId,
        control_out: mpsc::Sender<ControlMessage>,
        media: MediaChannel,
    ) {
        {
            let mut st = lock(&self.state);
            st.parent_links.insert(parent.clone(), link);
            let State {
                parents,
                parent_refused,
                ..
            } = &mut *st;
            parent_refused.retain(|room| parents.get(room) != Some(parent));
        }
        self.link_up(link, control_out, media).await;
    }

    /// A link is gone: its sinks end, relayed publications it fed stall until it (or another
    /// link for their room) is back.
    pub async fn link_down(&self, link: LinkId) {
        write(&self.links().channels).remove(&link);
        write(&self.links().flows).retain(|(l, _), _| *l != link);
        let mut fx = Effects::default();
        {
            let mut st = lock(&self.state);
            if let Some(entry) = st.links.remove(&link) {
                entry.reader.abort();
            }
            let gone: Vec<((LinkId, FlowId), Sink)> = st
                .sinks
                .iter()
                .filter(|((l, _), _)| *l == link)
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for ((l, flow), sink) in gone {
                st.sinks.remove(&(l, flow));
                if let Some(key) = st.holds.remove(&(l, flow)) {
                    self.release_locked(&mut st, key, &mut fx);
                }
                for layer in layers_of(sink.active) {
                    fx.commands.push((
                        sink.shard,
                        Command::RemoveLinkSink {
                            publication: sink.publication,
                            layer,
                            link,
                            flow,
                        },
                    ));
                }
            }
            let mut stalled = 0;
            for r in st.relayed.values_mut() {
                if r.via.is_some_and(|(l, _)| l == link) {
                    r.via = None;
                    stalled += 1;
                }
            }
            st.children.remove(&link);
            st.early.retain(|(l, _), _| *l != link);
            st.parent_links.retain(|_, l| *l != link);
            // Rooms that took media from this link move to what is left: a parent edge's
            // rooms fall back to their origin at once.
            let moving: Vec<RoomId> = st
                .room_links
                .iter()
                .filter(|(_, l)| **l == link)
                .map(|(r, _)| r.clone())
                .collect();
            for room in moving {
                if st.parents.contains_key(&room) {
                    self.links()
                        .metrics
                        .cascade
                        .parent_fallbacks
                        .fetch_add(1, Relaxed);
                    tracing::warn!(%link, %room, "media parent link lost: the room's media falls back to its origin");
                }
                self.refresh_room(&mut st, &room, &mut fx);
            }
            tracing::info!(%link, stalled, "cascade link media down");
        }
        self.apply(fx).await;
    }

    /// Names the link to a room's origin. The room's remote media comes down it unless an edge
    /// parent's link is up ([`Self::set_room_parent`]).
    pub async fn set_room_link(&self, room: &RoomId, link: LinkId) {
        let mut fx = Effects::default();
        {
            let mut st = lock(&self.state);
            st.origin_links.insert(room.clone(), link);
            self.refresh_room(&mut st, room, &mut fx);
        }
        self.apply(fx).await;
    }

    /// Names a room's media parent: another edge (its link comes from
    /// [`Self::parent_link_up`]), or `None` for the origin. Other rooms are not touched.
    pub async fn set_room_parent(&self, room: &RoomId, parent: Option<OriginAddr>) {
        let mut fx = Effects::default();
        {
            let mut st = lock(&self.state);
            st.parent_refused.remove(room);
            match parent {
                Some(p) => st.parents.insert(room.clone(), p),
                None => st.parents.remove(room),
            };
            self.refresh_room(&mut st, room, &mut fx);
        }
        self.apply(fx).await;
    }

    /// The link `room`'s remote media comes down now, if any (tests, stats).
    pub fn room_media_link(&self, room: &RoomId) -> Option<LinkId> {
        lock(&self.state).room_links.get(room).copied()
    }

    /// Moves `room`'s relayed publications to the link they should come down now
    /// ([`media_link`]) and subscribes the stalled ones there.
    fn refresh_room(&self, st: &mut State, room: &RoomId, fx: &mut Effects) {
        let Some(link) = media_link(st, room) else {
            return;
        };
        let old = st.room_links.insert(room.clone(), link);
        if old != Some(link) {
            if let Some(old) = old {
                tracing::info!(%room, from = %old, to = %link, "room media moves to another link");
            }
            // Unsubscribe from the old way, where it is still up.
            let moving: Vec<(TrackId, Relayed)> = st
                .relayed
                .iter()
                .filter(|((r, _), rel)| r == room && rel.via.is_some_and(|(l, _)| l != link))
                .map(|((_, t), rel)| (*t, rel.clone()))
                .collect();
            for (track, rel) in moving {
                if let Some((old, flow)) = rel.via {
                    write(&self.links().flows).remove(&(old, flow));
                    if let Some(entry) = st.links.get(&old) {
                        for layer in (0..rel.layers).filter_map(Layer::new) {
                            fx.control.push((
                                entry.control.clone(),
                                ControlMessage::Unsubscribe { flow, layer },
                            ));
                        }
                    }
                }
                if let Some(r) = st.relayed.get_mut(&(room.clone(), track)) {
                    r.via = None;
                }
            }
        }
        self.resubscribe_room(st, room, fx);
    }

    /// Tries the stalled relayed publications of `room` again (after a refusal).
    async fn retry_room(&self, room: &RoomId) {
        let mut fx = Effects::default();
        {
            let mut st = lock(&self.state);
            self.resubscribe_room(&mut st, room, &mut fx);
        }
        self.apply(fx).await;
    }

    /// A media control message from `link`'s peer. Messages that are not media control are
    /// ignored (the link task handles them).
    pub async fn on_control(self: &Arc<Self>, link: LinkId, msg: ControlMessage) {
        let mut fx = Effects::default();
        let mut retry = None;
        {
            let mut st = lock(&self.state);
            match msg {
                ControlMessage::Subscribe {
                    flow,
                    room,
                    track,
                    layer,
                } => self.handle_subscribe(&mut st, link, flow, room, track, layer, &mut fx),
                ControlMessage::Unsubscribe { flow, layer } => {
                    if let Some(e) = st.early.get_mut(&(link, flow)) {
                        e.layers = LayerSet(e.layers.0 & !(1u8 << layer.index()));
                        if e.layers.is_empty() {
                            st.early.remove(&(link, flow));
                        }
                    }
                    if let Some(sink) = st.sinks.get_mut(&(link, flow)) {
                        sink.subscribed = LayerSet(sink.subscribed.0 & !(1u8 << layer.index()));
                        sync_sink(sink, link, flow, &mut fx);
                        if sink.subscribed.is_empty() {
                            st.sinks.remove(&(link, flow));
                            if let Some(key) = st.holds.remove(&(link, flow)) {
                                self.release_locked(&mut st, key, &mut fx);
                            }
                        }
                    }
                }
                ControlMessage::LayerDemand { flow, layers } => {
                    if let Some(e) = st.early.get_mut(&(link, flow)) {
                        e.demand = Some(layers);
                    }
                    if let Some(sink) = st.sinks.get_mut(&(link, flow)) {
                        sink.demand = Some(layers);
                        sync_sink(sink, link, flow, &mut fx);
                    }
                }
                ControlMessage::KeyframeRequest { flow, layer } => {
                    if let Some(sink) = st.sinks.get(&(link, flow)) {
                        fx.commands.push((
                            sink.shard,
                            Command::RequestKeyframe {
                                publication: sink.publication,
                                layer: layer.index(),
                            },
                        ));
                    }
                }
                ControlMessage::Nack {
                    flow,
                    layer,
                    entries,
                } => {
                    if let Some(sink) = st.sinks.get(&(link, flow)) {
                        let seqs = entries.iter().flat_map(expand_nack).collect();
                        fx.commands.push((
                            sink.shard,
                            Command::LinkNack {
                                publication: sink.publication,
                                layer: layer.index(),
                                link,
                                flow,
                                seqs,
                            },
                        ));
                    }
                }
                ControlMessage::SubscribeRefused { flow, reason } => {
                    self.links()
                        .metrics
                        .cascade
                        .refusals_received
                        .fetch_add(1, Relaxed);
                    let key = st
                        .relayed
                        .iter()
                        .find(|(_, r)| r.via == Some((link, flow)))
                        .map(|(k, _)| k.clone());
                    match key {
                        Some((room, track)) => {
                            write(&self.links().flows).remove(&(link, flow));
                            if let Some(r) = st.relayed.get_mut(&(room.clone(), track)) {
                                r.via = None;
                            }
                            let from_parent =
                                st.parents.get(&room).and_then(|p| st.parent_links.get(p))
                                    == Some(&link);
                            if from_parent {
                                tracing::warn!(%link, %flow, %room, track = track.0, %reason, "parent edge refused a subscription; the room's media falls back to its origin");
                                st.parent_refused.insert(room.clone());
                                self.refresh_room(&mut st, &room, &mut fx);
                            } else {
                                tracing::warn!(%link, %flow, %room, track = track.0, %reason, retry_in = ?REFUSED_RETRY, "upstream refused a subscription");
                                retry = Some(room);
                            }
                        }
                        None => {
                            tracing::debug!(%link, %flow, %reason, "refusal for a flow no longer wanted")
                        }
                    }
                }
                _ => {}
            }
        }
        self.apply(fx).await;
        if let Some(room) = retry {
            let this = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(REFUSED_RETRY).await;
                if let Some(this) = this.upgrade() {
                    this.retry_room(&room).await;
                }
            });
        }
    }

    /// Tells a peer its subscribe is refused, and counts it.
    fn refuse_subscribe(
        &self,
        st: &State,
        link: LinkId,
        flow: FlowId,
        reason: String,
        fx: &mut Effects,
    ) {
        self.links()
            .metrics
            .cascade
            .subscribes_refused
            .fetch_add(1, Relaxed);
        tracing::warn!(%link, %flow, %reason, "cascade subscribe refused");
        if let Some(entry) = st.links.get(&link) {
            fx.control.push((
                entry.control.clone(),
                ControlMessage::SubscribeRefused { flow, reason },
            ));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_subscribe(
        &self,
        st: &mut State,
        link: LinkId,
        flow: FlowId,
        room: RoomId,
        track: TrackId,
        layer: Layer,
        fx: &mut Effects,
    ) {
        let key = (room.clone(), track);
        let child = st.children.contains(&link);
        let new_sink = !st.sinks.contains_key(&(link, flow));
        if st
            .relayed
            .get(&key)
            .and_then(|r| r.via)
            .is_some_and(|(l, _)| l == link)
        {
            let reason = format!("room {room} track {track} comes to this edge from you");
            self.refuse_subscribe(st, link, flow, reason, fx);
            return;
        }
        let found = lock(&self.publications).get(&key).cloned();
        let publ = match found {
            Some(publ) => {
                // A child's sink keeps a relayed publication alive with the local consumers.
                if child && new_sink && CascadeMedia::is_relayed(publ.id) {
                    if let Some(r) = st.relayed.get_mut(&key) {
                        r.users += 1;
                        st.holds.insert((link, flow), key.clone());
                    }
                }
                publ
            }
            None if child && new_sink => {
                // Not here yet: pull it from this edge's own media parent, once for all.
                let info = match (self.tracks)(&room, track) {
                    None => {
                        let reason = format!("this edge has no participants in room {room}");
                        self.refuse_subscribe(st, link, flow, reason, fx);
                        return;
                    }
                    Some(None) => {
                        let reason = format!("room {room} has no track {track}");
                        self.refuse_subscribe(st, link, flow, reason, fx);
                        return;
                    }
                    Some(Some(info)) => info,
                };
                let Some(publ) = self.ensure_locked(st, &room, &info, fx) else {
                    let reason = format!("this edge has no link toward room {room}'s media");
                    self.refuse_subscribe(st, link, flow, reason, fx);
                    return;
                };
                st.holds.insert((link, flow), key.clone());
                publ
            }
            None if child => {
                let reason = format!("flow {flow} is not bound to room {room} track {track}");
                self.refuse_subscribe(st, link, flow, reason, fx);
                return;
            }
            None => {
                self.park_subscribe(st, link, flow, room, track, layer, fx);
                return;
            }
        };
        let shard = self.shards.shard_of(room.as_str());
        let sink = st.sinks.entry((link, flow)).or_insert(Sink {
            shard,
            publication: publ.id,
            subscribed: LayerSet::default(),
            demand: None,
            active: LayerSet::default(),
        });
        if sink.publication != publ.id {
            tracing::warn!(%link, %flow, "peer rebound a flow to another track; ignored");
            return;
        }
        sink.subscribed = sink.subscribed.with(layer);
        if let Some(d) = sink.demand.as_mut() {
            *d = d.with(layer);
        }
        sync_sink(sink, link, flow, fx);
        // The peer starts decoding at a keyframe.
        fx.commands.push((
            shard,
            Command::RequestKeyframe {
                publication: publ.id,
                layer: layer.index(),
            },
        ));
    }

    /// Keeps an upstream subscribe for a track not registered here yet ([`Early`]); past
    /// [`MAX_EARLY_SUBSCRIBES`] it is refused with the reason instead.
    #[allow(clippy::too_many_arguments)]
    fn park_subscribe(
        &self,
        st: &mut State,
        link: LinkId,
        flow: FlowId,
        room: RoomId,
        track: TrackId,
        layer: Layer,
        fx: &mut Effects,
    ) {
        if let Some(e) = st.early.get_mut(&(link, flow)) {
            if e.room == room && e.track == track {
                e.layers = e.layers.with(layer);
                // As on a bound sink: a layer subscribed after a demand widens it.
                e.demand = e.demand.map(|d| d.with(layer));
            } else {
                tracing::warn!(%link, %flow, "peer rebound a flow to another track; ignored");
            }
            return;
        }
        if st.early.len() >= MAX_EARLY_SUBSCRIBES {
            let reason = format!(
                "room {room} track {track} is not on this edge, and {MAX_EARLY_SUBSCRIBES} \
                 subscribes already wait for tracks to be published here"
            );
            self.refuse_subscribe(st, link, flow, reason, fx);
            return;
        }
        tracing::debug!(%link, %flow, %room, track = track.0, "subscribe waits for the track to be published here");
        st.early.insert(
            (link, flow),
            Early {
                room,
                track,
                layers: LayerSet::default().with(layer),
                demand: None,
            },
        );
    }

    /// A publication of this edge was registered ([`crate::edge::Edge::add_publication`]):
    /// upstream subscribes that came before it ([`Early`]) are bound now, with their demand.
    pub async fn local_published(&self, room: &RoomId, track: TrackId) {
        let mut fx = Effects::default();
        {
            let mut st = lock(&self.state);
            let waiting: Vec<(LinkId, FlowId)> = st
                .early
                .iter()
                .filter(|(_, e)| e.room == *room && e.track == track)
                .map(|(k, _)| *k)
                .collect();
            for (link, flow) in waiting {
                let Some(e) = st.early.remove(&(link, flow)) else {
                    continue;
                };
                tracing::debug!(%link, %flow, %room, track = track.0, "early subscribe bound");
                for layer in layers_of(e.layers).filter_map(Layer::new) {
                    self.handle_subscribe(&mut st, link, flow, room.clone(), track, layer, &mut fx);
                }
                if let (Some(demand), Some(sink)) = (e.demand, st.sinks.get_mut(&(link, flow))) {
                    sink.demand = Some(demand);
                    sync_sink(sink, link, flow, &mut fx);
                }
            }
        }
        self.apply(fx).await;
    }

    /// The publication to consume `track` of `room` from, when it is published on another edge:
    /// a relayed publication on the room's shard, subscribed (all its layers) through the room's
    /// link. `None` when the room has no link. Counted: call [`Self::release_remote`] once per
    /// call when the consumer goes.
    pub async fn ensure_remote(&self, room: &RoomId, info: &TrackInfo) -> Option<LocalPublication> {
        let mut fx = Effects::default();
        let publ = {
            let mut st = lock(&self.state);
            self.ensure_locked(&mut st, room, info, &mut fx)?
        };
        self.apply(fx).await;
        Some(publ)
    }

    /// [`Self::ensure_remote`] under the lock (also for child edges' subscribes).
    fn ensure_locked(
        &self,
        st: &mut State,
        room: &RoomId,
        info: &TrackInfo,
        fx: &mut Effects,
    ) -> Option<LocalPublication> {
        {
            let key = (room.clone(), info.id);
            if let Some(r) = st.relayed.get_mut(&key) {
                r.users += 1;
                return lock(&self.publications).get(&key).cloned();
            }
            media_link(st, room)?;
            let id = PublicationId(st.next_publication);
            st.next_publication += 1;
            let shard = self.shards.shard_of(room.as_str());
            let (codec, kind, media_codec) = remote_codec(info);
            let layers = info.layers.clamp(1, cascade_proto::link::MAX_LAYER + 1);
            fx.commands.push((
                shard,
                Command::AddRelayedPublication {
                    id,
                    spec: RelayedPublicationSpec {
                        room: room.to_string(),
                        codec: media_codec,
                        clock_rate: codec.clock_rate,
                        layers,
                    },
                },
            ));
            let publ = LocalPublication {
                id,
                participant: info.participant,
                source: info.source,
                codec,
                kind,
                layers,
            };
            lock(&self.publications).insert(key.clone(), publ.clone());
            st.relayed.insert(
                key.clone(),
                Relayed {
                    shard,
                    publication: id,
                    via: None,
                    layers,
                    users: 1,
                    demand: None,
                    demand_sent: None,
                    announced: false,
                },
            );
            st.relayed_by_publication.insert(id, key);
            self.refresh_room(st, room, fx);
            Some(publ)
        }
    }

    /// One consumer of a remote track is gone; the last one unsubscribes it upstream and
    /// removes the relayed publication.
    pub async fn release_remote(&self, room: &RoomId, track: TrackId) {
        let mut fx = Effects::default();
        {
            let mut st = lock(&self.state);
            self.release_locked(&mut st, (room.clone(), track), &mut fx);
        }
        self.apply(fx).await;
    }

    /// [`Self::release_remote`] under the lock (also when a child's sink goes).
    fn release_locked(&self, st: &mut State, key: (RoomId, TrackId), fx: &mut Effects) {
        {
            let Some(r) = st.relayed.get_mut(&key) else {
                return;
            };
            r.users = r.users.saturating_sub(1);
            if r.users > 0 {
                return;
            }
            let r = st.relayed.remove(&key).expect("present above");
            st.relayed_by_publication.remove(&r.publication);
            lock(&self.publications).remove(&key);
            if let Some((link, flow)) = r.via {
                write(&self.links().flows).remove(&(link, flow));
                if let Some(entry) = st.links.get(&link) {
                    for layer in (0..r.layers).filter_map(Layer::new) {
                        fx.control.push((
                            entry.control.clone(),
                            ControlMessage::Unsubscribe { flow, layer },
                        ));
                    }
                }
            }
            fx.commands
                .push((r.shard, Command::RemovePublication { id: r.publication }));
        }
    }

    /// Whether a relayed publication currently has a link feeding it (tests, stats).
    pub fn remote_is_live(&self, room: &RoomId, track: TrackId) -> Option<bool> {
        lock(&self.state)
            .relayed
            .get(&(room.clone(), track))
            .map(|r| r.via.is_some())
    }

    /// Subscribes every stalled relayed publication of `room` through the room's link if up.
    fn resubscribe_room(&self, st: &mut State, room: &RoomId, fx: &mut Effects) {
        let Some(&link) = st.room_links.get(room) else {
            return;
        };
        let Some(control) = st.links.get(&link).map(|e| e.control.clone()) else {
            return;
        };
        let stalled: Vec<TrackId> = st
            .relayed
            .iter()
            .filter(|((r, _), rel)| r == room && rel.via.is_none())
            .map(|((_, t), _)| *t)
            .collect();
        for track in stalled {
            let flow = next_flow(st);
            let r = st
                .relayed
                .get_mut(&(room.clone(), track))
                .expect("listed above");
            r.via = Some((link, flow));
            r.demand_sent = None;
            r.announced = false;
            write(&self.links().flows).insert((link, flow), (r.shard, r.publication));
            for layer in (0..r.layers).filter_map(Layer::new) {
                fx.control.push((
                    control.clone(),
                    ControlMessage::Subscribe {
                        flow,
                        room: room.clone(),
                        track,
                        layer,
                    },
                ));
            }
            fx.announce.push(((room.clone(), track), (link, flow)));
        }
    }

    /// Relayed publications' requests from the shards: NACKs and keyframe requests go up
    /// their link as they come; a layer demand is remembered and sent by
    /// [`Self::handle_layer_demand`].
    fn start_request_pump(self: &Arc<Self>) {
        let Some(mut rx) = lock(&self.links().requests_rx).take() else {
            return;
        };
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let Some(this) = this.upgrade() else { return };
                match req {
                    CascadeRequest::LayerDemand {
                        publication,
                        layers,
                    } => this.handle_layer_demand(publication, layers),
                    CascadeRequest::Keyframe { publication, layer } => {
                        let Some((control, flow)) = this.upstream(publication) else {
                            continue;
                        };
                        if let Some(layer) = Layer::new(layer) {
                            let _ = control
                                .send(ControlMessage::KeyframeRequest { flow, layer })
                                .await;
                        }
                    }
                    CascadeRequest::Nack {
                        publication,
                        layer,
                        seqs,
                    } => {
                        let (Some((control, flow)), Some(layer)) =
                            (this.upstream(publication), Layer::new(layer))
                        else {
                            continue;
                        };
                        for entries in pack_nack(&seqs).chunks(MAX_NACK_ENTRIES) {
                            let _ = control
                                .send(ControlMessage::Nack {
                                    flow,
                                    layer,
                                    entries: entries.to_vec(),
                                })
                                .await;
                        }
                    }
                }
            }
        });
    }

    /// The control sender of the link a relayed publication comes through, and its flow
    /// there; `None` while it is stalled (or gone).
    fn upstream(
        &self,
        publication: PublicationId,
    ) -> Option<(mpsc::Sender<ControlMessage>, FlowId)> {
        let st = lock(&self.state);
        let (link, flow) = st
            .relayed_by_publication
            .get(&publication)
            .and_then(|key| st.relayed.get(key))
            .and_then(|r| r.via)?;
        st.links.get(&link).map(|e| (e.control.clone(), flow))
    }

    /// A relayed publication's demand changed in its shard: remembered, and sent upstream on
    /// its flow once that flow's subscribes are queued (else [`Self::apply`] sends it after
    /// them).
    fn handle_layer_demand(&self, publication: PublicationId, layers: LayerSet) {
        let mut st = lock(&self.state);
        let State {
            relayed,
            relayed_by_publication,
            links,
            ..
        } = &mut *st;
        let Some(r) = relayed_by_publication
            .get(&publication)
            .and_then(|key| relayed.get_mut(key))
        else {
            return;
        };
        r.demand = Some(layers);
        if r.announced {
            self.send_demand(r, links);
        }
    }

    /// Sends `r`'s demand on its flow if upstream does not have it yet. Called under the state
    /// lock with `try_send`, so demands reach the link's control queue in the order they were
    /// decided (the last one sent is the current one). A full queue (the link is not draining
    /// its control stream) drops it and counts a failure; the next change sends again.
    fn send_demand(&self, r: &mut Relayed, links: &HashMap<LinkId, LinkEntry>) {
        let (Some(demand), Some((link, flow))) = (r.demand, r.via) else {
            return;
        };
        if r.demand_sent == Some(demand) {
            return;
        }
        let Some(entry) = links.get(&link) else {
            return;
        };
        let counters = &self.links().metrics.cascade;
        match entry.control.try_send(ControlMessage::LayerDemand {
            flow,
            layers: demand,
        }) {
            Ok(()) => {
                r.demand_sent = Some(demand);
                counters.layer_demands_sent.fetch_add(1, Relaxed);
                tracing::debug!(%link, %flow, layers = demand.0, "layer demand sent upstream");
            }
            Err(e) => {
                counters.layer_demand_failures.fetch_add(1, Relaxed);
                tracing::warn!(%link, %flow, error = %e, "layer demand not sent: link control queue");
            }
        }
    }

    async fn apply(&self, fx: Effects) {
        for (shard, cmd) in fx.commands {
            self.shards.send(shard, ShardInput::Command(cmd)).await;
        }
        for (control, msg) in fx.control {
            if control.send(msg).await.is_err() {
                tracing::debug!("cascade link control channel closed");
            }
        }
        if fx.announce.is_empty() {
            return;
        }
        let mut st = lock(&self.state);
        let State { relayed, links, .. } = &mut *st;
        for (key, via) in fx.announce {
            if let Some(r) = relayed.get_mut(&key).filter(|r| r.via == Some(via)) {
                r.announced = true;
                self.send_demand(r, links);
            }
        }
    }
}

/// The link `room`'s media should come down now: its parent edge's link while that is up,
/// else its origin's.
fn media_link(st: &State, room: &RoomId) -> Option<LinkId> {
    st.parents
        .get(room)
        .filter(|_| !st.parent_refused.contains(room))
        .and_then(|p| st.parent_links.get(p))
        .filter(|l| st.links.contains_key(*l))
        .or_else(|| st.origin_links.get(room))
        .copied()
}

/// Every room the cascade has a link or parent for.
fn known_rooms(st: &State) -> Vec<RoomId> {
    let mut rooms: HashSet<RoomId> = st.origin_links.keys().cloned().collect();
    rooms.extend(st.parents.keys().cloned());
    rooms.extend(st.room_links.keys().cloned());
    rooms.into_iter().collect()
}

/// Makes a sink's shard sinks match what its peer wants.
fn sync_sink(sink: &mut Sink, link: LinkId, flow: FlowId, fx: &mut Effects) {
    let wanted = sink.wanted();
    for layer in layers_of(LayerSet(wanted.0 & !sink.active.0)) {
        fx.commands.push((
            sink.shard,
            Command::AddLinkSink {
                publication: sink.publication,
                layer,
                link,
                flow,
            },
        ));
    }
    for layer in layers_of(LayerSet(sink.active.0 & !wanted.0)) {
        fx.commands.push((
            sink.shard,
            Command::RemoveLinkSink {
                publication: sink.publication,
                layer,
                link,
                flow,
            },
        ));
    }
    sink.active = wanted;
}

fn next_flow(st: &mut State) -> FlowId {
    let id = st.next_flow;
    st.next_flow = if id >= FlowId::MAX { 1 } else { id + 1 };
    FlowId::new(id).expect("kept within FlowId::MAX")
}

fn layers_of(set: LayerSet) -> impl Iterator<Item = u8> {
    (0..=cascade_proto::link::MAX_LAYER).filter(move |l| set.0 & (1 << l) != 0)
}

/// RFC 4585 §6.2.1: `pid`, and `pid + i + 1` for each bit `i` of `blp`.
fn expand_nack(e: &NackEntry) -> impl Iterator<Item = u16> + '_ {
    std::iter::once(e.pid).chain(
        (0..16u16)
            .filter(move |i| e.blp & (1 << i) != 0)
            .map(move |i| e.pid.wrapping_add(i + 1)),
    )
}

fn pack_nack(seqs: &[u16]) -> Vec<NackEntry> {
    kcs_media::nack::nack_pairs(seqs)
        .into_iter()
        .map(|(pid, blp)| NackEntry { pid, blp })
        .collect()
}

/// The codec a subscriber is offered for a remote track. The room state names the codec but
/// not the publisher's fmtp or payload types, so the usual browser values are used (as our own
/// SDP answers use them).
fn remote_codec(info: &TrackInfo) -> (Codec, MediaKind, MediaCodec) {
    let video = |name: &str, pt: u8, rtx: u8, fmtp: Option<&str>, codec: VideoCodec| {
        (
            Codec {
                payload_type: pt,
                name: name.into(),
                clock_rate: 90_000,
                channels: None,
                fmtp: fmtp.map(Into::into),
                rtcp_fb: vec![
                    "nack".into(),
                    "nack pli".into(),
                    "ccm fir".into(),
                    "transport-cc".into(),
                ],
                rtx_payload_type: Some(rtx),
            },
            MediaKind::Video,
            MediaCodec::Video(codec),
        )
    };
    match (info.kind, info.codec.to_ascii_lowercase().as_str()) {
        (TrackKind::Audio, _) => (
            Codec {
                payload_type: 111,
                name: "opus".into(),
                clock_rate: 48_000,
                channels: Some(2),
                fmtp: Some("minptime=10;useinbandfec=1".into()),
                rtcp_fb: vec!["transport-cc".into()],
                rtx_payload_type: None,
            },
            MediaKind::Audio,
            MediaCodec::Audio,
        ),
        (_, "h264") => video(
            "H264",
            102,
            103,
            Some("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"),
            VideoCodec::H264,
        ),
        (_, "vp9") => video("VP9", 98, 99, Some("profile-id=0"), VideoCodec::Vp9),
        _ => video("VP8", 96, 97, None, VideoCodec::Vp8),
    }
}

/// Reads a link's datagrams and hands them to shards in batches until the link closes.
async fn read_link(link: LinkId, media: MediaChannel, links: Arc<LinkChannels>, shards: Shards) {
    let mut batches: HashMap<usize, Vec<RelayedPacket>> = HashMap::new();
    // Counted per read batch and folded into the shared counters once, not per datagram.
    let mut by_layer = [0u64; cascade_proto::link::MAX_LAYER as usize + 1];
    loop {
        let first = match media.recv().await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(%link, error = %e, "cascade link reader stops");
                return;
            }
        };
        // The start of the datagram's stay in kcs_cascade_residence_seconds.
        let mut next = Some((first, std::time::Instant::now()));
        let mut taken = 0;
        {
            let flows = read(&links.flows);
            while let Some((bytes, received)) = next.take() {
                taken += 1;
                route(
                    link,
                    bytes,
                    received,
                    &flows,
                    &links,
                    &mut batches,
                    &mut by_layer,
                );
                if taken < READ_BATCH {
                    next = media
                        .recv()
                        .now_or_never()
                        .and_then(Result::ok)
                        .map(|b| (b, std::time::Instant::now()));
                }
            }
        }
        for (total, n) in links
            .metrics
            .cascade
            .relayed_datagrams_by_layer
            .iter()
            .zip(&mut by_layer)
        {
            if *n != 0 {
                total.fetch_add(std::mem::take(n), Relaxed);
            }
        }
        for (shard, packets) in batches.drain() {
            let n = packets.len() as u64;
            if !shards.try_send(shard, ShardInput::Relayed(packets)) {
                links.metrics.cascade.shard_overflow.fetch_add(n, Relaxed);
            }
        }
    }
}

fn route(
    link: LinkId,
    bytes: Bytes,
    received: std::time::Instant,
    flows: &HashMap<(LinkId, FlowId), (usize, PublicationId)>,
    links: &LinkChannels,
    batches: &mut HashMap<usize, Vec<RelayedPacket>>,
    by_layer: &mut [u64],
) {
    let Ok(d) = cascade_proto::wire::decode_datagram(&bytes) else {
        links.metrics.cascade.unsolicited.fetch_add(1, Relaxed);
        return;
    };
    let Some(&(shard, publication)) = flows.get(&(link, d.flow)) else {
        links.metrics.cascade.unsolicited.fetch_add(1, Relaxed);
        return;
    };
    let (layer, flags) = (d.layer.index(), d.flags);
    by_layer[usize::from(layer)] += 1;
    let offset = bytes.len() - d.rtp.len();
    batches.entry(shard).or_default().push(RelayedPacket {
        publication,
        layer,
        flags,
        rtp: bytes.slice(offset..),
        received,
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_demand_the_full_request_queue_drops_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let links = LinkChannels::new(metrics.clone());
        let keyframe = CascadeRequest::Keyframe {
            publication: PublicationId(1),
            layer: 0,
        };
        // No pump drains the queue here: fill it.
        for _ in 0..REQUEST_QUEUE {
            links.request(keyframe.clone()).expect("room in the queue");
        }
        let demand = CascadeRequest::LayerDemand {
            publication: PublicationId(1),
            layers: LayerSet(0b001),
        };
        assert_eq!(links.request(demand.clone()), Err(demand));
        let failures = || metrics.cascade.layer_demand_failures.load(Relaxed);
        assert_eq!(failures(), 1);
        // A dropped keyframe request (the shard retries those) is not a demand failure.
        assert_eq!(links.request(keyframe.clone()), Err(keyframe));
        assert_eq!(failures(), 1);
    }
}
