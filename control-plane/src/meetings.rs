//! Meetings: the options a host sets for a room, stored at `<root>/meetings/<room>`.
//!
//! Requests are parsed into validated types at the boundary ([`MeetingOptions::validate`],
//! [`MeetingPatch::apply`]); invalid input is refused with a [`MeetingError`] naming the field
//! and nothing is written. Creation is a compare-and-create (a second create of the same room
//! is a conflict, never an overwrite); updates are compare-and-swap on the revision read, so
//! two concurrent PATCHes cannot lose each other's changes silently.

use crate::keys::KeyLayout;
use crate::nodes::Region;
use crate::store::{CreateOutcome, Store, StoreError, SwapOutcome};
use cascade_proto::RoomId;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Largest meeting we accept a cap for: the design target of one room (10,000 participants)
/// with headroom.
pub const MAX_PARTICIPANTS_LIMIT: u32 = 20_000;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Scheduled starts must lie within this many seconds of now (about ten years either way):
/// anything outside is a unit mistake (milliseconds) rather than a plan.
const SCHEDULE_WINDOW_SECS: u64 = 10 * 365 * 24 * 3600;

/// A meeting's options.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeetingOptions {
    /// Shown to participants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Joiners wait in a lobby until a host admits them.
    #[serde(default)]
    pub waiting_room: bool,
    /// Nobody new may join (hosts excepted).
    #[serde(default)]
    pub locked: bool,
    /// Cap on simultaneous participants (none: the deployment's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_participants: Option<u32>,
    /// Record the meeting.
    #[serde(default)]
    pub recording: bool,
    /// Planned start, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_start: Option<u64>,
    /// Where the host is: the room's origin is placed in this region when it has one
    /// (none: near the first participant to join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
}

/// A stored meeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meeting {
    pub room: RoomId,
    #[serde(flatten)]
    pub options: MeetingOptions,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
}

/// A partial update: absent fields stay as they are; `null` clears an optional one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeetingPatch {
    #[serde(default, deserialize_with = "some")]
    pub title: Option<Option<String>>,
    pub waiting_room: Option<bool>,
    pub locked: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    pub max_participants: Option<Option<u32>>,
    pub recording: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    pub scheduled_start: Option<Option<u64>>,
    #[serde(default, deserialize_with = "some")]
    pub region: Option<Option<Region>>,
}

