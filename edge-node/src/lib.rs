//! Edge node.

pub mod transport;
