//! Join tokens: JWTs signed with Ed25519 (EdDSA) carrying room, identity, role and expiry.
//!
//! EdDSA keeps the signing key on the control plane (or, in dev mode, in the single process)
//! while edges hold only public keys (architecture rule 5). A [`TokenVerifier`] holds one or more
//! public keys by `kid`, so keys can be rotated: sign with the new key, keep verifying the old
//! one until its tokens expire.

use cascade_proto::{Identity, Role, RoomId};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Leeway for clock skew between the minting host and the verifying edge.
const CLOCK_SKEW_LEEWAY_SECS: u64 = 30;

/// What a join token grants: one identity with one role in one room, until `exp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Room the token admits to.
    pub room: RoomId,
    /// Who joins (JWT `sub`).
    #[serde(rename = "sub")]
    pub identity: Identity,
    pub role: Role,
    /// Display name shown to others, if the minting service knows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
}

/// Why a token was refused. Each maps to one error code clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token signature invalid")]
    BadSignature,
    #[error("token signed with unknown key id {0:?}")]
    UnknownKey(Option<String>),
    #[error("token malformed: {0}")]
    Malformed(String),
    #[error("token is for room {token_room}, not {requested}")]
    WrongRoom {
        token_room: String,
        requested: String,
    },
}

impl TokenError {
    /// Stable machine-readable code for error events and HTTP bodies.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::BadSignature | TokenError::UnknownKey(_) => "token_invalid",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::WrongRoom { .. } => "token_wrong_room",
        }
    }
}

/// An Ed25519 signing key with its key id.
pub struct TokenSigner {
    kid: String,
    encoding: EncodingKey,
    public: [u8; 32],
}

impl TokenSigner {
    /// A fresh random key.
    pub fn generate(kid: impl Into<String>) -> Self {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        Self::from_signing_key(kid, &key)
    }

    /// A key from its 32-byte seed (the dev key is derived this way from a fixed file).
    pub fn from_seed(kid: impl Into<String>, seed: &[u8; 32]) -> Self {
        Self::from_signing_key(kid, &SigningKey::from_bytes(seed))
    }

    fn from_signing_key(kid: impl Into<String>, key: &SigningKey) -> Self {
        // Encoding a valid in-memory key to PKCS#8 cannot fail.
        let der = key.to_pkcs8_der().expect("ed25519 key encodes to pkcs8");
        Self {
            kid: kid.into(),
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            public: key.verifying_key().to_bytes(),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw 32-byte public key, for [`TokenVerifier::add_key`] and the published key set.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Signs claims.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        // Signing serialisable claims with a valid key cannot fail.
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("jwt encoding")
    }

    /// Mints a token valid for `ttl_secs` from `now_unix`.
    pub fn mint(
        &self,
        room: RoomId,
        identity: Identity,
        role: Role,
        name: Option<String>,
        now_unix: u64,
        ttl_secs: u64,
    ) -> String {
        self.sign(&Claims {
            room,
            identity,
            role,
            name,
            exp: now_unix + ttl_secs,
            iat: now_unix,
        })
    }
}

/// Verifies tokens against a set of public keys by `kid`.
#[derive(Clone, Default)]
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
}

impl TokenVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts a public key under `kid`.
    pub fn add_key(&mut self, kid: impl Into<String>, public: &[u8; 32]) {
        self.keys
            .insert(kid.into(), DecodingKey::from_ed_der(public));
    }

    pub fn remove_key(&mut self, kid: &str) {
        self.keys.remove(kid);
    }

    /// Verifies signature and expiry, returning the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Malformed(format!(
                "algorithm {:?} not accepted, only EdDSA",
                header.alg
            )));
        }
        let key = match header.kid.as_deref() {
            Some(kid) => self.keys.get(kid),
            None if self.keys.len() == 1 => self.keys.values().next(),
            None => None,
        }
        .ok_or_else(|| TokenError::UnknownKey(header.kid.clone()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = CLOCK_SKEW_LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    _ => TokenError::Malformed(e.to_string()),
                }
            })
    }

    /// Verifies a token and that it admits to `room`.
    pub fn verify_for_room(&self, token: &str, room: &RoomId) -> Result<Claims, TokenError> {
        let claims = self.verify(token)?;
        if &claims.room != room {
            return Err(TokenError::WrongRoom {
                token_room: claims.room.to_string(),
                requested: room.to_string(),
            });
        }
        Ok(claims)
    }
}

