//! ICE-lite responder (RFC 8445 §2.5), one per transport, sans-IO.
//!
//! The edge has a public address and never gathers or checks candidates itself: it is an
//! ICE-lite agent, always in the controlled role. The client (a full agent, controlling) sends
//! STUN Binding requests to our one host candidate; we answer each valid one, and the client
//! nominates the pair it wants with USE-CANDIDATE. That source address becomes the
//! [`selected`](IceLite::selected) address media is sent to. A later nomination from another
//! address (NAT rebinding, network change) moves it: the controlling peer decides.
//!
//! A request is valid when it is a Binding request (RFC 8489 §6) with a correct FINGERPRINT
//! (RFC 8489 §14.7), USERNAME `"<local ufrag>:<remote ufrag>"` (RFC 8445 §7.2.2) and a
//! MESSAGE-INTEGRITY keyed with our password (short-term credentials, RFC 8489 §9.1).
//! Failures are answered as RFC 8489 §9.1.3 requires: 400 when USERNAME or MESSAGE-INTEGRITY is
//! missing, 401 when USERNAME names someone else or the integrity check fails. Those replies
//! travel inside the [`IceError`] (see [`IceError::reply`]) so the caller both sends and
//! counts them. They carry no MESSAGE-INTEGRITY (we cannot key it for an unauthenticated
//! sender) and are smaller than the request that caused them, so they do not amplify a
//! spoofed-source flood. Messages whose FINGERPRINT is missing or wrong are not STUN to us
//! and are dropped silently. Binding indications (keep-alives) and responses are ignored.
//!
//! Consent freshness (RFC 7675): a lite agent sends no checks of its own, so we take the
//! peer's checks as its consent. Browsers send a Binding request on the selected pair every
//! few seconds; if none authenticates from the selected address for [`CONSENT_TIMEOUT`], we
//! report [`IceEvent::ConsentExpired`] once and stop answering. Before the first
//! nomination the same timeout runs from creation, which bounds how long an unconnected
//! transport can linger.
//!
//! Time model: `now` is passed into every call; nothing here reads the clock, spawns or
//! touches a socket. Drive it with [`IceLite::handle_stun`] for each STUN datagram,
//! [`IceLite::handle_timeout`] at [`IceLite::poll_timeout`], and drain
//! [`IceLite::poll_event`] after either.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::distributions::Alphanumeric;
use rand::Rng;
use stun::agent::TransactionId;
use stun::attributes::{
    ATTR_FINGERPRINT, ATTR_ICE_CONTROLLED, ATTR_MESSAGE_INTEGRITY, ATTR_USERNAME,
    ATTR_USE_CANDIDATE,
};
use stun::error_code::{
    ErrorCode, ErrorCodeAttribute, CODE_BAD_REQUEST, CODE_ROLE_CONFLICT, CODE_UNAUTHORIZED,
};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Message, MessageType, Setter, BINDING_ERROR, BINDING_SUCCESS, CLASS_REQUEST, MAGIC_COOKIE,
    MESSAGE_HEADER_SIZE, METHOD_BINDING,
};
use stun::xoraddr::XorMappedAddress;

/// RFC 7675 §5.1: consent is lost 30 s after the last successful check.
pub const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Our ufrag length: RFC 8445 §5.3 asks for at least 24 bits of randomness (4 ice-chars);
/// 8 alphanumerics give ~47 bits, so ufrags also work as routing keys without collisions.
const UFRAG_LEN: usize = 8;
/// Our password length: RFC 8445 §5.3 asks for at least 128 bits (22 ice-chars);
/// 24 alphanumerics give ~142 bits.
const PWD_LEN: usize = 24;

/// STUN attribute header: 2 bytes type, 2 bytes length (RFC 8489 §14).
const ATTR_HEADER_LEN: usize = 4;
/// MESSAGE-INTEGRITY is an HMAC-SHA1: 20 bytes (RFC 8489 §14.5).
const MESSAGE_INTEGRITY_LEN: usize = 20;

/// ICE username fragment and password of one side (RFC 8445 §5.3, SDP `a=ice-ufrag`/`a=ice-pwd`).
#[derive(Clone, PartialEq, Eq)]
pub struct IceCredentials {
    pub ufrag: String,
    pub pwd: String,
}

impl IceCredentials {
    /// Fresh random local credentials: 8-char ufrag, 24-char password, `[a-zA-Z0-9]`
    /// (a subset of RFC 8839's ice-char, so they need no escaping anywhere).
    pub fn random() -> Self {
        let mut rng = rand::thread_rng();
        let mut text = |len: usize| -> String {
            (&mut rng)
                .sample_iter(&Alphanumeric)
                .take(len)
                .map(char::from)
                .collect()
        };
        IceCredentials {
            ufrag: text(UFRAG_LEN),
            pwd: text(PWD_LEN),
        }
    }
}

