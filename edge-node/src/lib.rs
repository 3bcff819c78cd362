//! KCS edge node: terminates WebRTC clients (ICE-lite, DTLS-SRTP, RTP/RTCP) on one UDP port,
//! forwards media between local participants with simulcast layer selection, and serves
//! signaling (`/ws`), WHIP/WHEP, the web client, `/metrics` and `/healthz`.
//!
//! Layout: [`transport`] (ICE-lite, DTLS, SRTP, RFC 7983 demux) and [`sdp`] are the protocol
//! pieces; [`sfu`] is the sans-IO forwarding core of one shard and [`udp`] its thread-per-shard
//! shell; [`session`] maps one participant's peer connections onto shard commands and room
//! intents; [`hub`] links sessions to the room's origin; [`tree`] and [`membership`] put the edge in rooms'
//! fan-out trees; [`ws`] and [`http`] are the ways in.
//! docs/architecture.md has the picture.

pub mod app;
pub mod cascade;
pub mod cluster;
pub mod config;
pub mod edge;
pub mod http;
pub mod hub;
pub mod media_hook;
pub mod membership;
pub mod metrics;
pub mod origin_server;
pub mod realtime;
pub mod sdp;
pub mod session;
pub mod sfu;
pub mod spread;
pub mod transport;
pub mod tree;
pub mod udp;
pub mod uplink;
pub mod ws;
