//! Bytes of the cascade link: control frames and media datagrams (layout in docs/cascade.md).
//!
//! Sans-IO and panic-free on any input: [`FrameDecoder`] is fed whatever the QUIC stream
//! delivered (any split, any bytes) and yields whole [`ControlMessage`]s or one [`WireError`];
//! [`decode_datagram`] parses one datagram. Encoding appends to a caller's buffer so a shell can
//! reuse it. Room messages ([`ControlMessage::ToOrigin`] / [`ControlMessage::ToEdge`]) travel as
//! JSON of the serde types in [`crate::room`]: that protocol is extended by the meeting features
//! and must not need a second encoder kept in step by hand; it is control traffic, not media.
//! Everything else is a fixed binary layout.
//!
//! ## Control frame
//!
//! ```text
//! +---------+--------+-------------------+------------------+
//! | version | type   | body length       | body             |
//! | u8 = 1  | u8     | u24, big-endian   | (length bytes)   |
//! +---------+--------+-------------------+------------------+
//! ```
//!
//! A frame with another version, an unknown type, a body over the decoder's limit, a body
//! shorter or longer than its type needs, or a value out of range is an error; the decoder stays
//! failed after one (the stream's framing cannot be trusted any more) and the shell closes that
//! stream with [`WireError::code`] and the error's text.

use crate::ids::{RoomId, TrackId};
use crate::link::{
    ControlMessage, FlowId, GoodbyeCode, Hello, Label, Layer, LayerSet, LinkStats, MediaDatagram,
    MediaFlags, NackEntry, NodeRole, MAX_NACK_ENTRIES, MAX_REASON_LEN,
};
use crate::room::{EdgeToOrigin, OriginToEdge};

/// Version byte of every control frame and the high bits of every datagram header.
pub const WIRE_VERSION: u8 = 1;

/// Bytes before a frame's body.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest body the u24 length field can express.
pub const MAX_FRAME_BODY: usize = (1 << 24) - 1;

/// Default body limit of a [`FrameDecoder`]. The largest frame is a room join reply carrying the
/// whole roster: about 100 bytes of JSON per participant, so 10,000 participants fit in 1 MiB;
/// 4 MiB leaves room for roles and tracks without letting one peer make us buffer much more.
pub const DEFAULT_MAX_FRAME_BODY: usize = 4 << 20;

/// Smallest RTP packet: the fixed header (RFC 3550 §5.1).
pub const MIN_RTP_LEN: usize = 12;

mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const DRAIN: u8 = 0x02;
    pub const GOODBYE: u8 = 0x03;
    pub const TO_ORIGIN: u8 = 0x10;
    pub const TO_EDGE: u8 = 0x11;
    pub const SUBSCRIBE: u8 = 0x20;
    pub const UNSUBSCRIBE: u8 = 0x21;
    pub const KEYFRAME_REQUEST: u8 = 0x22;
    pub const LAYER_DEMAND: u8 = 0x23;
    pub const NACK: u8 = 0x24;
    pub const SUBSCRIBE_REFUSED: u8 = 0x25;
    pub const STATS: u8 = 0x30;
}

mod role_byte {
    pub const EDGE: u8 = 1;
    pub const ORIGIN: u8 = 2;
}

mod flag_bits {
    pub const KEYFRAME: u8 = 0x01;
    pub const END_OF_FRAME: u8 = 0x02;
    pub const RETRANSMISSION: u8 = 0x04;
    pub const KNOWN: u8 = KEYFRAME | END_OF_FRAME | RETRANSMISSION;
}

