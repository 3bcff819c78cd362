//! One room's state machine: roster, tracks and the event sequence.

use cascade_proto::room::{
    EdgeId, Intent, ParticipantInfo, Reply, RoomError, RoomEvent, RoomEventBody, TrackInfo,
};
use cascade_proto::{ParticipantId, Role, RoomId, TrackId, TrackSource};
use std::collections::BTreeMap;

/// Limits for one room. Plain data with the defaults documented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomConfig {
    /// Participants at most (default 10,000: the meeting size the project is built for).
    pub max_participants: u32,
    /// Tracks one participant may publish at once (default 4: mic, camera, screen, screen audio).
    pub max_tracks_per_participant: u32,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            max_participants: 10_000,
            max_tracks_per_participant: 4,
        }
    }
}

/// One room.
#[derive(Debug)]
pub struct Room {
    id: RoomId,
    config: RoomConfig,
    participants: BTreeMap<ParticipantId, ParticipantInfo>,
    tracks: BTreeMap<TrackId, TrackInfo>,
    next_participant: u64,
    next_track: u64,
    seq: u64,
}

type Events = Vec<(RoomEvent, Vec<EdgeId>)>;

impl Room {
    pub fn new(id: RoomId, config: RoomConfig) -> Self {
        Self {
            id,
            config,
            participants: BTreeMap::new(),
            tracks: BTreeMap::new(),
            next_participant: 1,
            next_track: 1,
            seq: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    pub fn participants(&self) -> impl Iterator<Item = &ParticipantInfo> {
        self.participants.values()
    }

    pub fn tracks(&self) -> impl Iterator<Item = &TrackInfo> {
        self.tracks.values()
    }

    /// Last event sequence number issued.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Applies one intent from `edge`. A refused intent changes nothing and emits no event.
    pub fn handle(&mut self, edge: EdgeId, intent: Intent) -> (Reply, Events) {
        let mut events = Vec::new();
        let reply = match self.apply(edge, intent, &mut events) {
            Ok(reply) => reply,
            Err(e) => {
                debug_assert!(events.is_empty(), "refused intents emit nothing");
                Reply::Refused(e)
            }
        };
        (reply, events)
    }

    fn apply(
        &mut self,
        edge: EdgeId,
        intent: Intent,
        events: &mut Events,
    ) -> Result<Reply, RoomError> {
        match intent {
            Intent::Join {
                identity,
                role,
                name,
            } => {
                if self.participants.len() as u32 >= self.config.max_participants {
                    return Err(RoomError::RoomFull(self.config.max_participants));
                }
                let id = ParticipantId(self.next_participant);
                self.next_participant += 1;
                let info = ParticipantInfo {
                    id,
                    identity,
                    name,
                    role,
                    edge,
                };
                self.participants.insert(id, info.clone());
                self.emit(RoomEventBody::ParticipantJoined(info.clone()), events);
                Ok(Reply::Joined {
                    you: info,
                    participants: self.participants.values().cloned().collect(),
                    tracks: self.tracks.values().cloned().collect(),
                    seq: self.seq,
                })
            }
            Intent::Leave { participant } => {
                self.member(participant)?;
                let gone: Vec<TrackId> = self
                    .tracks
                    .values()
                    .filter(|t| t.participant == participant)
                    .map(|t| t.id)
                    .collect();
                for track in gone {
                    self.tracks.remove(&track);
                    self.emit(
                        RoomEventBody::TrackUnpublished { track, participant },
                        events,
                    );
                }
                // Emit before removing so the leaving participant's edge hears it too.
                self.emit(RoomEventBody::ParticipantLeft { participant }, events);
                self.participants.remove(&participant);
                if self.participants.is_empty() {
                    self.emit_to_nobody(RoomEventBody::RoomClosed, events);
                }
                Ok(Reply::Done)
            }
            Intent::Publish {
                participant,
                source,
                codec,
                layers,
            } => {
                let role = self.member(participant)?.role;
                if !may_publish(role, source) {
                    return Err(RoomError::Forbidden(role));
                }
                let mine = self
                    .tracks
                    .values()
                    .filter(|t| t.participant == participant);
                let mut count = 0;
                for t in mine {
                    if t.source == source {
                        return Err(RoomError::SourceInUse(source));
                    }
                    count += 1;
                }
                if count >= self.config.max_tracks_per_participant {
                    return Err(RoomError::TooManyTracks(
                        self.config.max_tracks_per_participant,
                    ));
                }
                let track = TrackInfo {
                    id: TrackId(self.next_track),
                    participant,
                    source,
                    kind: source.kind(),
                    codec,
                    layers: layers.clamp(1, 3),
                    muted: false,
                };
                self.next_track += 1;
                self.tracks.insert(track.id, track.clone());
                self.emit(RoomEventBody::TrackPublished(track.clone()), events);
                Ok(Reply::Published { track })
            }
            Intent::Unpublish { participant, track } => {
                self.member(participant)?;
                self.own_track(participant, track)?;
                self.tracks.remove(&track);
                self.emit(
                    RoomEventBody::TrackUnpublished { track, participant },
                    events,
                );
                Ok(Reply::Done)
            }
            Intent::SetMuted {
                participant,
                track,
                muted,
            } => {
                self.member(participant)?;
                self.own_track(participant, track)?;
                if let Some(t) = self.tracks.get_mut(&track) {
                    if t.muted != muted {
                        t.muted = muted;
                        self.emit(RoomEventBody::TrackMuted { track, muted }, events);
                    }
                }
                Ok(Reply::Done)
            }
        }
    }

    fn member(&self, p: ParticipantId) -> Result<&ParticipantInfo, RoomError> {
        self.participants.get(&p).ok_or(RoomError::NotInRoom)
    }

    fn own_track(&self, p: ParticipantId, track: TrackId) -> Result<(), RoomError> {
        match self.tracks.get(&track) {
            Some(t) if t.participant == p => Ok(()),
            _ => Err(RoomError::NoSuchTrack),
        }
    }

    /// Edges that currently host participants of this room.
    fn edges(&self) -> Vec<EdgeId> {
        let mut edges: Vec<EdgeId> = self.participants.values().map(|p| p.edge).collect();
        edges.sort_by_key(|e| e.0);
        edges.dedup();
        edges
    }

    fn emit(&mut self, body: RoomEventBody, events: &mut Events) {
        let to = self.edges();
        self.push(body, to, events);
    }

    fn emit_to_nobody(&mut self, body: RoomEventBody, events: &mut Events) {
        self.push(body, Vec::new(), events);
    }

    fn push(&mut self, body: RoomEventBody, to: Vec<EdgeId>, events: &mut Events) {
        self.seq += 1;
        events.push((
            RoomEvent {
                room: self.id.clone(),
                seq: self.seq,
                body,
            },
            to,
        ));
    }
}

/// Who may publish what. The full permission matrix (mute others, admit, lock...) comes with the
/// meetings issue; publishing is the part the media path needs.
fn may_publish(role: Role, source: TrackSource) -> bool {
    match role {
        Role::Host | Role::CoHost | Role::Presenter => true,
        Role::Attendee => matches!(source, TrackSource::Microphone | TrackSource::Camera),
        Role::Viewer => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_proto::Identity;

    const E: EdgeId = EdgeId(0);

    fn room() -> Room {
        Room::new(RoomId::new("r").unwrap(), RoomConfig::default())
    }

    fn join(r: &mut Room, who: &str, role: Role) -> ParticipantId {
        let (reply, _) = r.handle(
            E,
            Intent::Join {
                identity: Identity::new(who).unwrap(),
                role,
                name: who.into(),
            },
        );
        match reply {
            Reply::Joined { you, .. } => you.id,
            other => panic!("join refused: {other:?}"),
        }
    }

    fn publish(r: &mut Room, p: ParticipantId, source: TrackSource) -> Reply {
        r.handle(
            E,
            Intent::Publish {
                participant: p,
                source,
                codec: "VP8".into(),
                layers: 3,
            },
        )
        .0
    }

    #[test]
    fn events_are_numbered_without_gaps_and_refusals_change_nothing() {
        let mut r = room();
        let a = join(&mut r, "a", Role::Host);
        let v = join(&mut r, "v", Role::Viewer);
        assert_eq!(r.seq(), 2);
        assert_eq!(
            publish(&mut r, v, TrackSource::Camera),
            Reply::Refused(RoomError::Forbidden(Role::Viewer))
        );
        assert_eq!(r.seq(), 2, "a refused intent emits nothing");
        let Reply::Published { track } = publish(&mut r, a, TrackSource::Camera) else {
            panic!()
        };
        assert_eq!(r.seq(), 3);
        assert_eq!(
            publish(&mut r, a, TrackSource::Camera),
            Reply::Refused(RoomError::SourceInUse(TrackSource::Camera))
        );
        let (reply, ev) = r.handle(
            E,
            Intent::Unpublish {
                participant: v,
                track: track.id,
            },
        );
        assert_eq!(
            reply,
            Reply::Refused(RoomError::NoSuchTrack),
            "not v's track"
        );
        assert!(ev.is_empty());
        let (_, ev) = r.handle(E, Intent::Leave { participant: a });
        let seqs: Vec<u64> = ev.iter().map(|(e, _)| e.seq).collect();
        assert_eq!(seqs, vec![4, 5], "track unpublished, then participant left");
        assert!(matches!(
            ev[0].0.body,
            RoomEventBody::TrackUnpublished { .. }
        ));
        assert_eq!(r.tracks().count(), 0);
    }

    #[test]
    fn attendees_publish_camera_and_mic_but_not_screen() {
        let mut r = room();
        let a = join(&mut r, "a", Role::Attendee);
        assert!(matches!(
            publish(&mut r, a, TrackSource::Microphone),
            Reply::Published { .. }
        ));
        assert!(matches!(
            publish(&mut r, a, TrackSource::Camera),
            Reply::Published { .. }
        ));
        assert_eq!(
            publish(&mut r, a, TrackSource::Screen),
            Reply::Refused(RoomError::Forbidden(Role::Attendee))
        );
    }

    #[test]
    fn room_full_is_refused() {
        let mut r = Room::new(
            RoomId::new("r").unwrap(),
            RoomConfig {
                max_participants: 1,
                ..RoomConfig::default()
            },
        );
        join(&mut r, "a", Role::Host);
        let (reply, ev) = r.handle(
            E,
            Intent::Join {
                identity: Identity::new("b").unwrap(),
                role: Role::Attendee,
                name: "b".into(),
            },
        );
        assert_eq!(reply, Reply::Refused(RoomError::RoomFull(1)));
        assert!(ev.is_empty());
    }

    #[test]
    fn joined_reply_carries_roster_and_tracks() {
        let mut r = room();
        let a = join(&mut r, "a", Role::Host);
        publish(&mut r, a, TrackSource::Microphone);
        let (reply, _) = r.handle(
            E,
            Intent::Join {
                identity: Identity::new("b").unwrap(),
                role: Role::Attendee,
                name: "b".into(),
            },
        );
        let Reply::Joined {
            participants,
            tracks,
            seq,
            ..
        } = reply
        else {
            panic!()
        };
        assert_eq!(participants.len(), 2);
        assert_eq!(tracks.len(), 1);
        assert_eq!(seq, 3);
    }
}
