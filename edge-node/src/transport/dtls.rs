//! DTLS-SRTP handshake (RFC 5763, RFC 5764) over the shared UDP port: an async shell around
//! webrtc-rs' `dtls` crate.
//!
//! `dtls::conn::DTLSConn` is async and reads and writes through an
//! `Arc<dyn webrtc_util::Conn>`. We give it a virtual connection made of two channels, so the
//! one UDP socket stays with the socket shell: datagrams the shell classifies as DTLS for this
//! transport go into `inbound`; what DTLS writes comes out of `outbound` as
//! `(peer address, bytes)` for the shell to send. The shell should feed `inbound` with
//! `try_send` and drop on a full channel: DTLS retransmits its flights (RFC 6347 §4.2.4).
//! It may send `outbound` datagrams to the transport's current ICE-selected address
//! rather than the `peer` given here, so a migration mid-handshake is followed.
//!
//! Identity: both sides use self-signed certificates, so there is no PKI to check. What
//! authenticates the peer is the SHA-256 fingerprint of its certificate, carried in its SDP
//! (`a=fingerprint`, RFC 8122 §5) over the authenticated signaling channel. We require the
//! client certificate (RFC 5763 §5) and fail the handshake with
//! [`DtlsError::FingerprintMismatch`] if it does not hash to that fingerprint.
//!
//! Keys: the `use_srtp` extension (RFC 5764 §4.1.2) offers and accepts
//! SRTP_AEAD_AES_128_GCM (RFC 7714 §14.2) first, then SRTP_AES128_CM_HMAC_SHA1_80; after the
//! handshake both sides export `EXTRACTOR-dtls_srtp` keying material and split it as
//! RFC 5764 §4.2 lays out ([`SrtpKeys`]). The DTLS server is whichever side has
//! `a=setup:passive`; the edge answers `passive`, so [`accept`] is what it runs, and
//! [`connect`] (`a=setup:active`) is for tests and the load tester.
//!
//! After the handshake keep the [`DtlsSession`] and keep feeding it DTLS datagrams: a peer
//! whose last flight was lost retransmits it and needs our answer, and
//! [`DtlsSession::close`] sends close_notify at the end. No application data is expected
//! (no data channels); if a peer sends some anyway, only its own session's reader stalls.
//!
//! Call [`super::install_crypto_provider`] before the first handshake.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::dtls::config::{ClientAuthType, Config};
use ::dtls::conn::DTLSConn;
use ::dtls::crypto::Certificate;
use ::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use async_trait::async_trait;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Mutex};
use webrtc_util::{Conn, KeyingMaterialExporter};

/// RFC 5764 §4.2: the exporter label for DTLS-SRTP keys.
const SRTP_EXPORTER_LABEL: &str = "EXTRACTOR-dtls_srtp";

/// Protection profiles we offer (as client) and accept (as server), most preferred first:
/// AEAD-GCM authenticates with less overhead and is what current browsers prefer.
const SRTP_PROFILES: [SrtpProtectionProfile; 2] = [
    SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
    SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
];

/// Subject name of our certificate: WebRTC ignores it (identity is the fingerprint).
const CERT_SUBJECT: &str = "kcs-edge";

