//! The `/ws` signaling decoder on arbitrary text: never panics, and every error carries a code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = edge_node::ws::decode(text) {
            assert!(!e.code.is_empty());
        }
    }
});
