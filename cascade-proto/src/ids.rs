//! Identities shared by every node: one identity model (architecture rule 5).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest room name or identity we accept; longer ones are refused at the boundary.
pub const MAX_NAME_LEN: usize = 128;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("character {0:?} not allowed (use letters, digits, '-', '_', '.', '@')")]
    BadChar(char),
}

fn check_name(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
    {
        return Err(NameError::BadChar(c));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses a name: non-empty, at most [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9-_.@]`.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                check_name(&s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// A meeting's name, as it appears in URLs and tokens.
    RoomId
);
name_type!(
    /// Who a participant is, as carried by their token (user id, e-mail-like handle).
    Identity
);

/// A participant's id within its room, assigned by the origin (unique per room and join).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ParticipantId(pub u64);

/// A published track's id within its room, assigned by the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TrackId(pub u64);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}
impl fmt::Display for TrackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// Roles of the seed design, plus `viewer` for subscribe-only joins (WHEP, webinar audiences).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Host,
    CoHost,
    Presenter,
    Attendee,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::CoHost => "co-host",
            Role::Presenter => "presenter",
            Role::Attendee => "attendee",
            Role::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "host" => Role::Host,
            "co-host" | "cohost" => Role::CoHost,
            "presenter" => Role::Presenter,
            "attendee" => Role::Attendee,
            "viewer" => Role::Viewer,
            other => {
                return Err(format!(
                    "unknown role {other:?} (host, co-host, presenter, attendee, viewer)"
                ))
            }
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    Audio,
    Video,
}

/// What a track carries, so clients lay it out (screen shares large) and the origin can apply
/// permissions per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackSource {
    Microphone,
    Camera,
    Screen,
    ScreenAudio,
}

impl TrackSource {
    pub fn kind(self) -> TrackKind {
        match self {
            TrackSource::Microphone | TrackSource::ScreenAudio => TrackKind::Audio,
            TrackSource::Camera | TrackSource::Screen => TrackKind::Video,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(RoomId::new("weekly-sync_1.a@b").is_ok());
        assert_eq!(RoomId::new(""), Err(NameError::Empty));
        assert_eq!(RoomId::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(RoomId::new("x".repeat(129)), Err(NameError::TooLong));
        let err = serde_json::from_str::<RoomId>("\"../etc\"");
        assert!(err.is_err());
    }

    #[test]
    fn roles_round_trip() {
        for r in [
            Role::Host,
            Role::CoHost,
            Role::Presenter,
            Role::Attendee,
            Role::Viewer,
        ] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
            let j = serde_json::to_string(&r).unwrap();
            assert_eq!(j, format!("\"{}\"", r.as_str()));
        }
        assert!("admin".parse::<Role>().is_err());
    }
}
