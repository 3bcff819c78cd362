//! VP8 RTP payload descriptor parsing and picture-id munging (RFC 7741).
//!
//! Each simulcast layer of a VP8 publisher numbers its pictures independently: its own 15-bit
//! PictureID and its own TL0PICIDX (RFC 7741 §4.2). When the forwarder moves a subscriber from one
//! layer to another, the subscriber's decoder must still see one stream whose picture ids advance
//! by one per picture, or it treats the jump as lost pictures and asks for keyframes.
//! [`Vp8Munger`] keeps one mapping `out = in + offset` per forwarded layer and re-bases the offset
//! at each switch so that the first picture of the new layer follows the last forwarded one.
//!
//! The munger edits descriptors in place and never changes their size: a 7-bit picture id stays
//! 7 bits (the output is reduced modulo 128), so the RTP payload never has to be moved.

use thiserror::Error;

/// Errors from parsing a VP8 payload descriptor; all mean "drop and count this packet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Vp8Error {
    /// The payload ends inside the descriptor.
    #[error("VP8 payload descriptor truncated: needs {needed} bytes, payload has {len}")]
    Truncated {
        /// Bytes the descriptor announces.
        needed: usize,
        /// Bytes in the payload.
        len: usize,
    },
}

/// 15-bit PictureID space (RFC 7741 §4.2, M=1).
const PICTURE_ID_SPACE: u16 = 1 << 15;
/// 7-bit PictureID space (RFC 7741 §4.2, M=0).
const SHORT_PICTURE_ID_SPACE: u16 = 1 << 7;

/// A PictureID as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PictureId {
    /// The value, `< 2^15` (or `< 2^7` when not `long`).
    pub value: u16,
    /// Whether the field is 15 bits (M=1) rather than 7 bits.
    pub long: bool,
}

/// The parsed VP8 payload descriptor (RFC 7741 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// N: the frame is not used as a reference by other frames.
    pub non_reference: bool,
    /// S: this packet starts a VP8 partition.
    pub start_of_partition: bool,
    /// PID: the partition index this packet belongs to.
    pub partition_index: u8,
    /// I: picture id, if present.
    pub picture_id: Option<PictureId>,
    /// L: TL0PICIDX, if present.
    pub tl0_pic_idx: Option<u8>,
    /// T: temporal layer index, if present.
    pub tid: Option<u8>,
    /// Y: layer sync bit (only meaningful when `tid` is present).
    pub layer_sync: bool,
    /// K: KEYIDX, if present.
    pub key_idx: Option<u8>,
    /// Length of the descriptor; the VP8 payload header (RFC 7741 §4.3) starts here.
    pub header_len: usize,
}

impl Vp8Descriptor {
    /// Parses the descriptor at the start of an RTP payload.
    pub fn parse(payload: &[u8]) -> Result<Self, Vp8Error> {
        let truncated = |needed: usize| Vp8Error::Truncated {
            needed,
            len: payload.len(),
        };
        let b0 = *payload.first().ok_or(truncated(1))?;
        let mut d = Vp8Descriptor {
            non_reference: b0 & 0x20 != 0,
            start_of_partition: b0 & 0x10 != 0,
            partition_index: b0 & 0x07,
            picture_id: None,
            tl0_pic_idx: None,
            tid: None,
            layer_sync: false,
            key_idx: None,
            header_len: 1,
        };
        if b0 & 0x80 == 0 {
            return Ok(d);
        }
        let x = *payload.get(1).ok_or(truncated(2))?;
        let mut at = 2;
        if x & 0x80 != 0 {
            let p0 = *payload.get(at).ok_or(truncated(at + 1))?;
            if p0 & 0x80 != 0 {
                let p1 = *payload.get(at + 1).ok_or(truncated(at + 2))?;
                d.picture_id = Some(PictureId {
                    value: (u16::from(p0 & 0x7F) << 8) | u16::from(p1),
                    long: true,
                });
                at += 2;
            } else {
                d.picture_id = Some(PictureId {
                    value: u16::from(p0),
                    long: false,
                });
                at += 1;
            }
        }
        if x & 0x40 != 0 {
            d.tl0_pic_idx = Some(*payload.get(at).ok_or(truncated(at + 1))?);
            at += 1;
        }
        // T and K share one octet (RFC 7741 §4.2: present when either bit is set).
        if x & 0x30 != 0 {
            let tk = *payload.get(at).ok_or(truncated(at + 1))?;
            if x & 0x20 != 0 {
                d.tid = Some(tk >> 6);
                d.layer_sync = tk & 0x20 != 0;
            }
            if x & 0x10 != 0 {
                d.key_idx = Some(tk & 0x1F);
            }
            at += 1;
        }
        d.header_len = at;
        Ok(d)
    }

