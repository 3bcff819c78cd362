//! Edge node.
pub mod sdp;
