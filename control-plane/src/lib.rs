//! Control plane: node registry, room placement, nearest-edge routing, geo-DNS, REST API and
//! join tokens.
//!
//! State lives in a [`store::Store`]: etcd in every deployment ([`store::EtcdStore`]), an
//! embedded in-memory store in dev mode only ([`store::MemStore`]). Nodes register under leases
//! ([`nodes`]), rooms are placed on origins by transaction ([`placement`]), and watchers mirror
//! the registry into memory ([`nodes::NodeTable`]) to answer DNS and join-info without a store
//! round trip. The decision logic (origin choice, edge routing, DNS answers) is sans-IO; the
//! async shells around it only move data between the store, sockets and those cores.

pub mod api;
pub mod config;
pub mod dns;
pub mod fanout;
pub mod keys;
pub mod meetings;
pub mod nodes;
pub mod placement;
pub mod ratelimit;
pub mod routing;
pub mod server;
pub mod store;
pub mod token;
pub mod trees;

pub use nodes::{NodeInfo, NodeKind, NodeLoad, NodeRegistration, RegistrationConfig};
pub use server::{run, ControlPlane, ControlPlaneConfig, ControlPlaneError, SigningKeyConfig};
pub use store::{EtcdConfig, EtcdStore, MemStore, Store};