    /// Whether this packet is the first of a key frame: start of partition 0 and the VP8 payload
    /// header's P bit (inverse key frame flag, RFC 7741 §4.3) is 0.
    pub fn starts_keyframe(&self, payload: &[u8]) -> bool {
        self.start_of_partition
            && self.partition_index == 0
            && payload.get(self.header_len).is_some_and(|h| h & 0x01 == 0)
    }

    /// Offset of the picture id field, when present.
    fn picture_id_offset(&self) -> usize {
        2
    }

    /// Offset of TL0PICIDX, when present.
    fn tl0_offset(&self) -> usize {
        2 + match self.picture_id {
            Some(PictureId { long: true, .. }) => 2,
            Some(PictureId { long: false, .. }) => 1,
            None => 0,
        }
    }
}

/// Keeps the forwarded stream's PictureID and TL0PICIDX continuous across simulcast switches.
///
/// One per (subscriber, VP8 track). Feed it only the packets that are actually forwarded (after
/// [`RtpRewriter`](crate::rewrite::RtpRewriter) accepted them), in forwarding order.
#[derive(Debug, Clone, Default)]
pub struct Vp8Munger {
    /// `None` until the first packet with a picture id.
    pic: Option<FieldMap>,
    /// `None` until the first packet with a TL0PICIDX.
    tl0: Option<FieldMap>,
}

/// One field's mapping `out = (in + offset) mod space` and the newest output value.
#[derive(Debug, Clone, Copy)]
struct FieldMap {
    offset: u16,
    /// The newest output value written (modulo `space`).
    last_out: u16,
    /// Whether the current offset was set at the current layer (false after a switch until the
    /// first packet with this field re-bases it).
    based: bool,
}

impl FieldMap {
    fn map(slot: &mut Option<Self>, input: u16, space: u16) -> u16 {
        let mask = space - 1;
        let m = match slot {
            None => slot.insert(FieldMap {
                offset: 0,
                last_out: input,
                based: true,
            }),
            Some(m) => {
                if !m.based {
                    // The first picture of the new layer follows the last forwarded one (modulo
                    // this packet's field size, so a 7-bit stream stays continuous modulo 128).
                    let out = m.last_out.wrapping_add(1) & mask;
                    m.offset = out.wrapping_sub(input) & mask;
                    m.based = true;
                }
                m
            }
        };
        let out = input.wrapping_add(m.offset) & mask;
        // Advance `last_out` only forwards (newer half of the space): reordered packets of
        // earlier pictures keep their own mapping without moving the reference back.
        let forward = out.wrapping_sub(m.last_out) & mask;
        if forward != 0 && forward < space / 2 {
            m.last_out = out;
        } else {
            // Keep the reference in this packet's space (a no-op for a stream of one field size).
            m.last_out &= mask;
        }
        out
    }
}

