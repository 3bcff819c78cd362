//! Node identities for cascade links: a cluster CA and the node certificates it issues.
//!
//! Every link is mutual TLS 1.3: each node presents a certificate for its node id issued by the
//! cluster CA, and trusts that CA only (never the system roots), so only nodes the operator
//! issued a certificate to can join the mesh. Deployments read PEM files
//! ([`NodeCredentials::from_pem_files`]); dev mode and tests generate a CA in memory
//! ([`ClusterCa::generate`]) and issue from it. The crypto provider is rustls's `ring`, passed
//! explicitly, so nothing depends on a process-wide default.

use crate::link::{Label, ALPN};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::Path;
use std::sync::Arc;

/// Why credentials could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    #[error("CA certificate refused: {0}")]
    Ca(String),
    #[error("node id {0:?} is not a certificate name")]
    BadName(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What one node needs for its links: the cluster CA to trust, its certificate chain and key.
#[derive(Debug)]
pub struct NodeCredentials {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for NodeCredentials {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl NodeCredentials {
    /// Reads the cluster CA certificate, this node's certificate chain and its private key from
    /// PEM files (what deployments configure).
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    /// Parses PEM text: the CA certificate, the node's chain (leaf first), the node's key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let pem_err = |what| {
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                what,
                reason: e.to_string(),
            }
        };
        let ca = CertificateDer::from_pem_slice(ca).map_err(pem_err("CA certificate"))?;
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("node certificate"))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "node certificate",
                reason: "no certificate found".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(pem_err("node key"))?;
        Ok(Self { ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Ca(e.to_string()))?;
        Ok(Arc::new(roots))
    }

    /// The listening side: TLS 1.3 only, our ALPN only, and a client certificate from the
    /// cluster CA required (a peer without one fails the handshake).
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Ca(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The dialling side: trusts the cluster CA only and presents this node's certificate.
    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Whether `cert` (already verified against the cluster CA by the handshake) names `node`.
/// Lets the listening side hold a dialler to the node id its hello claims.
pub(crate) fn certificate_names(cert: &CertificateDer<'_>, node: &Label) -> bool {
    let Ok(name) = ServerName::try_from(node.as_str()) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|ee| ee.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// A cluster CA held in memory: dev mode and tests. Production keeps its CA key offline and
/// gives nodes PEM files instead.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl ClusterCa {
    /// A fresh CA (ECDSA P-256) named `name`.
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a certificate for `node` (its DNS name is the node id, good for both TLS client
    /// and server use) and returns (certificate PEM, key PEM), for writing files.
    pub fn issue_pem(&self, node: &Label) -> Result<(String, String), TlsError> {
        let mut params = rcgen::CertificateParams::new(vec![node.as_str().to_owned()])
            .map_err(|_| TlsError::BadName(node.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node.as_str());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues credentials for `node`, ready to use.
    pub fn issue(&self, node: &Label) -> Result<NodeCredentials, TlsError> {
        let (cert, key) = self.issue_pem(node)?;
        NodeCredentials::from_pem(self.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes())
    }
}
