//! Prometheus metrics for `/metrics`.
//!
//! Shards count into plain `u64` fields of their own [`ShardCounters`] (no atomics, no registry
//! lookup per packet) and fold them into the process-wide [`Metrics`] atomics on every tick.
//! Signaling code counts straight into [`Metrics`]. Rendering is the Prometheus text format
//! (version 0.0.4): a fixed set of series does not need a metrics framework.

use kcs_media::residence::{Residence, BOUNDS_US, BUCKETS};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($field:ident => $name:literal, $help:literal;)*) => {
        /// Per-shard counters, folded into [`Metrics`] by [`Metrics::absorb`].
        #[derive(Debug, Default, Clone)]
        pub struct ShardCounters { $(pub $field: u64,)* }

        /// Process-wide counters.
        #[derive(Debug, Default)]
        pub struct MediaCounters { $(pub $field: AtomicU64,)* }

        impl MediaCounters {
            fn absorb(&self, c: &mut ShardCounters) {
                $( if c.$field != 0 { self.$field.fetch_add(c.$field, Relaxed); } )*
                *c = ShardCounters::default();
            }
            fn render(&self, out: &mut String) {
                $(
                    let _ = writeln!(out, "# HELP kcs_{} {}", $name, $help);
                    let _ = writeln!(out, "# TYPE kcs_{} counter", $name);
                    let _ = writeln!(out, "kcs_{} {}", $name, self.$field.load(Relaxed));
                )*
            }
        }
    };
}

counters! {
    packets_in => "rtp_packets_in_total", "SRTP packets received and decrypted";
    bytes_in => "rtp_bytes_in_total", "SRTP bytes received";
    packets_out => "rtp_packets_out_total", "SRTP packets forwarded";
    bytes_out => "rtp_bytes_out_total", "SRTP bytes forwarded";
    retransmits_out => "rtp_retransmits_out_total", "packets resent in answer to NACKs";
    probe_packets_out => "rtp_probe_packets_out_total", "packets resent to probe subscribers' bandwidth";
    rtx_in => "rtx_packets_in_total", "RTX retransmissions received from publishers";
    duplicates_in => "rtp_duplicates_in_total", "duplicate packets received";
    keyframes_in => "keyframes_in_total", "keyframes received from publishers";
    nacks_in => "nacks_in_total", "sequence numbers NACKed by subscribers";
    nacks_missed => "nacks_unanswerable_total", "NACKed packets no longer in the cache";
    nacks_out => "nacks_out_total", "sequence numbers NACKed towards publishers";
    plis_in => "keyframe_requests_in_total", "PLI/FIR received from subscribers";
    plis_out => "keyframe_requests_out_total", "PLI/FIR sent to publishers";
    layer_switches => "layer_switches_total", "simulcast layer changes of subscriptions";
    receiver_reports => "receiver_reports_in_total", "report blocks received from subscribers";
    rtcp_out => "rtcp_packets_out_total", "compound RTCP packets sent";
    transports_added => "transports_total", "ICE/DTLS transports created";
    encrypt_failures => "srtp_encrypt_failures_total", "SRTP encryptions that failed";
    rejected_stun_unknown => "rejected_stun_unknown_total", "STUN for no known transport";
    rejected_stun_integrity => "rejected_stun_integrity_total", "STUN with a bad username or integrity";
    rejected_unknown_source => "rejected_unknown_source_total", "media from an address with no nominated transport";
    rejected_before_keys => "rejected_before_keys_total", "media before DTLS finished";
    rejected_srtp => "rejected_srtp_total", "SRTP that failed authentication or replay checks";
    rejected_srtcp => "rejected_srtcp_total", "SRTCP that failed authentication or replay checks";
    rejected_rtp => "rejected_rtp_total", "malformed RTP";
    rejected_rtcp => "rejected_rtcp_total", "malformed RTCP";
    rejected_unknown_ssrc => "rejected_unknown_ssrc_total", "RTP of an SSRC no publication claims";
    rejected_payload_type => "rejected_payload_type_total", "RTP with a payload type not forwarded";
    rejected_garbage => "rejected_garbage_total", "datagrams that are neither STUN, DTLS nor RTP/RTCP";
    rejected_dtls => "rejected_dtls_total", "DTLS from an address with no nominated transport or failed handshakes";
    relayed_in => "cascade_relayed_packets_in_total", "RTP packets received from cascade links for relayed publications";
    relayed_rejected => "cascade_relayed_rejected_total", "cascade packets for no relayed publication, or not RTP";
    link_packets_out => "cascade_link_packets_out_total", "RTP packets queued as datagrams to cascade links";
    link_retransmits_out => "cascade_link_retransmits_out_total", "packets resent to cascade links in answer to NACKs";
    link_keyframe_requests_out => "cascade_keyframe_requests_out_total", "keyframe requests sent up cascade links";
    link_nacks_out => "cascade_nacks_out_total", "sequence numbers NACKed up cascade links";
    udp_datagrams_out => "udp_datagrams_out_total", "datagrams the media sockets handed to the kernel";
    udp_messages_out => "udp_messages_out_total", "messages those went in: a GSO message carries a frame's packets to one destination";
    fan_out_parts => "fan_out_parts_total", "parts of large fan-outs spread over a shard and its helper threads";
    fan_out_parts_helped => "fan_out_parts_by_helpers_total", "of those parts, the ones a helper thread made";
}

