//! The `/ws` signaling decoder on arbitrary text: never panics, every error carries a code (and
//! the request's id when the frame had a readable one), and whatever it accepts respects the
//! protocol's limits.
//!
//! Two ways in: the raw frame as sent, and — so the fuzzer reaches every request's field checks
//! without first guessing type names — the first byte picks one of the protocol's request types
//! and the rest is spliced into a frame of that type as its fields.
#![no_main]

use edge_node::ws::{decode, Request, TYPES};
use libfuzzer_sys::fuzz_target;

fn check(text: &str) {
    match decode(text) {
        Err(e) => {
            assert!(!e.code.is_empty());
            assert!(!e.message.is_empty());
        }
        Ok((_, req)) => match req {
            Request::Chat { text, .. } => {
                assert!(!text.trim().is_empty());
                assert!(text.chars().count() <= origin::MAX_CHAT_CHARS);
            }
            Request::Stats(r) => {
                for v in [r.rtt, r.loss, r.jitter, r.bitrate] {
                    assert!(v.is_finite() && v >= 0.0);
                }
                assert!(r.loss <= 1.0);
            }
            Request::Layers { max_spatial, .. } => assert!(max_spatial <= 2),
            Request::Members { limit, .. } => {
                assert!((1..=origin::MAX_ROSTER_PAGE).contains(&limit))
            }
            Request::React { emoji } => assert!(origin::REACTIONS.contains(&emoji.as_str())),
            Request::Add { role, .. } => assert_ne!(role, cascade_proto::Role::Host),
            _ => {}
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text);
    if let Some((first, rest)) = data.split_first() {
        if let Ok(fields) = std::str::from_utf8(rest) {
            let ty = TYPES[*first as usize % TYPES.len()];
            check(&format!(r#"{{"id":1,"type":"{ty}"{}{fields}}}"#, if fields.is_empty() { "" } else { "," }));
        }
    }
});
