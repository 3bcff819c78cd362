//! Client transport: everything between the edge's one UDP port and decrypted RTP/RTCP.
//!
//! The edge terminates every WebRTC client on a single UDP port. Each datagram is classified
//! by its first byte ([`demux`], RFC 7983) and handed to the transport (peer connection) that
//! owns it:
//!
//! - STUN goes to that transport's [`ice::IceLite`], a sans-IO ICE-lite responder
//!   (RFC 8445 §2.5): it answers Binding requests, follows the controlling peer's nomination
//!   and reports when consent (RFC 7675) expires. A STUN packet from an address no transport
//!   knows yet is routed by its USERNAME ([`ice::stun_username`]).
//! - DTLS goes to the transport's handshake ([`dtls::accept`]), an async shell around the
//!   webrtc-rs `dtls` crate fed through channels, so the socket stays shared. It verifies the
//!   peer certificate against the SDP `a=fingerprint` and exports the SRTP keys (RFC 5764).
//! - SRTP/SRTCP is decrypted and encrypted by [`srtp::SrtpSession`], synchronously, on the
//!   shard that owns the transport (no task or channel hop per packet); RTP in place, in the
//!   shard's own buffers (`srtp_rtp`), RTCP with webrtc-srtp.
//! - Decrypted RTP/RTCP is parsed with [`parse::parse_rtp`] / [`parse::parse_rtcp`], never
//!   with the rtp/rtcp crates directly: those panic on some malformed input.
//!
//! What this module does not do: own sockets, pick shards, parse SDP, or forward media.
//!
//! Call [`install_crypto_provider`] once at process start (and in tests that run a DTLS
//! handshake) before any DTLS handshake.

pub mod demux;
pub mod dtls;
pub mod ice;
pub mod parse;
pub mod srtp;
mod srtp_rtp;

/// Installs rustls' ring provider as the process-wide default, once; later calls do nothing.
///
/// Why: the `dtls` crate builds rustls certificate verifiers with
/// `WebPkiServerVerifier::builder`, which asks rustls for the process-wide `CryptoProvider`.
/// If none is installed, rustls picks one from its crate features, and that works only while
/// exactly one of `ring` / `aws-lc-rs` is enabled in the whole build. Today `dtls` enables
/// only `ring`, but any other crate enabling rustls' default features (quinn, an HTTP client,
/// an exporter) adds `aws-lc-rs`, and then every DTLS handshake panics with "Could not
/// automatically determine the process-level CryptoProvider". Installing ring explicitly
/// makes the outcome independent of the dependency graph.
pub fn install_crypto_provider() {
    // Err means a provider is already installed (by us or by the binary): any provider will
    // do for the verifiers dtls builds, so there is nothing to report.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn install_crypto_provider_is_idempotent_and_installs_one() {
        super::install_crypto_provider();
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
