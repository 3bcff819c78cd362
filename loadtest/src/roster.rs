//! A signaling session's view of the room's size, kept from the join ack and what follows it,
//! as a client with a large roster must (it only ever gets the first page).
//!
//! Full presence (docs/protocol.md, "Presence"): the ack's `participantCount` plus the batched
//! deltas. Why not a set of ids: in a 10,000-person room the ack lists 100. Participant ids
//! increase with each join, so the ack's `participantCount` covers everyone up to our own id,
//! and a delta's id above ours is a newcomer; a delta repeating someone we already counted (our
//! own join, or one in the same 200 ms batch as ours) is recognised by its id. Leaves count
//! down.
//!
//! Interesting presence (a room past the origin's `full_presence_up_to`, told by the ack's
//! `presence` or by the first `participant:count`): deltas only name interesting participants,
//! some of them long in the room, so they count nothing; the size is the latest
//! `participantCount` of the ack or a `participant:count` event. Either way the view converges
//! only if the session saw every event the room sent it.

use serde_json::Value;
use std::collections::HashSet;

#[derive(Debug, Default)]
pub struct RosterView {
    me: u64,
    count: i64,
    /// Newcomers already counted (a delta may repeat one).
    counted: HashSet<u64>,
    /// The room reports its size itself (`participant:count`) and lists only some joins.
    interesting: bool,
    /// Events received on the session, of any type.
    pub events: u64,
    /// Presence entries received: participants listed in `participant:joined` and
    /// `participant:left` (what grows with joins/s x sessions in a full-presence room).
    pub entries: u64,
}

impl RosterView {
    /// From the `room:join` ack (`you.id`, `participantCount`, `presence`).
    pub fn from_ack(ack: &Value) -> Self {
        Self {
            me: ack["you"]["id"].as_u64().unwrap_or(0),
            count: ack["participantCount"].as_i64().unwrap_or(0),
            counted: HashSet::new(),
            interesting: ack["presence"] == "interesting",
            events: 0,
            entries: 0,
        }
    }

    pub fn on_event(&mut self, ev: &Value) {
        self.events += 1;
        let ids = || {
            ev["participants"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_u64().or_else(|| p["id"].as_u64()))
        };
        if matches!(
            ev["type"].as_str(),
            Some("participant:joined" | "participant:left")
        ) {
            self.entries += ids().count() as u64;
        }
        match ev["type"].as_str() {
            Some("participant:count") => {
                if let Some(n) = ev["participantCount"].as_i64() {
                    self.interesting = true;
                    self.count = n;
                }
            }
            Some("participant:joined") if !self.interesting => {
                for id in ids() {
                    if id > self.me && self.counted.insert(id) {
                        self.count += 1;
                    }
                }
            }
            Some("participant:left") if !self.interesting => {
                for id in ids() {
                    self.counted.remove(&id);
                    self.count -= 1;
                }
            }
            _ => {}
        }
    }

    /// How many participants this session believes are in the room.
    pub fn count(&self) -> u64 {
        self.count.max(0) as u64
    }

    /// Whether the room reports its size by `participant:count` (a large room).
    pub fn is_interesting(&self) -> bool {
        self.interesting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_from_the_ack_and_deltas_without_double_counting() {
        let mut r = RosterView::from_ack(&json!({"you": {"id": 50}, "participantCount": 50}));
        assert!(!r.is_interesting());
        // Our own join and someone earlier in the same batch: already counted.
        r.on_event(&json!({"type": "participant:joined", "participants": [{"id": 49}, {"id": 50}, {"id": 51}]}));
        r.on_event(
            &json!({"type": "participant:joined", "participants": [{"id": 51}, {"id": 52}]}),
        );
        assert_eq!(r.count(), 52);
        r.on_event(&json!({"type": "participant:left", "participants": [3, 52]}));
        assert_eq!(r.count(), 50);
        r.on_event(&json!({"type": "chat:message"}));
        assert_eq!(r.events, 4);
        assert_eq!(r.entries, 7);
    }

    #[test]
    fn a_large_room_is_counted_by_its_count_events_only() {
        let mut r = RosterView::from_ack(&json!({"you": {"id": 900}, "participantCount": 900,
            "presence": "interesting"}));
        assert!(r.is_interesting());
        // A presenter joins and an attendee of long ago is announced (a raised hand): names,
        // not newcomers; and their leaves do not count down either.
        r.on_event(
            &json!({"type": "participant:joined", "participants": [{"id": 901}, {"id": 12}]}),
        );
        r.on_event(&json!({"type": "participant:left", "participants": [12]}));
        assert_eq!(r.count(), 900);
        r.on_event(&json!({"type": "participant:count", "participantCount": 1_450}));
        assert_eq!(r.count(), 1_450);
        r.on_event(&json!({"type": "participant:count", "participantCount": 1_449}));
        assert_eq!(r.count(), 1_449);
    }

    #[test]
    fn a_room_turning_large_switches_to_its_count() {
        let mut r = RosterView::from_ack(&json!({"you": {"id": 5}, "participantCount": 5}));
        r.on_event(&json!({"type": "participant:joined", "participants": [{"id": 6}]}));
        assert_eq!(r.count(), 6);
        // Joins 7..=20 were never listed: the first count tells the size and the mode.
        r.on_event(&json!({"type": "participant:count", "participantCount": 20,
            "presence": "interesting"}));
        assert!(r.is_interesting());
        assert_eq!(r.count(), 20);
        r.on_event(&json!({"type": "participant:joined", "participants": [{"id": 3}]}));
        assert_eq!(
            r.count(),
            20,
            "an announcement after the switch counts nothing"
        );
        // A session that missed the last count does not converge: the check stays real.
        let mut missed = RosterView::from_ack(&json!({"you": {"id": 5}, "participantCount": 5}));
        missed.on_event(&json!({"type": "participant:joined", "participants": [{"id": 6}]}));
        assert_ne!(missed.count(), r.count());
    }
}
