//! A signaling session's view of the room's size, kept from the join ack and the batched
//! presence deltas, as a client with a large roster must (it only ever gets the first page).
//!
//! Why not a set of ids: in a 10,000-person room the ack lists 100. Participant ids increase
//! with each join, so the ack's `participantCount` covers everyone up to our own id, and a
//! delta's id above ours is a newcomer; a delta repeating someone we already counted (our own
//! join, or one in the same 200 ms batch as ours) is recognised by its id. Leaves count down.

use serde_json::Value;
use std::collections::HashSet;

#[derive(Debug, Default)]
pub struct RosterView {
    me: u64,
    count: i64,
    /// Newcomers already counted (a delta may repeat one).
    counted: HashSet<u64>,
    /// Events received on the session, of any type.
    pub events: u64,
}

impl RosterView {
    /// From the `room:join` ack (`you.id`, `participantCount`).
    pub fn from_ack(ack: &Value) -> Self {
        Self {
            me: ack["you"]["id"].as_u64().unwrap_or(0),
            count: ack["participantCount"].as_i64().unwrap_or(0),
            counted: HashSet::new(),
            events: 0,
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
        match ev["type"].as_str() {
            Some("participant:joined") => {
                for id in ids() {
                    if id > self.me && self.counted.insert(id) {
                        self.count += 1;
                    }
                }
            }
            Some("participant:left") => {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_from_the_ack_and_deltas_without_double_counting() {
        let mut r = RosterView::from_ack(&json!({"you": {"id": 50}, "participantCount": 50}));
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
    }
}
