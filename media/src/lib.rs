//! Sans-IO media core.
//!
//! The edge decrypts each incoming SRTP packet once, then for each subscriber decides whether to
//! forward it and rewrites its header. Plain structs driven with `now: Instant`; no I/O, no clock.
//!
//! - [`units`]: `Bitrate` and `SpatialLayer` newtypes.
//! - [`seq`]: extending 16-bit sequence numbers and 32-bit timestamps to monotonic `u64`s.
//! - [`codec`]: video codecs and "first packet of a keyframe" detection.
//! - [`vp8`]: VP8 payload descriptor parsing and picture-id continuity across layer switches.
//! - [`rewrite`]: one continuous output stream (seq, timestamp) per subscriber and track.
//! - [`cache`]: recently received packets and what was sent per output seq, for NACK resends.
//! - [`selector`]: simulcast layer selection (max / target / current) per subscriber and track.
//! - [`meter`]: sliding-window bitrate of an incoming stream.
//! - [`bwe`]: send-side bandwidth estimation per subscriber transport from transport-wide-cc.
//! - [`nack`]: NACK generation for streams received from publishers.
//! - [`keyframe`]: coalescing and throttling of keyframe requests towards a publisher.
//! - [`speaker`]: dominant speaker detection from audio levels.
//! - [`stats`]: RTCP sender/receiver statistics and RTT.
//! - [`prefetch`]: cache-line prefetch hints for fan-out loops.
//! - [`residence`]: the histogram of how long packets stay in a node (`*_residence_seconds`).

pub mod bwe;
pub mod cache;
pub mod codec;
pub mod keyframe;
pub mod meter;
pub mod nack;
pub mod prefetch;
pub mod residence;
pub mod rewrite;
pub mod selector;
pub mod seq;
pub mod speaker;
pub mod stats;
pub mod units;
pub mod vp8;

#[cfg(test)]
mod forwarding_sim;
