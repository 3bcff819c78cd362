//! Where this edge takes each room's media from: its place in the room's fan-out tree.
//!
//! The control plane plans, per room, a tree rooted at the room's origin over the edges with
//! participants in it (`control_plane::fanout`) and writes each edge's position to etcd. An
//! edge's *media parent* for a room is either the origin itself or another edge (the relay of
//! its region, or an edge above it in the region's subtree). Room state always travels on the
//! link to the origin; only media subscriptions (subscribe, layer demand, keyframe requests,
//! NACKs and the datagrams they bring) go to the media parent.
//!
//! Two halves meet here: the follower, which watches the tree in etcd and says when a room's
//! parent changes, and the media side, which moves the room's remote-track subscriptions to the
//! new parent's link (falling back to the origin at once when the parent's link drops, so media
//! resumes before the planner has re-parented the edge).
//!
//! This module holds the edge's link tasks for the tree: [`spawn_follower`] (consumes
//! [`ParentChange`]s, keeps one link per parent edge, shared by its rooms, redialled with the
//! uplink's backoff and dialled with [`LinkEndpoint::connect_tree`]'s short idle timeout, so a
//! dead parent is noticed in under a second) and [`serve_children`] (accepts child edges on the
//! edge's cascade endpoint, refusing peers that are not edges). What the links carry is
//! [`CascadeMedia`]'s business: a child's subscriptions are served from the shard's relayed
//! publications and link sinks, the same machinery the origin's subscriptions use, rather than
//! by a second relay (`cascade_proto::relay`): the shard already holds each publication's
//! packets, NACK cache and keyframe rate limit, and local subscribers and child edges then share
//! one copy of every packet.

use crate::cascade::CascadeMedia;
use crate::media_hook::is_media_control;
use crate::metrics::Metrics;
use crate::uplink::{OriginAddr, BACKOFF_FIRST, BACKOFF_MAX};
use cascade_proto::link::{ControlMessage, GoodbyeCode, NodeRole};
use cascade_proto::quic::{Link, LinkEndpoint, LinkError};
use cascade_proto::relay::LinkId;
use cascade_proto::RoomId;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Control messages queued for a tree link's writer.
const LINK_QUEUE: usize = 4096;
/// How long a link ended with a goodbye stays open for the peer to read it.
const LINGER: Duration = Duration::from_secs(1);

/// A room's media parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaParent {
    /// The room's origin, over the edge's existing link to it.
    Origin,
    /// Another edge, dialled at its cascade address (`quic://NODE@HOST:PORT`).
    Edge(OriginAddr),
}

/// The follower's output: from now on, `room`'s media comes from `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentChange {
    pub room: RoomId,
    pub parent: MediaParent,
}

/// Parses `ROOM=quic://NODE@HOST:PORT` (`kcs edge --media-parent`, an operator override).
pub fn parse_media_parent(s: &str) -> anyhow::Result<ParentChange> {
    let (room, url) = s
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("expected ROOM=quic://NODE@HOST:PORT, got {s:?}"))?;
    let room = RoomId::new(room).map_err(|e| anyhow::anyhow!("room {room:?}: {e}"))?;
    Ok(ParentChange {
        room,
        parent: MediaParent::Edge(OriginAddr::parse(url)?),
    })
}

/// Starts following `changes`: each room's remote media moves to its parent edge's link (one
/// link per parent edge, shared by its rooms, dialled with backoff) and back to the origin's
/// when the follower says so. A parent edge's link that drops sends its rooms to their origin
/// at once ([`CascadeMedia::link_down`]); when it is back they return. Rooms whose parent did
/// not change are never touched. Closing `changes` ends the follower and all its parent links
/// (their rooms go back to the origin): keep a sender for as long as parents should hold.
pub fn spawn_follower(
    endpoint: Arc<LinkEndpoint>,
    media: Arc<CascadeMedia>,
    metrics: Arc<Metrics>,
    mut changes: mpsc::Receiver<ParentChange>,
) {
    let me = endpoint.hello().node.clone();
    tokio::spawn(async move {
        let mut rooms: HashMap<RoomId, OriginAddr> = HashMap::new();
        // One link task per parent edge; dropping its sender stops it.
        let mut links: HashMap<OriginAddr, oneshot::Sender<()>> = HashMap::new();
        while let Some(ParentChange { room, parent }) = changes.recv().await {
            let parent = match parent {
                MediaParent::Edge(p) if p.node == me => {
                    tracing::warn!(%room, "media parent names this edge itself; using the origin");
                    None
                }
                MediaParent::Edge(p) => Some(p),
                MediaParent::Origin => None,
            };
            if rooms.get(&room) == parent.as_ref() {
                continue;
            }
            tracing::info!(%room, parent = %parent.as_ref().map_or("origin".to_string(), OriginAddr::url), "media parent changes");
            if let Some(p) = &parent {
                links.entry(p.clone()).or_insert_with(|| {
                    let (stop, stopped) = oneshot::channel();
                    tokio::spawn(run_parent_link(
                        endpoint.clone(),
                        p.clone(),
                        media.clone(),
                        metrics.clone(),
                        stopped,
                    ));
                    stop
                });
            }
            let old = match &parent {
                Some(p) => rooms.insert(room.clone(), p.clone()),
                None => rooms.remove(&room),
            };
            media.set_room_parent(&room, parent).await;
            if let Some(old) = old {
                if !rooms.values().any(|p| *p == old) {
                    links.remove(&old); // its last room left: the link task ends
                }
            }
        }
    });
}