/// Process-wide totals of a residence histogram ([`kcs_media::residence::Residence`], the one
/// bucket layout): shards observe into their own plain `Residence` and fold it in with
/// [`ResidenceTotals::absorb`] on every tick, like [`ShardCounters`].
#[derive(Debug, Default)]
pub struct ResidenceTotals {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl ResidenceTotals {
    /// Adds a shard's tally and zeroes it.
    pub fn absorb(&self, r: &mut Residence) {
        if r.is_empty() {
            return;
        }
        let r = r.take();
        for (total, n) in self.buckets.iter().zip(r.buckets()) {
            if *n != 0 {
                total.fetch_add(*n, Relaxed);
            }
        }
        self.sum_us.fetch_add(r.sum_us(), Relaxed);
    }

    /// Per-bucket counts (not cumulative) and the sum in microseconds.
    pub fn load(&self) -> ([u64; BUCKETS], u64) {
        (
            std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            self.sum_us.load(Relaxed),
        )
    }
}

/// How long cascade datagrams (received from links, relayed publications) stay in the edge,
/// by where their copies go: `kcs_cascade_residence_seconds{to="links"|"subscribers"}`. See
/// docs/cascade.md ("Residence") for exactly what each span includes.
#[derive(Debug, Default)]
pub struct CascadeResidence {
    /// Until the copies for child edges were handed to quinn (`send_datagram`).
    pub links: ResidenceTotals,
    /// Until the SRTP copies for local subscribers were handed to the kernel (`sendmmsg`).
    pub subscribers: ResidenceTotals,
    /// Until the room's shard took the datagram from its inbox: the wait part of either stay,
    /// `kcs_cascade_shard_wait_seconds` (edges only).
    pub shard_wait: ResidenceTotals,
}

/// `# HELP` and `# TYPE` of a histogram (once per name, before its series).
pub(crate) fn histogram_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
}

