//! The cascade link decoders on arbitrary bytes: never panic; whatever decodes re-encodes to a
//! frame that decodes to the same value (round trip); a decoder fed the bytes in two pieces
//! agrees with one fed them whole.
#![no_main]

use cascade_proto::wire::{
    decode_datagram, decode_frame, encode_datagram, encode_frame, FrameDecoder,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_frame(data) {
        let mut again = Vec::new();
        encode_frame(&msg, &mut again).expect("a decoded message is encodable");
        assert_eq!(decode_frame(&again).as_ref(), Ok(&msg));
    }
    if let Ok(d) = decode_datagram(data) {
        let mut again = Vec::new();
        encode_datagram(&d, &mut again);
        assert_eq!(decode_datagram(&again), Ok(d));
    }
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut whole = FrameDecoder::new(1 << 16);
    whole.push(data);
    let mut pieces = FrameDecoder::new(1 << 16);
    pieces.push(&data[..split]);
    let mut from_pieces = Vec::new();
    loop {
        match pieces.poll_message() {
            Ok(Some(m)) => from_pieces.push(Ok(m)),
            Ok(None) => break,
            Err(e) => {
                from_pieces.push(Err(e));
                break;
            }
        }
    }
    pieces.push(&data[split..]);
    if !matches!(from_pieces.last(), Some(Err(_))) {
        loop {
            match pieces.poll_message() {
                Ok(Some(m)) => from_pieces.push(Ok(m)),
                Ok(None) => break,
                Err(e) => {
                    from_pieces.push(Err(e));
                    break;
                }
            }
        }
    }
    let mut from_whole = Vec::new();
    loop {
        match whole.poll_message() {
            Ok(Some(m)) => from_whole.push(Ok(m)),
            Ok(None) => break,
            Err(e) => {
                from_whole.push(Err(e));
                break;
            }
        }
    }
    // Splitting may reveal an error earlier (a bad header before its body arrived) but never
    // changes the messages decoded before it.
    let ok_whole: Vec<_> = from_whole.iter().take_while(|r| r.is_ok()).collect();
    let ok_pieces: Vec<_> = from_pieces.iter().take_while(|r| r.is_ok()).collect();
    assert_eq!(ok_whole, ok_pieces);
});
