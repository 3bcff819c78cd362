//! One participant's media on this edge: its publisher and subscriber peer connections.
//!
//! [`Participant`] is what a signaling session (WebSocket, WHIP or WHEP) drives. It turns SDP
//! offers and answers into shard commands and room intents: it asks the origin to publish a track,
//! then tells the room's shard how to receive it; it subscribes by creating a subscription in the
//! shard and renegotiating the subscriber PC. It owns no room state (the origin does) and no
//! media state (the shard does), only the mapping between the two for this participant.

use crate::edge::{Edge, LocalPublication};
use crate::hub::RoomSignal;
use crate::sdp::{self, Codec, Direction, HeaderExtIds, MediaKind, OutgoingMedia, SdpLimits};
use crate::sfu::{
    Command, ExtIds, LayerSpec, MediaCodec, PublicationId, PublicationSpec, SessionId,
    SubscriptionId, SubscriptionSpec, TransportId,
};
use crate::transport::ice::IceCredentials;
use crate::udp::ShardInput;
use cascade_proto::room::{
    Intent, ParticipantInfo, Reply, RoomEvent, RoomEventBody, RoomSnapshot, TrackInfo,
};
use cascade_proto::{ParticipantId, RoomId, TrackId, TrackKind, TrackSource};
use kcs_media::codec::VideoCodec;
use kcs_media::units::SpatialLayer;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Header extension ids we offer on subscriber PCs (the ones libwebrtc uses, so answers keep them).
pub const SUBSCRIBER_EXT: HeaderExtIds = HeaderExtIds {
    audio_level: Some(1),
    abs_send_time: Some(2),
    transport_cc: Some(3),
    mid: Some(4),
    rid: None,
    repaired_rid: None,
};

/// A failure a client sees as an error with a code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SessionError {
    pub code: &'static str,
    pub message: String,
}

