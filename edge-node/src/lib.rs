//! Edge node.
