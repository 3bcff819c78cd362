//! Fuzzes the ICE-lite responder (`IceLite::handle_stun`) and the routing pre-parse
//! (`stun_username`) with arbitrary datagrams.
//!
//! Odd first byte: the rest is the datagram, as sent. Even first byte: the rest becomes the
//! attributes of a Binding request that is then given the right USERNAME, a valid
//! MESSAGE-INTEGRITY and FINGERPRINT, so the fuzzer also reaches the code behind
//! authentication (USE-CANDIDATE, ICE-CONTROLLED, duplicate and odd attributes), which random
//! bytes never would.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edge_node::transport::ice::{stun_username, IceCredentials, IceLite, StunOutcome};
use libfuzzer_sys::fuzz_target;
use stun::agent::TransactionId;
use stun::attributes::{AttrType, ATTR_USERNAME};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{Message, Setter, BINDING_REQUEST};
use stun::textattrs::TextAttribute;

const LOCAL_UFRAG: &str = "srvUfrag";
const LOCAL_PWD: &str = "serverPassword0123456789";
const REMOTE_UFRAG: &str = "cli1";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let msg = if mode & 1 == 0 {
        signed_request(rest)
    } else {
        rest.to_vec()
    };

    let _ = stun_username(&msg);

    let now = Instant::now();
    let creds = |ufrag: &str, pwd: &str| IceCredentials {
        ufrag: ufrag.into(),
        pwd: pwd.into(),
    };
    let mut ice = IceLite::new(
        creds(LOCAL_UFRAG, LOCAL_PWD),
        Some(creds(REMOTE_UFRAG, "clientPasswordAbcdefghijk")),
        now,
    );
    let from: SocketAddr = ([192, 0, 2, 1], 5000).into();
    match ice.handle_stun(from, &msg, now) {
        Ok(StunOutcome::Reply { to, bytes }) => {
            assert_eq!(to, from);
            assert!(
                bytes.len() >= 20 && bytes[8..20] == msg[8..20],
                "reply keeps the transaction id"
            );
        }
        Ok(StunOutcome::Ignore) => {}
        Err(e) => {
            if let Some(reply) = e.reply() {
                assert!(reply.len() >= 20 && reply[8..20] == msg[8..20]);
            }
        }
    }
    while ice.poll_event().is_some() {}
    ice.handle_timeout(now + Duration::from_secs(31));
    while ice.poll_event().is_some() {}
    assert_eq!(ice.selected(), None, "consent expired");
});

/// A Binding request with the fuzzed attributes (`[type hi, type lo, len, value..]`
/// repeated), signed the way a browser signs it.
fn signed_request(attrs: &[u8]) -> Vec<u8> {
    let mut m = Message::new();
    m.typ = BINDING_REQUEST;
    m.transaction_id = TransactionId([7; 12]);
    m.write_header();
    let _ =
        TextAttribute::new(ATTR_USERNAME, format!("{LOCAL_UFRAG}:{REMOTE_UFRAG}")).add_to(&mut m);
    let mut rest = attrs;
    while rest.len() >= 3 {
        let typ = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(rest[2]).min(rest.len() - 3);
        m.add(AttrType(typ), &rest[3..3 + len]);
        rest = &rest[3 + len..];
    }
    // Both refuse only if the fuzzer already put a FINGERPRINT in; then the message goes
    // out as it is.
    let _ = MessageIntegrity::new_short_term_integrity(LOCAL_PWD.into()).add_to(&mut m);
    let _ = FINGERPRINT.add_to(&mut m);
    m.raw
}
