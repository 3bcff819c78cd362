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
//! Until the media relay is wired in, nodes run [`LoggingMediaSide`], which logs what arrives
//! and forwards nothing.

use cascade_proto::link::{ControlMessage, Hello};
use cascade_proto::quic::MediaChannel;
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
        tracing::debug!(link, message = msg.name(), "cascade media control ignored (no media relay)");
    }

    fn link_down(&self, link: LinkId) {
        tracing::debug!(link, "cascade link down");
    }
}
