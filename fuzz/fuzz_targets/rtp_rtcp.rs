//! Fuzzes what the media path does with every datagram a peer sends after ICE: the RFC 7983
//! demux, the guarded rtp and rtcp parsers (`transport::parse`), and SRTP/SRTCP
//! unprotection (which runs before any authentication succeeds, so it sees attacker bytes)
//! for both profiles.
//!
//! Run with `cargo fuzz run rtp_rtcp` (nightly), or on stable without cargo-fuzz: build with
//! `RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4
//! -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table
//! -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
//! cargo build --release --target x86_64-unknown-linux-gnu` and run the binary with
//! `-max_total_time=60` (same for `stun`).
#![no_main]

use edge_node::transport::demux::classify;
use edge_node::transport::dtls::{SrtpKeys, SrtpProfile};
use edge_node::transport::parse::{parse_rtcp, parse_rtp};
use edge_node::transport::srtp::SrtpSession;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let class = classify(data);

    // The edge's only entry points to the rtp and rtcp parsers. parse_rtcp catches panics
    // in production, but libFuzzer's panic hook aborts first, so a gap in its checks shows
    // up here as a crash.
    let _ = parse_rtp(data);
    let _ = parse_rtcp(data);

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
        // Into an arena: split off whole or refused, never leaving bytes behind.
        let mut arena = bytes::BytesMut::new();
        let _ = session.encrypt_rtcp_into(data, &mut arena);
        assert!(arena.is_empty(), "a packet left in the arena");
    }
});
