//! KCS load tester: simulated participants that are real WebRTC clients, scenarios,
//! measurements and reports; plus a userspace UDP delay relay.
//!
//! Each simulated participant speaks the edge's public protocol only — WebSocket signaling or
//! WHIP/WHEP, ICE (controlling, nominating), DTLS client, SRTP, RTCP feedback (receiver reports,
//! NACK, PLI, transport-wide congestion control) — so what a run measures is what browsers cost
//! the server. Participants are tokio tasks, many per thread; the runtime has a few threads.
//!
//! Layout: [`media`] makes the synthetic audio/video and the probe each payload carries;
//! [`recv`] is the sans-IO receiver (loss, delay, jitter, RTCP it owes); [`peer`] is one peer
//! connection's async shell, [`send_from`] its batched sends from many source addresses;
//! [`signaling`] the WebSocket/WHIP/WHEP/token clients;
//! [`participant`] one participant's life; [`scenario`] the scenario model and TOML files;
//! [`runner`] runs a scenario; [`report`] writes JSON/HTML; [`relay`] is the delay relay;
//! [`janus`] speaks Janus's VideoRoom API (the same scenarios against Janus) and
//! [`ice_responder`] answers a full-ICE server's connectivity checks.
//! [`baseline`] is the raw forwarding ceiling the edge is compared with.
//!
//! What it does not do: TURN, TCP candidates, trickle ICE (the edge is ICE-lite and needs
//! none; toward Janus our candidate is in the SDP), real codecs (payloads are shaped like VP8/Opus, never decoded).

pub mod baseline;
pub mod ice_responder;
pub mod janus;
pub mod media;
pub mod participant;
pub mod peer;
pub mod prefetch;
pub mod recv;
pub mod relay;
pub mod report;
pub mod roster;
pub mod runner;
pub mod scenario;
pub mod sdp;
pub mod send_from;
pub mod server_metrics;
pub mod signaling;
pub mod stats;
