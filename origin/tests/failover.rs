//! Origin failover: a meeting runs on one origin with two edges, each edge keeping its replica
//! (`cascade_proto::replica`) from exactly what the origin sent it; the origin dies; a new origin
//! is rebuilt from the replicas of the edges that are still there. Nothing the old origin
//! acknowledged to a surviving participant is lost: roster, roles, hands, chat, settings,
//! tracks, host mutes; nor what the new origin acknowledged while it waited for the replicas
//! (a hand raised or lowered, a setting, a leave), whatever later replica comes after it.

use cascade_proto::replica::ReplicaTracker;
use cascade_proto::room::{
    Audience, EdgeId, EdgeToOrigin, Intent, Layout, OriginToEdge, PresenceMode, Reply, RequestId,
    RoomEvent, RoomEventBody, RoomReplica, RoomSettings,
};
use cascade_proto::{Identity, ParticipantId, Role, RoomId, TrackKind, TrackSource};
use origin::{Origin, RoomConfig, RESTORE_GRACE_MS, RESTORE_ID_MARGIN};
use std::collections::{HashMap, HashSet};

const E1: EdgeId = EdgeId(1);
const E2: EdgeId = EdgeId(2);
const T0: u64 = 1_000_000;

/// An origin and the edges' replica trackers, fed from what the origin sends each edge.
struct Cluster {
    origin: Origin,
    config: RoomConfig,
    edges: HashMap<EdgeId, ReplicaTracker>,
    /// Events each edge received, for checks.
    seen: HashMap<EdgeId, Vec<RoomEvent>>,
    /// Edges the origin's messages do not reach (in flight when it died).
    cut: HashSet<EdgeId>,
    next_id: u64,
    now: u64,
}

fn room() -> RoomId {
    RoomId::new("town").unwrap()
}

impl Cluster {
    fn new() -> Self {
        Self::with(RoomConfig::default())
    }

    fn with(config: RoomConfig) -> Self {
        Self {
            origin: Origin::new(config.clone()),
            config,
            edges: [(E1, ReplicaTracker::new()), (E2, ReplicaTracker::new())].into(),
            seen: HashMap::new(),
            cut: HashSet::new(),
            next_id: 1,
            now: T0,
        }
    }

    fn deliver(
        &mut self,
        out: Vec<origin::Outgoing>,
        asked: Option<(RequestId, &mut Option<Reply>)>,
    ) {
        let mut asked = asked;
        for o in out {
            if self.cut.contains(&o.edge) {
                continue;
            }
            let tracker = self.edges.entry(o.edge).or_default();
            match o.message {
                OriginToEdge::Reply { id, reply } => {
                    tracker.on_reply(&room(), &reply);
                    if let Some((want, slot)) = asked.as_mut() {
                        if *want == id {
                            **slot = Some(reply);
                        }
                    }
                }
                OriginToEdge::Event(e) => {
                    tracker.on_event(&e);
                    self.seen.entry(o.edge).or_default().push(e);
                }
                OriginToEdge::Attached { .. } => {}
            }
        }
    }

    fn ask(&mut self, edge: EdgeId, intent: Intent) -> Reply {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.now += 10;
        let out = self.origin.handle_at(
            edge,
            EdgeToOrigin::Request {
                id,
                room: room(),
                intent,
            },
            self.now,
        );
        let mut reply = None;
        self.deliver(out, Some((id, &mut reply)));
        reply.expect("every request gets a reply")
    }

    fn tick(&mut self, advance_ms: u64) {
        self.now += advance_ms;
        let out = self.origin.tick_at(self.now);
        self.deliver(out, None);
    }

    fn join(&mut self, edge: EdgeId, who: &str, role: Role) -> ParticipantId {
        let reply = self.ask(
            edge,
            Intent::Join {
                identity: Identity::new(who).unwrap(),
                role,
                name: who.into(),
            },
        );
        match reply {
            Reply::Joined(s) => s.you.id,
            other => panic!("join of {who} refused: {other:?}"),
        }
    }

    /// The origin dies; a fresh one takes the room from the replicas of `survivors`.
    fn fail_over(&mut self, survivors: &[EdgeId]) {
        self.origin = Origin::new(self.config.clone());
        for &edge in survivors {
            self.restore_from(edge);
        }
    }

    /// `edge` sends its replica to the (new) origin.
    fn restore_from(&mut self, edge: EdgeId) {
        let replica = self.edges[&edge]
            .replica(&room())
            .expect("edge has the room");
        let (id, out) = self.offer_replica(edge, replica);
        let mut reply = None;
        self.deliver(out, Some((id, &mut reply)));
        assert_eq!(reply, Some(Reply::Done));
    }

