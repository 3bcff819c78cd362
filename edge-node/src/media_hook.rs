//! Where cascade media control goes: the seam between the link tasks (signaling) and the media
//! relay.
//!
//! A cascade link carries two kinds of traffic: room messages (`to_origin` / `to_edge`, owned by
//! the hub on an edge and by the room state machine on an origin) and media (the `subscribe`,
//! `unsubscribe`, `keyframe_request`, `layer_demand`, `nack` and `stats` control messages, and the
//! link's QUIC datagrams). The link tasks own the QUIC link and demultiplex: room messages go
//! where they always went, media goes to a [`MediaSide`]. The media side gets, at link-up, a
//! sender into the link task's single control writer (so its control frames interleave with room
//! messages on the one ordered stream) and the link's [`MediaChannel`] for datagrams.
//!
//! Two more calls carry what only the signaling side knows: on an edge, which link a room's
//! media comes down ([`MediaSide::room_link`], from the uplink's routing); on an origin, which
//! link each track's publisher is behind ([`MediaSide::track_source`], from the room state).
//!
//! Implementations: [`EdgeMediaBridge`] (an edge: `crate::cascade::CascadeMedia`), the origin's
//! relay (`crate::origin_server::OriginRelay`), and [`LoggingMediaSide`] (logs, forwards
//! nothing: tests of the control path alone).

use cascade_proto::link::{ControlMessage, Hello};
use cascade_proto::quic::MediaChannel;
use cascade_proto::{RoomId, TrackId};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A link's id, unique for the life of the process (a reconnect gets a new one).
pub type LinkId = u64;

/// The media relay's view of the node's cascade links.
pub trait MediaSide: Send + Sync + 'static {
    /// A link came up with `peer`. `control` feeds the link's control stream (dropped messages
    /// mean the link is going down); `media` sends and receives its datagrams.
    fn link_up(
        &self,
        link: LinkId,
        peer: &Hello,
        control: mpsc::Sender<ControlMessage>,
        media: MediaChannel,
    );
    /// A media control message (`subscribe` ... `stats`) arrived on `link`.
    fn on_control(&self, link: LinkId, msg: ControlMessage);
    /// The link is gone: forget its subscriptions and flows.
    fn link_down(&self, link: LinkId);
    /// Edges: `room`'s media comes through `link` (its origin's link, now up).
    fn room_link(&self, _room: &RoomId, _link: LinkId) {}
    /// Origins: `track` of `room` is published behind `source` (`None`: gone or unreachable).
    fn track_source(&self, _room: &RoomId, _track: TrackId, _source: Option<LinkId>) {}
    /// Prometheus text of the media side's counters (appended to the node's `/metrics`).
    fn render_metrics(&self) -> String {
        String::new()
    }
}

enum BridgeEvent {
    Up(LinkId, mpsc::Sender<ControlMessage>, MediaChannel),
    Control(LinkId, ControlMessage),
    Down(LinkId),
    RoomLink(RoomId, LinkId),
}

/// The edge's media side: hands link events, in order, to the edge's
/// [`CascadeMedia`](crate::cascade::CascadeMedia), whose calls are async. The uplink starts before
/// the [`Edge`](crate::edge::Edge) that owns the `CascadeMedia` exists, so the bridge queues until
/// [`EdgeMediaBridge::attach`] hands it over.
pub struct EdgeMediaBridge {
    tx: mpsc::UnboundedSender<BridgeEvent>,
    target:
        std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Arc<crate::cascade::CascadeMedia>>>>,
}

impl EdgeMediaBridge {
    /// Needs a tokio runtime (spawns the task that owns the ordering).
    pub fn new() -> Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<BridgeEvent>();
        let (target_tx, target_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok(media): Result<Arc<crate::cascade::CascadeMedia>, _> = target_rx.await else {
                return;
            };
            while let Some(ev) = rx.recv().await {
                match ev {
                    BridgeEvent::Up(link, control, channel) => {
                        media.link_up(relay_link(link), control, channel).await
                    }
                    BridgeEvent::Control(link, msg) => {
                        media.on_control(relay_link(link), msg).await
                    }
                    BridgeEvent::Down(link) => media.link_down(relay_link(link)).await,
                    BridgeEvent::RoomLink(room, link) => {
                        media.set_room_link(&room, relay_link(link)).await
                    }
                }
            }
        });
        Arc::new(Self {
            tx,
            target: std::sync::Mutex::new(Some(target_tx)),
        })
    }

    /// Hands over the edge's cascade media; events queued so far are delivered first.
    pub fn attach(&self, media: Arc<crate::cascade::CascadeMedia>) {
        if let Some(t) = self.target.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.send(media);
        }
    }
}

fn relay_link(link: LinkId) -> cascade_proto::relay::LinkId {
    cascade_proto::relay::LinkId(link)
}

impl MediaSide for EdgeMediaBridge {
    fn link_up(
        &self,
        link: LinkId,
        _peer: &Hello,
        control: mpsc::Sender<ControlMessage>,
        media: MediaChannel,
    ) {
        let _ = self.tx.send(BridgeEvent::Up(link, control, media));
    }

    fn on_control(&self, link: LinkId, msg: ControlMessage) {
        let _ = self.tx.send(BridgeEvent::Control(link, msg));
    }

    fn link_down(&self, link: LinkId) {
        let _ = self.tx.send(BridgeEvent::Down(link));
    }

    fn room_link(&self, room: &RoomId, link: LinkId) {
        let _ = self.tx.send(BridgeEvent::RoomLink(room.clone(), link));
    }
}

/// Whether `msg` is for the media side rather than the room.
pub fn is_media_control(msg: &ControlMessage) -> bool {
    matches!(
        msg,
        ControlMessage::Subscribe { .. }
            | ControlMessage::Unsubscribe { .. }
            | ControlMessage::KeyframeRequest { .. }
            | ControlMessage::LayerDemand { .. }
            | ControlMessage::Nack { .. }
            | ControlMessage::Stats(_)
            | ControlMessage::SubscribeRefused { .. }
    )
}

/// The media side until the relay exists: logs, forwards nothing.
#[derive(Debug, Default)]
pub struct LoggingMediaSide;

impl MediaSide for LoggingMediaSide {
    fn link_up(
        &self,
        link: LinkId,
        peer: &Hello,
        _control: mpsc::Sender<ControlMessage>,
        _media: MediaChannel,
    ) {
        tracing::debug!(link, peer = %peer.node, "cascade link up (no media relay)");
    }

    fn on_control(&self, link: LinkId, msg: ControlMessage) {
        tracing::debug!(
            link,
            message = msg.name(),
            "cascade media control ignored (no media relay)"
        );
    }

    fn link_down(&self, link: LinkId) {
        tracing::debug!(link, "cascade link down");
    }
}