impl fmt::Debug for IceCredentials {
    /// The password is a secret: logs get its length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceCredentials")
            .field("ufrag", &self.ufrag)
            .field("pwd", &format_args!("<{} chars>", self.pwd.len()))
            .finish()
    }
}

/// What to do with a STUN datagram after [`IceLite::handle_stun`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StunOutcome {
    /// Send `bytes` to `to` from the shared socket.
    Reply { to: SocketAddr, bytes: Vec<u8> },
    /// Nothing to send (indication, response, or the transport has expired).
    Ignore,
}

/// Outputs of [`IceLite`], drained with [`IceLite::poll_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceEvent {
    /// The peer nominated this address: send media here from now on. Also emitted when a
    /// later nomination moves the selected address (migration).
    Nominated(SocketAddr),
    /// No valid Binding request from the selected address for [`CONSENT_TIMEOUT`]
    /// (or no nomination within it): tear the transport down. Emitted once.
    ConsentExpired,
}

/// Why a STUN datagram was not accepted. The caller counts it; if [`IceError::reply`] is
/// `Some`, it sends those bytes back to the datagram's source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IceError {
    /// Not a parsable STUN message (RFC 8489 §5, §14): dropped.
    #[error("malformed STUN message: {0}")]
    Malformed(&'static str),
    /// A request for a method other than Binding: dropped (ICE uses only Binding).
    #[error("unsupported STUN request, message type {0:#06x}")]
    UnsupportedMethod(u16),
    /// FINGERPRINT missing, not last, or wrong (RFC 8489 §14.7): not STUN for us, dropped.
    #[error("STUN FINGERPRINT missing or wrong")]
    BadFingerprint,
    /// Binding request without USERNAME or MESSAGE-INTEGRITY: 400 reply (RFC 8489 §9.1.3).
    #[error("Binding request without USERNAME or MESSAGE-INTEGRITY")]
    BadRequest { reply: Vec<u8> },
    /// USERNAME is not `"<local ufrag>:<remote ufrag>"` of this transport: 401 reply
    /// (RFC 8489 §9.1.3).
    #[error("STUN USERNAME {username:?} does not name this transport")]
    UnknownUsername { username: String, reply: Vec<u8> },
    /// MESSAGE-INTEGRITY does not verify with our password: 401 reply (RFC 8489 §9.1.3).
    #[error("STUN MESSAGE-INTEGRITY check failed")]
    BadIntegrity { reply: Vec<u8> },
}

impl IceError {
    /// The error response to send back to the request's source, if the RFC wants one.
    pub fn reply(&self) -> Option<&[u8]> {
        match self {
            IceError::BadRequest { reply }
            | IceError::UnknownUsername { reply, .. }
            | IceError::BadIntegrity { reply } => Some(reply),
            IceError::Malformed(_) | IceError::UnsupportedMethod(_) | IceError::BadFingerprint => {
                None
            }
        }
    }
}

/// The ICE-lite responder of one transport. See the module docs.
#[derive(Debug)]
pub struct IceLite {
    local: IceCredentials,
    remote: Option<IceCredentials>,
    selected: Option<SocketAddr>,
    /// When consent is lost unless a valid request from `selected` arrives first.
    consent_deadline: Instant,
    expired: bool,
    /// At most one `Nominated` (the latest) and one `ConsentExpired`: bounded however often
    /// a peer re-nominates between two polls.
    events: VecDeque<IceEvent>,
}

impl IceLite {
    /// A responder with our `local` credentials and, if the SDP already gave them, the
    /// peer's. The consent clock starts at `now`.
    pub fn new(local: IceCredentials, remote: Option<IceCredentials>, now: Instant) -> Self {
        IceLite {
            local,
            remote,
            selected: None,
            consent_deadline: now + CONSENT_TIMEOUT,
            expired: false,
            events: VecDeque::with_capacity(2),
        }
    }

    /// Sets (or, on renegotiation, replaces) the peer's credentials from its SDP. Until they
    /// are known, the remote half of USERNAME is not checked; integrity still is.
    pub fn set_remote(&mut self, remote: IceCredentials) {
        self.remote = Some(remote);
    }

    /// Our credentials, for the SDP we send.
    pub fn local_credentials(&self) -> &IceCredentials {
        &self.local
    }

    /// The address the peer nominated last, while consent holds.
    pub fn selected(&self) -> Option<SocketAddr> {
        self.selected
    }