/// One published public key, as a JWK (RFC 7517) of type OKP / Ed25519 (RFC 8037 §2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Always `OKP` for Ed25519.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    pub kid: String,
    /// The 32-byte public key, base64url without padding.
    pub x: String,
    /// Always `EdDSA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Always `sig`.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
}

/// The key set the control plane publishes at `/v1/keys` (JWKS shape): edges fetch it and build
/// a [`TokenVerifier`] with [`TokenVerifier::from_jwks`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwk {
    pub fn ed25519(kid: impl Into<String>, public: &[u8; 32]) -> Self {
        use base64::Engine;
        Self {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            kid: kid.into(),
            x: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public),
            alg: Some("EdDSA".into()),
            key_use: Some("sig".into()),
        }
    }

    /// The raw public key, if this is a well-formed Ed25519 JWK.
    pub fn public_key(&self) -> Result<[u8; 32], TokenError> {
        use base64::Engine;
        if self.kty != "OKP" || self.crv != "Ed25519" {
            return Err(TokenError::Malformed(format!(
                "key {} is {}/{}, not OKP/Ed25519",
                self.kid, self.kty, self.crv
            )));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.x.trim_end_matches('='))
            .map_err(|e| TokenError::Malformed(format!("key {}: {e}", self.kid)))?;
        bytes
            .try_into()
            .map_err(|_| TokenError::Malformed(format!("key {}: not 32 bytes", self.kid)))
    }
}

impl TokenVerifier {
    /// A verifier trusting every key of a published set.
    pub fn from_jwks(jwks: &Jwks) -> Result<Self, TokenError> {
        let mut v = Self::new();
        for k in &jwks.keys {
            v.add_key(k.kid.clone(), &k.public_key()?);
        }
        Ok(v)
    }
}

/// The control plane's keys: one signs, older ones stay published until their tokens expire.
pub struct SigningKeys {
    current: TokenSigner,
    retired: Vec<(String, [u8; 32])>,
}

impl SigningKeys {
    pub fn new(current: TokenSigner) -> Self {
        Self {
            current,
            retired: Vec::new(),
        }
    }

    /// Keeps publishing a retired key (verification only).
    pub fn with_retired(mut self, kid: impl Into<String>, public: [u8; 32]) -> Self {
        self.retired.push((kid.into(), public));
        self
    }

    /// Makes `next` the signing key; the old one stays published.
    pub fn rotate(&mut self, next: TokenSigner) {
        let old = std::mem::replace(&mut self.current, next);
        self.retired
            .insert(0, (old.kid().to_owned(), old.public_key()));
    }

    /// Stops publishing a retired key.
    pub fn retire(&mut self, kid: &str) {
        self.retired.retain(|(k, _)| k != kid);
    }

    pub fn signer(&self) -> &TokenSigner {
        &self.current
    }

    pub fn jwks(&self) -> Jwks {
        let mut keys = vec![Jwk::ed25519(self.current.kid(), &self.current.public_key())];
        keys.extend(
            self.retired
                .iter()
                .map(|(kid, pk)| Jwk::ed25519(kid.clone(), pk)),
        );
        Jwks { keys }
    }

    /// A verifier for every published key (what an edge builds from [`Self::jwks`]).
    pub fn verifier(&self) -> TokenVerifier {
        let mut v = TokenVerifier::new();
        v.add_key(self.current.kid(), &self.current.public_key());
        for (kid, pk) in &self.retired {
            v.add_key(kid.clone(), pk);
        }
        v
    }
}

