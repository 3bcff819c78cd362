//! Control plane: join tokens today; node registry, placement, geo-DNS and the REST API are
//! built by the control-plane issue on top of this crate.

pub mod token;