    /// Next output, if any.
    pub fn poll_event(&mut self) -> Option<IceEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next; `None` once consent
    /// has expired.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.expired).then_some(self.consent_deadline)
    }

    /// Advances time: expires consent at its deadline (RFC 7675 §5.1).
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.expired && now >= self.consent_deadline {
            self.expired = true;
            self.selected = None;
            self.events.retain(|e| !matches!(e, IceEvent::Nominated(_)));
            self.events.push_back(IceEvent::ConsentExpired);
        }
    }

    /// Handles one datagram classified as STUN, received from `from`.
    ///
    /// A valid Binding request gets a success response (XOR-MAPPED-ADDRESS,
    /// MESSAGE-INTEGRITY, FINGERPRINT), refreshes consent if it came from the selected
    /// address, and nominates `from` if it carries USE-CANDIDATE (RFC 8445 §7.3.2 / §8.2.2).
    /// A valid request carrying ICE-CONTROLLED gets 487 Role Conflict: a lite agent is always
    /// controlled and cannot switch (RFC 8445 §6.1.1, §7.3.1.1).
    pub fn handle_stun(
        &mut self,
        from: SocketAddr,
        msg: &[u8],
        now: Instant,
    ) -> Result<StunOutcome, IceError> {
        let mut req = parse(msg)?;
        if req.typ.class != CLASS_REQUEST {
            // Indications (keep-alives) and responses need nothing from a lite agent.
            return Ok(StunOutcome::Ignore);
        }
        if req.typ.method != METHOD_BINDING {
            return Err(IceError::UnsupportedMethod(req.typ.value()));
        }
        check_fingerprint(&req)?;
        if self.expired {
            return Ok(StunOutcome::Ignore);
        }

        let tid = req.transaction_id;
        let (Ok(username), true) = (req.get(ATTR_USERNAME), req.contains(ATTR_MESSAGE_INTEGRITY))
        else {
            return Err(IceError::BadRequest {
                reply: error_response(tid, CODE_BAD_REQUEST, b"Bad Request", None),
            });
        };
        if !self.username_matches(&username) {
            return Err(IceError::UnknownUsername {
                username: String::from_utf8_lossy(&username).into_owned(),
                reply: error_response(tid, CODE_UNAUTHORIZED, b"Unauthenticated", None),
            });
        }
        if !integrity_ok(&mut req, &self.local.pwd) {
            return Err(IceError::BadIntegrity {
                reply: error_response(tid, CODE_UNAUTHORIZED, b"Unauthenticated", None),
            });
        }

        if req.contains(ATTR_ICE_CONTROLLED) {
            let bytes = error_response(
                tid,
                CODE_ROLE_CONFLICT,
                b"Role Conflict",
                Some(&self.local.pwd),
            );
            return Ok(StunOutcome::Reply { to: from, bytes });
        }

        if req.contains(ATTR_USE_CANDIDATE) && self.selected != Some(from) {
            self.selected = Some(from);
            self.events.retain(|e| !matches!(e, IceEvent::Nominated(_)));
            self.events.push_back(IceEvent::Nominated(from));
        }
        if self.selected == Some(from) {
            self.consent_deadline = now + CONSENT_TIMEOUT;
        }

        Ok(StunOutcome::Reply {
            to: from,
            bytes: success_response(tid, from, &self.local.pwd),
        })
    }

    /// RFC 8445 §7.2.2: the request's USERNAME is `"<our ufrag>:<their ufrag>"`.
    fn username_matches(&self, username: &[u8]) -> bool {
        let Some((local, remote)) = split_username(username) else {
            return false;
        };
        local == self.local.ufrag.as_bytes()
            && self
                .remote
                .as_ref()
                .is_none_or(|r| remote == r.ufrag.as_bytes())
    }
}

/// Cheap pre-parse for routing: the `(local ufrag, remote ufrag)` halves of a STUN message's
/// USERNAME, from our point of view as the receiver (RFC 8445 §7.2.2). No integrity check:
/// the owning [`IceLite`] does that. `None` if `msg` is not STUN or has no usable USERNAME.
pub fn stun_username(msg: &[u8]) -> Option<(String, String)> {
    let header = msg.get(..MESSAGE_HEADER_SIZE)?;
    if header[0] & 0b1100_0000 != 0 || header[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return None;
    }
    let body_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut attrs = msg.get(MESSAGE_HEADER_SIZE..MESSAGE_HEADER_SIZE + body_len)?;
    while attrs.len() >= ATTR_HEADER_LEN {
        let typ = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(ATTR_HEADER_LEN..ATTR_HEADER_LEN + len)?;
        if typ == ATTR_USERNAME.value() {
            let (local, remote) = split_username(value)?;
            let local = std::str::from_utf8(local).ok()?;
            let remote = std::str::from_utf8(remote).ok()?;
            return Some((local.to_owned(), remote.to_owned()));
        }
        // Values are padded to 4 bytes (RFC 8489 §14).
        let padded = ATTR_HEADER_LEN + len.div_ceil(4) * 4;
        attrs = attrs.get(padded..)?;
    }
    None
}