impl Vp8Munger {
    /// A munger that has forwarded nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rewrites the picture id and TL0PICIDX of a forwarded packet in place.
    ///
    /// `switched_layer`: this packet is the first forwarded from a new layer (the switch
    /// keyframe). The first packet ever keeps its values.
    pub fn rewrite(&mut self, payload: &mut [u8], switched_layer: bool) -> Result<(), Vp8Error> {
        let d = Vp8Descriptor::parse(payload)?;
        if switched_layer {
            // A field absent from the switch packet is re-based at its first occurrence.
            for m in [&mut self.pic, &mut self.tl0].into_iter().flatten() {
                m.based = false;
            }
        }
        if let Some(pid) = d.picture_id {
            let space = if pid.long {
                PICTURE_ID_SPACE
            } else {
                SHORT_PICTURE_ID_SPACE
            };
            let out = FieldMap::map(&mut self.pic, pid.value, space);
            let at = d.picture_id_offset();
            // `parse` proved the field is inside `payload`.
            if pid.long {
                payload[at] = 0x80 | (out >> 8) as u8;
                payload[at + 1] = out as u8;
            } else {
                payload[at] = out as u8; // < 128: mapped in the 7-bit space
            }
        }
        if let Some(tl0) = d.tl0_pic_idx {
            let out = FieldMap::map(&mut self.tl0, u16::from(tl0), 256);
            payload[d.tl0_offset()] = out as u8;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a descriptor: X=1 with I (15- or 7-bit), L, T and K, then one payload header byte.
    fn packet(pic: Option<(u16, bool)>, tl0: Option<u8>, tid: Option<u8>, key: bool) -> Vec<u8> {
        let mut x = 0u8;
        let mut rest = Vec::new();
        if let Some((v, long)) = pic {
            x |= 0x80;
            if long {
                rest.extend_from_slice(&[0x80 | (v >> 8) as u8, v as u8]);
            } else {
                rest.push(v as u8 & 0x7F);
            }
        }
        if let Some(t) = tl0 {
            x |= 0x40;
            rest.push(t);
        }
        if let Some(t) = tid {
            x |= 0x20;
            rest.push((t << 6) | 0x20);
        }
        let mut p = vec![0x90, x]; // X=1, S=1, PID=0
        p.extend(rest);
        p.push(if key { 0x10 } else { 0x11 }); // payload header, P bit
        p.extend_from_slice(&[0xAA; 4]);
        p
    }

    #[test]
    fn parse_table() {
        let cases: Vec<(Vec<u8>, Result<Vp8Descriptor, Vp8Error>)> = vec![
            (
                vec![0x10, 0x00],
                Ok(Vp8Descriptor {
                    non_reference: false,
                    start_of_partition: true,
                    partition_index: 0,
                    picture_id: None,
                    tl0_pic_idx: None,
                    tid: None,
                    layer_sync: false,
                    key_idx: None,
                    header_len: 1,
                }),
            ),
            (
                // X, I (15-bit 0x1234), L=7, T=2 Y=1 K=5, N=1, PID=3
                vec![0xA3, 0xF0, 0x92, 0x34, 0x07, 0xA5, 0x00],
                Ok(Vp8Descriptor {
                    non_reference: true,
                    start_of_partition: false,
                    partition_index: 3,
                    picture_id: Some(PictureId {
                        value: 0x1234,
                        long: true,
                    }),
                    tl0_pic_idx: Some(7),
                    tid: Some(2),
                    layer_sync: true,
                    key_idx: Some(5),
                    header_len: 6,
                }),
            ),
            (
                // K only: the TK octet is present, tid is not.
                vec![0x80, 0x10, 0x1F],
                Ok(Vp8Descriptor {
                    non_reference: false,
                    start_of_partition: false,
                    partition_index: 0,
                    picture_id: None,
                    tl0_pic_idx: None,
                    tid: None,
                    layer_sync: false,
                    key_idx: Some(31),
                    header_len: 3,
                }),
            ),
            (
                vec![0x90, 0x80, 0x05],
                Ok(Vp8Descriptor {
                    non_reference: false,
                    start_of_partition: true,
                    partition_index: 0,
                    picture_id: Some(PictureId {
                        value: 5,
                        long: false,
                    }),
                    tl0_pic_idx: None,
                    tid: None,
                    layer_sync: false,
                    key_idx: None,
                    header_len: 3,
                }),
            ),
            (vec![], Err(Vp8Error::Truncated { needed: 1, len: 0 })),
            (vec![0x80], Err(Vp8Error::Truncated { needed: 2, len: 1 })),
            (
                vec![0x80, 0x80, 0x80],
                Err(Vp8Error::Truncated { needed: 4, len: 3 }),
            ),
            (
                vec![0x80, 0xC0, 0x01],
                Err(Vp8Error::Truncated { needed: 4, len: 3 }),
            ),
        ];
        for (i, (bytes, want)) in cases.iter().enumerate() {
            assert_eq!(Vp8Descriptor::parse(bytes), *want, "case {i}");
        }
    }

    #[test]
    fn every_prefix_parses_or_errors() {
        let p = packet(Some((300, true)), Some(9), Some(1), true);
        for n in 0..=p.len() {
            let _ = Vp8Descriptor::parse(&p[..n]);
            let mut m = Vp8Munger::new();
            let mut buf = p[..n].to_vec();
            let _ = m.rewrite(&mut buf, true);
        }
    }

    #[test]
    fn keyframe_detection() {
        let key = packet(Some((1, true)), None, None, true);
        let d = Vp8Descriptor::parse(&key).unwrap();
        assert!(d.starts_keyframe(&key));
        let delta = packet(Some((1, true)), None, None, false);
        assert!(!Vp8Descriptor::parse(&delta)
            .unwrap()
            .starts_keyframe(&delta));
        // Missing payload header: not a keyframe.
        let cut = &key[..d.header_len];
        assert!(!d.starts_keyframe(cut));
    }

    fn out_of(p: &[u8]) -> (Option<u16>, Option<u8>) {
        let d = Vp8Descriptor::parse(p).unwrap();
        (d.picture_id.map(|p| p.value), d.tl0_pic_idx)
    }

    /// Table: (input picture id, input tl0, switched) -> expected output (picture id, tl0).
    #[test]
    fn munging_table() {
        type Step = ((u16, u8, bool), (u16, u8));
        let cases: &[(&str, &[Step])] = &[
            (
                "first packet keeps values, same layer continues",
                &[
                    ((100, 5, false), (100, 5)),
                    ((100, 5, false), (100, 5)),
                    ((101, 5, false), (101, 5)),
                    ((103, 6, false), (103, 6)), // loss stays visible
                ],
            ),
            (
                "switch re-bases to last+1, frames keep one id",
                &[
                    ((100, 5, false), (100, 5)),
                    ((101, 6, false), (101, 6)),
                    ((7000, 200, true), (102, 7)),
                    ((7000, 200, false), (102, 7)),
                    ((7001, 200, false), (103, 7)),
                    ((7002, 201, false), (104, 8)),
                    ((50, 3, true), (105, 9)),
                ],
            ),
            (
                "15-bit and 8-bit wraparound",
                &[
                    ((32766, 254, false), (32766, 254)),
                    ((32767, 255, false), (32767, 255)),
                    ((0, 0, false), (0, 0)),
                    ((10, 20, true), (1, 1)),
                ],
            ),
            (
                "switch across the wrap of the output",
                &[
                    ((32767, 255, false), (32767, 255)),
                    ((5, 5, true), (0, 0)),
                    ((6, 6, false), (1, 1)),
                ],
            ),
            (
                "reordered packet of an older picture does not move the base",
                &[
                    ((10, 1, false), (10, 1)),
                    ((12, 2, false), (12, 2)),
                    ((11, 1, false), (11, 1)),
                    ((500, 9, true), (13, 3)),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut m = Vp8Munger::new();
            for (i, ((pid, tl0, sw), want)) in steps.iter().enumerate() {
                let mut p = packet(Some((*pid, true)), Some(*tl0), Some(0), false);
                m.rewrite(&mut p, *sw).unwrap();
                assert_eq!(out_of(&p), (Some(want.0), Some(want.1)), "{name}: step {i}");
                // Everything else is untouched.
                assert_eq!(p[0], 0x90);
                assert_eq!(&p[p.len() - 4..], &[0xAA; 4]);
            }
        }
    }

    #[test]
    fn short_picture_id_stays_short() {
        let mut m = Vp8Munger::new();
        let mut p = packet(Some((300, true)), None, None, false);
        m.rewrite(&mut p, false).unwrap();
        // The new layer uses 7-bit ids: output 301 is written modulo 128.
        let mut q = packet(Some((127, false)), None, None, true);
        let len = q.len();
        m.rewrite(&mut q, true).unwrap();
        assert_eq!(q.len(), len);
        let d = Vp8Descriptor::parse(&q).unwrap();
        assert_eq!(
            d.picture_id,
            Some(PictureId {
                value: 301 % 128,
                long: false
            })
        );
        // 7-bit input wrapping 127 -> 0 continues modulo 128.
        let mut r = packet(Some((0, false)), None, None, false);
        m.rewrite(&mut r, false).unwrap();
        let d = Vp8Descriptor::parse(&r).unwrap();
        assert_eq!(d.picture_id.map(|p| p.value), Some(302 % 128));
    }

    #[test]
    fn short_stream_wraps_then_switches() {
        let mut m = Vp8Munger::new();
        let mut last = 0;
        for i in 0..300u16 {
            let mut p = packet(Some((i % 128, false)), None, None, false);
            m.rewrite(&mut p, false).unwrap();
            last = out_of(&p).0.unwrap();
            assert_eq!(last, i % 128);
        }
        let mut q = packet(Some((99, false)), None, None, true);
        m.rewrite(&mut q, true).unwrap();
        assert_eq!(out_of(&q).0, Some((last + 1) % 128));
    }

    #[test]
    fn field_absent_at_switch_is_rebased_later() {
        let mut m = Vp8Munger::new();
        let mut p = packet(Some((10, true)), Some(4), None, false);
        m.rewrite(&mut p, false).unwrap();
        // The switch packet has a picture id but no TL0PICIDX.
        let mut q = packet(Some((900, true)), None, None, true);
        m.rewrite(&mut q, true).unwrap();
        assert_eq!(out_of(&q), (Some(11), None));
        let mut r = packet(Some((901, true)), Some(77), None, false);
        m.rewrite(&mut r, false).unwrap();
        assert_eq!(out_of(&r), (Some(12), Some(5)));
    }

    #[test]
    fn no_extension_is_left_alone() {
        let mut m = Vp8Munger::new();
        let mut p = vec![0x10, 0x00, 0x01];
        m.rewrite(&mut p, true).unwrap();
        assert_eq!(p, vec![0x10, 0x00, 0x01]);
        assert_eq!(
            m.rewrite(&mut [], false),
            Err(Vp8Error::Truncated { needed: 1, len: 0 })
        );
    }
}