/// One parent edge's link: dial, serve media control, redial with backoff until stopped.
async fn run_parent_link(
    endpoint: Arc<LinkEndpoint>,
    parent: OriginAddr,
    media: Arc<CascadeMedia>,
    metrics: Arc<Metrics>,
    mut stop: oneshot::Receiver<()>,
) {
    let counters = &metrics.cascade;
    let mut backoff = BACKOFF_FIRST;
    loop {
        let dialled = tokio::select! {
            r = endpoint.connect_tree(parent.addr, &parent.node) => r,
            _ = &mut stop => return,
        };
        let failure = match dialled {
            Ok(link) if link.peer.role != NodeRole::Edge => {
                link.media
                    .close(GoodbyeCode::BadHello, "a media parent is an edge");
                format!(
                    "{} is an {}, not an edge",
                    link.peer.node,
                    link.peer.role.as_str()
                )
            }
            Ok(link) => {
                backoff = BACKOFF_FIRST;
                counters.parent_link_connects.fetch_add(1, Relaxed);
                counters.parent_links.fetch_add(1, Relaxed);
                let id = LinkId(crate::uplink::next_link_id());
                tracing::info!(parent = %parent.url(), link = %id, "linked to a parent edge");
                let why = serve_parent(link, id, &parent, &media, &mut stop).await;
                counters.parent_links.fetch_sub(1, Relaxed);
                media.link_down(id).await;
                match why {
                    None => return,
                    Some(why) => {
                        tracing::warn!(parent = %parent.url(), link = %id, %why, "parent edge link dropped; its rooms' media falls back to the origin");
                        continue; // redial at once; backoff applies if that fails
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        counters.parent_link_failures.fetch_add(1, Relaxed);
        tracing::warn!(parent = %parent.url(), error = %failure, retry_in = ?backoff, "cannot link to the parent edge");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Serves one parent link until it drops (`Some(why)`) or the edge no longer needs it (`None`).
async fn serve_parent(
    link: Link,
    id: LinkId,
    parent: &OriginAddr,
    media: &Arc<CascadeMedia>,
    stop: &mut oneshot::Receiver<()>,
) -> Option<String> {
    let Link {
        mut sender,
        mut receiver,
        media: channel,
        ..
    } = link;
    let (control_tx, mut control_rx) = mpsc::channel::<ControlMessage>(LINK_QUEUE);
    media
        .parent_link_up(parent, id, control_tx, channel.clone())
        .await;
    let why = loop {
        tokio::select! {
            _ = &mut *stop => {
                let _ = sender.goodbye(GoodbyeCode::Normal, "no longer this edge's media parent").await;
                channel.close(GoodbyeCode::Normal, "no longer this edge's media parent");
                return None;
            }
            Some(msg) = control_rx.recv() => {
                if let Err(e) = sender.send(&msg).await { break e.to_string(); }
            }
            msg = receiver.recv() => match msg {
                Ok(m) if is_media_control(&m) => media.on_control(id, m).await,
                Ok(ControlMessage::Goodbye { code, reason }) => break format!("parent said goodbye ({code:?}): {reason}"),
                Ok(ControlMessage::Drain { deadline_ms }) => {
                    tracing::info!(link = %id, deadline_ms, "parent edge draining");
                }
                Ok(other) => {
                    let reason = format!("a parent edge does not send {}", other.name());
                    let _ = sender.goodbye(GoodbyeCode::ProtocolError, &reason).await;
                    break reason;
                }
                Err(LinkError::Malformed(e)) => {
                    let _ = sender.refuse(&e).await;
                    break format!("malformed frame from the parent: {e}");
                }
                Err(e) => break e.to_string(),
            },
        }
    };
    channel.close(GoodbyeCode::ProtocolError, "control stream ended");
    Some(why)
}

/// Accepts links from child edges on the edge's cascade endpoint, for as long as it is open.
/// Each is served by [`serve_child`]; a peer that is not an edge is refused with a reason.
pub fn serve_children(
    endpoint: Arc<LinkEndpoint>,
    media: Arc<CascadeMedia>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        while let Some(pending) = endpoint.accept().await {
            let (media, metrics) = (media.clone(), metrics.clone());
            tokio::spawn(async move {
                let remote = pending.remote_address();
                match pending.handshake().await {
                    Ok(link) => serve_child(link, media, metrics).await,
                    Err(e) => {
                        metrics.cascade.child_links_refused.fetch_add(1, Relaxed);
                        tracing::warn!(%remote, error = %e, "cascade handshake from a would-be child failed");
                    }
                }
            });
        }
    });
}

/// One child edge's link: its media control goes to [`CascadeMedia`], which serves its
/// subscribes from this edge's publications and relayed tracks. Anything else on the control
/// stream ends the link with a goodbye naming it.
async fn serve_child(link: Link, media: Arc<CascadeMedia>, metrics: Arc<Metrics>) {
    let Link {
        peer,
        mut sender,
        mut receiver,
        media: channel,
    } = link;
    let counters = &metrics.cascade;
    if peer.role != NodeRole::Edge {
        counters.child_links_refused.fetch_add(1, Relaxed);
        let reason = format!(
            "an edge takes links only from child edges; {} is an {}",
            peer.node,
            peer.role.as_str()
        );
        tracing::warn!(peer = %peer.node, %reason, "cascade link refused");
        let _ = sender.goodbye(GoodbyeCode::BadHello, &reason).await;
        tokio::time::sleep(LINGER).await;
        channel.close(GoodbyeCode::BadHello, &reason);
        return;
    }
    let id = LinkId(crate::uplink::next_link_id());
    counters.child_links_accepted.fetch_add(1, Relaxed);
    counters.child_links.fetch_add(1, Relaxed);
    tracing::info!(link = %id, child = %peer.node, region = %peer.region, "child edge linked");
    let (control_tx, mut control_rx) = mpsc::channel::<ControlMessage>(LINK_QUEUE);
    // The writer: the one owner of the control stream's sending half; a goodbye is its last.
    let writer = tokio::spawn(async move {
        while let Some(msg) = control_rx.recv().await {
            if let ControlMessage::Goodbye { code, reason } = &msg {
                let _ = sender.goodbye(*code, reason).await;
                return;
            }
            if sender.send(&msg).await.is_err() {
                return;
            }
        }
    });
    media
        .child_link_up(id, control_tx.clone(), channel.clone())
        .await;
    let why = loop {
        match receiver.recv().await {
            Ok(m) if is_media_control(&m) => media.on_control(id, m).await,
            Ok(ControlMessage::Goodbye { code, reason }) => {
                break format!("child said goodbye ({code:?}): {reason}")
            }
            Ok(ControlMessage::Drain { .. }) => {}
            Ok(other) => {
                counters.child_links_refused.fetch_add(1, Relaxed);
                let reason = format!(
                    "a child edge sends only media control, not {}",
                    other.name()
                );
                let _ = control_tx
                    .send(ControlMessage::Goodbye {
                        code: GoodbyeCode::ProtocolError,
                        reason: reason.clone(),
                    })
                    .await;
                break reason;
            }
            Err(LinkError::Malformed(e)) => {
                counters.child_links_refused.fetch_add(1, Relaxed);
                let _ = control_tx
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
    media.link_down(id).await;
    counters.child_links.fetch_sub(1, Relaxed);
    tracing::info!(link = %id, child = %peer.node, %why, "child edge link ended");
    drop(control_tx);
    let _ = tokio::time::timeout(LINGER, writer).await;
    channel.close(GoodbyeCode::Normal, "link ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_parent_overrides() {
        let c = parse_media_parent("r1=quic://edge-r@127.0.0.1:7500").unwrap();
        assert_eq!(c.room.as_str(), "r1");
        match c.parent {
            MediaParent::Edge(a) => assert_eq!(a.url(), "quic://edge-r@127.0.0.1:7500"),
            other => panic!("{other:?}"),
        }
        for bad in [
            "r1",
            "r1=http://edge-r@127.0.0.1:7500",
            "=quic://edge-r@127.0.0.1:7500",
            "r1=quic://127.0.0.1:7500",
        ] {
            assert!(parse_media_parent(bad).is_err(), "{bad}");
        }
    }
}