/// One series of a residence histogram in the Prometheus text format: cumulative buckets in
/// seconds, `_sum`, `_count`. `labels` is empty or `key="value"` pairs without braces.
pub(crate) fn histogram_series(
    out: &mut String,
    name: &str,
    labels: &str,
    buckets: &[u64; BUCKETS],
    sum_us: u64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, n) in buckets.iter().enumerate() {
        cumulative += n;
        let le = match BOUNDS_US.get(i) {
            Some(us) => (*us as f64 / 1e6).to_string(),
            None => "+Inf".to_string(),
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let sum = sum_us as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

/// Help of `kcs_cascade_residence_seconds`, on edges and origins alike.
pub(crate) const CASCADE_RESIDENCE_HELP: &str = "time from a cascade datagram's delivery by quinn to the hand-off of its copies: to=links, to quinn for downstream links; to=subscribers, SRTP copies to the kernel for local subscribers";

/// Counters of the cascade links' media shell (`crate::cascade`).
#[derive(Debug, Default)]
pub struct CascadeLinkCounters {
    /// Datagrams to a link dropped: the link is gone or QUIC refused them.
    pub send_failures: AtomicU64,
    /// Datagrams from links on flows this edge did not subscribe, or that did not decode.
    pub unsolicited: AtomicU64,
    /// Relayed packets dropped because the room's shard inbox was full.
    pub shard_overflow: AtomicU64,
    /// Child edges (of rooms' fan-out trees) linked to this edge now.
    pub child_links: AtomicI64,
    /// Child edge links accepted (handshake done, peer is an edge).
    pub child_links_accepted: AtomicU64,
    /// Incoming links refused: failed handshakes, peers that are not edges, protocol errors.
    pub child_links_refused: AtomicU64,
    /// Subscribes refused with `subscribe_refused` (unknown room or track).
    pub subscribes_refused: AtomicU64,
    /// `subscribe_refused` received from upstream (retried after a second).
    pub refusals_received: AtomicU64,
    /// Links to parent edges up now.
    pub parent_links: AtomicI64,
    /// Parent edge links established (first and reconnects).
    pub parent_link_connects: AtomicU64,
    /// Failed attempts to dial a parent edge.
    pub parent_link_failures: AtomicU64,
    /// Rooms whose media fell back to the origin because their parent edge's link dropped.
    pub parent_fallbacks: AtomicU64,
    /// `layer_demand` messages sent upstream for relayed publications.
    pub layer_demands_sent: AtomicU64,
    /// Layer demands dropped on the way up: a shard's could not be queued for the cascade
    /// (its request queue full), or the `layer_demand` message could not be queued on the
    /// link (its control queue full or closed).
    pub layer_demand_failures: AtomicU64,
    /// Datagrams received from links for relayed publications, by simulcast layer (index =
    /// layer): what each layer costs the links into this edge.
    pub relayed_datagrams_by_layer: [AtomicU64; cascade_proto::link::MAX_LAYER as usize + 1],
}

/// Counters of the edge's membership in rooms' fan-out trees (`crate::membership`).
#[derive(Debug, Default)]
pub struct TreeCounters {
    /// Presence records written (puts), each a coalesced update of one room.
    pub presence_writes: AtomicU64,
    /// Presence records deleted (the room's last local participant left).
    pub presence_deletes: AtomicU64,
    /// Presence writes or deletes that failed (retried on the next round).
    pub presence_failures: AtomicU64,
    /// Rooms whose tree position this edge follows now.
    pub rooms_followed: AtomicI64,
    /// Media parent changes the tree follower handed to the data plane.
    pub parent_changes: AtomicU64,
    /// Tree positions or parent presence records that did not parse (treated as "origin").
    pub malformed_records: AtomicU64,
    /// Watches of tree positions or presence records that broke and were resynchronised.
    pub watch_resyncs: AtomicU64,
}

/// Everything `/metrics` shows.
#[derive(Debug, Default)]
pub struct Metrics {
    pub media: MediaCounters,
    /// How long client media datagrams stay in the edge: from the kernel's arrival stamp to
    /// the moment the copies they caused were handed to the kernel to send (socket queue,
    /// decryption, forwarding and encryption, batching): `kcs_media_residence_seconds`.
    pub residence: ResidenceTotals,
    /// How long cascade datagrams stay in the edge: `kcs_cascade_residence_seconds`.
    pub cascade_residence: CascadeResidence,
    pub participants: AtomicI64,
    pub publications: AtomicI64,
    pub subscriptions: AtomicI64,
    pub rooms: AtomicI64,
    pub ws_connections: AtomicI64,
    /// Participants whose signaling connection dropped, kept for resuming.
    pub ws_resumable: AtomicI64,
    /// Cascade link media counted outside the shards (link readers and senders).
    pub cascade: CascadeLinkCounters,
    /// Presence records and tree following (cluster mode with etcd).
    pub tree: TreeCounters,
    /// Signaling and HTTP inputs rejected, by reason code.
    rejected: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Links to origins (cluster mode; all zero with an in-process origin).
    pub uplink: std::sync::Arc<crate::uplink::UplinkMetrics>,
}

impl Metrics {
    /// Folds a shard's counters in and zeroes them.
    pub fn absorb(&self, c: &mut ShardCounters) {
        self.media.absorb(c);
    }

    /// Counts one rejected signaling/HTTP input by its error code (cold path).
    pub fn reject(&self, code: &str) {
        // A poisoned lock only means a panic elsewhere mid-increment; the map is still usable.
        let mut m = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(code.to_string()).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        self.media.render(&mut out);
        let name = "kcs_media_residence_seconds";
        histogram_header(
            &mut out,
            name,
            "time from a client media datagram's arrival (kernel stamp) to the hand-off of the copies it caused to the kernel",
        );
        let (buckets, sum) = self.residence.load();
        histogram_series(&mut out, name, "", &buckets, sum);
        let name = "kcs_cascade_residence_seconds";
        histogram_header(&mut out, name, CASCADE_RESIDENCE_HELP);
        for (to, totals) in [
            ("links", &self.cascade_residence.links),
            ("subscribers", &self.cascade_residence.subscribers),
        ] {
            let (buckets, sum) = totals.load();
            histogram_series(&mut out, name, &format!("to=\"{to}\""), &buckets, sum);
        }
        let name = "kcs_cascade_shard_wait_seconds";
        histogram_header(
            &mut out,
            name,
            "time from a cascade datagram's delivery by quinn to its room's shard taking it from the inbox (the wait part of kcs_cascade_residence_seconds)",
        );
        let (buckets, sum) = self.cascade_residence.shard_wait.load();
        histogram_series(&mut out, name, "", &buckets, sum);
        for (name, help, v) in [
            (
                "participants",
                "participants connected to this edge",
                &self.participants,
            ),
            (
                "publications",
                "tracks published on this edge",
                &self.publications,
            ),
            (
                "subscriptions",
                "track subscriptions on this edge",
                &self.subscriptions,
            ),
            ("rooms", "rooms with participants on this edge", &self.rooms),
            (
                "ws_connections",
                "open signaling WebSockets",
                &self.ws_connections,
            ),
            (
                "ws_resumable",
                "participants whose signaling connection dropped, kept 30 s for reconnect:attempt",
                &self.ws_resumable,
            ),
        ] {
            let _ = writeln!(out, "# HELP kcs_{name} {help}");
            let _ = writeln!(out, "# TYPE kcs_{name} gauge");
            let _ = writeln!(out, "kcs_{name} {}", v.load(Relaxed));
        }
        for (name, help, v) in [
            (
                "cascade_link_send_failures_total",
                "datagrams to cascade links dropped (link gone or QUIC send buffer full)",
                &self.cascade.send_failures,
            ),
            (
                "cascade_unsolicited_datagrams_total",
                "datagrams from cascade links on flows this edge did not subscribe, or malformed",
                &self.cascade.unsolicited,
            ),
            (
                "cascade_shard_overflow_total",
                "relayed packets dropped because the shard inbox was full",
                &self.cascade.shard_overflow,
            ),
            (
                "cascade_child_links_accepted_total",
                "links from child edges accepted",
                &self.cascade.child_links_accepted,
            ),
            (
                "cascade_child_links_refused_total",
                "incoming cascade links refused (handshake failed, not an edge, protocol error)",
                &self.cascade.child_links_refused,
            ),
            (
                "cascade_subscribes_refused_total",
                "subscribes from peers refused (unknown room or track)",
                &self.cascade.subscribes_refused,
            ),
            (
                "cascade_refusals_received_total",
                "subscribes this edge sent that upstream refused (retried)",
                &self.cascade.refusals_received,
            ),
            (
                "cascade_parent_link_connects_total",
                "links to parent edges established (first and reconnects)",
                &self.cascade.parent_link_connects,
            ),
            (
                "cascade_parent_link_failures_total",
                "failed attempts to dial a parent edge",
                &self.cascade.parent_link_failures,
            ),
            (
                "cascade_parent_fallbacks_total",
                "rooms whose media fell back to the origin when their parent edge's link dropped",
                &self.cascade.parent_fallbacks,
            ),
            (
                "cascade_layer_demands_sent_total",
                "layer_demand messages sent upstream (the layers of relayed tracks wanted here)",
                &self.cascade.layer_demands_sent,
            ),
            (
                "cascade_layer_demand_failures_total",
                "layer demands dropped: the cascade's request queue or the link's control queue was full or closed",
                &self.cascade.layer_demand_failures,
            ),
            (
                "tree_presence_writes_total",
                "presence records written to etcd (coalesced per room)",
                &self.tree.presence_writes,
            ),
            (
                "tree_presence_deletes_total",
                "presence records deleted (a room's last local participant left)",
                &self.tree.presence_deletes,
            ),
            (
                "tree_presence_failures_total",
                "presence writes or deletes that failed (retried)",
                &self.tree.presence_failures,
            ),
            (
                "tree_parent_changes_total",
                "media parent changes taken from rooms' fan-out trees in etcd",
                &self.tree.parent_changes,
            ),
            (
                "tree_malformed_records_total",
                "tree positions or presence records that did not parse (treated as the origin)",
                &self.tree.malformed_records,
            ),
            (
                "tree_watch_resyncs_total",
                "tree or presence watches that broke and were read again",
                &self.tree.watch_resyncs,
            ),
        ] {
            let _ = writeln!(out, "# HELP kcs_{name} {help}");
            let _ = writeln!(out, "# TYPE kcs_{name} counter");
            let _ = writeln!(out, "kcs_{name} {}", v.load(Relaxed));
        }
        let name = "kcs_cascade_relayed_datagrams_in_total";
        let _ = writeln!(
            out,
            "# HELP {name} datagrams of relayed tracks received from cascade links, by simulcast layer"
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (layer, v) in self.cascade.relayed_datagrams_by_layer.iter().enumerate() {
            let v = v.load(Relaxed);
            if v > 0 || layer < 3 {
                let _ = writeln!(out, "{name}{{layer=\"{layer}\"}} {v}");
            }
        }
        for (name, help, v) in [
            (
                "cascade_child_links",
                "child edges of rooms' fan-out trees linked to this edge",
                &self.cascade.child_links,
            ),
            (
                "cascade_parent_links",
                "links to parent edges of rooms' fan-out trees that are up",
                &self.cascade.parent_links,
            ),
            (
                "tree_rooms_followed",
                "rooms whose fan-out tree position this edge follows in etcd",
                &self.tree.rooms_followed,
            ),
        ] {
            let _ = writeln!(out, "# HELP kcs_{name} {help}");
            let _ = writeln!(out, "# TYPE kcs_{name} gauge");
            let _ = writeln!(out, "kcs_{name} {}", v.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP kcs_signaling_rejected_total signaling and HTTP inputs rejected, by error code"
        );
        let _ = writeln!(out, "# TYPE kcs_signaling_rejected_total counter");
        let m = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        for (code, n) in m.iter() {
            let _ = writeln!(out, "kcs_signaling_rejected_total{{code=\"{code}\"}} {n}");
        }
        drop(m);
        let u = &self.uplink;
        let _ = writeln!(
            out,
            "# HELP kcs_origin_links cascade links to origins that are up"
        );
        let _ = writeln!(out, "# TYPE kcs_origin_links gauge");
        let _ = writeln!(out, "kcs_origin_links {}", u.links_up.load(Relaxed));
        for (name, help, v) in [
            (
                "origin_link_connects_total",
                "cascade links to origins established (first and reconnects)",
                &u.connects,
            ),
            (
                "origin_link_connect_failures_total",
                "failed attempts to dial an origin",
                &u.connect_failures,
            ),
            (
                "origin_requests_failed_total",
                "room requests failed because their origin was unreachable",
                &u.requests_failed,
            ),
            (
                "uplink_rooms_moved_total",
                "rooms moved to another origin because their placement changed",
                &u.rooms_moved,
            ),
        ] {
            let _ = writeln!(out, "# HELP kcs_{name} {help}");
            let _ = writeln!(out, "# TYPE kcs_{name} counter");
            let _ = writeln!(out, "kcs_{name} {}", v.load(Relaxed));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_counters_fold_into_rendered_text() {
        let m = Metrics::default();
        let mut c = ShardCounters {
            packets_in: 3,
            rejected_srtp: 2,
            ..Default::default()
        };
        m.absorb(&mut c);
        assert_eq!(c.packets_in, 0, "absorbed counters are zeroed");
        c.packets_in = 1;
        m.absorb(&mut c);
        m.reject("bad_request");
        m.reject("bad_request");
        m.participants.store(4, Relaxed);
        let text = m.render();
        assert!(text.contains("kcs_rtp_packets_in_total 4\n"));
        assert!(text.contains("kcs_rejected_srtp_total 2\n"));
        assert!(text.contains("kcs_signaling_rejected_total{code=\"bad_request\"} 2\n"));
        assert!(text.contains("kcs_participants 4\n"));
        assert!(text.contains("# TYPE kcs_rtp_packets_in_total counter"));
    }

    #[test]
    fn residence_buckets_are_cumulative_with_bounds_inclusive() {
        use std::time::Duration;
        let m = Metrics::default();
        let mut s = Residence::default();
        for us in [50, 100, 101, 4_999, 5_000, 5_001, 200_000] {
            s.observe(Duration::from_micros(us));
        }
        m.residence.absorb(&mut s);
        m.residence.absorb(&mut s); // absorbed tallies are zeroed
        let text = m.render();
        let line = |le: &str| {
            let key = format!("kcs_media_residence_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"))
                .to_string()
        };
        assert_eq!(line("0.0001"), "2", "50 and 100 us");
        assert_eq!(line("0.00025"), "3");
        assert_eq!(line("0.005"), "5", "up to and including 5 ms");
        assert_eq!(line("0.0075"), "6");
        assert_eq!(line("0.1"), "6");
        assert_eq!(line("+Inf"), "7");
        assert!(text.contains("kcs_media_residence_seconds_count 7\n"));
        assert!(text.contains("kcs_media_residence_seconds_sum 0.215251\n"));
        // The cascade histogram's series carry their `to` label before `le`.
        let mut c = Residence::default();
        c.observe(Duration::from_micros(80));
        m.cascade_residence.links.absorb(&mut c);
        c.observe(Duration::from_micros(1_500));
        m.cascade_residence.shard_wait.absorb(&mut c);
        let text = m.render();
        for line in [
            "# TYPE kcs_cascade_residence_seconds histogram\n",
            "kcs_cascade_residence_seconds_bucket{to=\"links\",le=\"0.0001\"} 1\n",
            "kcs_cascade_residence_seconds_bucket{to=\"links\",le=\"+Inf\"} 1\n",
            "kcs_cascade_residence_seconds_sum{to=\"links\"} 0.00008\n",
            "kcs_cascade_residence_seconds_count{to=\"links\"} 1\n",
            "kcs_cascade_residence_seconds_count{to=\"subscribers\"} 0\n",
            "# TYPE kcs_cascade_shard_wait_seconds histogram\n",
            "kcs_cascade_shard_wait_seconds_bucket{le=\"0.001\"} 0\n",
            "kcs_cascade_shard_wait_seconds_bucket{le=\"0.002\"} 1\n",
            "kcs_cascade_shard_wait_seconds_count 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