/// Seconds since the Unix epoch, for minting and checking tokens in shells (not in cores).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (RoomId, Identity) {
        (RoomId::new("r1").unwrap(), Identity::new("alice").unwrap())
    }

    #[test]
    fn round_trip_and_room_check() {
        let s = TokenSigner::generate("k1");
        let mut v = TokenVerifier::new();
        v.add_key("k1", &s.public_key());
        let (room, who) = ids();
        let t = s.mint(room.clone(), who.clone(), Role::Host, None, unix_now(), 60);
        let c = v.verify_for_room(&t, &room).unwrap();
        assert_eq!(c.identity, who);
        assert_eq!(c.role, Role::Host);
        let other = RoomId::new("r2").unwrap();
        assert_eq!(
            v.verify_for_room(&t, &other).unwrap_err().code(),
            "token_wrong_room"
        );
    }

    #[test]
    fn expired_forged_and_garbage_are_refused() {
        let s = TokenSigner::generate("k1");
        let mut v = TokenVerifier::new();
        v.add_key("k1", &s.public_key());
        let (room, who) = ids();
        let old = s.mint(room.clone(), who.clone(), Role::Attendee, None, 1_000, 60);
        assert_eq!(v.verify(&old).unwrap_err(), TokenError::Expired);

        // Same kid, different key: a forgery.
        let forger = TokenSigner::generate("k1");
        let forged = forger.mint(room.clone(), who.clone(), Role::Host, None, unix_now(), 60);
        assert_eq!(v.verify(&forged).unwrap_err(), TokenError::BadSignature);

        // Tampered payload: a host payload spliced onto an attendee token's signature.
        let good = s.mint(room, who, Role::Attendee, None, unix_now(), 60);
        let good_parts: Vec<&str> = good.split('.').collect();
        let forged_parts: Vec<&str> = forged.split('.').collect();
        let spliced = format!("{}.{}.{}", good_parts[0], forged_parts[1], good_parts[2]);
        assert_ne!(forged_parts[1], good_parts[1]);
        assert_eq!(v.verify(&spliced).unwrap_err(), TokenError::BadSignature);

        assert_eq!(v.verify("not a jwt").unwrap_err().code(), "token_malformed");
        let unknown = TokenSigner::generate("k9").mint(
            RoomId::new("r").unwrap(),
            Identity::new("x").unwrap(),
            Role::Host,
            None,
            unix_now(),
            60,
        );
        assert!(matches!(v.verify(&unknown), Err(TokenError::UnknownKey(_))));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_key_removed() {
        let old = TokenSigner::generate("2026-01");
        let new = TokenSigner::generate("2026-02");
        let mut v = TokenVerifier::new();
        v.add_key(old.kid(), &old.public_key());
        v.add_key(new.kid(), &new.public_key());
        let (room, who) = ids();
        let t_old = old.mint(room.clone(), who.clone(), Role::Host, None, unix_now(), 60);
        let t_new = new.mint(room, who, Role::Host, None, unix_now(), 60);
        assert!(v.verify(&t_old).is_ok());
        assert!(v.verify(&t_new).is_ok());
        v.remove_key(old.kid());
        assert!(v.verify(&t_old).is_err());
        assert!(v.verify(&t_new).is_ok());
    }

    #[test]
    fn jwks_round_trip_and_rotation() {
        let mut keys = SigningKeys::new(TokenSigner::generate("k1"));
        let (room, who) = ids();
        let t1 = keys
            .signer()
            .mint(room.clone(), who.clone(), Role::Host, None, unix_now(), 60);
        keys.rotate(TokenSigner::generate("k2"));
        let t2 = keys
            .signer()
            .mint(room, who, Role::Host, None, unix_now(), 60);
        let json = serde_json::to_string(&keys.jwks()).unwrap();
        assert!(json.contains("\"kty\":\"OKP\""));
        let published: Jwks = serde_json::from_str(&json).unwrap();
        assert_eq!(published.keys.len(), 2);
        let v = TokenVerifier::from_jwks(&published).unwrap();
        assert!(v.verify(&t1).is_ok());
        assert!(v.verify(&t2).is_ok());
        keys.retire("k1");
        let v = TokenVerifier::from_jwks(&keys.jwks()).unwrap();
        assert!(v.verify(&t1).is_err());
        let mut bad = published.keys[0].clone();
        bad.x = "AAAA".into();
        assert!(bad.public_key().is_err());
    }
}
