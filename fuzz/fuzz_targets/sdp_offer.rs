//! A client's SDP offer is the first thing a peer sends us: `answer_publish` must refuse any
//! input with a typed error, never panic, and whatever it answers must parse as SDP again.
#![no_main]

use edge_node::sdp::{answer_publish, Fingerprint, LocalTransport, SdpLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(offer) = std::str::from_utf8(data) else {
        return;
    };
    let local = LocalTransport {
        ice_ufrag: "fuzz".to_owned(),
        ice_pwd: "fuzzfuzzfuzzfuzzfuzzfuzz".to_owned(),
        fingerprint: Fingerprint {
            algorithm: "sha-256".to_owned(),
            value: ["AB"; 32].join(":"),
        },
        candidates: vec!["192.0.2.1:40000".parse().expect("literal address")],
    };
    if let Ok(answer) = answer_publish(offer, &local, &SdpLimits::default()) {
        let mut reader = std::io::Cursor::new(answer.sdp.as_bytes());
        if let Err(e) = sdp::SessionDescription::unmarshal(&mut reader) {
            panic!("our answer does not parse: {e}\n{}", answer.sdp);
        }
    }
});
