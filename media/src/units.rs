//! Unit newtypes shared by the media core, so a bitrate is never confused with a byte count and a
//! simulcast layer never with an index of something else.

use std::fmt;

/// Bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bitrate(pub u64);

impl Bitrate {
    /// `v` bits per second.
    pub const fn bps(v: u64) -> Self {
        Self(v)
    }

    /// `v` kilobits (1000 bits) per second.
    pub const fn kbps(v: u64) -> Self {
        Self(v * 1000)
    }

    /// The rate in bits per second.
    pub fn as_bps(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Bitrate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bit/s", self.0)
    }
}

/// Simulcast spatial layer, 0 = lowest resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpatialLayer(pub u8);