/// Distinguishes an explicit `null` (Some(None)) from an absent field (None).
fn some<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Why a meeting request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeetingError {
    #[error("invalid field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("meeting {0} already exists")]
    Exists(RoomId),
    #[error("meeting {0} not found")]
    NotFound(RoomId),
    #[error("meeting {0} was changed concurrently; read it again and retry")]
    Conflict(RoomId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> MeetingError {
    MeetingError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl MeetingOptions {
    /// Checks every field; `now_unix` anchors the scheduling window.
    pub fn validate(&self, now_unix: u64) -> Result<(), MeetingError> {
        if let Some(t) = &self.title {
            if t.chars().count() > MAX_TITLE_CHARS {
                return Err(invalid(
                    "title",
                    format!("longer than {MAX_TITLE_CHARS} characters"),
                ));
            }
            if t.chars().any(char::is_control) {
                return Err(invalid("title", "contains control characters"));
            }
        }
        if let Some(m) = self.max_participants {
            if m == 0 || m > MAX_PARTICIPANTS_LIMIT {
                return Err(invalid(
                    "max_participants",
                    format!("must be 1 to {MAX_PARTICIPANTS_LIMIT}"),
                ));
            }
        }
        if let Some(s) = self.scheduled_start {
            if s.abs_diff(now_unix) > SCHEDULE_WINDOW_SECS {
                return Err(invalid(
                    "scheduled_start",
                    "must be seconds since the Unix epoch within ten years of now",
                ));
            }
        }
        Ok(())
    }
}

impl MeetingPatch {
    /// The options after this patch (not yet validated).
    pub fn apply(&self, mut o: MeetingOptions) -> MeetingOptions {
        if let Some(t) = &self.title {
            o.title = t.clone();
        }
        if let Some(v) = self.waiting_room {
            o.waiting_room = v;
        }
        if let Some(v) = self.locked {
            o.locked = v;
        }
        if let Some(v) = self.max_participants {
            o.max_participants = v;
        }
        if let Some(v) = self.recording {
            o.recording = v;
        }
        if let Some(v) = self.scheduled_start {
            o.scheduled_start = v;
        }
        if let Some(v) = &self.region {
            o.region = v.clone();
        }
        o
    }
}

/// Meetings in the store.
#[derive(Clone)]
pub struct Meetings {
    store: Arc<dyn Store>,
    keys: KeyLayout,
}

impl Meetings {
    pub fn new(store: Arc<dyn Store>, keys: KeyLayout) -> Self {
        Self { store, keys }
    }

    pub async fn create(
        &self,
        room: RoomId,
        options: MeetingOptions,
        now_unix: u64,
    ) -> Result<Meeting, MeetingError> {
        options.validate(now_unix)?;
        let meeting = Meeting {
            room: room.clone(),
            options,
            created_at: now_unix,
        };
        // Serialising our own plain struct cannot fail.
        let value = serde_json::to_vec(&meeting).expect("Meeting serialises");
        match self
            .store
            .create(&self.keys.meeting(&room), value, None)
            .await?
        {
            CreateOutcome::Created(_) => Ok(meeting),
            CreateOutcome::Exists(_) => Err(MeetingError::Exists(room)),
        }
    }

    pub async fn get(&self, room: &RoomId) -> Result<Meeting, MeetingError> {
        let kv = self
            .store
            .get(&self.keys.meeting(room))
            .await?
            .ok_or_else(|| MeetingError::NotFound(room.clone()))?;
        serde_json::from_slice(&kv.value).map_err(|_| MeetingError::NotFound(room.clone()))
    }

    pub async fn update(
        &self,
        room: &RoomId,
        patch: &MeetingPatch,
        now_unix: u64,
    ) -> Result<Meeting, MeetingError> {
        let key = self.keys.meeting(room);
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| MeetingError::NotFound(room.clone()))?;
        let mut meeting: Meeting =
            serde_json::from_slice(&kv.value).map_err(|_| MeetingError::NotFound(room.clone()))?;
        let options = patch.apply(meeting.options.clone());
        options.validate(now_unix)?;
        meeting.options = options;
        let value = serde_json::to_vec(&meeting).expect("Meeting serialises");
        match self
            .store
            .compare_and_swap(&key, kv.mod_revision, value, None)
            .await?
        {
            SwapOutcome::Swapped(_) => Ok(meeting),
            SwapOutcome::Conflict(None) => Err(MeetingError::NotFound(room.clone())),
            SwapOutcome::Conflict(Some(_)) => Err(MeetingError::Conflict(room.clone())),
        }
    }

    pub async fn delete(&self, room: &RoomId) -> Result<(), MeetingError> {
        if self.store.delete(&self.keys.meeting(room)).await? {
            Ok(())
        } else {
            Err(MeetingError::NotFound(room.clone()))
        }
    }

    /// One page of meetings after `after`, and whether more follow.
    pub async fn list(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<(Vec<Meeting>, bool), MeetingError> {
        let after_key = after.map(|r| self.keys.meeting(r));
        let page = self
            .store
            .range(
                &self.keys.meetings_prefix(),
                after_key.as_deref(),
                Some(limit),
            )
            .await?;
        Ok((
            page.kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                .collect(),
            page.more,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn validation_table() {
        let ok = MeetingOptions::default();
        let cases: Vec<(MeetingOptions, Option<&str>)> = vec![
            (ok.clone(), None),
            (
                MeetingOptions {
                    max_participants: Some(0),
                    ..ok.clone()
                },
                Some("max_participants"),
            ),
            (
                MeetingOptions {
                    max_participants: Some(10_000),
                    ..ok.clone()
                },
                None,
            ),
            (
                MeetingOptions {
                    title: Some("x".repeat(201)),
                    ..ok.clone()
                },
                Some("title"),
            ),
            (
                MeetingOptions {
                    title: Some("a\u{7}b".into()),
                    ..ok.clone()
                },
                Some("title"),
            ),
            (
                MeetingOptions {
                    scheduled_start: Some(NOW * 1000),
                    ..ok.clone()
                },
                Some("scheduled_start"),
            ),
            (
                MeetingOptions {
                    scheduled_start: Some(NOW + 3600),
                    ..ok
                },
                None,
            ),
        ];
        for (o, want) in cases {
            let got = o.validate(NOW).err().map(|e| match e {
                MeetingError::Invalid { field, .. } => field,
                other => panic!("{other:?}"),
            });
            assert_eq!(got, want, "{o:?}");
        }
    }

    #[test]
    fn patch_distinguishes_null_from_absent() {
        let base = MeetingOptions {
            title: Some("t".into()),
            max_participants: Some(5),
            ..MeetingOptions::default()
        };
        let p: MeetingPatch = serde_json::from_str(r#"{"locked": true, "title": null}"#).unwrap();
        let o = p.apply(base);
        assert!(o.locked);
        assert_eq!(o.title, None);
        assert_eq!(o.max_participants, Some(5));
        assert!(serde_json::from_str::<MeetingPatch>(r#"{"colour": 1}"#).is_err());
    }
}