    /// `replica` reaches the origin on `link` (the edge's link, or its new one after a blip);
    /// returns the request's id and what the origin sends, not yet delivered.
    fn offer_replica(
        &mut self,
        link: EdgeId,
        replica: RoomReplica,
    ) -> (RequestId, Vec<origin::Outgoing>) {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let out = self.origin.handle_at(
            link,
            EdgeToOrigin::Restore {
                id,
                room: room(),
                replica: Box::new(replica),
            },
            self.now,
        );
        (id, out)
    }

    fn chat(&mut self, edge: EdgeId, participant: ParticipantId, text: &str) -> u64 {
        let r = self.ask(
            edge,
            Intent::Chat {
                participant,
                text: text.into(),
                to: None,
            },
        );
        match r {
            Reply::Chat { message } => message.id,
            other => panic!("chat refused: {other:?}"),
        }
    }
}

/// A meeting with a bit of everything: host and guest on edge 1, a promoted presenter and an
/// attendee on edge 2; chat, hands, a host mute, layout, lock.
fn meeting() -> (Cluster, [ParticipantId; 4]) {
    let mut c = Cluster::new();
    let host = c.join(E1, "host", Role::Host);
    let guest = c.join(E1, "guest", Role::Attendee);
    let pres = c.join(E2, "pres", Role::Attendee);
    let att = c.join(E2, "att", Role::Attendee);
    c.tick(200);
    let r = c.ask(
        E1,
        Intent::SetRole {
            participant: host,
            target: pres,
            role: Role::Presenter,
        },
    );
    assert_eq!(r, Reply::Done);
    for (edge, p) in [(E2, pres), (E1, guest)] {
        let r = c.ask(
            edge,
            Intent::Publish {
                participant: p,
                source: TrackSource::Camera,
                codec: "VP8".into(),
                layers: 3,
            },
        );
        assert!(matches!(r, Reply::Published { .. }), "{r:?}");
        let r = c.ask(
            edge,
            Intent::Publish {
                participant: p,
                source: TrackSource::Microphone,
                codec: "opus".into(),
                layers: 1,
            },
        );
        assert!(matches!(r, Reply::Published { .. }), "{r:?}");
    }
    let r = c.ask(
        E1,
        Intent::MuteRemote {
            participant: host,
            target: pres,
            kind: TrackKind::Audio,
            muted: true,
        },
    );
    assert_eq!(r, Reply::Done);
    for (edge, p, text) in [
        (E1, host, "welcome"),
        (E2, att, "hi all"),
        (E1, guest, "hello"),
    ] {
        let r = c.ask(
            edge,
            Intent::Chat {
                participant: p,
                text: text.into(),
                to: None,
            },
        );
        assert!(matches!(r, Reply::Chat { .. }), "{r:?}");
    }
    // A direct message between the edges.
    let r = c.ask(
        E2,
        Intent::Chat {
            participant: att,
            text: "psst".into(),
            to: Some(guest),
        },
    );
    assert!(matches!(r, Reply::Chat { .. }), "{r:?}");
    for (edge, p) in [(E2, att), (E1, guest)] {
        assert_eq!(
            c.ask(edge, Intent::RaiseHand { participant: p }),
            Reply::Done
        );
    }
    let r = c.ask(
        E1,
        Intent::SetLayout {
            participant: host,
            layout: Some(Layout::Speaker),
            spotlight: Some(Some(pres)),
        },
    );
    assert_eq!(r, Reply::Done);
    let r = c.ask(
        E1,
        Intent::SetLocked {
            participant: host,
            locked: true,
        },
    );
    assert_eq!(r, Reply::Done);
    c.tick(200);
    (c, [host, guest, pres, att])
}