fn split_username(username: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = username.iter().position(|&b| b == b':')?;
    Some((&username[..colon], &username[colon + 1..]))
}

/// Header and attribute walk (RFC 8489 §5, §14), rejecting trailing bytes.
fn parse(msg: &[u8]) -> Result<Message, IceError> {
    if msg.len() < MESSAGE_HEADER_SIZE {
        return Err(IceError::Malformed("shorter than the STUN header"));
    }
    if msg[0] & 0b1100_0000 != 0 {
        return Err(IceError::Malformed("first two bits are not zero"));
    }
    if msg[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return Err(IceError::Malformed("no magic cookie"));
    }
    let body_len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
    if body_len % 4 != 0 {
        return Err(IceError::Malformed("length not a multiple of 4"));
    }
    if msg.len() != MESSAGE_HEADER_SIZE + body_len {
        return Err(IceError::Malformed(
            "length field does not match the datagram",
        ));
    }
    let mut m = Message::new();
    m.raw = msg.to_vec();
    m.decode()
        .map_err(|_| IceError::Malformed("attribute overruns the message"))?;
    Ok(m)
}

/// FINGERPRINT must be present and last (RFC 8489 §14.7) and match the CRC.
fn check_fingerprint(m: &Message) -> Result<(), IceError> {
    match m.attributes.0.last() {
        Some(a) if a.typ == ATTR_FINGERPRINT => {}
        _ => return Err(IceError::BadFingerprint),
    }
    FINGERPRINT.check(m).map_err(|_| IceError::BadFingerprint)
}

/// MESSAGE-INTEGRITY (HMAC-SHA1 keyed with the password, RFC 8489 §9.1.1, §14.5) is the
/// right size and verifies. Attributes after it other than FINGERPRINT are tolerated and
/// left out of the HMAC, as §14.5 says.
fn integrity_ok(m: &mut Message, pwd: &str) -> bool {
    let size_ok = m
        .attributes
        .0
        .iter()
        .find(|a| a.typ == ATTR_MESSAGE_INTEGRITY)
        .is_some_and(|a| a.value.len() == MESSAGE_INTEGRITY_LEN);
    size_ok
        && MessageIntegrity::new_short_term_integrity(pwd.to_owned())
            .check(m)
            .is_ok()
}

fn success_response(tid: TransactionId, from: SocketAddr, pwd: &str) -> Vec<u8> {
    let mapped = XorMappedAddress {
        ip: from.ip(),
        port: from.port(),
    };
    encode(BINDING_SUCCESS, tid, &[&mapped], Some(pwd))
}

fn error_response(
    tid: TransactionId,
    code: ErrorCode,
    reason: &[u8],
    integrity: Option<&str>,
) -> Vec<u8> {
    let error = ErrorCodeAttribute {
        code,
        reason: reason.to_vec(),
    };
    encode(BINDING_ERROR, tid, &[&error], integrity)
}

/// Encodes a response: header, `attrs`, then MESSAGE-INTEGRITY if keyed, then FINGERPRINT
/// (RFC 8445 §7.3: responses carry FINGERPRINT; authenticated ones MESSAGE-INTEGRITY).
fn encode(
    typ: MessageType,
    tid: TransactionId,
    attrs: &[&dyn Setter],
    integrity: Option<&str>,
) -> Vec<u8> {
    let mut m = Message::new();
    m.typ = typ;
    m.transaction_id = tid;
    m.write_header();
    // The setters below fail only for inputs we never give them (an error reason over 763
    // bytes, FINGERPRINT before MESSAGE-INTEGRITY); peer data (address, transaction id)
    // cannot make them fail. A failure is a bug here, so it panics.
    for a in attrs {
        a.add_to(&mut m).expect("STUN attribute encodes");
    }
    if let Some(pwd) = integrity {
        MessageIntegrity::new_short_term_integrity(pwd.to_owned())
            .add_to(&mut m)
            .expect("MESSAGE-INTEGRITY encodes before FINGERPRINT");
    }
    FINGERPRINT
        .add_to(&mut m)
        .expect("FINGERPRINT encodes last");
    m.raw
}

