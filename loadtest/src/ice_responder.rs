//! Answers the remote's ICE connectivity checks, for servers that are full ICE agents.
//!
//! The edge is ICE-lite: it never checks us, so a participant only sends Binding requests.
//! Janus (libnice) is a full agent: it checks our candidate too, and a pair becomes valid on
//! its side only when our side answers (RFC 8445 §7.3). This is that answer: a Binding
//! success response with XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY keyed with our password and
//! FINGERPRINT. Requests whose integrity does not verify with our password get nothing.
//!
//! Unlike the edge's `IceLite`, which as a lite agent answers ICE-CONTROLLED requests with
//! 487, this accepts either role attribute: we are the controlling side toward Janus as a
//! publisher (we offer) and the controlled side as a subscriber (Janus offers).

use std::net::SocketAddr;
use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_USE_CANDIDATE};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{Message, Setter, BINDING_REQUEST, BINDING_SUCCESS};
use stun::xoraddr::XorMappedAddress;

/// What a valid Binding request asks of us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckAnswer {
    /// The success response to send back to the request's source.
    pub reply: Vec<u8>,
    /// The request carried USE-CANDIDATE: the controlling agent nominated this pair.
    pub nominated: bool,
}

/// Answers `msg` (a datagram classified as STUN) from `from` when it is a Binding request
/// authenticated with `local_pwd`; `None` for anything else.
pub fn answer_check(msg: &[u8], from: SocketAddr, local_pwd: &str) -> Option<CheckAnswer> {
    let mut m = Message::new();
    m.raw = msg.to_vec();
    m.decode().ok()?;
    if m.typ != BINDING_REQUEST || !m.contains(ATTR_MESSAGE_INTEGRITY) {
        return None;
    }
    let integrity = MessageIntegrity::new_short_term_integrity(local_pwd.to_owned());
    integrity.check(&mut m).ok()?;
    let nominated = m.contains(ATTR_USE_CANDIDATE);
    let mut r = Message::new();
    r.typ = BINDING_SUCCESS;
    r.transaction_id = m.transaction_id;
    r.write_header();
    let mapped = XorMappedAddress {
        ip: from.ip(),
        port: from.port(),
    };
    mapped.add_to(&mut r).ok()?;
    integrity.add_to(&mut r).ok()?;
    FINGERPRINT.add_to(&mut r).ok()?;
    Some(CheckAnswer {
        reply: r.raw,
        nominated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::Getter;

    #[test]
    fn answers_an_authenticated_check_and_sees_nomination() {
        let from: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        // What a controlling agent sends us: USERNAME "<our ufrag>:<its ufrag>", our password.
        let req = edge_node::transport::ice::binding_request(
            "ours:theirs",
            "ourpassword1234567890",
            true,
        );
        let a = answer_check(&req, from, "ourpassword1234567890").expect("answered");
        assert!(a.nominated);
        let mut r = Message::new();
        r.raw = a.reply.clone();
        r.decode().unwrap();
        assert_eq!(r.typ, BINDING_SUCCESS);
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&r).unwrap();
        assert_eq!(mapped.port, 40001);
        MessageIntegrity::new_short_term_integrity("ourpassword1234567890".into())
            .check(&mut r)
            .unwrap();
    }

    #[test]
    fn ignores_wrong_password_and_non_requests() {
        let from: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let req = edge_node::transport::ice::binding_request("ours:theirs", "somebodyelse", false);
        assert!(answer_check(&req, from, "ourpassword1234567890").is_none());
        assert!(answer_check(b"\x16\xfe\xfd", from, "x").is_none());
    }
}