/// Why bytes from a peer were refused. Each has a stable numeric [`code`](WireError::code) for
/// QUIC stream resets and a text for the peer's logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("unsupported wire version {0} (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("{frame} frame body is truncated")]
    Truncated { frame: &'static str },
    #[error("{frame} frame has {extra} bytes after its last field")]
    TrailingBytes { frame: &'static str, extra: usize },
    #[error("{frame}: field {field} is out of range")]
    BadValue {
        frame: &'static str,
        field: &'static str,
    },
    #[error("{frame}: field {field} is not valid UTF-8")]
    BadUtf8 {
        frame: &'static str,
        field: &'static str,
    },
    #[error("room message is not valid: {0}")]
    BadRoomMessage(String),
    #[error("datagram shorter than its header")]
    ShortDatagram,
    #[error("datagram payload is not an RTP packet")]
    NotRtp,
    #[error("message cannot be encoded: {0}")]
    Unencodable(&'static str),
}

impl WireError {
    /// Application error code for closing the offending QUIC stream (0x100 + n keeps clear of
    /// the small codes the link uses for whole-connection closes).
    pub fn code(&self) -> u32 {
        0x100
            + match self {
                WireError::UnsupportedVersion(_) => 1,
                WireError::UnknownType(_) => 2,
                WireError::TooLong { .. } => 3,
                WireError::Truncated { .. } => 4,
                WireError::TrailingBytes { .. } => 5,
                WireError::BadValue { .. } => 6,
                WireError::BadUtf8 { .. } => 7,
                WireError::BadRoomMessage(_) => 8,
                WireError::ShortDatagram => 9,
                WireError::NotRtp => 10,
                WireError::Unencodable(_) => 11,
            }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends `msg` as one control frame to `out`. Fails (leaving `out` as it was) only for values
/// the wire cannot carry: a NACK with more than [`MAX_NACK_ENTRIES`], a reason over
/// [`MAX_REASON_LEN`], a body over [`MAX_FRAME_BODY`].
pub fn encode_frame(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[WIRE_VERSION, 0, 0, 0, 0]);
    let result = encode_body(msg, out);
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    let result = result.and_then(|ty| {
        if body_len > MAX_FRAME_BODY {
            Err(WireError::Unencodable("frame body over 16 MiB"))
        } else {
            Ok(ty)
        }
    });
    match result {
        Ok(ty) => {
            out[start + 1] = ty;
            let len = (body_len as u32).to_be_bytes();
            out[start + 2..start + 5].copy_from_slice(&len[1..]);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Writes the body and returns the frame type.
fn encode_body(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<u8, WireError> {
    use frame_type::*;
    Ok(match msg {
        ControlMessage::Hello(h) => {
            put_u16(out, h.version);
            out.push(match h.role {
                NodeRole::Edge => role_byte::EDGE,
                NodeRole::Origin => role_byte::ORIGIN,
            });
            put_str8(out, h.node.as_str());
            put_str8(out, h.region.as_str());
            HELLO
        }
        ControlMessage::Drain { deadline_ms } => {
            put_u32(out, *deadline_ms);
            DRAIN
        }
        ControlMessage::Goodbye { code, reason } => {
            if reason.len() > MAX_REASON_LEN {
                return Err(WireError::Unencodable("goodbye reason too long"));
            }
            put_u16(out, code.to_u16());
            put_u16(out, reason.len() as u16);
            out.extend_from_slice(reason.as_bytes());
            GOODBYE
        }
        ControlMessage::ToOrigin(m) => {
            serde_json::to_writer(&mut *out, m)
                .map_err(|_| WireError::Unencodable("room message does not serialise"))?;
            TO_ORIGIN
        }
        ControlMessage::ToEdge(m) => {
            serde_json::to_writer(&mut *out, m)
                .map_err(|_| WireError::Unencodable("room message does not serialise"))?;
            TO_EDGE
        }
        ControlMessage::Subscribe {
            flow,
            room,
            track,
            layer,
        } => {
            put_varint(out, u64::from(flow.get()));
            out.push(layer.index());
            put_varint_u64(out, track.0)?;
            // RoomId is at most MAX_NAME_LEN (128) bytes: fits a u8 length.
            put_str8(out, room.as_str());
            SUBSCRIBE
        }
        ControlMessage::Unsubscribe { flow, layer } => {
            put_varint(out, u64::from(flow.get()));
            out.push(layer.index());
            UNSUBSCRIBE
        }
        ControlMessage::KeyframeRequest { flow, layer } => {
            put_varint(out, u64::from(flow.get()));
            out.push(layer.index());
            KEYFRAME_REQUEST
        }
        ControlMessage::LayerDemand { flow, layers } => {
            put_varint(out, u64::from(flow.get()));
            out.push(layers.0);
            LAYER_DEMAND
        }
        ControlMessage::Nack {
            flow,
            layer,
            entries,
        } => {
            if entries.is_empty() || entries.len() > MAX_NACK_ENTRIES {
                return Err(WireError::Unencodable("NACK must have 1 to 64 entries"));
            }
            put_varint(out, u64::from(flow.get()));
            out.push(layer.index());
            out.push(entries.len() as u8);
            for e in entries {
                put_u16(out, e.pid);
                put_u16(out, e.blp);
            }
            NACK
        }
        ControlMessage::Stats(s) => {
            put_u32(out, s.rtt_micros);
            put_u64(out, s.datagrams_sent);
            put_u64(out, s.datagrams_received);
            put_u64(out, s.datagrams_dropped);
            put_u64(out, s.bytes_sent);
            STATS
        }
        ControlMessage::SubscribeRefused { flow, reason } => {
            if reason.len() > MAX_REASON_LEN {
                return Err(WireError::Unencodable("refusal reason too long"));
            }
            put_varint(out, u64::from(flow.get()));
            put_u16(out, reason.len() as u16);
            out.extend_from_slice(reason.as_bytes());
            SUBSCRIBE_REFUSED
        }
    })
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Labels and room ids are at most 128 bytes, checked by their constructors.
fn put_str8(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= usize::from(u8::MAX));
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Largest QUIC variable-length integer (RFC 9000 §16).
const VARINT_MAX: u64 = (1 << 62) - 1;

fn put_varint_u64(out: &mut Vec<u8>, v: u64) -> Result<(), WireError> {
    if v > VARINT_MAX {
        return Err(WireError::Unencodable("integer over 2^62 - 1"));
    }
    put_varint(out, v);
    Ok(())
}

/// RFC 9000 §16: the two high bits of the first byte give the length (1, 2, 4, 8 bytes).
/// Callers guarantee `v <= VARINT_MAX`.
fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// Appends one media datagram (header, then the RTP packet) to `out`.
pub fn encode_datagram(d: &MediaDatagram<'_>, out: &mut Vec<u8>) {
    out.push((WIRE_VERSION << 6) | d.layer.index());
    let mut flags = 0;
    if d.flags.keyframe {
        flags |= flag_bits::KEYFRAME;
    }
    if d.flags.end_of_frame {
        flags |= flag_bits::END_OF_FRAME;
    }
    if d.flags.retransmission {
        flags |= flag_bits::RETRANSMISSION;
    }
    out.push(flags);
    put_varint(out, u64::from(d.flow.get()));
    out.extend_from_slice(d.rtp);
}

/// Header bytes [`encode_datagram`] puts before the RTP packet of `flow`.
pub fn datagram_header_len(flow: FlowId) -> usize {
    2 + varint_len(u64::from(flow.get()))
}

fn varint_len(v: u64) -> usize {
    match v {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        0x4000..=0x3fff_ffff => 4,
        _ => 8,
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Parses one media datagram. The RTP packet is borrowed, not copied.
pub fn decode_datagram(bytes: &[u8]) -> Result<MediaDatagram<'_>, WireError> {
    let mut r = Reader::new(bytes, "datagram");
    let (Some(first), Some(flags)) = (r.u8().ok(), r.u8().ok()) else {
        return Err(WireError::ShortDatagram);
    };
    let version = first >> 6;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    // Bits 5..3 are reserved: a sender that sets them speaks a format we do not know.
    if first & 0x38 != 0 || flags & !flag_bits::KNOWN != 0 {
        return Err(WireError::BadValue {
            frame: "datagram",
            field: "reserved bits",
        });
    }
    let layer = Layer::new(first & 0x07).ok_or(WireError::BadValue {
        frame: "datagram",
        field: "layer",
    })?;
    let flow = r.flow().map_err(|e| match e {
        WireError::Truncated { .. } => WireError::ShortDatagram,
        e => e,
    })?;
    let rtp = r.rest();
    // RFC 3550 §5.1: version 2 in the two high bits of the first byte.
    if rtp.len() < MIN_RTP_LEN || rtp[0] >> 6 != 2 {
        return Err(WireError::NotRtp);
    }
    Ok(MediaDatagram {
        flow,
        layer,
        flags: MediaFlags {
            keyframe: flags & flag_bits::KEYFRAME != 0,
            end_of_frame: flags & flag_bits::END_OF_FRAME != 0,
            retransmission: flags & flag_bits::RETRANSMISSION != 0,
        },
        rtp,
    })
}

/// Reassembles control frames from stream bytes. Feed with [`push`](Self::push), drain with
/// [`poll_message`](Self::poll_message) until it returns `Ok(None)`.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed by returned frames (compacted lazily).
    consumed: usize,
    max_body: usize,
    failed: Option<WireError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BODY)
    }
}

impl FrameDecoder {
    /// A decoder refusing bodies over `max_body` bytes (capped at [`MAX_FRAME_BODY`]).
    pub fn new(max_body: usize) -> Self {
        Self {
            buf: Vec::new(),
            consumed: 0,
            max_body: max_body.min(MAX_FRAME_BODY),
            failed: None,
        }
    }

    /// Appends bytes received on the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.consumed > 0 && self.consumed == self.buf.len() {
            self.buf.clear();
            self.consumed = 0;
        } else if self.consumed > self.buf.len() / 2 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// The next whole message, `Ok(None)` when more bytes are needed, or the error that broke
    /// the stream (returned again on every later call).
    pub fn poll_message(&mut self) -> Result<Option<ControlMessage>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let pending = &self.buf[self.consumed..];
        // Check the version and type as soon as they arrive, before waiting for a long body:
        // a peer speaking something else is told at once, not after it sent 4 MiB.
        if let Some(&version) = pending.first() {
            if version != WIRE_VERSION {
                return Err(self.fail(WireError::UnsupportedVersion(version)));
            }
        }
        if let Some(&ty) = pending.get(1) {
            if frame_name(ty).is_none() {
                return Err(self.fail(WireError::UnknownType(ty)));
            }
        }
        if pending.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let ty = pending[1];
        let len = u32::from_be_bytes([0, pending[2], pending[3], pending[4]]) as usize;
        if len > self.max_body {
            return Err(self.fail(WireError::TooLong {
                len,
                max: self.max_body,
            }));
        }
        if pending.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let body = &pending[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
        match decode_body(ty, body) {
            Ok(msg) => {
                self.consumed += FRAME_HEADER_LEN + len;
                Ok(Some(msg))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: WireError) -> WireError {
        self.failed = Some(e.clone());
        self.buf = Vec::new();
        self.consumed = 0;
        e
    }
}

/// Decodes exactly one frame from `bytes` (header and body, nothing after): for tests and
/// tools; streams use [`FrameDecoder`].
pub fn decode_frame(bytes: &[u8]) -> Result<ControlMessage, WireError> {
    let mut d = FrameDecoder::new(MAX_FRAME_BODY);
    d.push(bytes);
    match d.poll_message()? {
        Some(msg) if d.buffered() == 0 => Ok(msg),
        Some(msg) => Err(WireError::TrailingBytes {
            frame: msg.name(),
            extra: d.buffered(),
        }),
        None => Err(WireError::Truncated {
            frame: bytes.get(1).and_then(|&t| frame_name(t)).unwrap_or("frame"),
        }),
    }
}

fn frame_name(ty: u8) -> Option<&'static str> {
    use frame_type::*;
    Some(match ty {
        HELLO => "hello",
        DRAIN => "drain",
        GOODBYE => "goodbye",
        TO_ORIGIN => "to_origin",
        TO_EDGE => "to_edge",
        SUBSCRIBE => "subscribe",
        UNSUBSCRIBE => "unsubscribe",
        KEYFRAME_REQUEST => "keyframe_request",
        LAYER_DEMAND => "layer_demand",
        NACK => "nack",
        STATS => "stats",
        SUBSCRIBE_REFUSED => "subscribe_refused",
        _ => return None,
    })
}

fn decode_body(ty: u8, body: &[u8]) -> Result<ControlMessage, WireError> {
    use frame_type::*;
    let name = frame_name(ty).ok_or(WireError::UnknownType(ty))?;
    let mut r = Reader::new(body, name);
    let msg = match ty {
        HELLO => {
            let version = r.u16()?;
            let role = match r.u8()? {
                role_byte::EDGE => NodeRole::Edge,
                role_byte::ORIGIN => NodeRole::Origin,
                _ => return Err(r.bad("role")),
            };
            let node = Label::new(r.str8("node")?).map_err(|_| r.bad("node"))?;
            let region = Label::new(r.str8("region")?).map_err(|_| r.bad("region"))?;
            ControlMessage::Hello(Hello {
                node,
                region,
                role,
                version,
            })
        }
        DRAIN => ControlMessage::Drain {
            deadline_ms: r.u32()?,
        },
        GOODBYE => {
            let code = GoodbyeCode::from_u16(r.u16()?);
            let len = usize::from(r.u16()?);
            if len > MAX_REASON_LEN {
                return Err(r.bad("reason"));
            }
            let reason = r.utf8(len, "reason")?.to_owned();
            ControlMessage::Goodbye { code, reason }
        }
        TO_ORIGIN => {
            let m: EdgeToOrigin = serde_json::from_slice(r.rest())
                .map_err(|e| WireError::BadRoomMessage(e.to_string()))?;
            ControlMessage::ToOrigin(m)
        }
        TO_EDGE => {
            let m: OriginToEdge = serde_json::from_slice(r.rest())
                .map_err(|e| WireError::BadRoomMessage(e.to_string()))?;
            ControlMessage::ToEdge(m)
        }
        SUBSCRIBE => {
            let flow = r.flow()?;
            let layer = r.layer()?;
            let track = TrackId(r.varint()?);
            let room = RoomId::new(r.str8("room")?).map_err(|_| r.bad("room"))?;
            ControlMessage::Subscribe {
                flow,
                room,
                track,
                layer,
            }
        }
        UNSUBSCRIBE => ControlMessage::Unsubscribe {
            flow: r.flow()?,
            layer: r.layer()?,
        },
        KEYFRAME_REQUEST => ControlMessage::KeyframeRequest {
            flow: r.flow()?,
            layer: r.layer()?,
        },
        LAYER_DEMAND => ControlMessage::LayerDemand {
            flow: r.flow()?,
            layers: LayerSet(r.u8()?),
        },
        NACK => {
            let flow = r.flow()?;
            let layer = r.layer()?;
            let count = usize::from(r.u8()?);
            if count == 0 || count > MAX_NACK_ENTRIES {
                return Err(r.bad("entry count"));
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(NackEntry {
                    pid: r.u16()?,
                    blp: r.u16()?,
                });
            }
            ControlMessage::Nack {
                flow,
                layer,
                entries,
            }
        }
        STATS => ControlMessage::Stats(LinkStats {
            rtt_micros: r.u32()?,
            datagrams_sent: r.u64()?,
            datagrams_received: r.u64()?,
            datagrams_dropped: r.u64()?,
            bytes_sent: r.u64()?,
        }),
        SUBSCRIBE_REFUSED => {
            let flow = r.flow()?;
            let len = usize::from(r.u16()?);
            if len > MAX_REASON_LEN {
                return Err(r.bad("reason"));
            }
            let reason = r.utf8(len, "reason")?.to_owned();
            ControlMessage::SubscribeRefused { flow, reason }
        }
        _ => return Err(WireError::UnknownType(ty)),
    };
    r.finish()?;
    Ok(msg)
}

/// A cursor over one body; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], frame: &'static str) -> Self {
        Self { bytes, frame }
    }

    fn truncated(&self) -> WireError {
        WireError::Truncated { frame: self.frame }
    }

    fn bad(&self, field: &'static str) -> WireError {
        WireError::BadValue {
            frame: self.frame,
            field,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < n {
            return Err(self.truncated());
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// RFC 9000 §16. Any length may encode any value (we write the shortest).
    fn varint(&mut self) -> Result<u64, WireError> {
        let first = self.u8()?;
        let extra = (1usize << (first >> 6)) - 1;
        let mut v = u64::from(first & 0x3f);
        for &b in self.take(extra)? {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }

    fn flow(&mut self) -> Result<FlowId, WireError> {
        let v = self.varint()?;
        u32::try_from(v)
            .ok()
            .and_then(FlowId::new)
            .ok_or(self.bad("flow"))
    }

    fn layer(&mut self) -> Result<Layer, WireError> {
        Layer::new(self.u8()?).ok_or(self.bad("layer"))
    }

    fn utf8(&mut self, len: usize, field: &'static str) -> Result<&'a str, WireError> {
        let frame = self.frame;
        std::str::from_utf8(self.take(len)?).map_err(|_| WireError::BadUtf8 { frame, field })
    }

    fn str8(&mut self, field: &'static str) -> Result<&'a str, WireError> {
        let len = usize::from(self.u8()?);
        self.utf8(len, field)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                frame: self.frame,
                extra: self.bytes.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests;