/// Builds the Binding request a controlling ICE agent sends us (RFC 8445 §7.1): USERNAME
/// `"<our ufrag>:<their ufrag>"`, PRIORITY, ICE-CONTROLLING, optionally USE-CANDIDATE,
/// MESSAGE-INTEGRITY with our password, FINGERPRINT. For tests, benches and load generators
/// that play the client.
pub fn binding_request(username: &str, pwd: &str, use_candidate: bool) -> Vec<u8> {
    use stun::attributes::{ATTR_ICE_CONTROLLING, ATTR_PRIORITY};
    use stun::message::BINDING_REQUEST;
    use stun::textattrs::TextAttribute;
    let mut m = Message::new();
    m.typ = BINDING_REQUEST;
    m.transaction_id = TransactionId::new();
    m.write_header();
    let mut ok = TextAttribute::new(ATTR_USERNAME, username.to_owned())
        .add_to(&mut m)
        .is_ok();
    m.add(ATTR_PRIORITY, &1_853_824_767u32.to_be_bytes());
    m.add(ATTR_ICE_CONTROLLING, &rand::random::<u64>().to_be_bytes());
    if use_candidate {
        m.add(ATTR_USE_CANDIDATE, &[]);
    }
    ok &= MessageIntegrity::new_short_term_integrity(pwd.to_owned())
        .add_to(&mut m)
        .is_ok();
    ok &= FINGERPRINT.add_to(&mut m).is_ok();
    // Adding attributes to an in-memory message cannot fail; a broken request would only make
    // the caller's test fail, never the server.
    debug_assert!(ok);
    m.raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use stun::attributes::{ATTR_ICE_CONTROLLING, ATTR_PRIORITY};
    use stun::message::{Getter, BINDING_REQUEST, CLASS_INDICATION, CLASS_SUCCESS_RESPONSE};
    use stun::textattrs::TextAttribute;

    const PEER_A: &str = "192.0.2.10:50000";
    const PEER_B: &str = "198.51.100.7:61000";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn creds(ufrag: &str, pwd: &str) -> IceCredentials {
        IceCredentials {
            ufrag: ufrag.into(),
            pwd: pwd.into(),
        }
    }

    fn server_creds() -> IceCredentials {
        creds("srvUfrag", "serverPassword0123456789")
    }

    fn client_creds() -> IceCredentials {
        creds("cli1", "clientPasswordAbcdefghijk")
    }

    /// What a browser (controlling full agent) sends, built with the stun crate.
    struct Req<'a> {
        username: Option<&'a str>,
        pwd: Option<&'a str>,
        use_candidate: bool,
        controlled: bool,
        typ: MessageType,
    }

    impl Default for Req<'_> {
        fn default() -> Self {
            Req {
                username: Some("srvUfrag:cli1"),
                pwd: Some("serverPassword0123456789"),
                use_candidate: false,
                controlled: false,
                typ: BINDING_REQUEST,
            }
        }
    }

    impl Req<'_> {
        fn build(&self) -> (TransactionId, Vec<u8>) {
            let tid = TransactionId::new();
            let mut m = Message::new();
            m.typ = self.typ;
            m.transaction_id = tid;
            m.write_header();
            if let Some(u) = self.username {
                TextAttribute::new(ATTR_USERNAME, u.to_owned())
                    .add_to(&mut m)
                    .unwrap();
            }
            // RFC 8445 §7.1.1: peer-reflexive priority of the client's candidate.
            m.add(ATTR_PRIORITY, &1_853_824_767u32.to_be_bytes());
            if self.controlled {
                m.add(ATTR_ICE_CONTROLLED, &7u64.to_be_bytes());
            } else {
                m.add(
                    ATTR_ICE_CONTROLLING,
                    &0x1234_5678_9abc_def0u64.to_be_bytes(),
                );
            }
            if self.use_candidate {
                m.add(ATTR_USE_CANDIDATE, &[]);
            }
            if let Some(p) = self.pwd {
                MessageIntegrity::new_short_term_integrity(p.to_owned())
                    .add_to(&mut m)
                    .unwrap();
            }
            FINGERPRINT.add_to(&mut m).unwrap();
            (tid, m.raw)
        }
    }

    fn decode(bytes: &[u8]) -> Message {
        let mut m = Message::new();
        m.raw = bytes.to_vec();
        m.decode().unwrap();
        m
    }

    fn error_code(m: &Message) -> u16 {
        let mut e = ErrorCodeAttribute::default();
        e.get_from(m).unwrap();
        e.code.0
    }

    fn ice(now: Instant) -> IceLite {
        IceLite::new(server_creds(), Some(client_creds()), now)
    }

    #[test]
    fn browser_request_gets_a_verifiable_success_response() {
        let now = Instant::now();
        let mut ice = ice(now);
        let (tid, req) = Req {
            use_candidate: true,
            ..Req::default()
        }
        .build();

        let out = ice.handle_stun(addr(PEER_A), &req, now).unwrap();
        let StunOutcome::Reply { to, bytes } = out else {
            panic!("expected a reply, got {out:?}");
        };
        assert_eq!(to, addr(PEER_A));

        let mut resp = decode(&bytes);
        assert_eq!(resp.typ, BINDING_SUCCESS);
        assert_eq!(resp.transaction_id, tid);
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&resp).unwrap();
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), addr(PEER_A));
        FINGERPRINT.check(&resp).unwrap();
        MessageIntegrity::new_short_term_integrity(server_creds().pwd)
            .check(&mut resp)
            .unwrap();
        assert!(
            MessageIntegrity::new_short_term_integrity("wrong".into())
                .check(&mut resp)
                .is_err(),
            "response must be keyed with the local password only"
        );

        assert_eq!(ice.poll_event(), Some(IceEvent::Nominated(addr(PEER_A))));
        assert_eq!(ice.poll_event(), None);
        assert_eq!(ice.selected(), Some(addr(PEER_A)));
    }

    #[test]
    fn ipv6_peer_gets_its_address_mapped() {
        let now = Instant::now();
        let mut ice = ice(now);
        let peer = addr("[2001:db8::5]:40000");
        let (_, req) = Req::default().build();
        let Ok(StunOutcome::Reply { bytes, .. }) = ice.handle_stun(peer, &req, now) else {
            panic!("expected a reply");
        };
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&decode(&bytes)).unwrap();
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), peer);
    }

    #[test]
    fn rejected_requests_table() {
        let cases: &[(&str, Req, u16)] = &[
            (
                "wrong password",
                Req {
                    pwd: Some("notTheServerPassword0000"),
                    use_candidate: true,
                    ..Req::default()
                },
                401,
            ),
            (
                "client keyed with its own password",
                Req {
                    pwd: Some("clientPasswordAbcdefghijk"),
                    ..Req::default()
                },
                401,
            ),
            (
                "wrong local ufrag",
                Req {
                    username: Some("otherUfr:cli1"),
                    ..Req::default()
                },
                401,
            ),
            (
                "wrong remote ufrag",
                Req {
                    username: Some("srvUfrag:evil"),
                    ..Req::default()
                },
                401,
            ),
            (
                "halves swapped",
                Req {
                    username: Some("cli1:srvUfrag"),
                    ..Req::default()
                },
                401,
            ),
            (
                "no colon",
                Req {
                    username: Some("srvUfrag"),
                    ..Req::default()
                },
                401,
            ),
            (
                "no USERNAME",
                Req {
                    username: None,
                    ..Req::default()
                },
                400,
            ),
            (
                "no MESSAGE-INTEGRITY",
                Req {
                    pwd: None,
                    ..Req::default()
                },
                400,
            ),
        ];
        let now = Instant::now();
        for (what, req, code) in cases {
            let mut ice = ice(now);
            let (tid, bytes) = req.build();
            let err = ice.handle_stun(addr(PEER_A), &bytes, now).expect_err(what);
            match (&err, code) {
                (IceError::BadIntegrity { .. }, 401) if what.contains("password") => {}
                (IceError::UnknownUsername { .. }, 401) if !what.contains("password") => {}
                (IceError::BadRequest { .. }, 400) => {}
                _ => panic!("{what}: unexpected {err:?}"),
            }
            let resp = decode(err.reply().expect("error response"));
            assert_eq!(resp.typ, BINDING_ERROR, "{what}");
            assert_eq!(resp.transaction_id, tid, "{what}");
            assert_eq!(error_code(&resp), *code, "{what}");
            assert!(
                !resp.contains(ATTR_MESSAGE_INTEGRITY),
                "{what}: unauthenticated error responses carry no integrity"
            );
            FINGERPRINT.check(&resp).unwrap();
            assert_eq!(ice.selected(), None, "{what}");
            assert_eq!(ice.poll_event(), None, "{what}");
        }
    }

    #[test]
    fn role_conflict_gets_authenticated_487() {
        let now = Instant::now();
        let mut ice = ice(now);
        let (tid, req) = Req {
            controlled: true,
            use_candidate: true,
            ..Req::default()
        }
        .build();
        let Ok(StunOutcome::Reply { bytes, .. }) = ice.handle_stun(addr(PEER_A), &req, now) else {
            panic!("expected a 487 reply");
        };
        let mut resp = decode(&bytes);
        assert_eq!(resp.typ, BINDING_ERROR);
        assert_eq!(resp.transaction_id, tid);
        assert_eq!(error_code(&resp), 487);
        MessageIntegrity::new_short_term_integrity(server_creds().pwd)
            .check(&mut resp)
            .unwrap();
        FINGERPRINT.check(&resp).unwrap();
        assert_eq!(
            ice.selected(),
            None,
            "a conflicting request nominates nothing"
        );
        assert_eq!(ice.poll_event(), None);
    }

    #[test]
    fn indications_and_responses_are_ignored() {
        let now = Instant::now();
        for class in [CLASS_INDICATION, CLASS_SUCCESS_RESPONSE] {
            let mut ice = ice(now);
            let (_, bytes) = Req {
                typ: MessageType::new(METHOD_BINDING, class),
                use_candidate: true,
                ..Req::default()
            }
            .build();
            assert_eq!(
                ice.handle_stun(addr(PEER_A), &bytes, now),
                Ok(StunOutcome::Ignore)
            );
            assert_eq!(ice.selected(), None);
        }
    }

    #[test]
    fn every_prefix_and_every_bit_flip_is_rejected_without_panic() {
        let now = Instant::now();
        let (_, good) = Req {
            use_candidate: true,
            ..Req::default()
        }
        .build();
        for n in 0..good.len() {
            let mut ice = ice(now);
            let got = ice.handle_stun(addr(PEER_A), &good[..n], now);
            assert!(got.is_err(), "prefix {n} accepted: {got:?}");
            let _ = stun_username(&good[..n]);
        }
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut ice = ice(now);
            let got = ice.handle_stun(addr(PEER_A), &bad, now);
            assert!(
                !matches!(got, Ok(StunOutcome::Reply { .. })),
                "bit {bit} flipped and still answered: {got:?}"
            );
            assert_eq!(ice.selected(), None, "bit {bit}");
        }
    }

    #[test]
    fn random_garbage_does_not_panic() {
        let now = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7983);
        let mut ice = ice(now);
        for i in 0..20_000 {
            let len = rng.gen_range(0..200);
            let mut buf = vec![0u8; len];
            rng.fill_bytes(&mut buf);
            if i % 2 == 0 && len >= 8 {
                // Make half of them look like STUN so the attribute walk gets exercised.
                buf[0] &= 0b0000_0001;
                buf[2..4].copy_from_slice(&((len.saturating_sub(20) & !3) as u16).to_be_bytes());
                buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            }
            let _ = ice.handle_stun(addr(PEER_A), &buf, now);
            let _ = stun_username(&buf);
        }
        assert_eq!(ice.selected(), None);
    }

    #[test]
    fn check_without_use_candidate_answers_but_does_not_nominate() {
        let now = Instant::now();
        let mut ice = ice(now);
        let (_, req) = Req::default().build();
        assert!(matches!(
            ice.handle_stun(addr(PEER_A), &req, now),
            Ok(StunOutcome::Reply { .. })
        ));
        assert_eq!(ice.selected(), None);
        assert_eq!(ice.poll_event(), None);
    }

    #[test]
    fn renomination_migrates_and_repeats_are_quiet() {
        let now = Instant::now();
        let mut ice = ice(now);
        let nominate = Req {
            use_candidate: true,
            ..Req::default()
        };
        let (_, r1) = nominate.build();
        ice.handle_stun(addr(PEER_A), &r1, now).unwrap();
        let (_, r2) = nominate.build();
        ice.handle_stun(addr(PEER_A), &r2, now + Duration::from_secs(1))
            .unwrap();
        assert_eq!(ice.poll_event(), Some(IceEvent::Nominated(addr(PEER_A))));
        assert_eq!(
            ice.poll_event(),
            None,
            "same address nominated twice: one event"
        );

        let (_, r3) = nominate.build();
        ice.handle_stun(addr(PEER_B), &r3, now + Duration::from_secs(2))
            .unwrap();
        assert_eq!(ice.selected(), Some(addr(PEER_B)));
        assert_eq!(ice.poll_event(), Some(IceEvent::Nominated(addr(PEER_B))));

        // Flapping between polls leaves only the latest nomination queued.
        for (i, p) in [PEER_A, PEER_B, PEER_A].iter().enumerate() {
            let (_, r) = nominate.build();
            ice.handle_stun(addr(p), &r, now + Duration::from_secs(3 + i as u64))
                .unwrap();
        }
        assert_eq!(ice.poll_event(), Some(IceEvent::Nominated(addr(PEER_A))));
        assert_eq!(ice.poll_event(), None);
    }

    #[test]
    fn consent_expires_without_checks_from_the_selected_address() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut ice = ice(t0);
        let (_, nominate) = Req {
            use_candidate: true,
            ..Req::default()
        }
        .build();
        ice.handle_stun(addr(PEER_A), &nominate, t0).unwrap();
        assert_eq!(ice.poll_event(), Some(IceEvent::Nominated(addr(PEER_A))));
        assert_eq!(ice.poll_timeout(), Some(t0 + CONSENT_TIMEOUT));

        // A consent check from the selected address at 20 s pushes the deadline to 50 s.
        let (_, check) = Req::default().build();
        ice.handle_stun(addr(PEER_A), &check, t0 + s(20)).unwrap();
        assert_eq!(ice.poll_timeout(), Some(t0 + s(50)));
        // Checks from elsewhere, and failed ones, do not keep the selected pair alive.
        let (_, other) = Req::default().build();
        ice.handle_stun(addr(PEER_B), &other, t0 + s(40)).unwrap();
        let (_, bad) = Req {
            pwd: Some("notTheServerPassword0000"),
            ..Req::default()
        }
        .build();
        let _ = ice.handle_stun(addr(PEER_A), &bad, t0 + s(45));
        assert_eq!(ice.poll_timeout(), Some(t0 + s(50)));

        ice.handle_timeout(t0 + s(49));
        assert_eq!(ice.poll_event(), None);
        assert_eq!(ice.selected(), Some(addr(PEER_A)));

        ice.handle_timeout(t0 + s(50));
        assert_eq!(ice.poll_event(), Some(IceEvent::ConsentExpired));
        assert_eq!(ice.poll_event(), None);
        assert_eq!(ice.selected(), None);
        assert_eq!(ice.poll_timeout(), None);

        // Expiry is final: once, and later requests are not answered.
        ice.handle_timeout(t0 + s(90));
        assert_eq!(ice.poll_event(), None);
        let (_, late) = Req {
            use_candidate: true,
            ..Req::default()
        }
        .build();
        assert_eq!(
            ice.handle_stun(addr(PEER_A), &late, t0 + s(91)),
            Ok(StunOutcome::Ignore)
        );
        assert_eq!(ice.selected(), None);
    }

    #[test]
    fn never_nominated_expires_from_creation() {
        let t0 = Instant::now();
        let mut ice = ice(t0);
        let (_, check) = Req::default().build();
        ice.handle_stun(addr(PEER_A), &check, t0 + Duration::from_secs(29))
            .unwrap();
        ice.handle_timeout(t0 + CONSENT_TIMEOUT);
        assert_eq!(ice.poll_event(), Some(IceEvent::ConsentExpired));
    }

    #[test]
    fn unknown_remote_is_learned_from_sdp_later() {
        let now = Instant::now();
        let mut ice = IceLite::new(server_creds(), None, now);
        let (_, any_remote) = Req {
            username: Some("srvUfrag:whoever"),
            ..Req::default()
        }
        .build();
        assert!(ice.handle_stun(addr(PEER_A), &any_remote, now).is_ok());

        ice.set_remote(client_creds());
        let (_, r) = Req {
            username: Some("srvUfrag:whoever"),
            ..Req::default()
        }
        .build();
        assert!(matches!(
            ice.handle_stun(addr(PEER_A), &r, now),
            Err(IceError::UnknownUsername { .. })
        ));
        let (_, ok) = Req::default().build();
        assert!(ice.handle_stun(addr(PEER_A), &ok, now).is_ok());
    }

    #[test]
    fn stun_username_table() {
        let (_, browser) = Req::default().build();
        let (_, odd_len) = Req {
            username: Some("abcde:xyz"),
            ..Req::default()
        }
        .build();
        let (_, no_user) = Req {
            username: None,
            ..Req::default()
        }
        .build();
        let (_, no_colon) = Req {
            username: Some("srvUfrag"),
            ..Req::default()
        }
        .build();
        let mut bad_cookie = browser.clone();
        bad_cookie[4] ^= 1;
        let mut long_len = browser.clone();
        long_len[3] = long_len[3].wrapping_add(4);
        let pair = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
        type Ufrags = Option<(String, String)>;
        let cases: Vec<(&str, &[u8], Ufrags)> = vec![
            ("browser request", &browser, pair("srvUfrag", "cli1")),
            ("padded username", &odd_len, pair("abcde", "xyz")),
            ("no USERNAME", &no_user, None),
            ("no colon", &no_colon, None),
            ("bad cookie", &bad_cookie, None),
            ("length beyond datagram", &long_len, None),
            ("empty", &[], None),
            (
                "DTLS",
                &[
                    22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
                None,
            ),
        ];
        for (what, msg, want) in cases {
            assert_eq!(stun_username(msg), want, "{what}");
        }
    }

    #[test]
    fn random_credentials_follow_rfc8445() {
        let a = IceCredentials::random();
        let b = IceCredentials::random();
        assert_eq!(a.ufrag.len(), UFRAG_LEN);
        assert_eq!(a.pwd.len(), PWD_LEN);
        assert!(a.ufrag.len() >= 4 && a.pwd.len() >= 22);
        assert!(a
            .ufrag
            .chars()
            .chain(a.pwd.chars())
            .all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        assert!(
            !format!("{a:?}").contains(&a.pwd),
            "Debug must not leak the password"
        );
    }
}
