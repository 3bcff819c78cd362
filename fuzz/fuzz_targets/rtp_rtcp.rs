//! Fuzzes what the media path does with every datagram a peer sends after ICE: the RFC 7983
//! demux, the rtp and rtcp parsers, and SRTP/SRTCP unprotection (which runs before any
//! authentication succeeds, so it sees attacker bytes) for both profiles.
#![no_main]

use edge_node::transport::demux::classify;
use edge_node::transport::dtls::{SrtpKeys, SrtpProfile};
use edge_node::transport::srtp::{check_rtp_header, SrtpSession};
use libfuzzer_sys::fuzz_target;
use webrtc_util::Unmarshal;

fuzz_target!(|data: &[u8]| {
    let class = classify(data);

    // The rtp crate panics on extension elements that overrun the packet; every path in the
    // edge runs check_rtp_header (or SrtpSession::decrypt_rtp, which does) before it. What
    // passes the check must parse without panicking.
    if check_rtp_header(data).is_ok() {
        let _ = rtp::packet::Packet::unmarshal(&mut &data[..]);
    }
    let _ = rtcp::packet::unmarshal(&mut &data[..]);

    for profile in [SrtpProfile::Aes128CmHmacSha1_80, SrtpProfile::AeadAes128Gcm] {
        let keys = SrtpKeys {
            profile,
            local_key: vec![1; profile.key_len()],
            local_salt: vec![2; profile.salt_len()],
            remote_key: vec![3; profile.key_len()],
            remote_salt: vec![4; profile.salt_len()],
        };
        let Ok(mut session) = SrtpSession::new(&keys) else {
            panic!("fixed keys have the right lengths");
        };
        let rtp = session.decrypt_rtp(data);
        let rtcp = session.decrypt_rtcp(data);
        // Random bytes never carry a valid tag under these keys.
        assert!(
            rtp.is_err() && rtcp.is_err(),
            "{class:?} unprotected without keys"
        );
        // Our own output path must not panic on whatever a parser let through either.
        let _ = session.encrypt_rtp(data);
        let _ = session.encrypt_rtcp(data);
    }
});