#[test]
fn a_new_origin_rebuilds_the_room_from_both_edges() {
    let (mut c, [host, guest, pres, att]) = meeting();
    let before = c.origin.room(&room()).unwrap();
    let roster_before: Vec<_> = before.participants().cloned().collect();
    let tracks_before: Vec<_> = before.tracks().cloned().collect();
    let settings_before = before.settings().clone();
    let seq_before = before.seq();

    c.fail_over(&[E2, E1]);
    c.tick(RESTORE_GRACE_MS + 1);

    let after = c.origin.room(&room()).expect("room rebuilt");
    assert!(!after.is_restoring());
    assert_eq!(
        after.participants().cloned().collect::<Vec<_>>(),
        roster_before
    );
    assert_eq!(after.tracks().cloned().collect::<Vec<_>>(), tracks_before);
    assert_eq!(after.settings(), &settings_before);
    // Numbered on above anything a client saw (see RESTORE_ID_MARGIN).
    assert_eq!(after.seq(), seq_before + RESTORE_ID_MARGIN);
    let audio = after
        .tracks()
        .find(|t| t.participant == pres && t.kind == TrackKind::Audio)
        .unwrap()
        .id;

    // Roles hold: the presenter still may not lock, the host still may; the host mute holds.
    assert!(matches!(
        c.ask(
            E2,
            Intent::SetLocked {
                participant: pres,
                locked: false
            }
        ),
        Reply::Refused(_)
    ));
    assert!(matches!(
        c.ask(
            E2,
            Intent::SetMuted {
                participant: pres,
                track: audio,
                muted: false
            }
        ),
        Reply::Refused(_)
    ));
    // Hands in their order; the chat history a joiner gets, including the direct message for
    // the guest only.
    let late = c.ask(
        E1,
        Intent::Join {
            identity: Identity::new("late-host").unwrap(),
            role: Role::Host,
            name: "late".into(),
        },
    );
    let Reply::Joined(s) = late else {
        panic!("{late:?}")
    };
    assert_eq!(s.hands, vec![att, guest]);
    let texts: Vec<&str> = s.chat.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["welcome", "hi all", "hello"]);
    assert!(s.you.id.0 > att.0, "ids are never reused");
    let r = c.ask(
        E1,
        Intent::Chat {
            participant: guest,
            text: "after".into(),
            to: None,
        },
    );
    let Reply::Chat { message } = r else {
        panic!("{r:?}")
    };
    assert!(message.id > 4, "chat ids continue: {}", message.id);
    // Events after the failover are numbered on from the old origin's.
    c.tick(200);
    let last = c.seen[&E2].last().unwrap();
    assert!(last.seq > seq_before);
    let _ = host;
}

/// The dying origin's last events reach one edge and not the other: a participant who joined
/// and a message acknowledged on edge 2 only. The new origin hears from edge 1 first and serves
/// a join and a message there before edge 2's replica comes. Nobody is merged into somebody
/// else, no acknowledged message is dropped, the messages keep their order, and every client
/// sees event numbers go on rising.
#[test]
fn ids_handed_out_while_restoring_never_collide_with_a_later_replicas() {
    let mut c = Cluster::new();
    let host = c.join(E1, "host", Role::Host);
    let pres = c.join(E2, "pres", Role::Attendee);
    c.chat(E1, host, "before");
    c.tick(200);
    // The origin's last moments: edge 1 hears none of it.
    c.cut.insert(E1);
    let late = c.join(E2, "late", Role::Attendee);
    let only_e2 = c.chat(E2, pres, "only edge 2 saw this");
    let e2_last_seq = c.seen[&E2].last().unwrap().seq;
    c.cut.clear();

    // The new origin: edge 1's replica first, then a join and a message on edge 1 while the
    // window is open, then edge 2's replica.
    c.origin = Origin::new(c.config.clone());
    c.restore_from(E1);
    let fresh = c.join(E1, "fresh", Role::Attendee);
    let during = c.chat(E1, host, "during the window");
    c.restore_from(E2);
    c.tick(RESTORE_GRACE_MS + 1);

    assert_ne!(
        fresh, late,
        "a participant only edge 2 knew keeps its own id"
    );
    assert!(during > only_e2, "chat sent later sorts later");
    let room_now = c.origin.room(&room()).unwrap();
    let homes: HashMap<ParticipantId, EdgeId> =
        room_now.participants().map(|p| (p.id, p.edge)).collect();
    assert_eq!(homes.get(&late), Some(&E2), "{homes:?}");
    assert_eq!(homes.get(&fresh), Some(&E1), "{homes:?}");
    assert_eq!(homes.len(), 4, "{homes:?}");
    let newcomer = c.ask(
        E2,
        Intent::Join {
            identity: Identity::new("newcomer").unwrap(),
            role: Role::Attendee,
            name: "newcomer".into(),
        },
    );
    let Reply::Joined(s) = newcomer else {
        panic!("{newcomer:?}")
    };
    let texts: Vec<&str> = s.chat.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        ["before", "only edge 2 saw this", "during the window"]
    );
    // Edge 2's clients saw the old origin's numbers up to e2_last_seq: what the new origin
    // sends them is numbered above, so a resume (which replays by number) misses nothing.
    c.tick(200);
    assert!(
        c.seen[&E2].last().unwrap().seq > e2_last_seq,
        "{:?}",
        c.seen[&E2].last()
    );
}