impl SessionError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<sdp::SdpError> for SessionError {
    fn from(e: sdp::SdpError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

fn refused(reply: Reply) -> SessionError {
    match reply {
        Reply::Refused(e) => SessionError::new(e.code(), e.to_string()),
        other => SessionError::new(
            "internal",
            format!("unexpected reply from origin: {other:?}"),
        ),
    }
}

fn origin_down() -> SessionError {
    SessionError::new(
        "origin_unavailable",
        "the room's origin is unreachable; retry shortly",
    )
}

/// Gives up a place in a room's lobby (the client left or can not wait).
pub async fn leave_waiting(edge: &Edge, room: &RoomId, participant: ParticipantId) {
    let _ = edge
        .hub
        .request(room, Intent::Leave { participant }, None)
        .await;
    edge.hub.detach(room, participant).await;
}

struct Publisher {
    transport: TransportId,
    local: sdp::LocalTransport,
    /// mid -> (track, publication) for active published m-lines.
    tracks: HashMap<String, (TrackId, PublicationId)>,
}

struct SubMedia {
    mid: String,
    track: TrackId,
    participant: ParticipantId,
    source: TrackSource,
    kind: MediaKind,
    codec: Codec,
    ssrc: u32,
    rtx_ssrc: Option<u32>,
    subscription: Option<SubscriptionId>,
    /// Received through a cascade link (a relayed publication this session holds a use of).
    remote: bool,
}

struct Subscriber {
    transport: TransportId,
    local: sdp::LocalTransport,
    remote_known: bool,
    media: Vec<SubMedia>,
    revision: u64,
    session_id: u64,
    next_mid: u32,
    /// An offer is out and not answered yet.
    awaiting_answer: bool,
    /// The mids of the last offer sent.
    offered_mids: Vec<String>,
    /// Something changed while an offer was out: offer again after the answer.
    renegotiate: bool,
}

/// A new offer of the subscriber PC for the client to answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriberOffer {
    pub revision: u64,
    pub sdp: String,
    pub tracks: Vec<OfferedTrack>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OfferedTrack {
    pub mid: String,
    pub track: TrackId,
    pub participant: ParticipantId,
    pub source: TrackSource,
    pub kind: TrackKind,
}

/// One participant's media on this edge.
pub struct Participant {
    edge: Arc<Edge>,
    pub room: RoomId,
    pub me: ParticipantInfo,
    pub session: SessionId,
    shard: usize,
    publisher: Option<Publisher>,
    subscriber: Option<Subscriber>,
    /// Tracks of the room (from the join snapshot and events), for subscribing by id.
    pub tracks: HashMap<TrackId, TrackInfo>,
    left: bool,
}

/// What a join returns besides the participant: the room as it stood.
pub type Joined = Box<RoomSnapshot>;

/// How a join ended: in the room, or in its lobby.
pub enum Entry {
    Joined(Box<Participant>, Joined),
    /// Waiting for a moderator; the room's `Admitted` event (see [`Participant::admitted`]) or
    /// `Denied` follows on the listener.
    Waiting(ParticipantInfo),
}

impl Participant {
    /// Joins the room through its origin. `listener` receives the room's events; `events`
    /// receives this participant's shard events (transport state, layer changes).
    pub async fn enter(
        edge: Arc<Edge>,
        room: RoomId,
        intent: Intent,
        listener: mpsc::Sender<RoomSignal>,
        events: mpsc::Sender<crate::sfu::Event>,
    ) -> Result<Entry, SessionError> {
        let reply = edge
            .hub
            .request(&room, intent, Some(listener))
            .await
            .map_err(|_| origin_down())?;
        match reply {
            Reply::Joined(snapshot) => {
                let p = Self::admitted(edge, room, &snapshot, events).await;
                Ok(Entry::Joined(Box::new(p), snapshot))
            }
            Reply::Waiting { you } => {
                tracing::info!(room = %room, participant = %you.id, identity = %you.identity, "waiting in the lobby");
                Ok(Entry::Waiting(you))
            }
            other => Err(refused(other)),
        }
    }

    /// Joins where there is no one to wait for a lobby decision (WHIP, WHEP): a lobby answer
    /// gives up the place in it and is refused with `in_lobby`.
    pub async fn join(
        edge: Arc<Edge>,
        room: RoomId,
        intent: Intent,
        listener: mpsc::Sender<RoomSignal>,
        events: mpsc::Sender<crate::sfu::Event>,
    ) -> Result<(Self, Joined), SessionError> {
        match Self::enter(edge.clone(), room.clone(), intent, listener, events).await? {
            Entry::Joined(p, s) => Ok((*p, s)),
            Entry::Waiting(you) => {
                leave_waiting(&edge, &room, you.id).await;
                Err(SessionError::new(
                    "in_lobby",
                    "the meeting has a lobby: join from the meeting page and wait to be admitted",
                ))
            }
        }
    }

    /// The participant a join or a lobby admission (`snapshot`) made, registered with the
    /// room's shard.
    pub async fn admitted(
        edge: Arc<Edge>,
        room: RoomId,
        snapshot: &RoomSnapshot,
        events: mpsc::Sender<crate::sfu::Event>,
    ) -> Self {
        let you = snapshot.you.clone();
        let shard = edge.shards.shard_of(room.as_str());
        let session = edge.session_id();
        edge.shards
            .send(shard, ShardInput::Register { session, events })
            .await;
        edge.metrics
            .participants
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(room = %room, participant = %you.id, identity = %you.identity, role = %you.role, "joined");
        Self {
            edge,
            room,
            me: you,
            session,
            shard,
            publisher: None,
            subscriber: None,
            tracks: snapshot.tracks.iter().map(|t| (t.id, t.clone())).collect(),
            left: false,
        }
    }

    /// Sends one intent about this participant to the room's origin.
    pub async fn ask(&self, intent: Intent) -> Result<Reply, SessionError> {
        let reply = self
            .edge
            .hub
            .request(&self.room, intent, None)
            .await
            .map_err(|_| origin_down())?;
        match reply {
            Reply::Refused(_) => Err(refused(reply)),
            other => Ok(other),
        }
    }

    async fn shard(&self, cmd: Command) {
        self.edge
            .shards
            .send(self.shard, ShardInput::Command(cmd))
            .await;
    }

    async fn new_transport(
        &self,
        creds: IceCredentials,
        remote: Option<&sdp::RemoteTransport>,
        ext_in: ExtIds,
        ext_out: ExtIds,
    ) -> TransportId {
        let id = self.edge.transport_id();
        self.edge.shards.router.add_ufrag(&creds.ufrag, self.shard);
        let remote_creds = remote.map(|r| IceCredentials {
            ufrag: r.ice_ufrag.clone(),
            pwd: r.ice_pwd.clone(),
        });
        self.shard(Command::AddTransport {
            id,
            owner: self.session,
            local: creds,
            remote: remote_creds,
            ext_in,
            ext_out,
        })
        .await;
        if let Some(r) = remote {
            self.expect_dtls(id, r).await;
        }
        id
    }

    async fn expect_dtls(&self, transport: TransportId, remote: &sdp::RemoteTransport) {
        self.edge
            .shards
            .send(
                self.shard,
                ShardInput::ExpectDtls {
                    transport,
                    fingerprint: remote.fingerprint.value.clone(),
                },
            )
            .await;
    }

    /// Handles an offer of the publisher PC: publishes new m-lines, unpublishes inactive ones.
    /// `sources` maps mids to what they carry; unnamed audio is the microphone, video the camera.
    pub async fn produce(
        &mut self,
        offer: &str,
        sources: &HashMap<String, TrackSource>,
    ) -> Result<(String, Vec<(String, TrackId)>), SessionError> {
        let limits = SdpLimits::default();
        // Renegotiation keeps the transport, and so must keep our ICE credentials: new ones
        // would read as an ICE restart to the client.
        let (creds, local) = match &self.publisher {
            Some(p) => (None, p.local.clone()),
            None => {
                let (c, l) = self.edge.local_transport(self.shard);
                (Some(c), l)
            }
        };
        let answer = sdp::answer_publish(offer, &local, &limits)?;
        let ext_in = answer.ext_in();
        let answer_sdp = answer.sdp.clone();
        let transport = match (&self.publisher, creds) {
            (Some(p), _) => p.transport,
            (None, Some(creds)) => {
                let t = self
                    .new_transport(creds, Some(&answer.remote), ext_in, ExtIds::default())
                    .await;
                self.publisher = Some(Publisher {
                    transport: t,
                    local,
                    tracks: HashMap::new(),
                });
                t
            }
            (None, None) => return Err(SessionError::new("internal", "publisher state lost")),
        };
        self.shard(Command::SetExtensions {
            id: transport,
            ext_in,
            ext_out: ExtIds::default(),
        })
        .await;
        let mut published = Vec::new();
        let mut still_active = Vec::new();
        for m in &answer.media {
            if !m.active || !matches!(m.direction, Direction::SendOnly | Direction::SendRecv) {
                continue;
            }
            still_active.push(m.mid.clone());
            if let Some((track, _)) = self.publisher.as_ref().and_then(|p| p.tracks.get(&m.mid)) {
                published.push((m.mid.clone(), *track));
                continue;
            }
            let source = sources.get(&m.mid).copied().unwrap_or(match m.kind {
                MediaKind::Audio => TrackSource::Microphone,
                MediaKind::Video => TrackSource::Camera,
            });
            if source.kind() != track_kind(m.kind) {
                return Err(SessionError::new(
                    "bad_request",
                    format!("mid {} is {:?} but source {source:?} is not", m.mid, m.kind),
                ));
            }
            let layers = m.rids.len().max(1) as u8;
            let reply = self
                .edge
                .hub
                .request(
                    &self.room,
                    Intent::Publish {
                        participant: self.me.id,
                        source,
                        codec: m.codec.name.clone(),
                        layers,
                    },
                    None,
                )
                .await
                .map_err(|_| origin_down())?;
            let Reply::Published { track } = reply else {
                return Err(refused(reply));
            };
            let pid = self.edge.publication_id();
            let codec = match m.kind {
                MediaKind::Audio => MediaCodec::Audio,
                MediaKind::Video => match VideoCodec::from_sdp_name(&m.codec.name) {
                    Some(c) => MediaCodec::Video(c),
                    None => {
                        return Err(SessionError::new(
                            "sdp_unsupported",
                            format!("codec {} not forwardable", m.codec.name),
                        ))
                    }
                },
            };
            let layer_specs: Vec<LayerSpec> = if m.rids.is_empty() {
                let s = m.ssrcs.first();
                vec![LayerSpec {
                    rid: None,
                    ssrc: s.map(|s| s.ssrc),
                    rtx_ssrc: s.and_then(|s| s.rtx_ssrc),
                }]
            } else {
                m.rids
                    .iter()
                    .map(|r| LayerSpec {
                        rid: Some(r.clone()),
                        ssrc: None,
                        rtx_ssrc: None,
                    })
                    .collect()
            };
            let prefers_fir = !m.codec.rtcp_fb.iter().any(|f| f == "nack pli")
                && m.codec.rtcp_fb.iter().any(|f| f == "ccm fir");
            self.shard(Command::AddPublication {
                id: pid,
                spec: PublicationSpec {
                    room: self.room.to_string(),
                    transport,
                    mid: m.mid.clone(),
                    codec,
                    clock_rate: m.codec.clock_rate,
                    payload_type: m.codec.payload_type,
                    rtx_payload_type: m.codec.rtx_payload_type,
                    layers: layer_specs,
                    prefers_fir,
                },
            })
            .await;
            if track.muted {
                // Published while a moderator's mute holds: not forwarded until lifted.
                self.shard(Command::SetPublicationMuted {
                    id: pid,
                    muted: true,
                })
                .await;
            }
            self.edge.hub.note_publication(pid, self.room.clone());
            self.edge
                .add_publication(
                    &self.room,
                    track.id,
                    LocalPublication {
                        id: pid,
                        participant: self.me.id,
                        source,
                        codec: m.codec.clone(),
                        kind: m.kind,
                        layers,
                    },
                )
                .await;
            self.edge
                .metrics
                .publications
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(room = %self.room, participant = %self.me.id, track = %track.id, mid = %m.mid, codec = %m.codec.name, layers, "published");
            if let Some(p) = self.publisher.as_mut() {
                p.tracks.insert(m.mid.clone(), (track.id, pid));
            }
            self.tracks.insert(track.id, track.clone());
            published.push((m.mid.clone(), track.id));
        }
        // m-lines that went inactive: unpublish.
        let gone: Vec<TrackId> = self
            .publisher
            .as_ref()
            .map(|p| {
                p.tracks
                    .iter()
                    .filter(|(mid, _)| !still_active.contains(mid))
                    .map(|(_, (t, _))| *t)
                    .collect()
            })
            .unwrap_or_default();
        for t in gone {
            self.unpublish(t).await?;
        }
        Ok((answer_sdp, published))
    }

    /// Withdraws one of our tracks.
    pub async fn unpublish(&mut self, track: TrackId) -> Result<(), SessionError> {
        let Some(p) = self.publisher.as_mut() else {
            return Err(SessionError::new("no_such_track", "nothing published"));
        };
        let Some(mid) = p
            .tracks
            .iter()
            .find(|(_, (t, _))| *t == track)
            .map(|(m, _)| m.clone())
        else {
            return Err(SessionError::new(
                "no_such_track",
                format!("track {track} is not yours"),
            ));
        };
        let Some((_, pid)) = p.tracks.remove(&mid) else {
            return Ok(());
        };
        self.shard(Command::RemovePublication { id: pid }).await;
        self.edge.hub.forget_publication(pid);
        self.edge.remove_publication(&self.room, track);
        self.edge
            .metrics
            .publications
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let reply = self
            .edge
            .hub
            .request(
                &self.room,
                Intent::Unpublish {
                    participant: self.me.id,
                    track,
                },
                None,
            )
            .await
            .map_err(|_| origin_down())?;
        match reply {
            Reply::Done => Ok(()),
            other => Err(refused(other)),
        }
    }

    /// Subscribes to tracks and returns the subscriber PC's new offer (None if nothing changed).
    pub async fn consume(
        &mut self,
        tracks: &[TrackId],
        max_layer: Option<SpatialLayer>,
    ) -> Result<Option<SubscriberOffer>, SessionError> {
        let mut added = false;
        // A track that cannot be subscribed does not stop the others; its error is returned
        // only when nothing could be subscribed.
        let mut first_error = None;
        for &track in tracks {
            if self.subscriber.as_ref().is_some_and(|s| {
                s.media
                    .iter()
                    .any(|m| m.track == track && m.subscription.is_some())
            }) {
                continue; // already subscribed
            }
            let Some(info) = self.tracks.get(&track).cloned() else {
                first_error.get_or_insert(SessionError::new(
                    "no_such_track",
                    format!("no track {track} in this room"),
                ));
                continue;
            };
            if info.participant == self.me.id {
                first_error.get_or_insert(SessionError::new(
                    "bad_request",
                    "cannot subscribe to your own track",
                ));
                continue;
            }
            // Published on this edge, or else received through the room's cascade link.
            let (publ, remote) = match self.edge.publication(&self.room, track) {
                Some(p) if !crate::cascade::CascadeMedia::is_relayed(p.id) => (Some(p), false),
                _ => (
                    self.edge.cascade.ensure_remote(&self.room, &info).await,
                    true,
                ),
            };
            let Some(publ) = publ else {
                first_error.get_or_insert(SessionError::new(
                    "no_such_track",
                    format!("track {track} is not being received"),
                ));
                continue;
            };
            self.ensure_subscriber().await;
            let Some(sub) = self.subscriber.as_mut() else {
                return Err(SessionError::new("internal", "no subscriber transport"));
            };
            let mid = sub.next_mid.to_string();
            sub.next_mid += 1;
            let ssrc: u32 = rand::random();
            let rtx_ssrc = publ.codec.rtx_payload_type.map(|_| rand::random::<u32>());
            let sid = self.edge.subscription_id();
            let transport = sub.transport;
            sub.media.push(SubMedia {
                mid: mid.clone(),
                track,
                participant: info.participant,
                source: info.source,
                kind: publ.kind,
                codec: publ.codec.clone(),
                ssrc,
                rtx_ssrc,
                subscription: Some(sid),
                remote,
            });
            self.shard(Command::AddSubscription {
                id: sid,
                spec: SubscriptionSpec {
                    transport,
                    publication: publ.id,
                    mid,
                    ssrc,
                    rtx_ssrc,
                    payload_type: publ.codec.payload_type,
                    rtx_payload_type: publ.codec.rtx_payload_type,
                    max_layer: Some(
                        max_layer.unwrap_or(SpatialLayer(publ.layers.saturating_sub(1))),
                    ),
                    paused: false,
                },
            })
            .await;
            self.edge
                .metrics
                .subscriptions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            added = true;
        }
        match (added, first_error) {
            (true, _) => Ok(self.subscriber_offer()),
            (false, Some(e)) => Err(e),
            (false, None) => Ok(None),
        }
    }

    /// Every track of the room not our own that we do not receive yet.
    pub fn unsubscribed_tracks(&self) -> Vec<TrackId> {
        let mut v: Vec<TrackId> = self
            .tracks
            .values()
            .filter(|t| t.participant != self.me.id)
            .filter(|t| {
                !self.subscriber.as_ref().is_some_and(|s| {
                    s.media
                        .iter()
                        .any(|m| m.track == t.id && m.subscription.is_some())
                })
            })
            .map(|t| t.id)
            .collect();
        v.sort();
        v
    }

    /// Stops receiving tracks; returns the new offer if anything changed.
    pub async fn close_consumers(&mut self, tracks: &[TrackId]) -> Option<SubscriberOffer> {
        let mut removed = Vec::new();
        let mut remote = Vec::new();
        if let Some(sub) = self.subscriber.as_mut() {
            for m in sub.media.iter_mut() {
                if tracks.contains(&m.track) {
                    if let Some(sid) = m.subscription.take() {
                        removed.push(sid);
                        if std::mem::take(&mut m.remote) {
                            remote.push(m.track);
                        }
                    }
                }
            }
        }
        for sid in &removed {
            self.shard(Command::RemoveSubscription { id: *sid }).await;
            self.edge
                .metrics
                .subscriptions
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        for track in remote {
            self.edge.cascade.release_remote(&self.room, track).await;
        }
        if removed.is_empty() {
            None
        } else {
            self.subscriber_offer()
        }
    }

    fn subscription_of(&self, track: TrackId) -> Result<SubscriptionId, SessionError> {
        self.subscriber
            .as_ref()
            .and_then(|s| s.media.iter().find(|m| m.track == track))
            .and_then(|m| m.subscription)
            .ok_or_else(|| {
                SessionError::new("no_such_track", format!("not subscribed to track {track}"))
            })
    }

    pub async fn set_paused(&self, track: TrackId, paused: bool) -> Result<(), SessionError> {
        let id = self.subscription_of(track)?;
        self.shard(Command::SetPaused { id, paused }).await;
        Ok(())
    }

    pub async fn set_max_layer(&self, track: TrackId, max: u8) -> Result<(), SessionError> {
        let id = self.subscription_of(track)?;
        if max > 2 {
            return Err(SessionError::new(
                "bad_request",
                "maxSpatial must be 0, 1 or 2",
            ));
        }
        self.shard(Command::SetMaxLayer {
            id,
            max: Some(SpatialLayer(max)),
        })
        .await;
        Ok(())
    }

    /// The track a subscription forwards (for layer-change events).
    pub fn track_of(&self, sid: SubscriptionId) -> Option<TrackId> {
        self.subscriber
            .as_ref()?
            .media
            .iter()
            .find(|m| m.subscription == Some(sid))
            .map(|m| m.track)
    }

    /// The track of one of our publications on this edge, for active-speaker events.
    pub fn track_of_publication(&self, pid: PublicationId) -> Option<(TrackId, ParticipantId)> {
        self.tracks
            .values()
            .find(|t| {
                self.edge
                    .publication(&self.room, t.id)
                    .is_some_and(|p| p.id == pid)
            })
            .map(|t| (t.id, t.participant))
    }

    /// The client's answer to our offer `revision`.
    /// The client's answer to our offer `revision`; returns the next offer if changes queued up
    /// while this one was out.
    pub async fn handle_answer(
        &mut self,
        revision: u64,
        answer: &str,
    ) -> Result<Option<SubscriberOffer>, SessionError> {
        let Some(sub) = self.subscriber.as_mut() else {
            return Err(SessionError::new("stale_revision", "no offer outstanding"));
        };
        if revision != sub.revision {
            return Err(SessionError::new(
                "stale_revision",
                format!(
                    "answer is for revision {revision}, current offer is {}",
                    sub.revision
                ),
            ));
        }
        // Check against the m-lines of the offer that was sent: tracks added since then wait for
        // the next offer.
        let mids: Vec<&str> = sub.offered_mids.iter().map(String::as_str).collect();
        let parsed = sdp::parse_subscriber_answer(answer, &mids, &SdpLimits::default())?;
        let transport = sub.transport;
        sub.awaiting_answer = false;
        let again = std::mem::take(&mut sub.renegotiate);
        let first = !sub.remote_known;
        sub.remote_known = true;
        let ext_out = parsed.ext;
        if first {
            self.shard(Command::SetRemote {
                id: transport,
                remote: IceCredentials {
                    ufrag: parsed.remote.ice_ufrag.clone(),
                    pwd: parsed.remote.ice_pwd.clone(),
                },
            })
            .await;
            self.expect_dtls(transport, &parsed.remote).await;
        }
        self.shard(Command::SetExtensions {
            id: transport,
            ext_in: ExtIds::default(),
            ext_out,
        })
        .await;
        Ok(if again { self.subscriber_offer() } else { None })
    }

    async fn ensure_subscriber(&mut self) {
        if self.subscriber.is_some() {
            return;
        }
        let (creds, local) = self.edge.local_transport(self.shard);
        let transport = self
            .new_transport(creds, None, ExtIds::default(), ExtIds::default())
            .await;
        self.subscriber = Some(Subscriber {
            transport,
            local,
            remote_known: false,
            media: Vec::new(),
            revision: 0,
            session_id: rand::random::<u32>() as u64,
            next_mid: 0,
            awaiting_answer: false,
            offered_mids: Vec::new(),
            renegotiate: false,
        });
    }

    /// The subscriber PC's next offer, or `None` while the previous one awaits its answer (the
    /// change is then offered as soon as that answer arrives: one offer in flight at a time, so
    /// the client never sees an offer while it is still applying the previous one).
    fn subscriber_offer(&mut self) -> Option<SubscriberOffer> {
        let sub = self.subscriber.as_mut()?;
        if sub.awaiting_answer {
            sub.renegotiate = true;
            return None;
        }
        sub.awaiting_answer = true;
        sub.revision += 1;
        sub.offered_mids = sub.media.iter().map(|m| m.mid.clone()).collect();
        let media: Vec<OutgoingMedia> = sub
            .media
            .iter()
            .map(|m| OutgoingMedia {
                mid: m.mid.clone(),
                kind: m.kind,
                codec: m.codec.clone(),
                ssrc: m.ssrc,
                rtx_ssrc: m.rtx_ssrc,
                stream_id: format!("{}", m.participant),
                track_id: format!("{}", m.track),
                active: m.subscription.is_some(),
            })
            .collect();
        let sdp = sdp::subscriber_offer(
            sub.session_id,
            sub.revision,
            &sub.local,
            &media,
            &SUBSCRIBER_EXT,
        );
        Some(SubscriberOffer {
            revision: sub.revision,
            sdp,
            tracks: sub
                .media
                .iter()
                .filter(|m| m.subscription.is_some())
                .map(|m| OfferedTrack {
                    mid: m.mid.clone(),
                    track: m.track,
                    participant: m.participant,
                    source: m.source,
                    kind: track_kind(m.kind),
                })
                .collect(),
        })
    }

    /// Applies a room event to our view; returns a new subscriber offer when the event removed
    /// tracks we were receiving.
    pub async fn handle_room_event(&mut self, event: &RoomEvent) -> Option<SubscriberOffer> {
        match &event.body {
            RoomEventBody::TrackPublished(t) => {
                self.tracks.insert(t.id, t.clone());
                None
            }
            RoomEventBody::TrackUnpublished { track, .. } => {
                self.tracks.remove(track);
                // Our own track withdrawn by the room (a role change took the right away).
                self.drop_own_publication(*track).await;
                self.close_consumers(&[*track]).await
            }
            RoomEventBody::TrackMuted { track, muted, .. } => {
                if let Some(t) = self.tracks.get_mut(track) {
                    t.muted = *muted;
                }
                // The publisher's edge enforces a mute at the SFU: a muted track (by its owner
                // or by a moderator) is not forwarded to anyone.
                if let Some(pid) = self.own_publication(*track) {
                    self.shard(Command::SetPublicationMuted {
                        id: pid,
                        muted: *muted,
                    })
                    .await;
                }
                None
            }
            RoomEventBody::RoleChanged {
                participant, role, ..
            } if *participant == self.me.id => {
                self.me.role = *role;
                None
            }
            _ => None,
        }
    }

    /// The shard publication of one of our tracks.
    fn own_publication(&self, track: TrackId) -> Option<PublicationId> {
        self.publisher
            .as_ref()?
            .tracks
            .values()
            .find(|(t, _)| *t == track)
            .map(|(_, pid)| *pid)
    }

    /// Stops receiving one of our tracks the room no longer has (no intent: the room decided).
    async fn drop_own_publication(&mut self, track: TrackId) {
        let Some(p) = self.publisher.as_mut() else {
            return;
        };
        let Some(mid) = p
            .tracks
            .iter()
            .find(|(_, (t, _))| *t == track)
            .map(|(m, _)| m.clone())
        else {
            return;
        };
        let Some((_, pid)) = p.tracks.remove(&mid) else {
            return;
        };
        self.shard(Command::RemovePublication { id: pid }).await;
        self.edge.hub.forget_publication(pid);
        self.edge.remove_publication(&self.room, track);
        self.edge
            .metrics
            .publications
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Transport ids, to tell which of our transports an event is about.
    pub fn is_publisher_transport(&self, t: TransportId) -> bool {
        self.publisher.as_ref().is_some_and(|p| p.transport == t)
    }

    /// Leaves the room and releases every transport. Idempotent.
    pub async fn leave(&mut self) {
        self.release(true).await;
    }

    /// Releases everything without telling the origin: for when the room already forgot us
    /// (we were removed, or the meeting ended), where a late `Leave` could only confuse it.
    pub async fn release_after_room_ended(&mut self) {
        self.release(false).await;
    }

    async fn release(&mut self, tell_origin: bool) {
        if self.left {
            return;
        }
        self.left = true;
        let published: Vec<(TrackId, PublicationId)> = self
            .publisher
            .as_ref()
            .map(|p| p.tracks.values().copied().collect())
            .unwrap_or_default();
        for (track, pid) in &published {
            self.edge.remove_publication(&self.room, *track);
            self.edge.hub.forget_publication(*pid);
        }
        let subs = self
            .subscriber
            .as_ref()
            .map(|s| s.media.iter().filter(|m| m.subscription.is_some()).count())
            .unwrap_or(0);
        use std::sync::atomic::Ordering::Relaxed;
        self.edge
            .metrics
            .publications
            .fetch_sub(published.len() as i64, Relaxed);
        self.edge
            .metrics
            .subscriptions
            .fetch_sub(subs as i64, Relaxed);
        self.edge.metrics.participants.fetch_sub(1, Relaxed);
        for t in [
            self.publisher.as_ref().map(|p| p.transport),
            self.subscriber.as_ref().map(|s| s.transport),
        ]
        .into_iter()
        .flatten()
        {
            self.shard(Command::RemoveTransport { id: t }).await;
        }
        let remote: Vec<TrackId> = self
            .subscriber
            .as_ref()
            .map(|s| {
                s.media
                    .iter()
                    .filter(|m| m.remote && m.subscription.is_some())
                    .map(|m| m.track)
                    .collect()
            })
            .unwrap_or_default();
        for track in remote {
            self.edge.cascade.release_remote(&self.room, track).await;
        }
        if tell_origin {
            let _ = self
                .edge
                .hub
                .request(
                    &self.room,
                    Intent::Leave {
                        participant: self.me.id,
                    },
                    None,
                )
                .await;
        }
        self.edge.hub.detach(&self.room, self.me.id).await;
        self.edge
            .shards
            .send(
                self.shard,
                ShardInput::Unregister {
                    session: self.session,
                },
            )
            .await;
        tracing::info!(room = %self.room, participant = %self.me.id, "left");
    }
}

/// Our answer to a WHEP offer: subscribes to the given tracks on a client-offered transport.
pub async fn whep_subscribe(
    p: &mut Participant,
    offer: &str,
    tracks: &[TrackId],
) -> Result<String, SessionError> {
    let mut wants = Vec::new();
    let mut pubs = Vec::new();
    // Remote tracks (published on another edge) are relayed here through the cascade.
    let mut remote = Vec::new();
    for &t in tracks {
        let publ = match p.edge.publication(&p.room, t) {
            Some(publ) if !crate::cascade::CascadeMedia::is_relayed(publ.id) => Some(publ),
            _ => match p.tracks.get(&t).cloned() {
                Some(info) => {
                    let publ = p.edge.cascade.ensure_remote(&p.room, &info).await;
                    if publ.is_some() {
                        remote.push(t);
                    }
                    publ
                }
                None => None,
            },
        };
        let Some(publ) = publ else {
            continue;
        };
        let ssrc: u32 = rand::random();
        let rtx = publ.codec.rtx_payload_type.map(|_| rand::random::<u32>());
        pubs.push((t, publ, ssrc, rtx));
    }
    let ids: Vec<(String, String)> = pubs
        .iter()
        .map(|(t, publ, _, _)| (publ.participant.to_string(), t.to_string()))
        .collect();
    for ((_, publ, ssrc, rtx), (stream_id, track_id)) in pubs.iter().zip(&ids) {
        wants.push(sdp::WhepSource {
            kind: publ.kind,
            codec: &publ.codec.name,
            ssrc: *ssrc,
            rtx_ssrc: *rtx,
            stream_id,
            track_id,
        });
    }
    let (creds, local) = p.edge.local_transport(p.shard);
    let answer = sdp::answer_subscribe(offer, &local, &wants, &SdpLimits::default())?;
    let ext_out = answer
        .media
        .iter()
        .find(|m| m.accepted)
        .map(|m| m.ext)
        .unwrap_or_default();
    let transport = p
        .new_transport(creds, Some(&answer.remote), ExtIds::default(), ext_out)
        .await;
    let mut any = false;
    let mut media = Vec::new();
    for m in answer.media.iter().filter(|m| m.accepted) {
        let (Some(i), Some(codec)) = (m.source, m.codec.as_ref()) else {
            continue;
        };
        let Some((t, publ, ssrc, rtx)) = pubs.get(i) else {
            continue;
        };
        let sid = p.edge.subscription_id();
        if let Some(info) = p.tracks.get(t) {
            // Kept so leave() removes the subscription and releases a relayed publication.
            media.push(SubMedia {
                mid: m.mid.clone(),
                track: *t,
                participant: info.participant,
                source: info.source,
                kind: publ.kind,
                codec: publ.codec.clone(),
                ssrc: *ssrc,
                rtx_ssrc: codec.rtx_payload_type.and(*rtx),
                subscription: Some(sid),
                remote: remote.contains(t),
            });
        }
        // WHEP offers carry the client's payload types: use the ones the answer chose.
        p.shard(Command::AddSubscription {
            id: sid,
            spec: SubscriptionSpec {
                transport,
                publication: publ.id,
                mid: m.mid.clone(),
                ssrc: *ssrc,
                rtx_ssrc: codec.rtx_payload_type.and(*rtx),
                payload_type: codec.payload_type,
                rtx_payload_type: codec.rtx_payload_type,
                max_layer: Some(SpatialLayer(publ.layers.saturating_sub(1))),
                paused: false,
            },
        })
        .await;
        any = true;
    }
    // Relayed publications this session took but its answer did not use.
    for t in remote
        .iter()
        .filter(|t| !media.iter().any(|m| m.track == **t))
    {
        p.edge.cascade.release_remote(&p.room, *t).await;
    }
    if !any {
        return Err(SessionError::new(
            "sdp_unsupported",
            "the offer accepts none of the publisher's tracks (codec or direction)",
        ));
    }
    // Remember the transport so leave() releases it.
    p.subscriber = Some(Subscriber {
        transport,
        local,
        remote_known: true,
        media,
        revision: 0,
        session_id: 0,
        next_mid: 0,
        awaiting_answer: false,
        offered_mids: Vec::new(),
        renegotiate: false,
    });
    Ok(answer.sdp)
}

fn track_kind(k: MediaKind) -> TrackKind {
    match k {
        MediaKind::Audio => TrackKind::Audio,
        MediaKind::Video => TrackKind::Video,
    }
}
