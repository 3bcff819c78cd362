//! The thin async shell around [`Relay`] for a node whose links are QUIC ([`MediaChannel`]):
//! the origin today.
//!
//! The link task (which owns the control stream) calls [`RelayNode::link_up`] with the link's
//! control sender and media channel, [`RelayNode::on_control`] with each control message, and
//! [`RelayNode::link_down`]; the room state calls [`RelayNode::set_track_source`] and
//! [`RelayNode::remove_track`]. A reader task per link takes datagrams straight into the relay
//! and sends the copies it queues at once, under one short `std::sync::Mutex` (never held across
//! an `.await`): no channel hop per packet.
//!
//! ## Residence
//!
//! The node records how long each relayed datagram stays in it ([`RelayNode::residence`],
//! exported as `kcs_cascade_residence_seconds{to="links"}`): from the moment the reader takes
//! it from quinn ([`MediaChannel::recv`] returns, so quinn's own receive path and decryption
//! are before the start) to the moment the last of its copies for downstream links was handed
//! to quinn (`send_datagram` returned, so the packet protection and the UDP send quinn does
//! after that are not included). Included: waiting for the relay's lock, the relay's
//! forwarding, the other datagrams of the same read batch, and the copies of those. Only
//! datagrams that made at least one copy count (dropped, unsolicited and unwanted ones do not);
//! copies sent in answer to NACKs do not either.

use crate::ids::{RoomId, TrackId};
use crate::link::ControlMessage;
use crate::quic::MediaChannel;
use crate::relay::{LinkId, Relay, RelayConfig, RelayCounters, RelayError};
use futures_util_free::now_or_never;
use kcs_media::residence::Residence;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

struct Inner {
    relay: Relay,
    links: HashMap<LinkId, LinkHandles>,
    /// How long relayed datagrams stayed (see the module docs).
    residence: Residence,
}

struct LinkHandles {
    control: mpsc::Sender<ControlMessage>,
    media: MediaChannel,
    reader: tokio::task::JoinHandle<()>,
}

/// A [`Relay`] driving QUIC links. Cheap to clone.
#[derive(Clone)]
pub struct RelayNode {
    inner: Arc<Mutex<Inner>>,
}

impl RelayNode {
    pub fn new(config: RelayConfig) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                relay: Relay::new(config),
                links: HashMap::new(),
                residence: Residence::default(),
            })),
        }
    }

    /// A link is up. Needs a tokio runtime (spawns the link's datagram reader).
    pub fn link_up(
        &self,
        link: LinkId,
        control_out: mpsc::Sender<ControlMessage>,
        media: MediaChannel,
    ) {
        let reader = tokio::spawn(read_datagrams(
            link,
            media.clone(),
            Arc::downgrade(&self.inner),
        ));
        let mut inner = lock(&self.inner);
        if let Some(old) = inner.links.insert(
            link,
            LinkHandles {
                control: control_out,
                media,
                reader,
            },
        ) {
            old.reader.abort();
        }
        inner.relay.handle_link_up(link);
        flush(&mut inner);
    }

    pub fn link_down(&self, link: LinkId) {
        let mut inner = lock(&self.inner);
        if let Some(old) = inner.links.remove(&link) {
            old.reader.abort();
        }
        inner.relay.handle_link_down(link);
        flush(&mut inner);
    }

    /// A control message from `link`'s peer. A protocol violation is returned so the link task
    /// can close the link when [`RelayError::is_fatal`]; the relay has already refused it.
    pub fn on_control(&self, link: LinkId, msg: ControlMessage) -> Result<(), RelayError> {
        let mut inner = lock(&self.inner);
        let result = inner.relay.handle_control(link, msg, Instant::now());
        flush(&mut inner);
        result
    }

    pub fn set_track_source(&self, room: RoomId, track: TrackId, source: LinkId) {
        let mut inner = lock(&self.inner);
        inner.relay.set_track_source(room, track, source);
        flush(&mut inner);
    }

    pub fn remove_track(&self, room: &RoomId, track: TrackId) {
        let mut inner = lock(&self.inner);
        inner.relay.remove_track(room, track);
        flush(&mut inner);
    }

    pub fn counters(&self) -> RelayCounters {
        lock(&self.inner).relay.counters
    }

    /// How long relayed datagrams stayed in this node so far (cumulative; see the module
    /// docs for what the span covers).
    pub fn residence(&self) -> Residence {
        lock(&self.inner).residence.clone()
    }
}

/// Sends what the relay queued: datagrams now, control messages without waiting (a full
/// control channel means the link is hopelessly behind; the message is dropped and logged).
fn flush(inner: &mut Inner) {
    let Inner { relay, links, .. } = inner;
    relay.drain_datagrams(|link, bytes| {
        if let Some(l) = links.get(&link) {
            let _ = l.media.send_encoded(bytes);
        }
    });
    while let Some((link, msg)) = relay.poll_control() {
        if let Some(l) = links.get(&link) {
            if let Err(e) = l.control.try_send(msg) {
                tracing::warn!(%link, error = %e, "cascade control queue full or closed; message dropped");
            }
        }
    }
}

/// Reads `link`'s datagrams into the relay until the link closes or the node is dropped.
/// Takes whatever else already arrived under the same lock (up to a bound), so a burst costs one
/// lock, not one per packet.
async fn read_datagrams(link: LinkId, media: MediaChannel, inner: std::sync::Weak<Mutex<Inner>>) {
    /// Datagrams handled per lock: a keyframe's burst, without starving the other links.
    const BATCH: usize = 64;
    // When quinn handed over each datagram of the batch that made copies.
    let mut copied: Vec<Instant> = Vec::with_capacity(BATCH);
    loop {
        let Ok(first) = media.recv().await else {
            return;
        };
        let received = Instant::now();
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut inner = lock(&inner);
        relay_one(&mut inner.relay, link, &first, received, &mut copied);
        for _ in 1..BATCH {
            match now_or_never(media.recv()) {
                Some(Ok(bytes)) => {
                    relay_one(&mut inner.relay, link, &bytes, Instant::now(), &mut copied)
                }
                _ => break,
            }
        }
        flush(&mut inner);
        inner.residence.observe_handed_on(&mut copied, Instant::now);
    }
}

/// Hands one datagram to the relay; notes `received` in `copied` if it made any copies.
fn relay_one(
    relay: &mut Relay,
    link: LinkId,
    bytes: &[u8],
    received: Instant,
    copied: &mut Vec<Instant>,
) {
    let before = relay.queued_datagrams();
    relay.handle_datagram(link, bytes);
    if relay.queued_datagrams() > before {
        copied.push(received);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `FutureExt::now_or_never` without pulling the futures crate into cascade-proto: polls once
/// with a no-op waker.
mod futures_util_free {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    pub fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(f).poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }
}