/// Errors of the DTLS handshake and certificate handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DtlsError {
    #[error("certificate generation failed")]
    Certificate(#[source] ::dtls::Error),
    #[error("fingerprint is not 32 colon-separated hex bytes")]
    BadFingerprint,
    #[error("peer certificate does not match the SDP fingerprint")]
    FingerprintMismatch,
    #[error("DTLS handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("DTLS handshake failed")]
    Handshake(#[source] ::dtls::Error),
    #[error("no SRTP protection profile negotiated")]
    NoSrtpProfile,
    #[error("exporting SRTP keying material failed")]
    Export(#[source] webrtc_util::KeyingMaterialExporterError),
    #[error("closing the DTLS session failed")]
    Close(#[source] ::dtls::Error),
}

/// A SHA-256 certificate fingerprint (RFC 8122 §5), as SDP's `a=fingerprint:sha-256 AB:CD:..`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Parses the value part of `a=fingerprint:sha-256 <value>`: 32 hex bytes separated by
    /// colons, either case (RFC 8122 §5 says uppercase, peers are not always strict).
    pub fn parse_sha256(s: &str) -> Result<Self, DtlsError> {
        let mut out = [0u8; 32];
        let mut parts = s.trim().split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or(DtlsError::BadFingerprint)?;
            // from_str_radix alone would also take "+A".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DtlsError::BadFingerprint);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| DtlsError::BadFingerprint)?;
        }
        if parts.next().is_some() {
            return Err(DtlsError::BadFingerprint);
        }
        Ok(Fingerprint(out))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Fingerprint {
    type Err = DtlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fingerprint::parse_sha256(s)
    }
}

impl fmt::Display for Fingerprint {
    /// Uppercase hex with colons, as SDP wants.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Our self-signed ECDSA P-256 certificate, generated once at startup and used for every
/// transport (its fingerprint goes into every SDP we send).
#[derive(Clone)]
pub struct DtlsCertificate {
    cert: Certificate,
    fingerprint: Fingerprint,
}

impl DtlsCertificate {
    /// Generates a fresh key pair and certificate. rcgen's default key type is ECDSA P-256
    /// with SHA-256, the one browsers generate too (RFC 8827 §6.5 wants ECDSA P-256 support).
    pub fn generate() -> Result<Self, DtlsError> {
        let cert = Certificate::generate_self_signed(vec![CERT_SUBJECT.to_owned()])
            .map_err(DtlsError::Certificate)?;
        // generate_self_signed always yields exactly one certificate; an empty chain would be
        // a bug in the dtls crate, reported as a generation failure rather than a panic.
        let der = cert
            .certificate
            .first()
            .ok_or(DtlsError::Certificate(::dtls::Error::ErrInvalidCertificate))?;
        let fingerprint = Fingerprint::of_der(der.as_ref());
        Ok(DtlsCertificate { cert, fingerprint })
    }

    /// The SHA-256 fingerprint, e.g. for `a=fingerprint:sha-256 AB:CD:...`.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The SHA-256 fingerprint as SDP writes it: uppercase hex with colons.
    pub fn fingerprint_sha256(&self) -> String {
        self.fingerprint.to_string()
    }
}

impl fmt::Debug for DtlsCertificate {
    /// The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DtlsCertificate")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// An SRTP protection profile negotiated by `use_srtp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SrtpProfile {
    /// SRTP_AES128_CM_HMAC_SHA1_80 (RFC 5764 §4.1.2).
    Aes128CmHmacSha1_80,
    /// SRTP_AEAD_AES_128_GCM (RFC 7714 §14.2).
    AeadAes128Gcm,
}

impl SrtpProfile {
    /// Master key length: AES-128 in both profiles.
    pub fn key_len(self) -> usize {
        16
    }

    /// Master salt length: 112 bits for AES-CM (RFC 3711 §8.2), 96 bits for AEAD
    /// (RFC 7714 §12).
    pub fn salt_len(self) -> usize {
        match self {
            SrtpProfile::Aes128CmHmacSha1_80 => 14,
            SrtpProfile::AeadAes128Gcm => 12,
        }
    }

    fn from_dtls(p: SrtpProtectionProfile) -> Option<Self> {
        match p {
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => {
                Some(SrtpProfile::Aes128CmHmacSha1_80)
            }
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => Some(SrtpProfile::AeadAes128Gcm),
            _ => None,
        }
    }
}

/// SRTP master keys of one transport from our point of view: `local_*` protects what we
/// send, `remote_*` what we receive. The peer's `local_*` are our `remote_*`.
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKeys {
    pub profile: SrtpProfile,
    pub local_key: Vec<u8>,
    pub local_salt: Vec<u8>,
    pub remote_key: Vec<u8>,
    pub remote_salt: Vec<u8>,
}

impl fmt::Debug for SrtpKeys {
    /// Keys stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SrtpKeys")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl SrtpKeys {
    /// Splits exported keying material laid out as RFC 5764 §4.2:
    /// client key | server key | client salt | server salt.
    fn from_keying_material(
        profile: SrtpProfile,
        material: &[u8],
        is_client: bool,
    ) -> Option<Self> {
        let (k, s) = (profile.key_len(), profile.salt_len());
        let (client_key, rest) = material.split_at_checked(k)?;
        let (server_key, rest) = rest.split_at_checked(k)?;
        let (client_salt, rest) = rest.split_at_checked(s)?;
        let server_salt = rest.get(..s)?;
        let (local, remote) = if is_client {
            ((client_key, client_salt), (server_key, server_salt))
        } else {
            ((server_key, server_salt), (client_key, client_salt))
        };
        Some(SrtpKeys {
            profile,
            local_key: local.0.to_vec(),
            local_salt: local.1.to_vec(),
            remote_key: remote.0.to_vec(),
            remote_salt: remote.1.to_vec(),
        })
    }
}

/// A finished DTLS association. Keep it (and keep feeding its `inbound` channel) for the
/// life of the transport; see the module docs.
pub struct DtlsSession {
    conn: DTLSConn,
    profile: SrtpProfile,
}

impl DtlsSession {
    /// The negotiated SRTP protection profile.
    pub fn profile(&self) -> SrtpProfile {
        self.profile
    }

    /// Sends close_notify and stops the session's reader. Idempotent.
    pub async fn close(&self) -> Result<(), DtlsError> {
        self.conn.close().await.map_err(DtlsError::Close)
    }
}

impl fmt::Debug for DtlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DtlsSession")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

/// Runs the DTLS server side (`a=setup:passive`) of one transport's handshake. See the
/// module docs for the channel contract. Fails with [`DtlsError::FingerprintMismatch`] if
/// the client's certificate does not hash to `remote_fingerprint`, and with
/// [`DtlsError::Timeout`] if the handshake does not finish within `timeout`.
pub async fn accept(
    cert: &DtlsCertificate,
    peer: SocketAddr,
    remote_fingerprint: &Fingerprint,
    inbound: mpsc::Receiver<Vec<u8>>,
    outbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    timeout: Duration,
) -> Result<(SrtpKeys, DtlsSession), DtlsError> {
    handshake(
        Side::SERVER,
        cert,
        peer,
        remote_fingerprint,
        inbound,
        outbound,
        timeout,
    )
    .await
}

/// Runs the DTLS client side (`a=setup:active`): the mirror of [`accept`], for tests and
/// the load tester.
pub async fn connect(
    cert: &DtlsCertificate,
    peer: SocketAddr,
    remote_fingerprint: &Fingerprint,
    inbound: mpsc::Receiver<Vec<u8>>,
    outbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    timeout: Duration,
) -> Result<(SrtpKeys, DtlsSession), DtlsError> {
    handshake(
        Side::CLIENT,
        cert,
        peer,
        remote_fingerprint,
        inbound,
        outbound,
        timeout,
    )
    .await
}

/// Which end of the handshake we are, and the SRTP profiles we offer or accept there.
#[derive(Debug, Clone, Copy)]
struct Side {
    is_client: bool,
    profiles: &'static [SrtpProtectionProfile],
}

impl Side {
    const SERVER: Side = Side {
        is_client: false,
        profiles: &SRTP_PROFILES,
    };
    const CLIENT: Side = Side {
        is_client: true,
        profiles: &SRTP_PROFILES,
    };
}

async fn handshake(
    side: Side,
    cert: &DtlsCertificate,
    peer: SocketAddr,
    remote_fingerprint: &Fingerprint,
    inbound: mpsc::Receiver<Vec<u8>>,
    outbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    timeout: Duration,
) -> Result<(SrtpKeys, DtlsSession), DtlsError> {
    let is_client = side.is_client;
    let mismatch = Arc::new(AtomicBool::new(false));
    let config = Config {
        certificates: vec![cert.cert.clone()],
        srtp_protection_profiles: side.profiles.to_vec(),
        // RFC 5763 §5: the server requests the client's certificate; any self-signed one
        // will do for the crate, the fingerprint callback below is the real check.
        client_auth: if is_client {
            ClientAuthType::NoClientCert
        } else {
            ClientAuthType::RequireAnyClientCert
        },
        // Self-signed certificates have no chain to verify (RFC 5763 §5); the client
        // authenticates the server by fingerprint the same way.
        insecure_skip_verify: true,
        verify_peer_certificate: Some(fingerprint_check(*remote_fingerprint, mismatch.clone())),
        ..Config::default()
    };
    let conn: Arc<dyn Conn + Send + Sync> = Arc::new(ChannelConn {
        peer,
        inbound: Mutex::new(inbound),
        outbound,
    });

    let dtls =
        match tokio::time::timeout(timeout, DTLSConn::new(conn, config, is_client, None)).await {
            Err(_) => return Err(DtlsError::Timeout(timeout)),
            Ok(Err(_)) if mismatch.load(Ordering::SeqCst) => {
                return Err(DtlsError::FingerprintMismatch)
            }
            Ok(Err(e)) => return Err(DtlsError::Handshake(e)),
            Ok(Ok(c)) => c,
        };

    let keys = match export_keys(&dtls, is_client).await {
        Ok(keys) => keys,
        Err(e) => {
            // Best effort: tell the peer we are done with it; the export error is the news.
            let _ = dtls.close().await;
            return Err(e);
        }
    };
    let profile = keys.profile;
    Ok((
        keys,
        DtlsSession {
            conn: dtls,
            profile,
        },
    ))
}

/// The `verify_peer_certificate` callback: the first (leaf) certificate must hash to the
/// SDP fingerprint. Sets `mismatch` so the caller can tell this failure from others.
#[allow(clippy::type_complexity)]
fn fingerprint_check(
    expected: Fingerprint,
    mismatch: Arc<AtomicBool>,
) -> Arc<dyn Fn(&[Vec<u8>], &[CertificateDer<'static>]) -> Result<(), ::dtls::Error> + Send + Sync>
{
    Arc::new(move |certs, _chains| {
        let matches = certs
            .first()
            .is_some_and(|der| Fingerprint::of_der(der) == expected);
        if matches {
            Ok(())
        } else {
            mismatch.store(true, Ordering::SeqCst);
            Err(::dtls::Error::ErrInvalidCertificate)
        }
    })
}

async fn export_keys(dtls: &DTLSConn, is_client: bool) -> Result<SrtpKeys, DtlsError> {
    let profile = SrtpProfile::from_dtls(dtls.selected_srtpprotection_profile())
        .ok_or(DtlsError::NoSrtpProfile)?;
    let len = 2 * (profile.key_len() + profile.salt_len());
    let material = dtls
        .connection_state()
        .await
        .export_keying_material(SRTP_EXPORTER_LABEL, &[], len)
        .await
        .map_err(DtlsError::Export)?;
    // The exporter returns exactly `len` bytes; a short answer would be a dtls crate bug,
    // reported rather than panicking.
    SrtpKeys::from_keying_material(profile, &material, is_client).ok_or(DtlsError::Export(
        webrtc_util::KeyingMaterialExporterError::CipherSuiteUnset,
    ))
}

/// The virtual connection DTLS reads and writes: two channels to the socket shell.
struct ChannelConn {
    peer: SocketAddr,
    inbound: Mutex<mpsc::Receiver<Vec<u8>>>,
    outbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
}

#[async_trait]
impl Conn for ChannelConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "a channel connection is already connected".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let datagram = self.inbound.lock().await.recv().await;
        match datagram {
            Some(d) => {
                // DTLS records fit the MTU; an oversized datagram is truncated and then
                // fails DTLS parsing, which drops it.
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            // The shell dropped the sender. The dtls reader loops on errors without
            // backing off, so instead of erroring we wait until the session is closed or
            // dropped, which ends the reader.
            None => std::future::pending().await,
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        Ok((n, self.peer))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.outbound
            .send((self.peer, buf.to_vec()))
            .await
            .map_err(|_| webrtc_util::Error::ErrUseClosedNetworkConn)?;
        Ok(buf.len())
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        // There is no socket of our own; nothing in the handshake needs this address.
        Ok(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // The socket is shared; closing a transport closes nothing underneath.
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_ADDR: &str = "192.0.2.1:5000";
    const SERVER_ADDR: &str = "192.0.2.2:3478";
    /// Generous for a debug build on a shared 2-core machine; loopback handshakes take ms.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

    struct Wire {
        to_server: mpsc::Sender<Vec<u8>>,
        to_client: mpsc::Sender<Vec<u8>>,
    }

    /// Wires a client and a server together through channels, like two socket shells.
    /// Returns the halves each side's handshake takes, and a handle to inject datagrams.
    #[allow(clippy::type_complexity)]
    fn wire() -> (
        (mpsc::Receiver<Vec<u8>>, mpsc::Sender<(SocketAddr, Vec<u8>)>),
        (mpsc::Receiver<Vec<u8>>, mpsc::Sender<(SocketAddr, Vec<u8>)>),
        Wire,
    ) {
        let (to_server, server_in) = mpsc::channel::<Vec<u8>>(64);
        let (to_client, client_in) = mpsc::channel::<Vec<u8>>(64);
        let (server_out, mut server_out_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(64);
        let (client_out, mut client_out_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(64);
        let c2s = to_server.clone();
        tokio::spawn(async move {
            while let Some((to, d)) = client_out_rx.recv().await {
                assert_eq!(to, SERVER_ADDR.parse::<SocketAddr>().unwrap());
                if c2s.send(d).await.is_err() {
                    break;
                }
            }
        });
        let s2c = to_client.clone();
        tokio::spawn(async move {
            while let Some((to, d)) = server_out_rx.recv().await {
                assert_eq!(to, CLIENT_ADDR.parse::<SocketAddr>().unwrap());
                if s2c.send(d).await.is_err() {
                    break;
                }
            }
        });
        (
            (server_in, server_out),
            (client_in, client_out),
            Wire {
                to_server,
                to_client,
            },
        )
    }

    async fn run_pair(
        server_cert: &DtlsCertificate,
        client_cert: &DtlsCertificate,
        server_expects: Fingerprint,
        client_expects: Fingerprint,
        timeout: Duration,
    ) -> (
        Result<(SrtpKeys, DtlsSession), DtlsError>,
        Result<(SrtpKeys, DtlsSession), DtlsError>,
        Wire,
    ) {
        run_pair_offering(
            Side::CLIENT,
            server_cert,
            client_cert,
            server_expects,
            client_expects,
            timeout,
        )
        .await
    }

    async fn run_pair_offering(
        client_side: Side,
        server_cert: &DtlsCertificate,
        client_cert: &DtlsCertificate,
        server_expects: Fingerprint,
        client_expects: Fingerprint,
        timeout: Duration,
    ) -> (
        Result<(SrtpKeys, DtlsSession), DtlsError>,
        Result<(SrtpKeys, DtlsSession), DtlsError>,
        Wire,
    ) {
        super::super::install_crypto_provider();
        let ((s_in, s_out), (c_in, c_out), wire) = wire();
        let client_addr: SocketAddr = CLIENT_ADDR.parse().unwrap();
        let server_addr: SocketAddr = SERVER_ADDR.parse().unwrap();
        let (server, client) = tokio::join!(
            accept(
                server_cert,
                client_addr,
                &server_expects,
                s_in,
                s_out,
                timeout
            ),
            handshake(
                client_side,
                client_cert,
                server_addr,
                &client_expects,
                c_in,
                c_out,
                timeout
            ),
        );
        (server, client, wire)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_derives_mirrored_keys_for_both_profiles() {
        let server_cert = DtlsCertificate::generate().unwrap();
        let client_cert = DtlsCertificate::generate().unwrap();
        let cases: [(&'static [SrtpProtectionProfile], SrtpProfile); 3] = [
            // Both offer GCM first, so GCM wins.
            (&SRTP_PROFILES, SrtpProfile::AeadAes128Gcm),
            (
                &[SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80],
                SrtpProfile::Aes128CmHmacSha1_80,
            ),
            // An older client preferring AES-CM, with an unsupported profile first.
            (
                &[
                    SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_32,
                    SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
                    SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                ],
                SrtpProfile::Aes128CmHmacSha1_80,
            ),
        ];
        for (offer, want) in cases {
            let client_side = Side {
                is_client: true,
                profiles: offer,
            };
            let (server, client, wire) = run_pair_offering(
                client_side,
                &server_cert,
                &client_cert,
                client_cert.fingerprint(),
                server_cert.fingerprint(),
                HANDSHAKE_TIMEOUT,
            )
            .await;
            let (skeys, ssession) = server.unwrap();
            let (ckeys, csession) = client.unwrap();

            assert_eq!(skeys.profile, want, "offer {offer:?}");
            assert_eq!(ckeys.profile, want);
            assert_eq!(ssession.profile(), want);
            assert_eq!(skeys.local_key.len(), want.key_len());
            assert_eq!(skeys.local_salt.len(), want.salt_len());
            assert_eq!(ckeys.local_key, skeys.remote_key);
            assert_eq!(ckeys.local_salt, skeys.remote_salt);
            assert_eq!(ckeys.remote_key, skeys.local_key);
            assert_eq!(ckeys.remote_salt, skeys.local_salt);
            assert_ne!(skeys.local_key, skeys.remote_key);

            // The exported keys work: what the client protects, the server opens.
            let mut c = super::super::srtp::SrtpSession::new(&ckeys).unwrap();
            let mut s = super::super::srtp::SrtpSession::new(&skeys).unwrap();
            let rtp = [0x80, 111, 0, 1, 0, 0, 0, 1, 0, 0, 0, 42, 0xde, 0xad];
            let protected = c.encrypt_rtp(&rtp).unwrap();
            assert_eq!(&s.decrypt_rtp(&protected).unwrap()[..], &rtp[..]);

            // After the handshake, garbage still reaching the session must not hurt it.
            wire.to_server
                .send(vec![22, 0xfe, 0xfd, 0xff])
                .await
                .unwrap();
            wire.to_client.send(vec![0xff; 3]).await.unwrap();
            ssession.close().await.unwrap();
            csession.close().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_common_srtp_profile_fails() {
        let server_cert = DtlsCertificate::generate().unwrap();
        let client_cert = DtlsCertificate::generate().unwrap();
        let client_side = Side {
            is_client: true,
            profiles: &[SrtpProtectionProfile::Srtp_Aead_Aes_256_Gcm],
        };
        let (server, client, _wire) = run_pair_offering(
            client_side,
            &server_cert,
            &client_cert,
            client_cert.fingerprint(),
            server_cert.fingerprint(),
            Duration::from_secs(5),
        )
        .await;
        assert!(server.is_err(), "server: {server:?}");
        assert!(client.is_err(), "client: {client:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_rejects_a_client_certificate_not_in_the_sdp() {
        let server_cert = DtlsCertificate::generate().unwrap();
        let client_cert = DtlsCertificate::generate().unwrap();
        let stranger = DtlsCertificate::generate().unwrap();
        let (server, client, _wire) = run_pair(
            &server_cert,
            &client_cert,
            stranger.fingerprint(),
            server_cert.fingerprint(),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(server, Err(DtlsError::FingerprintMismatch)),
            "server: {server:?}"
        );
        assert!(client.is_err(), "client must not complete: {client:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_rejects_a_server_certificate_not_in_the_sdp() {
        let server_cert = DtlsCertificate::generate().unwrap();
        let client_cert = DtlsCertificate::generate().unwrap();
        let stranger = DtlsCertificate::generate().unwrap();
        let (server, client, _wire) = run_pair(
            &server_cert,
            &client_cert,
            client_cert.fingerprint(),
            stranger.fingerprint(),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(client, Err(DtlsError::FingerprintMismatch)),
            "client: {client:?}"
        );
        assert!(server.is_err(), "server must not complete: {server:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_before_the_handshake_does_not_panic_or_block() {
        super::super::install_crypto_provider();
        let server_cert = DtlsCertificate::generate().unwrap();
        let client_cert = DtlsCertificate::generate().unwrap();
        let ((s_in, s_out), (c_in, c_out), wire) = wire();
        for junk in [
            vec![],
            vec![22],
            vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
            vec![23; 300],
            vec![0xde, 0xad, 0xbe, 0xef],
        ] {
            wire.to_server.send(junk).await.unwrap();
        }
        let (client_fp, server_fp) = (client_cert.fingerprint(), server_cert.fingerprint());
        let (server, client) = tokio::join!(
            accept(
                &server_cert,
                CLIENT_ADDR.parse().unwrap(),
                &client_fp,
                s_in,
                s_out,
                HANDSHAKE_TIMEOUT
            ),
            connect(
                &client_cert,
                SERVER_ADDR.parse().unwrap(),
                &server_fp,
                c_in,
                c_out,
                HANDSHAKE_TIMEOUT
            ),
        );
        let (skeys, _s) = server.unwrap();
        let (ckeys, _c) = client.unwrap();
        assert_eq!(skeys.remote_key, ckeys.local_key);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_peer_times_out() {
        super::super::install_crypto_provider();
        let cert = DtlsCertificate::generate().unwrap();
        let (_to_server, server_in) = mpsc::channel(4);
        let (server_out, _server_out_rx) = mpsc::channel(4);
        let got = accept(
            &cert,
            CLIENT_ADDR.parse().unwrap(),
            &cert.fingerprint(),
            server_in,
            server_out,
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(got, Err(DtlsError::Timeout(_))), "{got:?}");
    }

    #[test]
    fn keying_material_split_follows_rfc5764() {
        for profile in [SrtpProfile::AeadAes128Gcm, SrtpProfile::Aes128CmHmacSha1_80] {
            let (k, s) = (profile.key_len(), profile.salt_len());
            let material: Vec<u8> = (0..2 * (k + s)).map(|i| i as u8).collect();
            let client = SrtpKeys::from_keying_material(profile, &material, true).unwrap();
            let server = SrtpKeys::from_keying_material(profile, &material, false).unwrap();
            assert_eq!(client.local_key, material[..k]);
            assert_eq!(client.remote_key, material[k..2 * k]);
            assert_eq!(client.local_salt, material[2 * k..2 * k + s]);
            assert_eq!(client.remote_salt, material[2 * k + s..]);
            assert_eq!(server.local_key, client.remote_key);
            assert_eq!(server.local_salt, client.remote_salt);
            assert_eq!(server.remote_key, client.local_key);
            assert_eq!(server.remote_salt, client.local_salt);
            assert!(SrtpKeys::from_keying_material(profile, &material[1..], true).is_none());
        }
    }

    #[test]
    fn fingerprint_text_round_trip() {
        let cert = DtlsCertificate::generate().unwrap();
        let text = cert.fingerprint_sha256();
        assert_eq!(text.len(), 32 * 3 - 1);
        assert!(text
            .chars()
            .all(|c| c == ':' || c.is_ascii_digit() || c.is_ascii_uppercase()));
        assert_eq!(
            Fingerprint::parse_sha256(&text).unwrap(),
            cert.fingerprint()
        );
        assert_eq!(
            Fingerprint::parse_sha256(&text.to_lowercase()).unwrap(),
            cert.fingerprint()
        );
        assert!(!format!("{cert:?}").is_empty());

        let plus_signs = "+A:".repeat(32);
        let bad = [
            "",
            "AB",
            &text[..text.len() - 3],
            &format!("{text}:00"),
            &text.replace(':', "-"),
            &format!("G{}", &text[1..]),
            &format!("A:{}", &text[3..]),
            plus_signs.trim_end_matches(':'),
        ];
        for b in bad {
            assert!(Fingerprint::parse_sha256(b).is_err(), "{b:?} accepted");
        }
    }
}
