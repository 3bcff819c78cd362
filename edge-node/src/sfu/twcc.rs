//! Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01)
//! turned into the per-packet arrival list our send-side estimator takes.

use kcs_media::bwe::TwccPacketStatus;
use rtcp::transport_feedbacks::transport_layer_cc::{
    PacketStatusChunk, SymbolSizeTypeTcc, SymbolTypeTcc, TransportLayerCc,
};
use std::time::Duration;

/// Expands a feedback packet into one status per reported sequence number. Arrival times are
/// relative to the receiver's epoch: reference time (multiples of 64 ms) plus cumulative deltas.
/// Malformed feedback (fewer deltas than received symbols) yields the statuses read so far.
pub fn statuses(fb: &TransportLayerCc) -> Vec<TwccPacketStatus> {
    let mut symbols = Vec::with_capacity(fb.packet_status_count as usize);
    'chunks: for chunk in &fb.packet_chunks {
        match chunk {
            PacketStatusChunk::RunLengthChunk(c) => {
                for _ in 0..c.run_length {
                    if symbols.len() >= fb.packet_status_count as usize {
                        break 'chunks;
                    }
                    symbols.push(c.packet_status_symbol);
                }
            }
            PacketStatusChunk::StatusVectorChunk(c) => {
                for s in &c.symbol_list {
                    if symbols.len() >= fb.packet_status_count as usize {
                        break 'chunks;
                    }
                    // In one-bit vectors "received" means a small delta.
                    let s = match (c.symbol_size, *s) {
                        (SymbolSizeTypeTcc::OneBit, SymbolTypeTcc::PacketReceivedSmallDelta) => {
                            SymbolTypeTcc::PacketReceivedSmallDelta
                        }
                        (_, s) => s,
                    };
                    symbols.push(s);
                }
            }
        }
    }
    let mut arrival_us: i64 = i64::from(fb.reference_time) * 64_000;
    let mut deltas = fb.recv_deltas.iter();
    let mut out = Vec::with_capacity(symbols.len());
    for (i, s) in symbols.into_iter().enumerate() {
        let seq = fb.base_sequence_number.wrapping_add(i as u16);
        let arrival = match s {
            SymbolTypeTcc::PacketReceivedSmallDelta | SymbolTypeTcc::PacketReceivedLargeDelta => {
                let Some(d) = deltas.next() else { break };
                arrival_us += d.delta;
                Some(Duration::from_micros(arrival_us.max(0) as u64))
            }
            _ => None,
        };
        out.push(TwccPacketStatus { seq, arrival });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor::twcc::Recorder;

    #[test]
    fn recorder_feedback_round_trips_to_statuses() {
        let mut rec = Recorder::new(1);
        // 65534, 65535, (0 lost), 1, 2 arriving 1 ms apart from t = 10 s.
        let base = 10_000_000i64;
        for (i, seq) in [65534u16, 65535, 1, 2].into_iter().enumerate() {
            rec.record(7, seq, base + i as i64 * 1000);
        }
        let pkts = rec.build_feedback_packet();
        let fb = pkts[0]
            .as_any()
            .downcast_ref::<TransportLayerCc>()
            .expect("twcc feedback");
        let st = statuses(fb);
        let seqs: Vec<u16> = st.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![65534, 65535, 0, 1, 2]);
        assert!(st[2].arrival.is_none());
        let a0 = st[0].arrival.unwrap();
        let a4 = st[4].arrival.unwrap();
        assert_eq!((a4 - a0).as_micros(), 3000);
    }
}
