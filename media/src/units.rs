//! Unit newtypes shared across the media core, so a bitrate is never confused with a byte count
//! and a simulcast layer index is never a bare `u8` (or `-1`).

use std::fmt;

/// Bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bitrate(pub u64);

impl Bitrate {
    /// A bitrate of `v` bits per second.
    pub const fn bps(v: u64) -> Self {
        Self(v)
    }

    /// A bitrate of `v` kilobits (1000 bits) per second.
    pub const fn kbps(v: u64) -> Self {
        Self(v.saturating_mul(1000))
    }

    /// The bitrate in bits per second.
    pub fn as_bps(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Bitrate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v >= 1_000_000 {
            write!(f, "{}.{:03} Mbps", v / 1_000_000, (v % 1_000_000) / 1000)
        } else if v >= 1000 {
            write!(f, "{}.{:03} kbps", v / 1000, v % 1000)
        } else {
            write!(f, "{v} bps")
        }
    }
}

/// Simulcast spatial layer, 0 = lowest resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpatialLayer(pub u8);
