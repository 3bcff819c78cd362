//! Sans-IO media core.
//!
//! Modules:
//! - [`units`]: unit newtypes shared by the modules (`Bitrate`, `SpatialLayer`).
//! - [`bwe`]: send-side bandwidth estimation per subscriber transport from transport-wide-cc.
//! - [`nack`]: NACK generation for streams received from publishers.
//! - [`keyframe`]: coalescing and throttling of keyframe requests towards a publisher.
//! - [`speaker`]: dominant speaker detection from audio levels.
//! - [`stats`]: RTCP sender/receiver statistics and RTT.

pub mod bwe;
pub mod keyframe;
pub mod nack;
pub mod speaker;
pub mod stats;
pub mod units;
