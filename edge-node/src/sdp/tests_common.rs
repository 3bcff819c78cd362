//! Helpers shared by the tests of this module.

use super::{Fingerprint, LocalTransport};

/// Our transport in tests: two candidates (IPv4 then IPv6, documentation ranges).
pub(crate) fn local() -> LocalTransport {
    LocalTransport {
        ice_ufrag: "EdGe".to_owned(),
        ice_pwd: "edgepasswordedgepassword".to_owned(),
        fingerprint: Fingerprint {
            algorithm: "sha-256".to_owned(),
            value: "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"
                .to_owned(),
        },
        candidates: vec![
            "192.0.2.1:40000".parse().expect("literal"),
            "[2001:db8::1]:40000".parse().expect("literal"),
        ],
    }
}

/// The lines of an SDP before its first m-line ("session") — the only section asked for.
pub(crate) fn lines_of(sdp: &str, section: &str) -> Vec<String> {
    assert_eq!(section, "session");
    sdp.lines()
        .take_while(|l| !l.starts_with("m="))
        .map(str::to_owned)
        .collect()
}

/// The lines of each m-line section, the m= line first.
pub(crate) fn mline_blocks(sdp: &str) -> Vec<Vec<String>> {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for l in sdp.lines() {
        if l.starts_with("m=") {
            blocks.push(Vec::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push(l.to_owned());
        }
    }
    blocks
}