#[test]
fn participants_of_an_edge_that_died_with_the_origin_leave_after_the_window() {
    let (mut c, [host, guest, pres, att]) = meeting();
    c.seen.clear();
    c.fail_over(&[E1]);
    {
        let r = c.origin.room(&room()).unwrap();
        assert!(r.is_restoring());
        // Edge 1's own participants are back at once; edge 2's are not announced.
        let ids: Vec<_> = r.participants().map(|p| p.id).collect();
        assert_eq!(ids, vec![host, guest]);
    }
    c.tick(RESTORE_GRACE_MS / 2);
    assert!(c.origin.room(&room()).unwrap().is_restoring());
    c.tick(RESTORE_GRACE_MS);
    let r = c.origin.room(&room()).unwrap();
    assert!(!r.is_restoring());
    // Edge 2's participants left: edge 1 is told, hands and spotlight of the gone are dropped.
    let left: Vec<ParticipantId> = c.seen[&E1]
        .iter()
        .filter_map(|e| match &e.body {
            RoomEventBody::ParticipantsLeft(l) if e.audience == Audience::All => Some(l.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(left, vec![pres, att]);
    let late = c.ask(
        E1,
        Intent::Join {
            identity: Identity::new("late").unwrap(),
            role: Role::Host,
            name: "late".into(),
        },
    );
    let Reply::Joined(s) = late else {
        panic!("{late:?}")
    };
    assert_eq!(s.hands, vec![guest]);
    assert_eq!(s.settings.spotlight, None);
    assert!(s.tracks.iter().all(|t| t.participant == guest));
    // Edge 1's replica was the only one and agreed with the room until the close dropped the
    // gone presenter's hand and spotlight: one `Restored`, after the leave, tells its clients.
    let restored: Vec<usize> = c.seen[&E1]
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.body, RoomEventBody::Restored { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(restored.len(), 1, "{:?}", c.seen[&E1]);
    let leave_at = c.seen[&E1]
        .iter()
        .position(|e| matches!(e.body, RoomEventBody::ParticipantsLeft(_)))
        .unwrap();
    assert!(restored[0] > leave_at);
    assert_eq!(held_by(&c, E1), (s.settings.clone(), s.hands.clone()));
}

/// Events the origin sent while edge 2's link was down never reached it: when the edge comes
/// back on a new link, its replica shows its clients' stale hands and settings, and the room
/// sends `Restored` (to every edge, so no one sees a gap in the room's numbering).
#[test]
fn a_link_blip_that_lost_events_tells_the_edges_clients_the_rooms_hands_and_settings() {
    let (mut c, [host, guest, ..]) = meeting();
    c.cut.insert(E2);
    assert_eq!(
        c.ask(
            E1,
            Intent::LowerHand {
                participant: host,
                target: guest
            }
        ),
        Reply::Done
    );
    assert_eq!(
        c.ask(
            E1,
            Intent::SetLobby {
                participant: host,
                enabled: true
            }
        ),
        Reply::Done
    );
    c.cut.clear();
    c.seen.clear();
    const E2_NEW: EdgeId = EdgeId(7);
    let replica = c.edges[&E2].replica(&room()).unwrap();
    let (_, out) = c.offer_replica(E2_NEW, replica);
    c.deliver(out, None);
    let r = c.origin.room(&room()).unwrap();
    let want = RoomEventBody::Restored {
        settings: r.settings().clone(),
        hands: r.hands().to_vec(),
    };
    assert!(r.settings().lobby);
    assert!(!r.hands().contains(&guest));
    for edge in [E1, E2_NEW] {
        let bodies: Vec<&RoomEventBody> = c.seen[&edge].iter().map(|e| &e.body).collect();
        assert_eq!(bodies, vec![&want], "edge {edge:?}");
    }
}

/// The settings and hand queue the clients of `edge` hold: its replica tracker follows every
/// event they were sent.
fn held_by(c: &Cluster, edge: EdgeId) -> (RoomSettings, Vec<ParticipantId>) {
    let r = c.edges[&edge].replica(&room()).expect("edge has the room");
    (r.settings, r.hands)
}

fn restored_count(c: &Cluster, edge: EdgeId) -> usize {
    c.seen.get(&edge).map_or(0, |events| {
        events
            .iter()
            .filter(|e| matches!(e.body, RoomEventBody::Restored { .. }))
            .count()
    })
}

/// Edge 2 saw the old origin's last events (a hand, the lock); edge 1 saw a hand raised on the
/// new origin while it waited. After edge 2's later replica each edge's clients held another
/// queue and settings than the room: both are sent the room's with `Restored`, and hold them.
#[test]
fn clients_on_every_edge_are_told_the_rebuilt_rooms_hands_and_settings() {
    let (mut c, [_, guest, a, b]) = window_then_later_replica(
        |c, [_, _, a, b]| {
            assert_eq!(c.ask(E2, Intent::RaiseHand { participant: b }), Reply::Done);
            assert_eq!(
                c.ask(
                    E2,
                    Intent::SetLocked {
                        participant: a,
                        locked: true
                    }
                ),
                Reply::Done
            );
        },
        |c, [_, guest, ..]| {
            assert_eq!(
                c.ask(E1, Intent::RaiseHand { participant: guest }),
                Reply::Done
            );
            assert_eq!(
                restored_count(c, E1),
                0,
                "one replica merged: nothing to tell"
            );
        },
    );
    let room_now = {
        let r = c.origin.room(&room()).unwrap();
        (r.settings().clone(), r.hands().to_vec())
    };
    assert_eq!(room_now.1, vec![b, guest]);
    assert!(room_now.0.locked);
    for edge in [E1, E2] {
        assert_eq!(restored_count(&c, edge), 1, "edge {edge:?}");
        assert_eq!(held_by(&c, edge), room_now, "edge {edge:?}");
    }
    // Closing the window changes nothing anyone holds: no second one.
    c.tick(RESTORE_GRACE_MS + 1);
    for edge in [E1, E2] {
        assert_eq!(restored_count(&c, edge), 1, "edge {edge:?}");
    }
    let _ = a;
}

/// Replicas that agree (both edges saw every event) send no `Restored`: nothing to correct.
#[test]
fn replicas_that_agree_send_no_restored() {
    let (mut c, _) = meeting();
    c.seen.clear();
    c.fail_over(&[E1, E2]);
    c.tick(RESTORE_GRACE_MS + 1);
    for edge in [E1, E2] {
        assert_eq!(restored_count(&c, edge), 0, "{:?}", c.seen.get(&edge));
    }
}

#[test]
fn a_link_blip_rehomes_an_edge_on_the_same_origin() {
    let (mut c, [host, guest, pres, _att]) = meeting();
    let seq = c.origin.room(&room()).unwrap().seq();
    // Edge 2 reconnects; the origin gives its new link another id.
    const E2_NEW: EdgeId = EdgeId(7);
    let replica = c.edges[&E2].replica(&room()).unwrap();
    c.edges.insert(E2_NEW, ReplicaTracker::new());
    let (_, out) = c.offer_replica(E2_NEW, replica);
    assert_eq!(
        out.len(),
        1,
        "only the reply: nothing changed for anyone: {out:?}"
    );
    let r = c.origin.room(&room()).unwrap();
    assert_eq!(r.seq(), seq);
    assert!(!r.is_restoring());
    assert!(r.participants().filter(|p| p.edge == E2_NEW).count() == 2);
    // The host's next chat reaches edge 2 on its new link.
    c.seen.clear();
    c.ask(
        E1,
        Intent::Chat {
            participant: host,
            text: "still there?".into(),
            to: None,
        },
    );
    assert!(c.seen.get(&E2_NEW).is_some_and(|v| !v.is_empty()));
    assert!(!c.seen.contains_key(&E2));
    let _ = (guest, pres);
}

#[test]
fn restoring_twice_changes_nothing() {
    let (mut c, _) = meeting();
    c.fail_over(&[E1, E2]);
    c.tick(RESTORE_GRACE_MS + 1);
    let snapshot = |c: &Cluster| {
        let r = c.origin.room(&room()).unwrap();
        (
            r.participants().cloned().collect::<Vec<_>>(),
            r.tracks().cloned().collect::<Vec<_>>(),
            r.settings().clone(),
            r.seq(),
        )
    };
    let once = snapshot(&c);
    for edge in [E1, E2] {
        let replica = c.edges[&edge].replica(&room()).unwrap();
        let (_, out) = c.offer_replica(edge, replica);
        assert_eq!(out.len(), 1);
    }
    c.tick(200);
    assert_eq!(snapshot(&c), once);
}

#[test]
fn an_invitation_survives_the_failover_and_still_opens_the_lock() {
    let (mut c, [host, ..]) = meeting();
    let vip = Identity::new("vip").unwrap();
    let r = c.ask(
        E1,
        Intent::Invite {
            participant: host,
            identity: vip.clone(),
            role: Role::Presenter,
        },
    );
    assert_eq!(r, Reply::Done);
    // What the inviting edge's hub does with the accepted invitation.
    c.edges
        .get_mut(&E1)
        .unwrap()
        .on_invited(&room(), &vip, Role::Presenter);
    c.fail_over(&[E1, E2]);
    c.tick(RESTORE_GRACE_MS + 1);
    assert!(c.origin.room(&room()).unwrap().settings().locked);
    let stranger = stranger_joins(&mut c, E2);
    assert!(
        matches!(stranger, Reply::Refused(_)),
        "the lock survived: {stranger:?}"
    );
    let joined = c.ask(
        E2,
        Intent::Join {
            identity: vip,
            role: Role::Attendee,
            name: "vip".into(),
        },
    );
    // (The invitation's role travels in the join token it minted; the origin only lets the
    // identity past the lobby and the lock.)
    assert!(
        matches!(joined, Reply::Joined(_)),
        "the invited identity is let in after the failover: {joined:?}"
    );
}

/// Ids in `ParticipantsJoined` (or `ParticipantsLeft`) events an edge saw.
/// An attendee nobody invited asks to join through `edge`: the reply (refused while locked).
fn stranger_joins(c: &mut Cluster, edge: EdgeId) -> Reply {
    c.ask(
        edge,
        Intent::Join {
            identity: Identity::new("stranger").unwrap(),
            role: Role::Attendee,
            name: "stranger".into(),
        },
    )
}

fn listed(events: &[RoomEvent], leaves: bool) -> Vec<ParticipantId> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            RoomEventBody::ParticipantsJoined(j) if !leaves => {
                Some(j.iter().map(|p| p.id).collect())
            }
            RoomEventBody::ParticipantsLeft(l) if leaves => Some(l.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn counts(events: &[RoomEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e.body {
            RoomEventBody::ParticipantCount { count } => Some(count),
            _ => None,
        })
        .collect()
}

#[test]
fn a_large_room_rebuilt_lists_only_the_leaves_of_the_announced_and_recounts() {
    let mut c = Cluster::with(RoomConfig {
        full_presence_up_to: 5,
        ..RoomConfig::default()
    });
    const E3: EdgeId = EdgeId(3);
    let host = c.join(E1, "host", Role::Host);
    // Listed while the room is small: announced for good.
    let a: Vec<ParticipantId> = (0..4)
        .map(|i| c.join(E1, &format!("a{i}"), Role::Attendee))
        .collect();
    c.tick(200);
    let b: Vec<ParticipantId> = (0..6)
        .map(|i| c.join(E2, &format!("b{i}"), Role::Attendee))
        .collect();
    c.tick(200);
    let hand = b[0];
    c.ask(E2, Intent::RaiseHand { participant: hand });
    // Edge 3 dies with the origin: its presenter was announced, its attendees never were.
    let presenter = c.join(E3, "presenter", Role::Presenter);
    let quiet: Vec<ParticipantId> = (0..2)
        .map(|i| c.join(E3, &format!("c{i}"), Role::Attendee))
        .collect();
    c.tick(1_000);
    c.tick(1_000);
    assert_eq!(counts(&c.seen[&E1]).last(), Some(&14));
    let told_e2: HashSet<ParticipantId> = listed(&c.seen[&E2], false).into_iter().collect();
    assert_eq!(
        told_e2,
        HashSet::from([hand, presenter]),
        "after the switch only the interesting were listed"
    );
    // A replica from an edge of the large room says so, and names whom its clients know: the
    // small room's five (from its first join's snapshot) and the interesting since.
    let replica = c.edges[&E2].replica(&room()).unwrap();
    assert_eq!(replica.presence, PresenceMode::Interesting);
    let mut known_to_e2 = vec![host];
    known_to_e2.extend(&a);
    known_to_e2.extend([hand, presenter]);
    assert_eq!(replica.announced, known_to_e2);
    assert!(
        replica.known.contains(&b[3]),
        "its own participants are known"
    );

    c.seen.clear();
    c.fail_over(&[E1, E2]);
    c.tick(RESTORE_GRACE_MS / 2);
    assert!(
        c.seen.get(&E1).is_none_or(|e| counts(e).is_empty()),
        "no count while replicas may still come"
    );
    c.tick(RESTORE_GRACE_MS);
    let r = c.origin.room(&room()).unwrap();
    assert!(!r.is_restoring());
    assert_eq!(r.presence(), PresenceMode::Interesting);
    let mut announced = vec![host];
    announced.extend(&a);
    announced.push(hand);
    assert_eq!(r.announced().collect::<Vec<_>>(), announced);
    for edge in [E1, E2] {
        assert_eq!(
            listed(&c.seen[&edge], true),
            vec![presenter],
            "edge {edge:?}: only the announced presenter's leave, not {quiet:?}"
        );
        assert_eq!(
            counts(&c.seen[&edge]),
            vec![11],
            "a fresh count after the window"
        );
    }

    // The rebuilt room goes on in the same mode: a quiet leave is counted, an announced one
    // listed; a late joiner is told the mode and the announced.
    c.seen.clear();
    c.ask(E2, Intent::Leave { participant: b[1] });
    c.ask(E2, Intent::Leave { participant: hand });
    c.tick(1_000);
    assert_eq!(listed(&c.seen[&E1], true), vec![hand]);
    assert_eq!(counts(&c.seen[&E1]), vec![9]);
    let late = c.ask(
        E1,
        Intent::Join {
            identity: Identity::new("late").unwrap(),
            role: Role::Attendee,
            name: "late".into(),
        },
    );
    let Reply::Joined(s) = late else {
        panic!("{late:?}")
    };
    assert_eq!(s.presence, PresenceMode::Interesting);
    let mut named = vec![host];
    named.extend(&a);
    assert_eq!(
        s.participants.iter().map(|p| p.id).collect::<Vec<_>>(),
        named
    );
    assert_eq!(s.participant_count, 10);
}

#[test]
fn a_replica_from_an_edge_before_presence_modes_still_restores_a_full_room() {
    let (mut c, [host, guest, pres, att]) = meeting();
    let replica = c.edges[&E1].replica(&room()).unwrap();
    let mut json = serde_json::to_value(&replica).unwrap();
    let fields = json.as_object_mut().unwrap();
    fields.remove("presence");
    fields.remove("announced");
    let old: cascade_proto::room::RoomReplica = serde_json::from_value(json).unwrap();
    assert_eq!(old.presence, PresenceMode::Full);
    c.seen.clear();
    c.origin = Origin::new(RoomConfig::default());
    let (_, out) = c.offer_replica(E1, old);
    c.deliver(out, None);
    c.tick(RESTORE_GRACE_MS + 1);
    // Full presence as before: edge 2's participants' leaves are listed, no count.
    assert_eq!(listed(&c.seen[&E1], true), vec![pres, att]);
    assert!(counts(&c.seen[&E1]).is_empty());
    let r = c.origin.room(&room()).unwrap();
    assert_eq!(r.presence(), PresenceMode::Full);
    assert_eq!(r.announced().collect::<Vec<_>>(), vec![host, guest]);
}

/// What a participant joining now is told: hands in order and the settings.
fn joiner_view(c: &mut Cluster, who: &str) -> cascade_proto::room::RoomSnapshot {
    let r = c.ask(
        E1,
        Intent::Join {
            identity: Identity::new(who).unwrap(),
            role: Role::Host,
            name: who.into(),
        },
    );
    match r {
        Reply::Joined(s) => *s,
        other => panic!("join of {who} refused: {other:?}"),
    }
}

/// A room with a host and a guest on edge 1, a co-host and an attendee on edge 2, whose old origin's
/// last events (`last_words`) reach edge 2 only; then a new origin hears edge 1's replica
/// first (`window` runs while it waits), and edge 2's later one after.
fn window_then_later_replica(
    last_words: impl FnOnce(&mut Cluster, [ParticipantId; 4]),
    window: impl FnOnce(&mut Cluster, [ParticipantId; 4]),
) -> (Cluster, [ParticipantId; 4]) {
    let mut c = Cluster::new();
    let host = c.join(E1, "host", Role::Host);
    let guest = c.join(E1, "guest", Role::Attendee);
    let a = c.join(E2, "a", Role::CoHost);
    let b = c.join(E2, "b", Role::Attendee);
    c.tick(200);
    let people = [host, guest, a, b];
    c.cut.insert(E1);
    last_words(&mut c, people);
    c.cut.clear();
    let seq_e1 = c.edges[&E1].replica(&room()).unwrap().seq;
    let seq_e2 = c.edges[&E2].replica(&room()).unwrap().seq;
    assert!(
        seq_e2 > seq_e1,
        "edge 2 saw later events: {seq_e2} vs {seq_e1}"
    );

    c.origin = Origin::new(c.config.clone());
    c.restore_from(E1);
    window(&mut c, people);
    c.restore_from(E2);
    (c, people)
}

/// The old origin's last hand (edge 2 only) and one raised on the new origin while it waits:
/// both are up after edge 2's later replica, the old origin's first.
#[test]
fn a_hand_raised_on_the_new_origin_survives_a_later_replica() {
    let (mut c, [_, guest, a, b]) = window_then_later_replica(
        |c, [_, _, a, b]| {
            assert_eq!(c.ask(E2, Intent::RaiseHand { participant: b }), Reply::Done);
            assert_eq!(c.ask(E2, Intent::RaiseHand { participant: a }), Reply::Done);
        },
        |c, [_, guest, ..]| {
            assert_eq!(
                c.ask(E1, Intent::RaiseHand { participant: guest }),
                Reply::Done
            );
        },
    );
    assert_eq!(joiner_view(&mut c, "during").hands, vec![b, a, guest]);
    c.tick(RESTORE_GRACE_MS + 1);
    assert_eq!(joiner_view(&mut c, "after").hands, vec![b, a, guest]);
}

/// A hand both edges saw raised, lowered on the new origin while it waits: a later replica
/// that still has it up does not raise it again.
#[test]
fn a_hand_lowered_on_the_new_origin_stays_down_after_a_later_replica() {
    let mut c = Cluster::new();
    let host = c.join(E1, "host", Role::Host);
    let guest = c.join(E1, "guest", Role::Attendee);
    let other = c.join(E1, "other", Role::Attendee);
    let a = c.join(E2, "a", Role::Attendee);
    c.tick(200);
    for p in [guest, other] {
        assert_eq!(c.ask(E1, Intent::RaiseHand { participant: p }), Reply::Done);
    }
    c.cut.insert(E1);
    assert_eq!(c.ask(E2, Intent::RaiseHand { participant: a }), Reply::Done);
    c.cut.clear();

    c.origin = Origin::new(c.config.clone());
    c.restore_from(E1);
    // One lowers their own hand, the host lowers another's.
    assert_eq!(
        c.ask(
            E1,
            Intent::LowerHand {
                participant: guest,
                target: guest
            }
        ),
        Reply::Done
    );
    assert_eq!(
        c.ask(
            E1,
            Intent::LowerHand {
                participant: host,
                target: other
            }
        ),
        Reply::Done
    );
    c.restore_from(E2);
    assert_eq!(joiner_view(&mut c, "during").hands, vec![a]);
    c.tick(RESTORE_GRACE_MS + 1);
    assert_eq!(joiner_view(&mut c, "after").hands, vec![a]);
}

/// Settings per field: what the new origin set while it waited (lock, lobby, spotlight) wins;
/// what it did not touch (layout) comes from the replica that saw the old origin's last event.
#[test]
fn settings_set_on_the_new_origin_survive_a_later_replica_field_by_field() {
    let (mut c, [host, guest, a, _]) = window_then_later_replica(
        |c, [_, _, a, _]| {
            let r = c.ask(
                E2,
                Intent::SetLayout {
                    participant: a,
                    layout: Some(Layout::Speaker),
                    spotlight: Some(Some(a)),
                },
            );
            assert_eq!(r, Reply::Done);
        },
        |c, [host, guest, ..]| {
            for intent in [
                Intent::SetLocked {
                    participant: host,
                    locked: true,
                },
                Intent::SetLobby {
                    participant: host,
                    enabled: true,
                },
                Intent::SetLayout {
                    participant: host,
                    layout: None,
                    spotlight: Some(Some(guest)),
                },
            ] {
                assert_eq!(c.ask(E1, intent), Reply::Done);
            }
        },
    );
    c.tick(RESTORE_GRACE_MS + 1);
    let s = c.origin.room(&room()).unwrap().settings().clone();
    assert!(s.locked, "{s:?}");
    assert!(s.lobby, "{s:?}");
    assert_eq!(s.spotlight, Some(guest), "{s:?}");
    assert_eq!(
        s.layout,
        Layout::Speaker,
        "the old origin's last layout: {s:?}"
    );
    let stranger = stranger_joins(&mut c, E2);
    assert!(
        matches!(stranger, Reply::Refused(_)),
        "the lock set during the window holds: {stranger:?}"
    );
    let _ = (host, a);
}

/// Someone who left the new origin while it waited: their hand does not come back with a
/// later replica that still has it up, nor their spotlight, and their leave is listed once.
#[test]
fn a_participant_who_left_during_the_window_stays_gone() {
    let (mut c, [host, guest, a, _]) = window_then_later_replica(
        |c, [host, guest, a, _]| {
            // Both edges see these...
            c.cut.clear();
            assert_eq!(
                c.ask(E1, Intent::RaiseHand { participant: guest }),
                Reply::Done
            );
            let r = c.ask(
                E1,
                Intent::SetLayout {
                    participant: host,
                    layout: None,
                    spotlight: Some(Some(guest)),
                },
            );
            assert_eq!(r, Reply::Done);
            // ...edge 2 only this one.
            c.cut.insert(E1);
            assert_eq!(c.ask(E2, Intent::RaiseHand { participant: a }), Reply::Done);
        },
        |c, [_, guest, ..]| {
            c.seen.clear();
            assert_eq!(c.ask(E1, Intent::Leave { participant: guest }), Reply::Done);
            c.tick(200);
        },
    );
    let during = joiner_view(&mut c, "during");
    assert_eq!(during.hands, vec![a]);
    assert_eq!(during.settings.spotlight, None);
    c.tick(RESTORE_GRACE_MS + 1);
    assert_eq!(joiner_view(&mut c, "after").hands, vec![a]);
    assert_eq!(
        listed(&c.seen[&E1], true),
        vec![guest],
        "one leave, not a second one when the window closes"
    );
    let _ = host;
}
